"""Hierarchical gating, and what keeps it from collapsing onto one choice.

    schedule = GateSchedule()                  # shared by every gate of a fusion module
    schedule.update(cfg, progress=step / total_steps)
    weights, logits = expert_gate(pooled, context)            # level 2: [B, E] softmax over experts
    losses = expert_gate.aux_losses(weights, logits, dataset_index)   # {"balance": ..., "z": ...}, float32
    expert_gate.record_usage(dataset_index, step_mean)        # the mean over ranks, after each optimizer step
    out, gate = context_gate(x, update, context, mask)        # level 1: sigmoid per position and channel

Level 1 (ContextGate, inside each expert, per modality): how much of the
expert's update enters the residual stream, per position and channel, from the
position and a pooled context vector. Level 2 (ExpertGate): per sample, a
softmax over the enabled experts from their pooled outputs and the context.

A learned softmax gate drifts onto the expert that is most useful early on,
and the others, no longer trained, never catch up (mixture-of-experts
collapse). Each counter-measure is a field of [fusion] and can be switched off:

- the level-2 gate's last layer starts at zero: a uniform gate at step 0;
- warm-up (both levels): g = (1 - λ)·uniform + λ·g, λ rising linearly from 0 to
  1 over the first `gate_warmup_ratio` of training (uniform: 1/N at level 2,
  0.5 at level 1);
- noise (level 2): N(0, σ²) added to the gate logits in training, σ falling
  linearly from `gate_noise` to 0 over the first `gate_noise_ratio` of training
  (noisy gating: Shazeer et al. 2017, "Outrageously large neural networks");
- balance loss (level 2, `balance_coef`): N · Σ_i M_i², with M the mean gate
  over the training mix: minimal (1) when the mix uses every expert equally, N
  when it uses one. It is the soft-gating form of the Switch Transformer's
  N · Σ f_i P_i (Fedus et al. 2021). Every batch holds one dataset, so the
  batch's own mean P would pull each dataset towards uniform and leave no room
  for the dataset that needs the local expert to prefer it (measured: on the
  demo every dataset's gate sat at 1/3). M is therefore the mean over datasets
  of each dataset's recent mean gate (a moving average per dataset,
  `usage_momentum`), with the current dataset's entry replaced by this batch's
  P, which carries the gradient. Experts are balanced across the mix, each
  dataset free to prefer its own. With one dataset, M = P: the batch form.
  The averages are fed once per optimizer step, with the step's mean over its
  micro-batches and all ranks (`record_usage`): every rank holds the same ones,
  a resumed run continues exactly, and `usage_momentum` means the same per step
  whatever the number of ranks and accumulated micro-batches;
- router z-loss (level 2, `z_loss_coef`): the mean over samples of
  logsumexp(logits)², which keeps the logits small so that the softmax cannot
  saturate (ST-MoE: Zoph et al. 2022). The logits are centred (mean 0 per
  sample) first: the softmax ignores a shift, and uncentred logits saturate
  with logsumexp 0 ([0, -20, -20]), where the z-loss is 0 too. Centred, the
  z-loss grows with the spread of the logits, and its gradient does not vanish
  where the softmax's does, so a saturated gate is pulled back.

Both auxiliary losses are computed in float32 and returned unweighted; the
model weights them into its loss.

The level-1 gates are sigmoids, one per position and channel, that do not
compete with each other, so balance and z-loss do not apply to them. Neither do
a zero start or noise: on the demo's local set (400 steps, one process) a zero
start of the level-1 gates cut test accuracy from 0.78 to 0.39, and noise of
σ 1 on either level from about 0.84 to 0.48; σ 0.3 on level 2 alone gave 0.89
(docs/model.md).
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
        """Level 2's logits with the training noise."""
        if training and self.noise_std > 0:
            return logits + self.noise_std * torch.randn_like(logits)
        return logits

    def mixed(self, gate: torch.Tensor, uniform: float, training: bool) -> torch.Tensor:
        return (1.0 - self.mix) * uniform + self.mix * gate if training and self.mix < 1.0 else gate


def zero_last_layer(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


ROUTERS = ("mlp", "norm_mlp", "linear")


def router_layers(router: str, inputs: int, hidden: int, num_experts: int) -> nn.Sequential:
    """The level-2 gate's logits from its input (the pooled expert outputs and the context), last layer zero.

    'mlp': Linear -> GELU -> Linear. 'norm_mlp': the same after a LayerNorm: the input holds a large component that
    every sample shares, and one step along it can turn every hidden unit off for every sample at once (a dead
    gate, docs/model.md); normalised, no direction of the input dominates. 'linear': LayerNorm -> Linear (the
    Switch Transformer's and ST-MoE's router): no hidden unit to lose, and no feature it cannot weigh linearly.
    The layers keep their positions in `score` (score.0, score.2 for 'mlp'), so saved models keep their keys."""
    if router == "mlp":
        return nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), zero_last_layer(nn.Linear(hidden, num_experts)))
    if router == "norm_mlp":
        return nn.Sequential(
            nn.LayerNorm(inputs), nn.Linear(inputs, hidden), nn.GELU(), zero_last_layer(nn.Linear(hidden, num_experts))
        )
    if router == "linear":
        return nn.Sequential(nn.LayerNorm(inputs), zero_last_layer(nn.Linear(inputs, num_experts)))
    raise ValueError(f"unknown gate router {router!r}: one of {', '.join(ROUTERS)}")


