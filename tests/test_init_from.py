"""train.init_from: a new run starts from a trained model's adapter and fusion weights; a dataset the saved model
did not train gets a new front end; a saved model that does not fit is refused with the setting to change."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model_state_dict
from run_helpers import REPO, SMALL_EVAL
from safetensors.torch import load_file, save_file

from egmf.errors import CheckpointError, ConfigError
from egmf.train.config import load_config
from egmf.train.main import DEFAULT_RECIPE
from egmf.train.preflight import preflight
from egmf.train.trainer import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def one_set_best(train_shards, tiny_llm, tmp_path_factory) -> str:
    """best/ of a 2-step run that trained demo_cls_en alone."""
    out = str(tmp_path_factory.mktemp("one-set") / "run")
    args = [f"--data.root={train_shards}", f"--llm.path={tiny_llm}", f"--train.output_dir={out}", "--train.steps=2"]
    args += ["--data.train={demo_cls_en=1.0}", "--data.batch_size=4", "--data.num_workers=0", *SMALL_EVAL]
    args += ["--optim.warmup_steps=1", "--mlflow.system_metrics=false", "--eval.batch_size=24", "--eval.every=0"]
    done = subprocess.run([sys.executable, "launch/train.py", *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-5000:]
    return os.path.join(out, "best")


def config(train_shards, tiny_llm, *extra):
    """The demo recipe, as the saved run trained with it, on the test shards."""
    return load_config(DEFAULT_RECIPE, [f"--data.root={train_shards}", f"--llm.path={tiny_llm}", *extra])


@pytest.mark.slow
def test_a_run_starts_from_the_saved_weights_and_new_sets_get_new_front_ends(one_set_best, train_shards, tiny_llm):
    saved = load_file(os.path.join(one_set_best, "fusion.safetensors"))
    fresh = build_model(config(train_shards, tiny_llm, "--train.seed=3"), CPU)
    model = build_model(config(train_shards, tiny_llm, "--train.seed=3", f"--train.init_from={one_set_best}"), CPU)
    own, before = model.fusion.state_dict(), fresh.fusion.state_dict()

    taken = [k for k in saved if k != "gate.usage"]
    assert taken and all(torch.equal(own[k], saved[k]) for k in taken)  # shared weights and demo_cls_en's front end
    assert any(not torch.equal(saved[k], before[k]) for k in taken)  # ... which a fresh model does not have
    new_front = [k for k in own if k.startswith("audio_front.demo_reg_zh.")]
    assert new_front and all(torch.equal(own[k], before[k]) for k in new_front)  # never trained: as initialised
    assert own["gate.usage"].shape == (4, len(model.fusion.cfg.experts))
    assert torch.allclose(own["gate.usage"], torch.full_like(own["gate.usage"], 1 / len(model.fusion.cfg.experts)))

    adapter = load_file(os.path.join(one_set_best, "adapter", "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model.llm)
    assert adapter.keys() == loaded.keys() and all(torch.equal(loaded[k], adapter[k]) for k in adapter)


@pytest.mark.slow
def test_the_adapter_can_start_new_while_the_fusion_weights_are_taken(one_set_best, train_shards, tiny_llm):
    fresh = build_model(config(train_shards, tiny_llm, "--train.seed=3"), CPU)
    start = [f"--train.init_from={one_set_best}", "--train.init_from_adapter=false"]
    model = build_model(config(train_shards, tiny_llm, "--train.seed=3", *start), CPU)
    saved = load_file(os.path.join(one_set_best, "fusion.safetensors"))
    own = model.fusion.state_dict()
    assert all(torch.equal(own[k], saved[k]) for k in saved if k != "gate.usage")
    adapter, new = get_peft_model_state_dict(model.llm), get_peft_model_state_dict(fresh.llm)
    trained = load_file(os.path.join(one_set_best, "adapter", "adapter_model.safetensors"))
    assert all(torch.equal(adapter[k], new[k]) for k in new)  # as a fresh run's: B = 0, the base model's answers
    assert any(not torch.equal(adapter[k], trained[k]) for k in trained)


@pytest.mark.slow
def test_a_saved_model_that_does_not_fit_is_refused_with_the_setting_to_change(one_set_best, train_shards, tiny_llm):
    start = f"--train.init_from={one_set_best}"
    with pytest.raises(ConfigError, match=r"another shape.*fusion config \(width"):
        build_model(config(train_shards, tiny_llm, start, "--fusion.width=64"), CPU)
    with pytest.raises(ConfigError, match="set fusion.semantic_alignment = true"):
        build_model(config(train_shards, tiny_llm, start, "--fusion.semantic_alignment=false"), CPU)
    with pytest.raises(ConfigError, match="has LoRA adapter and this run has none; set lora.enabled"):
        build_model(config(train_shards, tiny_llm, start, "--lora.enabled=false"), CPU)
    lora_layers = r"adapter does not fit this model's LoRA layers \({} missing.*{} unexpected.*set lora.rank and lora"
    with pytest.raises(ConfigError, match=lora_layers.format("4", "0")):  # saved on q_proj, v_proj
        build_model(config(train_shards, tiny_llm, start, "--lora.target_modules=['q_proj','v_proj','up_proj']"), CPU)
    with pytest.raises(ConfigError, match=lora_layers.format("0", "4")):
        build_model(config(train_shards, tiny_llm, start, "--lora.target_modules=['q_proj']"), CPU)
    with pytest.raises(ConfigError, match=r"adapter does not fit this model \(.*size mismatch.*set lora.rank"):
        build_model(config(train_shards, tiny_llm, start, "--lora.rank=2"), CPU)


@pytest.mark.slow
def test_a_front_end_trained_on_other_feature_dimensions_is_refused(one_set_best, train_shards, tiny_llm, tmp_path):
    other = shutil.copytree(one_set_best, tmp_path / "best")
    state = load_file(other / "fusion.safetensors")
    for key in [k for k in state if k.startswith("audio_front.demo_cls_en.")]:  # as if its audio had 20 dimensions
        state[key] = torch.zeros(*[20 if n == 16 else n for n in state[key].shape])
    save_file(state, other / "fusion.safetensors")
    with pytest.raises(ConfigError, match="front ends of demo_cls_en were trained on features of other dimensions"):
        build_model(config(train_shards, tiny_llm, f"--train.init_from={other}"), CPU)


@pytest.mark.slow
def test_the_score_read_is_taken_left_out_or_started_new(one_set_best, train_shards, tiny_llm, tmp_path):
    """A first phase trained with the score read can start a second without it, and the other way round."""
    read = ["--fusion.score_read_coef=1.0", "--train.seed=3"]
    fresh = build_model(config(train_shards, tiny_llm, *read), CPU).fusion.state_dict()
    model = build_model(config(train_shards, tiny_llm, *read, f"--train.init_from={one_set_best}"), CPU)
    own = model.fusion.state_dict()
    assert {"score_read.weight", "score_read.bias"} <= own.keys()  # the saved model had none: as initialised
    assert all(torch.equal(own[k], fresh[k]) for k in ("score_read.weight", "score_read.bias"))

    with_read = shutil.copytree(one_set_best, tmp_path / "best")
    state = load_file(with_read / "fusion.safetensors")
    state |= {"score_read.weight": torch.full_like(own["score_read.weight"], 0.5), "score_read.bias": torch.ones(1)}
    save_file(state, with_read / "fusion.safetensors")
    taken = build_model(config(train_shards, tiny_llm, *read, f"--train.init_from={with_read}"), CPU)
    assert torch.equal(taken.fusion.state_dict()["score_read.bias"], torch.ones(1))
    dropped = build_model(config(train_shards, tiny_llm, f"--train.init_from={with_read}"), CPU).fusion.state_dict()
    assert "score_read.weight" not in dropped  # a run without the read leaves it out, and takes the rest
    assert all(torch.equal(dropped[k], state[k]) for k in dropped if k in state and k != "gate.usage")


def test_preflight_names_a_folder_that_holds_no_saved_model(train_shards, tiny_llm, tmp_path):
    cfg = config(train_shards, tiny_llm, f"--train.output_dir={tmp_path / 'out'}", f"--train.init_from={tmp_path}")
    with pytest.raises(ConfigError, match=rf"train.init_from: {tmp_path} is neither a checkpoint"):
        preflight(cfg)


@pytest.mark.slow
def test_a_run_that_resumes_needs_no_init_from_folder(one_set_best, train_shards, tiny_llm, tmp_path):
    """A requeued job resumes from its own checkpoint: the saved model it started from may be gone."""
    run = os.path.dirname(one_set_best)  # a run with a checkpoint to resume
    gone = f"--train.init_from={tmp_path / 'gone'}"
    preflight(config(train_shards, tiny_llm, f"--train.output_dir={run}", gone))
    model = build_model(config(train_shards, tiny_llm, gone), CPU, resuming=True)
    with pytest.raises(CheckpointError, match="is neither a checkpoint"):
        build_model(config(train_shards, tiny_llm, gone), CPU)
    assert model.fusion is not None
