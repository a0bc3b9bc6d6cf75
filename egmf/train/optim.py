"""Optimizer parameter groups and the learning-rate schedule.

Fusion and LoRA (each with its own learning rate), each split into decayed
weights and undecayed norms/biases/1-d parameters. With `optim.gate_lr_ratio`
other than 1 the level-2 gate's router is a third part (`gate`, `gate_no_decay`)
at that fraction of the fusion learning rate. The
schedule is a linear warm-up followed by a cosine decay to
`min_lr_ratio * peak`; DeepSpeed steps it once per optimizer step and saves
its state with each checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from egmf.train.config import OptimConfig


def is_decayed(name: str, param: nn.Parameter) -> bool:
    return param.ndim >= 2 and "norm" not in name.lower() and not name.endswith("bias")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters in named groups; the LLM's frozen weights are left out."""
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(name, cfg)
        decayed = is_decayed(name, param)
        key = f"{part}{'' if decayed else '_no_decay'}"
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "lr": {"fusion": cfg.fusion_lr, "gate": cfg.fusion_lr * cfg.gate_lr_ratio, "lora": cfg.lora_lr}[part],
                "weight_decay": cfg.weight_decay if decayed else 0.0,
            },
        )
        group["params"].append(param)
    unexpected = [n for n, p in model.named_parameters() if p.requires_grad and not _known_part(n)]
    assert not unexpected, f"trainable parameters outside the fusion module and LoRA: {unexpected[:3]}"
    return list(groups.values())


def part_of(name: str, cfg: OptimConfig) -> str:
    """fusion, gate or lora: which learning rate a trainable parameter gets."""
    if name.startswith("fusion.gate.") and cfg.gate_lr_ratio != 1.0:
        return "gate"
    return "fusion" if name.startswith("fusion.") else "lora"


def _known_part(name: str) -> bool:
    return name.startswith("fusion.") or "lora_" in name


def build_optimizer(groups: list[dict], cfg: OptimConfig, offload: bool) -> torch.optim.Optimizer:
    """AdamW; DeepSpeed's CPU Adam when the optimizer state is offloaded (ZeRO-Offload requires it)."""
    kwargs = {"betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


class WarmupCosine:
    """Multiplier of the peak learning rate after `step` optimizer steps."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, max(1, total_steps), min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, warmup_steps: int):
    """`warmup_steps` from egmf.train.schedule.plan_steps (optim.warmup_steps or optim.warmup_ratio)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, cfg.min_lr_ratio))
