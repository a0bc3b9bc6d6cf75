"""`--plan`: the schedule of the 7B recipes is the same at 1, 8 and 16 GPUs, with a short warm-up and validation
every epoch; degenerate schedules are named; sizes come from manifests when there are any."""

from __future__ import annotations

import itertools
import json

import pytest

from egmf.errors import ConfigError
from egmf.train.config import load_config
from egmf.train.plan import format_plan, make_plan, plan_problems

RECIPES = ("mosei", "sims2", "meld", "cherma", "joint")
UNKNOWN_SIZE = {"cherma": 20000, "joint": 50000}
"""Train samples given with --train-samples where a recipe holds CHERMA, whose public size is not known here."""


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_7b_recipes_hold_their_schedule_at_any_gpu_count(recipe):
    cfg = load_config(f"launch/recipes/{recipe}.toml", ["--data.root=/nonexistent"])
    plans = [make_plan(cfg, world_size, None, UNKNOWN_SIZE.get(recipe)) for world_size in (1, 8, 16)]
    assert {p.global_batch for p in plans} == {64}
    assert [p.grad_accum for p in plans] == [16, 2, 1]
    assert len({(p.steps.total_steps, p.steps.warmup_steps, tuple(p.eval_steps)) for p in plans}) == 1
    plan = plans[0]
    known = f"{recipe}: public release size"
    assert plan.sizes_from == ("--train-samples" if recipe in UNKNOWN_SIZE else known)
    assert plan.as_json()["checkpoint_every_minutes"] == 30
    assert 0 < plan.steps.warmup_steps <= 0.1 * plan.steps.total_steps
    gaps = [b - a for a, b in itertools.pairwise([0, *plan.eval_steps])]
    assert max(gaps) <= plan.steps.steps_per_epoch  # at least one validation per epoch
    assert plan_problems(plan, cfg) == []
    assert plan.model_from.startswith("published qwen2.5-7b shape")
    assert 15 < plan.memory_gb_per_device < 25  # 15.2 GB of bf16 weights, LoRA states, checkpointed activations
    row = json.loads(json.dumps(plan.as_json()))
    for key in (
        "world_size",
        "micro_batch",
        "grad_accum",
        "global_batch",
        "steps_per_epoch",
        "epochs",
        "total_steps",
        "warmup_steps",
        "eval_steps",
        "checkpoint_steps",
        "memory_gb_per_device",
    ):
        assert key in row, key


def test_degenerate_schedules_are_named(tmp_path):
    cfg = load_config(
        "launch/recipes/mosei.toml",
        [
            "--data.root=/nonexistent",
            "--optim.warmup_ratio=0",
            "--optim.warmup_steps=600",
            "--eval.per_epoch=0",
            "--eval.every=5000",
            "--train.epochs=3",
        ],
    )
    problems = plan_problems(make_plan(cfg, 16), cfg)
    assert any(p.startswith("no validation before the end: evaluation every 5000 steps") for p in problems)
    assert any(p.startswith("warm-up is 600 of 768 steps") for p in problems)
    cfg = load_config(
        "launch/recipes/sims2.toml",
        [
            "--data.root=/nonexistent",
            "--optim.global_batch=4096",
            "--data.batch_size=256",
            "--eval.per_epoch=0",
            "--eval.final=false",
        ],
    )
    problems = plan_problems(make_plan(cfg, 16), cfg)
    assert any("larger than the train split (2722 samples)" in p for p in problems)
    assert any(p.startswith("no validation at all") for p in problems)


def test_sizes_from_manifests_and_an_unknown_size(train_shards):
    overrides = [f"--data.root={train_shards}", "--train.steps=0", "--llm.path=/nonexistent/tiny"]
    cfg = load_config("launch/recipes/demo.toml", overrides)
    plan = make_plan(cfg, 2)
    assert plan.train_samples > 0 and "demo_cls_en: manifest" in plan.sizes_from
    assert plan.model_from.startswith("unknown") and plan.memory_gb_per_device is None
    assert "global batch" in format_plan(plan) and "unknown (model shape unknown)" in format_plan(plan)
    with pytest.raises(ConfigError, match="the size of cherma's train split is unknown"):
        make_plan(load_config("launch/recipes/cherma.toml", ["--data.root=/nonexistent"]), 1)


def test_plan_on_the_command_line_and_a_degenerate_run_refused(capsys, train_shards, tiny_llm, tmp_path):
    from egmf.train.main import main

    assert main(["--config", "launch/recipes/mosei.toml", "--plan", "--world-size", "8", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["world_size"], shown["grad_accum"], shown["global_batch"], shown["total_steps"]) == (8, 2, 64, 7680)
    assert main(["--config", "launch/recipes/mosei.toml", "--plan", "--optim.warmup_ratio=0.9"]) == 2
    assert "warm-up is 6912 of 7680 steps" in capsys.readouterr().err
    assert main(["--config", "launch/recipes/cherma.toml", "--plan", "--train-samples", "20000", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["train_samples"], shown["sizes_from"], shown["steps_per_epoch"]) == (20000, "--train-samples", 313)
    # a real run: refused with the same reasons before any process group, nothing written
    out = tmp_path / "out"
    argv = [f"--data.root={train_shards}", f"--llm.path={tiny_llm}", f"--train.output_dir={out}", "--train.steps=8"]
    assert main(argv) == 2  # the demo recipe evaluates every 500 steps: never, in 8
    assert "no validation before the end: evaluation every 500 steps, but the run is 8 steps" in capsys.readouterr().err
    assert not out.exists()


def test_a_demo_set_without_shards_counts_at_the_size_a_run_builds_it():
    from egmf.train.plan import train_sizes

    cfg = load_config(
        "launch/recipes/demo.toml",
        ["--data.root=/nonexistent", "--data.train={demo_cls_en=1.0,demo_key_en=1.0}", "--data.eval=['demo_key_en']"],
    )
    assert train_sizes(cfg) == (2048 + 16384, "demo_cls_en: demo size, demo_key_en: demo size")
