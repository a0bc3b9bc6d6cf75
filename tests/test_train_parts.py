"""The trainer's parts that need no process group: launch checks, DeepSpeed config, optimizer groups, schedule,
world info, selection score. Bad launches must fail before any process group starts, naming every problem."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from egmf.distributed import WorldInfo, free_port, world_info_from_env
from egmf.errors import ConfigError
from egmf.train import main as train_entry
from egmf.train.config import load_config
from egmf.train.ds_config import resolve_ds_config
from egmf.train.evaluation import PredictionRow, score_rows, scored_prediction, selection_score
from egmf.train.gate_watch import dataset_gates, newly_merged, pair_spreads
from egmf.train.optim import WarmupCosine, param_groups
from egmf.train.stop_signal import StopSignal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO2 = os.path.join(REPO, "ds_configs", "zero2.json")


def run_main(capsys, *argv) -> tuple[int, str]:
    code = train_entry.main(list(argv))
    return code, capsys.readouterr().err


def test_unknown_keys_and_bad_values_fail_before_any_process_group(capsys, tmp_path):
    code, err = run_main(
        capsys,
        f"--train.output_dir={tmp_path}",
        "--optim.lr=1e-3",
        "--optim.grad_accum=0",
        "--eval.modes=['beam']",
        "--checkpoint.keep_last=0",
        "--train.collective_timeout_s=0",
        "--prompt.pack_tokens=-1",
    )
    assert code == 2
    for name in ("unknown key optim.lr", "optim.grad_accum", "eval.modes", "checkpoint.keep_last"):
        assert name in err
    assert "train.collective_timeout_s must be >= 1" in err and "prompt.pack_tokens must be >= 0" in err
    assert not dist.is_initialized()
    assert not os.listdir(tmp_path)  # nothing written


def test_missing_model_and_shards_are_named_together(capsys, tmp_path):
    code, err = run_main(
        capsys,
        "--config",
        os.path.join(REPO, "launch", "recipes", "mosei.toml"),
        f"--llm.path={tmp_path}/no-model",
        f"--data.root={tmp_path}/no-shards",
        f"--train.output_dir={tmp_path}/run",
    )
    assert code == 2
    assert f"{tmp_path}/no-model is not a directory" in err
    assert "no-shards" in err and "mosei" in err
    assert not dist.is_initialized()


def test_eval_select_names_real_metrics(capsys, tmp_path):
    code, err = run_main(capsys, f"--train.output_dir={tmp_path}", '--eval.select={"demo_cls_en/mae" = 1.0}')
    assert code == 2
    assert "demo_cls_en has the metrics acc, wf1" in err


def test_resume_from_a_folder_that_is_no_checkpoint(capsys, tmp_path):
    code, err = run_main(capsys, f"--train.output_dir={tmp_path}", f"--resume={tmp_path}")
    assert code == 2
    assert "is not a complete checkpoint" in err


def write_ds(tmp_path, **changes) -> str:
    with open(ZERO2) as f:
        ds = json.load(f)
    ds.update(changes)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


def test_ds_config_autos_filled_from_the_recipe():
    cfg = load_config(None, ["--data.batch_size=6", "--optim.grad_accum=3", "--optim.clip_grad=0.5"])
    ds = resolve_ds_config(ZERO2, cfg, world_size=4, device_type="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 6
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 6 * 3 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False  # "auto" on a CPU
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] is False
    assert resolve_ds_config(ZERO2, cfg, 4, "cuda")["bf16"]["enabled"] is True


def test_ds_config_half_precision_on_cpu_falls_back_to_float32(tmp_path, caplog):
    path = write_ds(tmp_path, bf16={"enabled": True})
    ds = resolve_ds_config(path, load_config(), 1, "cpu")
    assert ds["bf16"]["enabled"] is False
    assert "not used on CPU ranks" in caplog.text


def test_ds_config_conflicts_are_all_named(tmp_path):
    path = write_ds(
        tmp_path,
        train_micro_batch_size_per_gpu=4,
        optimizer={"type": "Adam"},
        zero_optimization={"stage": 3},
    )
    with pytest.raises(ConfigError) as err:
        resolve_ds_config(path, load_config(None, ["--data.batch_size=8"]), 1, "cpu")
    text = str(err.value)
    assert "train_micro_batch_size_per_gpu is 4 but data.batch_size gives 8" in text
    assert 'remove the "optimizer" section' in text
    assert "stage 3 is not supported" in text


def test_ds_config_missing_or_broken(tmp_path, capsys):
    code, err = run_main(capsys, f"--train.output_dir={tmp_path}", f"--deepspeed={tmp_path}/none.json")
    assert code == 2 and "does not exist" in err
    (tmp_path / "bad.json").write_text("{not json")
    code, err = run_main(capsys, f"--train.output_dir={tmp_path}", f"--deepspeed={tmp_path}/bad.json")
    assert code == 2 and "is not valid JSON" in err


def test_param_groups_split_lr_and_decay():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fusion = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
            self.llm = torch.nn.ModuleDict({"q_proj": torch.nn.ModuleDict({"lora_A": torch.nn.Linear(4, 2)})})
            self.frozen = torch.nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

    cfg = load_config(None, ["--optim.fusion_lr=1e-3", "--optim.lora_lr=5e-4", "--optim.weight_decay=0.1"]).optim
    groups = {g["name"]: g for g in param_groups(Tiny(), cfg)}
    assert set(groups) == {"fusion", "fusion_no_decay", "lora", "lora_no_decay"}
    assert groups["fusion"]["lr"] == 1e-3 and groups["lora"]["lr"] == 5e-4
    assert groups["fusion"]["weight_decay"] == 0.1 and groups["fusion_no_decay"]["weight_decay"] == 0.0
    assert len(groups["fusion"]["params"]) == 1  # the Linear weight; its bias and the LayerNorm are not decayed
    assert len(groups["fusion_no_decay"]["params"]) == 3
    assert sum(len(g["params"]) for g in groups.values()) == 6  # the frozen layer is left out


def test_gate_lr_ratio_gives_the_level2_gate_a_group_of_its_own():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fusion = torch.nn.ModuleDict({"gate": torch.nn.Linear(4, 3), "expert": torch.nn.Linear(4, 4)})

    same = {g["name"] for g in param_groups(Tiny(), load_config(None, []).optim)}
    assert same == {"fusion", "fusion_no_decay"}  # at the default ratio the gate stays with the fusion module
    cfg = load_config(None, ["--optim.fusion_lr=1e-3", "--optim.gate_lr_ratio=0.1"]).optim
    groups = {g["name"]: g for g in param_groups(Tiny(), cfg)}
    assert set(groups) == {"fusion", "fusion_no_decay", "gate", "gate_no_decay"}
    assert groups["gate"]["lr"] == pytest.approx(1e-4) and groups["fusion"]["lr"] == 1e-3
    assert [p.shape for p in groups["gate"]["params"]] == [(3, 4)]  # the gate's weight; its bias is undecayed
    with pytest.raises(ConfigError, match="gate_lr_ratio"):
        load_config(None, ["--optim.gate_lr_ratio=0"])


def test_warmup_then_cosine_to_the_floor():
    schedule = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [round(schedule(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert schedule(4) == pytest.approx(1.0)
    assert schedule(9) == pytest.approx(0.55)
    assert schedule(14) == pytest.approx(0.1) and schedule(100) == pytest.approx(0.1)
    assert all(schedule(s) >= schedule(s + 1) for s in range(4, 20))


def test_world_info_from_each_launcher():
    assert world_info_from_env({}) == WorldInfo(0, 0, 1)
    assert world_info_from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == WorldInfo(3, 1, 4)
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}
    assert world_info_from_env(slurm) == WorldInfo(5, 1, 8)
    # inside an sbatch script but outside srun (no step): one process, not rank 5 of 8
    assert world_info_from_env({k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}) == WorldInfo(0, 0, 1)


CPU_OP_CHECK = """
import logging, sys
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
from egmf.distributed import announce_cpu_comm_build
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
announce_cpu_comm_build()
ShareMemCommBuilder().load(verbose=False)  # what deepspeed.init_distributed builds on a CPU
print("-- built --", flush=True)
announce_cpu_comm_build()
"""


@pytest.mark.slow
def test_the_cpu_communication_op_build_is_announced_and_happens_once_per_extensions_folder(tmp_path):
    """DeepSpeed compiles its CPU op silently for a minute or more: the first job in a TORCH_EXTENSIONS_DIR says so,
    and later jobs there (slurm/env.sh keeps one per environment, so requeues too) find it built."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", CPU_OP_CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = done.stdout.split("-- built --")
    assert "building DeepSpeed's CPU communication op (deepspeed_shm_comm)" in before and str(tmp_path) in before
    assert "building" not in after
    again = subprocess.run([sys.executable, "-c", CPU_OP_CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "building" not in again.stdout


SHM_RANK = """
import sys, torch, deepspeed.comm
from egmf.distributed import close_distributed, init_distributed, world_info_from_env
init_distributed(world_info_from_env(), torch.device("cpu"))
torch.distributed.barrier()  # both ranks past their unlink
mapped = [line for line in open("/proc/self/maps") if "deepspeed_allreduce_buffer" in line]
total = torch.tensor([float(deepspeed.comm.get_rank() + 1)])
deepspeed.comm.inference_all_reduce(total)  # DeepSpeed's shared-memory path, after the names are gone
close_distributed()
print(len(mapped), all(line.rstrip().endswith("(deleted)") for line in mapped), float(total))
"""


@pytest.mark.slow
def test_cpu_all_reduce_workspaces_are_unlinked_once_mapped():
    """DeepSpeed's CPU all-reduce creates a ~70 MB shared-memory file per rank and never removes it; each rank
    unlinks its own once all ranks have mapped them, so collectives still work and nothing stays in /dev/shm."""
    port = str(free_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", SHM_RANK],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in range(2)
    ]
    outputs = [rank.communicate(timeout=600) for rank in ranks]
    for rank, (stdout, stderr) in zip(ranks, outputs, strict=True):
        assert rank.returncode == 0, stderr[-3000:]
        mapped, all_deleted, total = stdout.split()[-3:]
        assert int(mapped) >= 2 and all_deleted == "True"  # its own workspace and its peer's, both unlinked
        assert float(total) == 3.0
    assert not [name for name in os.listdir("/dev/shm") if f"_127.0.0.1_{port}_" in name]


def row(dataset, mode, target, prediction, i=0):
    return PredictionRow(f"{dataset}_{i}", dataset, "valid", mode, target, prediction, str(prediction))


def test_scores_and_selection():
    rows = [
        row("demo_cls_en", "generate", "joy", "joy", 0),
        row("demo_cls_en", "generate", "anger", None, 1),  # unparseable counts as wrong
        row("demo_reg_en", "generate", 1.0, 0.5, 0),
        row("demo_reg_en", "generate", -1.0, None, 1),  # unparseable: scored as +3, the farthest end of [-3, 3]
        row("demo_reg_en", "generate", 2.0, 1.0, 2),
    ]
    results = score_rows(rows)
    assert results["demo_cls_en"]["generate"]["acc"] == 0.5
    assert results["demo_cls_en"]["generate"]["unparseable"] == 1
    assert results["demo_reg_en"]["generate"]["mae"] == pytest.approx((0.5 + 4.0 + 1.0) / 3)
    assert results["demo_reg_en"]["generate"]["has0_acc2"] == pytest.approx(2 / 3)  # on the wrong side of 0
    assert results["demo_reg_en"]["generate"]["samples"] == 3
    assert results["demo_reg_en"]["generate"]["unparseable"] == 1
    eval_cfg = load_config(None, ["--eval.select_mode=generate"]).eval
    wf1 = results["demo_cls_en"]["generate"]["wf1"]
    mae = results["demo_reg_en"]["generate"]["mae"]
    assert selection_score(results, eval_cfg, ["demo_cls_en", "demo_reg_en"]) == pytest.approx((wf1 - mae) / 2)
    eval_cfg.select = {"demo_reg_en/mae": -2.0}
    assert selection_score(results, eval_cfg, ["demo_cls_en", "demo_reg_en"]) == pytest.approx(-2 * mae)
    assert scored_prediction("demo_reg_zh", row("demo_reg_zh", "generate", 0.4, None)) == -1.0
    assert scored_prediction("demo_reg_zh", row("demo_reg_zh", "generate", 0.0, None)) == -1.0  # a tie: either end
    assert scored_prediction("demo_reg_zh", row("demo_reg_zh", "generate", 0.4, 0.2)) == 0.2


def test_the_test_split_stays_out_of_periodic_evaluation_unless_asked():
    eval_cfg = load_config(None).eval
    assert eval_cfg.splits_in_training() == ["valid"] and eval_cfg.splits == ["valid", "test"]
    assert load_config(None, ["--eval.periodic_splits=['valid', 'test']"]).eval.splits_in_training() == [
        "valid",
        "test",
    ]
    with pytest.raises(ConfigError, match=r"eval.periodic_splits \['test'\] must hold eval.select_split valid"):
        load_config(None, ["--eval.periodic_splits=['test']"])
    assert selection_score({}, eval_cfg, ["demo_reg_en"]) == -math.inf


def test_stop_signals_set_a_flag_and_the_exit_code():
    """SIGUSR1 (Slurm's time-limit warning) and SIGTERM only set a flag; the exit code names the first one."""
    import signal

    stop = StopSignal().install()
    try:
        assert not stop.received
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received and stop.signum == signal.SIGUSR1 and stop.exit_code == 138
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_close_run_ends_only_a_run_left_running(tmp_path, capsys):
    """What the job script does when a rank was killed outright: end the recorded run FAILED, once."""
    from mlflow.tracking import MlflowClient

    from egmf.tracking import write_run_record

    out = str(tmp_path / "out")
    args = [f"--train.output_dir={out}", "--close-run=FAILED"]
    assert train_entry.main(args) == 0
    assert "no MLflow run recorded" in capsys.readouterr().out

    uri = f"sqlite:///{out}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("egmf")).info.run_id
    os.makedirs(os.path.join(out, "failures"))
    with open(os.path.join(out, "failures", "rank1.txt"), "w") as f:
        f.write("n2\nTraceback ...\nRuntimeError: Connection closed by peer\n")
    write_run_record(out, type("Tracker", (), {"uri": uri, "run_id": run_id})())

    assert train_entry.main(args) == 0
    assert f"MLflow run {run_id} was still RUNNING; marked FAILED" in capsys.readouterr().out
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == "rank1.txt: RuntimeError: Connection closed by peer"
    assert train_entry.main(args) == 0
    assert "already ended FAILED" in capsys.readouterr().out


def test_help_lists_every_section_and_key_with_default_and_doc(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_entry.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for section in ("data", "fusion", "prompt", "llm", "lora", "optim", "train", "eval", "checkpoint", "mlflow"):
        assert f"\n[{section}]" in out, section
    assert '--data.root="shards/demo"' in out and "Shard root (a folder" in out
    assert "--optim.lora_lr=0.0002\n      Peak learning rate of the LoRA adapters." in out
    assert "--eval.final=true" in out and "--mlflow.enabled=true" in out


def test_console_scripts_run_after_install(demo_root):
    """`pip install -e .` (make) puts one command per job on the venv's PATH."""
    import subprocess
    import sys

    bin_dir = os.path.dirname(sys.executable)
    for command in ("egmf-train", "egmf-evaluate"):
        done = subprocess.run([os.path.join(bin_dir, command), "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and f"usage: {command}" in done.stdout, done.stderr[-2000:]
    done = subprocess.run(
        [os.path.join(bin_dir, "egmf-shards"), "inspect", demo_root], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "== demo_cls_en/train" in done.stdout, done.stderr[-2000:]


def test_exit_code_2_only_for_problems_found_before_training(capsys, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        code, err = run_main(capsys, f"--train.output_dir={tmp_path}", "--train.device=cuda")
        assert code == 2 and "torch sees no CUDA device" in err
    code, err = run_main(
        capsys, f"--train.output_dir={tmp_path}", "--prompt.label_words={demo_cls_en = {joy = 'a', anger = 'a'}}"
    )
    assert code == 2 and "prompt.label_words for demo_cls_en are not distinct" in err

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a bad input")

    monkeypatch.setattr("egmf.train.ds_config.resolve_ds_config", broken)
    with pytest.raises(RuntimeError, match="a bug, not a bad input"):  # a traceback (exit 1), never "bad config"
        train_entry.main([f"--train.output_dir={tmp_path}"])
    assert not dist.is_initialized()


def test_ranges_are_reported_in_one_format():
    from egmf.config import range_problems
    from egmf.train.config import OptimConfig

    optim = OptimConfig(fusion_lr=0.0, beta1=1.5, grad_accum=0, min_lr_ratio=2.0)
    assert optim.problems() == [
        "optim.fusion_lr must be > 0, got 0.0",
        "optim.beta1 must be in [0, 1), got 1.5",
        "optim.min_lr_ratio must be in [0, 1], got 2.0",
        "optim.grad_accum must be >= 1, got 0",
    ]
    assert range_problems("eval", OptimConfig(), ["clip_grad"], high=0.5) == ["eval.clip_grad must be <= 0.5, got 1.0"]


def tagging_trainer():
    """A trainer (not started) with the three experts, whose tracker keeps the tags it is given."""
    from egmf.tracking import NullTracker
    from egmf.train.trainer import Trainer

    class Tags(NullTracker):
        def __init__(self):
            self.tags = {}

        def set_tags(self, tags):
            self.tags.update(tags)

    trainer = Trainer(load_config(), {}, WorldInfo(0, 0, 1), torch.device("cpu"))
    trainer.tracker, trainer.expert_names = Tags(), ["local", "semantic", "global"]
    return trainer


def test_a_collapsed_gate_is_warned_about_once_and_tagged(caplog):
    """One expert above 0.95 for three logging windows in a row: a warning that says what it means and what to
    change, and a run tag; a window below the line starts the count again."""
    import logging

    trainer = tagging_trainer()
    collapsed = {"gate/local": 0.97, "gate/semantic": 0.02, "gate/global": 0.01}
    balanced = {"gate/local": 0.5, "gate/semantic": 0.3, "gate/global": 0.2}
    with caplog.at_level(logging.WARNING, logger="egmf.train"):
        for metrics in (collapsed, collapsed, balanced, collapsed, collapsed):
            trainer.watch_gate_collapse(metrics)
        assert not trainer.tracker.tags and "collapsed" not in caplog.text
        for _ in range(3):
            trainer.watch_gate_collapse(collapsed)  # the third window in a row, then a fourth: one warning
    assert caplog.text.count("has collapsed to one expert") == 1
    assert "fusion.balance_coef" in caplog.text and "local expert 0.97" in caplog.text
    assert trainer.tracker.tags["gate_collapse"].startswith("local 0.970")


def gate_window(**by_dataset) -> dict[str, float]:
    """A logging window's gate/DATASET/EXPERT metrics from {dataset: (local, semantic, global)}."""
    experts = ("local", "semantic", "global")
    metrics = {f"gate/{d}/{e}": w for d, weights in by_dataset.items() for e, w in zip(experts, weights, strict=True)}
    return metrics | {"gate/argmax_share/local": 1.0, "gate/local": 0.5}  # keys the watch must pass over


def test_the_gate_watch_finds_datasets_merged_after_they_were_told_apart():
    experts = ["local", "semantic", "global"]
    apart = gate_window(a=(0.6, 0.2, 0.2), b=(0.2, 0.6, 0.2), c=(0.34, 0.33, 0.33))
    merged = gate_window(a=(0.35, 0.35, 0.30), b=(0.3505, 0.3495, 0.30), c=(0.2, 0.2, 0.6))
    assert dataset_gates(merged, experts)["b"] == [0.3505, 0.3495, 0.30]
    told_apart, counts = [], {}
    found = [newly_merged(pair_spreads(dataset_gates(w, experts)), told_apart, counts) for w in [apart] + [merged] * 4]
    assert found == [[], [], [], ["a & b"], []]  # the third merged window in a row, once
    assert "a & b" not in told_apart  # reported again only once the gate tells the pair apart again
    found = [newly_merged(pair_spreads(dataset_gates(w, experts)), told_apart, counts) for w in [apart] + [merged] * 3]
    assert found == [[], [], [], ["a & b"]]

    # a gate that never told two datasets apart (the uniform start) is not dead; a window without one of the two
    # datasets keeps the pair's count
    uniform = gate_window(a=(1 / 3,) * 3, b=(1 / 3,) * 3)
    told_apart, counts = [], {}
    assert not any(newly_merged(pair_spreads(dataset_gates(uniform, experts)), told_apart, counts) for _ in range(5))
    told_apart, counts = ["a & b"], {}
    only_a = gate_window(a=(0.35, 0.35, 0.30))
    windows = [merged, merged, only_a, merged]
    found = [newly_merged(pair_spreads(dataset_gates(w, experts)), told_apart, counts) for w in windows]
    assert found[-1] == ["a & b"]


def test_a_dead_gate_is_warned_about_and_tagged(caplog):
    import logging

    trainer = tagging_trainer()
    with caplog.at_level(logging.WARNING, logger="egmf.train"):
        trainer.watch_dead_gate(gate_window(a=(0.6, 0.2, 0.2), b=(0.2, 0.6, 0.2)))
        for _ in range(3):
            trainer.watch_dead_gate(gate_window(a=(0.35, 0.35, 0.30), b=(0.35, 0.35, 0.30)))
    assert caplog.text.count("the same weights") == 1 and "fusion.gate_router = 'norm_mlp'" in caplog.text
    assert trainer.tracker.tags["gate_dead"].startswith("a & b at step 0")
    assert trainer.state.gate_merged_windows == {"a & b": 3}  # saved with the run's checkpoints


def test_mistyped_demo_paths_are_errors_not_fresh_assets(capsys, tmp_path, demo_root, tiny_llm):
    """Demo assets are built only at the demo recipe's own locations: a mistyped model or shard path elsewhere
    stops the run before anything is written, instead of training a fresh random model or writing demo shards."""
    typo = tmp_path / "typo"
    out = f"--train.output_dir={tmp_path}/run"
    code, err = run_main(capsys, out, f"--data.root={demo_root}", f"--llm.path={typo}")
    assert code == 2 and f"llm.path {typo} is not a directory" in err
    code, err = run_main(capsys, out, f"--data.root={typo}", f"--llm.path={tiny_llm}")
    assert code == 2 and f"cannot read {typo}/demo_cls_en/train/manifest.json" in err
    assert not typo.exists() and not (tmp_path / "run").exists()


def test_a_busy_rendezvous_port_is_named_with_the_fix(demo_root, tiny_llm, tmp_path):
    """Rank 0 of a 2-rank job whose MASTER_PORT another process holds: exit 2 with the port and how to choose
    another, not a traceback."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        argv = [f"--data.root={demo_root}", f"--llm.path={tiny_llm}", f"--train.output_dir={tmp_path}/run"]
        argv += ["--train.steps=2", "--eval.every=0", "--optim.warmup_steps=1"]
        done = subprocess.run(
            [sys.executable, "launch/train.py", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"the rendezvous port 127.0.0.1:{port} is already in use" in done.stderr and "--master_port" in done.stderr


def test_the_window_averages_the_score_read_over_the_batches_that_have_it():
    """train/aux/score_read: the score read's loss over the score batches of the window, not diluted by the class
    batches that have none, and absent from a window without score batches."""
    from egmf.model.egmf_model import EGMFOutput
    from egmf.train.throughput import Window

    def output(**aux):
        loss = torch.tensor(1.0)
        return EGMFOutput(loss, loss, {k: torch.tensor(v) for k, v in aux.items()}, None, {}, num_tokens=10)

    window = Window([], ["demo_cls_en", "demo_reg_en"])
    window.add_micro_batch(output(balance=1.0, z=0.0), "demo_cls_en", samples=4)
    assert "train/aux/score_read" not in window.metrics(1, torch.device("cpu"), 0.0, None)
    window.add_micro_batch(output(balance=1.0, z=0.0, score_read=0.3), "demo_reg_en", samples=4)
    window.add_micro_batch(output(balance=1.0, z=0.0, score_read=0.5), "demo_reg_en", samples=4)
    assert abs(window.metrics(1, torch.device("cpu"), 0.0, None)["train/aux/score_read"] - 0.4) < 1e-6
