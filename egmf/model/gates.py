"""Hierarchical gating, and what keeps it from collapsing onto one choice.

    schedule = GateSchedule()                  # shared by every gate of a fusion module
    schedule.update(cfg, progress=step / total_steps)
    weights, logits = expert_gate(pooled, context)            # level 2: [B, E] softmax over experts
    losses = expert_gate.aux_losses(weights, logits)          # {"balance": ..., "z": ...}, float32
    out, gate = context_gate(x, update, context, mask)        # level 1: sigmoid per position and channel

Level 1 (ContextGate, inside each expert, per modality): how much of the
expert's update enters the residual stream, per position and channel, from the
position and a pooled context vector. Level 2 (ExpertGate): per sample, a
softmax over the enabled experts from their pooled outputs and the context.

A learned softmax gate drifts onto the expert that is most useful early on,
and the others, no longer trained, never catch up (mixture-of-experts
collapse). Each counter-measure is a field of [fusion] and can be switched off:

- the gates' last layers start at zero: a uniform level-2 gate and level-1
  gates at 0.5 at step 0;
- warm-up (both levels): g = (1 - λ)·uniform + λ·g, λ rising linearly from 0 to
  1 over the first `gate_warmup_ratio` of training;
- noise (both levels): N(0, σ²) added to the gate logits in training, σ falling
  linearly from `gate_noise` to 0 over the first `gate_noise_ratio` of training
  (noisy gating: Shazeer et al. 2017, "Outrageously large neural networks");
- balance loss (level 2, `balance_coef`): N · Σ_i P_i², with P the batch's
  mean gate: minimal (1) when the batch uses every expert equally, N when it
  uses one. It is the soft-gating form of the Switch Transformer's N · Σ f_i P_i
  (Fedus et al. 2021), differentiable in both factors. Every batch holds one
  dataset, so it pulls each dataset's mean gate towards uniform; with a small
  weight the task loss still tilts each dataset towards the expert it needs.
  (A variant that weighs P against a moving average of the gate over the whole
  mix lags behind the gate and, in tests, swung it from one saturated expert to
  the others: the batch form has no lag);
- router z-loss (level 2, `z_loss_coef`): the mean over samples of
  logsumexp(logits)², which keeps the logits small so that the softmax cannot
  saturate (ST-MoE: Zoph et al. 2022).

Both auxiliary losses are computed in float32 and returned unweighted; the
model weights them into its loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GateSchedule:
    """Training-time noise and warm-up mixing, set from the training progress; both off at evaluation."""

    noise_std: float = 0.0
    mix: float = 1.0
    """λ: the gate's share against the uniform gate (1: the gate alone)."""

    def update(self, cfg, progress: float) -> None:
        """`cfg`: the [fusion] section; `progress`: the fraction of training done (0 at the first step)."""
        anneal = max(0.0, 1.0 - progress / cfg.gate_noise_ratio) if cfg.gate_noise_ratio else 0.0
        self.noise_std = cfg.gate_noise * anneal
        self.mix = min(1.0, progress / cfg.gate_warmup_ratio) if cfg.gate_warmup_ratio else 1.0

    def perturb(self, logits: torch.Tensor, training: bool) -> torch.Tensor:
        if training and self.noise_std > 0:
            return logits + self.noise_std * torch.randn_like(logits)
        return logits

    def mixed(self, gate: torch.Tensor, uniform: float, training: bool) -> torch.Tensor:
        return (1.0 - self.mix) * uniform + self.mix * gate if training and self.mix < 1.0 else gate


def zero_last_layer(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ContextGate(nn.Module):
    """Level-1 gate: x + g * update, g = sigmoid(W [x; context]) per position and channel (g = 1: gating off)."""

    def __init__(self, width: int, schedule: GateSchedule, enabled: bool = True):
        super().__init__()
        self.schedule, self.enabled = schedule, enabled
        self.proj = zero_last_layer(nn.Linear(2 * width, width)) if enabled else None

    def forward(self, x, update, context, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(gated output [B, L, d], gate [B, L, d])."""
        if not self.enabled:
            return (x + update) * mask[..., None], torch.ones_like(x)
        logits = self.proj(torch.cat([x, context[:, None, :].expand_as(x)], -1))
        gate = torch.sigmoid(self.schedule.perturb(logits, self.training))
        gate = self.schedule.mixed(gate, 0.5, self.training)
        return (x + gate * update) * mask[..., None], gate


class ExpertGate(nn.Module):
    """Level-2 gate: a softmax over experts per sample, from the pooled expert outputs and the context."""

    def __init__(self, width: int, num_experts: int, dynamic: bool, schedule: GateSchedule):
        super().__init__()
        self.num_experts, self.dynamic, self.schedule = num_experts, dynamic, schedule
        self.score = nn.Sequential(
            nn.Linear((num_experts + 1) * width, width), nn.GELU(), zero_last_layer(nn.Linear(width, num_experts))
        )

    def forward(self, pooled: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pooled [B, E, d], context [B, d] -> (weights [B, E] summing to one, float32 logits or None)."""
        if not self.dynamic:
            return pooled.new_full(pooled.shape[:2], 1.0 / self.num_experts), None
        logits = self.score(torch.cat([pooled.flatten(1), context], -1)).float()
        weights = torch.softmax(self.schedule.perturb(logits, self.training), -1)
        return self.schedule.mixed(weights, 1.0 / self.num_experts, self.training), logits

    def aux_losses(self, weights: torch.Tensor, logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """{"balance": N · Σ P_i², "z": mean logsumexp(logits)²}, unweighted, float32 (0 without a learned gate)."""
        if logits is None or self.num_experts < 2:
            zero = weights.new_zeros((), dtype=torch.float32)
            return {"balance": zero, "z": zero}
        return {
            "balance": self.num_experts * weights.float().mean(0).pow(2).sum(),
            "z": torch.logsumexp(logits, -1).pow(2).mean(),
        }