def saved_router(keys) -> str | None:
    """Which router a saved fusion state's level-2 gate keys (`gate.score.*`) come from; None without them."""
    layers = {k.split(".")[2] for k in keys if k.startswith("gate.score.")}
    if not layers:
        return None
    return "norm_mlp" if "3" in layers else "mlp" if "2" in layers else "linear"


class ContextGate(nn.Module):
    """Level-1 gate: x + g * update, g = sigmoid(W [x; context]) per position and channel (g = 1: gating off).
    Randomly initialised, so the gate depends on its input from the first step; mixed with 0.5 during warm-up."""

    def __init__(self, width: int, schedule: GateSchedule, enabled: bool = True):
        super().__init__()
        self.schedule, self.enabled = schedule, enabled
        self.proj = nn.Linear(2 * width, width) if enabled else None

    def forward(self, x, update, context, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(gated output [B, L, d], gate [B, L, d])."""
        if not self.enabled:
            return (x + update) * mask[..., None], torch.ones_like(x)
        logits = self.proj(torch.cat([x, context[:, None, :].expand_as(x)], -1))
        gate = torch.sigmoid(logits)
        gate = self.schedule.mixed(gate, 0.5, self.training)
        return (x + gate * update) * mask[..., None], gate


class ExpertGate(nn.Module):
    """Level-2 gate: a softmax over experts per sample, from the pooled expert outputs and the context."""

    def __init__(
        self,
        width: int,
        num_experts: int,
        dynamic: bool,
        schedule: GateSchedule,
        num_datasets: int = 1,
        usage_momentum: float = 0.9,
        router: str = "mlp",
    ):
        super().__init__()
        self.num_experts, self.dynamic, self.schedule = num_experts, dynamic, schedule
        self.usage_momentum = usage_momentum
        self.score = router_layers(router, (num_experts + 1) * width, width, num_experts)
        # Each dataset's recent mean gate (a buffer: checkpoints keep it, so a resumed run balances as before).
        self.register_buffer("usage", torch.full((num_datasets, num_experts), 1.0 / num_experts))

    def forward(self, pooled: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pooled [B, E, d], context [B, d] -> (weights [B, E] summing to one, float32 logits or None)."""
        if not self.dynamic:
            return pooled.new_full(pooled.shape[:2], 1.0 / self.num_experts), None
        logits = self.score(torch.cat([pooled.flatten(1), context], -1)).float()
        # Centred: the softmax ignores a shift, and without this the gate saturates with logsumexp = 0 (logits
        # [0, -20, -20]), where the z-loss sees nothing (measured on the demo: z 0.000, local weight 1.000).
        logits = logits - logits.mean(-1, keepdim=True)
        weights = torch.softmax(self.schedule.perturb(logits, self.training), -1)
        return self.schedule.mixed(weights, 1.0 / self.num_experts, self.training), logits

    def aux_losses(
        self, weights: torch.Tensor, logits: torch.Tensor | None, dataset_index: int = 0
    ) -> dict[str, torch.Tensor]:
        """{"balance": N · Σ M_i², "z": mean logsumexp(logits)²}, unweighted, float32 (0 without a learned gate).
        M: the mean gate over the mix, this batch's P standing in for its own dataset (`dataset_index`)."""
        if logits is None or self.num_experts < 2:
            zero = weights.new_zeros((), dtype=torch.float32)
            return {"balance": zero, "z": zero}
        per_dataset = self.usage.detach().float().clone()
        per_dataset[dataset_index] = weights.float().mean(0)
        return {
            "balance": self.num_experts * per_dataset.mean(0).pow(2).sum(),
            "z": torch.logsumexp(logits, -1).pow(2).mean(),
        }

    @torch.no_grad()
    def record_usage(self, dataset_index: int, batch_mean: torch.Tensor) -> None:
        """Fold one optimizer step's mean gate (the mean over its micro-batches and ranks: every rank must hold the
        same averages) into its dataset's moving average; a non-finite mean is left out."""
        if torch.isfinite(batch_mean).all():
            row = self.usage[dataset_index]
            row.mul_(self.usage_momentum).add_(batch_mean.to(row), alpha=1.0 - self.usage_momentum)
