"""The run's schedule in optimizer steps, from settings that hold at any number of devices.

    cfg = fit_to_world(cfg, world_size)              # grad_accum from optim.global_batch, before DeepSpeed
    plan = plan_steps(cfg, batches_per_epoch, world_size)   # total, warm-up, evaluation and checkpoint steps

A recipe written in steps trains a different schedule on 16 GPUs than on one:
the global batch grows with the device count, so the same epochs are fewer
steps, while a warm-up or an evaluation interval in steps stays put (on 16
GPUs a 200-step warm-up can be most of the run, and an evaluation every 500
steps may never come). optim.global_batch, optim.warmup_ratio, eval.per_epoch,
eval.every_samples and their checkpoint.* twins are the same at every device
count; checkpoint.every_minutes is kept by the trainer's clock.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from egmf.errors import ConfigError


def fit_to_world(cfg, world_size: int):
    """`cfg` with optim.grad_accum = optim.global_batch / (data.batch_size x world_size) when a global batch is set;
    ConfigError, naming the nearest global batches and micro-batches that work, when it does not divide exactly."""
    target = cfg.optim.global_batch
    if not target:
        return cfg
    micro = cfg.data.batch_size
    per_pass = micro * world_size
    if target % per_pass:
        lower, upper = (target // per_pass) * per_pass, (target // per_pass + 1) * per_pass
        nearest = " or ".join(str(g) for g in (lower, upper) if g > 0)
        micros = [m for m in range(1, target + 1) if target % (m * world_size) == 0]
        micros = sorted(micros, key=lambda m: abs(m - micro))[:3]
        instead = f", or data.batch_size {' / '.join(map(str, sorted(micros)))}" if micros else ""
        raise ConfigError(
            f"optim.global_batch {target} is not a multiple of data.batch_size {micro} x {world_size} device(s) = "
            f"{per_pass}: choose optim.global_batch {nearest}{instead}"
        )
    fitted = copy.deepcopy(cfg)
    fitted.optim.grad_accum = target // per_pass
    return fitted


@dataclass(frozen=True)
class StepPlan:
    """Optimizer-step figures of one run (0 for an interval: only at the end)."""

    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    eval_every: int
    checkpoint_every: int
    checkpoint_minutes: float = 0.0

    def describe(self) -> str:
        checkpoint = interval(self.checkpoint_every)
        if self.checkpoint_minutes:
            checkpoint += f" and every {self.checkpoint_minutes:g} min"
        return (
            f"{self.total_steps} optimizer steps ({self.steps_per_epoch} per epoch), warm-up {self.warmup_steps}, "
            f"evaluation {interval(self.eval_every)}, checkpoint {checkpoint}"
        )


def interval(steps: int) -> str:
    return f"every {steps} steps" if steps else "at the end"


def plan_steps(cfg, batches_per_epoch: int, world_size: int) -> StepPlan:
    """`batches_per_epoch`: micro-batches per rank and epoch (the train loader's length)."""
    global_batch = cfg.data.batch_size * cfg.optim.grad_accum * world_size
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.optim.grad_accum))
    total = cfg.train.steps or cfg.train.epochs * steps_per_epoch
    if cfg.optim.warmup_ratio:
        warmup = int(cfg.optim.warmup_ratio * total)  # rounded down: never more than the ratio
    else:
        warmup = cfg.optim.warmup_steps
    return StepPlan(
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=min(warmup, max(0, total - 1)),
        eval_every=event_interval(cfg.eval, steps_per_epoch, global_batch),
        checkpoint_every=event_interval(cfg.checkpoint, steps_per_epoch, global_batch),
        checkpoint_minutes=cfg.checkpoint.every_minutes,
    )


def event_interval(settings, steps_per_epoch: int, global_batch: int) -> int:
    """Optimizer steps between evaluations (cfg.eval) or saves (cfg.checkpoint), from whichever of per_epoch,
    every_samples and every is set (the configuration allows one); 0: only at the end."""
    if settings.per_epoch:
        return per_epoch_interval(settings.per_epoch, steps_per_epoch)
    if settings.every_samples:
        return max(1, round(settings.every_samples / global_batch))
    return settings.every


def per_epoch_interval(times: int, steps_per_epoch: int) -> int:
    """Steps between `times` events per epoch (at least 1); 0 when `times` is 0."""
    return max(1, steps_per_epoch // times) if times else 0
