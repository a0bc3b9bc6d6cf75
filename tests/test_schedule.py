"""Schedules that hold at any device count: the global batch fixes gradient accumulation (or names what would
work), warm-up as a share of the run, evaluations and checkpoints per epoch or per N samples."""

from __future__ import annotations

import pytest

from egmf.errors import ConfigError
from egmf.train.config import load_config
from egmf.train.schedule import fit_to_world, plan_steps

RECIPE = "launch/recipes/mosei.toml"


def config(*overrides: str):
    return load_config(RECIPE, list(overrides))


@pytest.mark.parametrize("world_size, accum", [(1, 8), (2, 4), (8, 1)])
def test_global_batch_sets_accumulation_for_the_device_count(world_size, accum):
    cfg = fit_to_world(config("--optim.global_batch=64", "--data.batch_size=8"), world_size)
    assert cfg.optim.grad_accum == accum
    assert cfg.data.batch_size * cfg.optim.grad_accum * world_size == 64


def test_a_global_batch_out_of_reach_names_the_nearest_choices():
    with pytest.raises(ConfigError) as caught:
        fit_to_world(config("--optim.global_batch=100", "--data.batch_size=8"), 16)
    message = str(caught.value)
    assert "optim.global_batch 100" in message and "8 x 16 device(s) = 128" in message
    assert "choose optim.global_batch 128" in message  # 0 is no choice
    with pytest.raises(ConfigError, match=r"choose optim.global_batch 98 or 112, or data.batch_size 2 / 5 / 10"):
        fit_to_world(config("--optim.global_batch=100", "--data.batch_size=7"), 2)


def test_without_a_global_batch_accumulation_is_the_recipes():
    cfg = config("--optim.global_batch=0", "--optim.grad_accum=3")
    assert fit_to_world(cfg, 16) is cfg


def test_ratios_and_per_epoch_intervals_scale_with_the_run():
    cfg = config(
        "--optim.warmup_ratio=0.1",
        "--eval.every=0",
        "--eval.per_epoch=2",
        "--checkpoint.every=0",
        "--checkpoint.per_epoch=1",
        "--train.epochs=3",
        "--optim.grad_accum=2",
    )
    plan = plan_steps(cfg, batches_per_epoch=101, world_size=1)  # 51 optimizer steps per epoch
    assert (plan.steps_per_epoch, plan.total_steps) == (51, 153)
    assert (plan.warmup_steps, plan.eval_every, plan.checkpoint_every) == (15, 25, 51)
    small = plan_steps(cfg, batches_per_epoch=2, world_size=1)  # one step per epoch: intervals of at least one step
    assert (small.total_steps, small.warmup_steps, small.eval_every, small.checkpoint_every) == (3, 0, 1, 1)
    assert "153 optimizer steps (51 per epoch)" in plan.describe() and "evaluation every 25 steps" in plan.describe()


def test_step_counts_stay_possible():
    plan = plan_steps(
        config(
            "--train.steps=40",
            "--optim.warmup_ratio=0",
            "--optim.warmup_steps=100",
            "--eval.per_epoch=0",
            "--eval.every=10",
        ),
        500,
        1,
    )
    assert (plan.total_steps, plan.warmup_steps, plan.eval_every) == (40, 39, 10)


def test_an_interval_is_set_once():
    with pytest.raises(ConfigError) as caught:
        config("--eval.every=5", "--eval.per_epoch=2", "--checkpoint.every=5", "--checkpoint.per_epoch=1")
    assert "set one of eval.every (5), eval.per_epoch (2), not several" in str(caught.value)
    assert "checkpoint.every (5), checkpoint.per_epoch (1)" in str(caught.value)
    with pytest.raises(ConfigError, match=r"eval.per_epoch \(2\), eval.every_samples \(640\), not several"):
        config("--eval.every=0", "--eval.per_epoch=2", "--eval.every_samples=640")
    with pytest.raises(ConfigError, match=r"optim.warmup_ratio must be"):
        config("--optim.warmup_ratio=1.5")


@pytest.mark.parametrize("world_size", [1, 8, 16])
def test_intervals_in_samples_hold_at_any_device_count(world_size):
    """The same global batch at every device count (grad_accum follows), so an interval in samples is the same
    number of steps; the time-based checkpoint is shown in the schedule."""
    overrides = ["--optim.global_batch=64", "--data.batch_size=4", "--eval.per_epoch=0", "--checkpoint.per_epoch=0"]
    overrides += ["--eval.every_samples=3200", "--checkpoint.every_samples=1000", "--checkpoint.every_minutes=30"]
    cfg = fit_to_world(config(*overrides), world_size)
    plan = plan_steps(cfg, batches_per_epoch=16000 // (4 * world_size), world_size=world_size)
    assert (plan.steps_per_epoch, plan.eval_every, plan.checkpoint_every) == (250, 50, 16)  # 1000 / 64 rounds to 16
    assert "checkpoint every 16 steps and every 30 min" in plan.describe()
