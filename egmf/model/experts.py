"""The three fusion experts. Each maps the three modality sequences to refined ones.

Inputs are lists over modalities (text, audio, vision) of x [B, L_m, d] and
mask [B, L_m], plus a context vector [B, d]. Every expert ends in a level-1
gate (`egmf.model.gates.ContextGate`): a sigmoid per position and channel,
conditioned on the position and on the context, that decides how much of the
expert's update enters the residual stream. Padded positions are zero on the
way in and on the way out.
"""

from __future__ import annotations

import torch
from torch import nn

from egmf.model.attention import masked_attention
from egmf.model.gates import ContextGate, GateSchedule


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real positions: x [B, L, d], mask [B, L] -> [B, d]."""
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def gate_summary(gate: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean gate value over real positions and channels: [B, L, d] -> [B] (for logging)."""
    return masked_mean(gate.mean(-1, keepdim=True), mask).squeeze(-1)


class FeedForward(nn.Sequential):
    def __init__(self, width: int, dropout: float):
        super().__init__(
            nn.LayerNorm(width),
            nn.Linear(width, 4 * width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(4 * width, width),
        )


class MultiHeadAttention(nn.Module):
    """Attention of queries x over keys/values y, with masks, on the configured kernel."""

    def __init__(self, width: int, heads: int, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.q, self.kv, self.out = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)

    def forward(self, x, x_mask, y, y_mask) -> torch.Tensor:
        b, lq, d = x.shape
        q = self.q(x).view(b, lq, self.heads, d // self.heads)
        k, v = self.kv(y).view(b, y.shape[1], 2, self.heads, d // self.heads).unbind(2)
        return self.out(masked_attention(q, k, v, x_mask, y_mask, self.backend).reshape(b, lq, d))


class LocalExpert(nn.Module):
    """Fine-grained local cues: depthwise temporal convolution + MLP inside each modality."""

    def __init__(self, width: int, kernel: int, dropout: float, schedule: GateSchedule | None = None, gated=True):
        super().__init__()
        schedule = schedule or GateSchedule()
        self.convs = nn.ModuleList(nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width) for _ in range(3))
        self.mlps = nn.ModuleList(FeedForward(width, dropout) for _ in range(3))
        self.gates = nn.ModuleList(ContextGate(width, schedule, gated) for _ in range(3))

    def forward(self, xs, masks, context):
        outs, gate_means = [], []
        for x, mask, conv, mlp, gate in zip(xs, masks, self.convs, self.mlps, self.gates, strict=True):
            local = conv(x.transpose(1, 2)).transpose(1, 2)  # padded frames are zero, so they add nothing
            out, g = gate(x, mlp(local), context, mask)
            outs.append(out)
            gate_means.append(gate_summary(g, mask))
        return outs, torch.stack(gate_means, 1)


def normalised_time(mask: torch.Tensor) -> torch.Tensor:
    """The clock every modality shares: 0 at the first real frame, 1 at the last ([B, L] mask -> [B, L] float).
    Frame-rate free, so audio and vision sampled at different rates line up."""
    lengths = mask.sum(1, keepdim=True).clamp(min=2) - 1
    return torch.arange(mask.shape[1], device=mask.device)[None, :] / lengths


def aligned_frames(y: torch.Tensor, y_mask: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
    """The frame of y at each position of x on the shared normalised clock, the nearest one:
    y [B, L_y, d] -> [B, L_x, d], zero at x's padding and where y has no frames."""
    y_len = y_mask.sum(1, keepdim=True)
    index = (normalised_time(x_mask) * (y_len - 1).clamp(min=0)).round().long().clamp(max=y.shape[1] - 1)
    found = torch.gather(y, 1, index[..., None].expand(-1, -1, y.shape[-1]))
    return found * (x_mask & (y_len > 0))[..., None].to(y.dtype)


class SemanticExpert(nn.Module):
    """Cross-modal correlation: each modality attends to the other two, and sees their frames at its own time
    (aligned), then an MLP over the frame and what it found."""

    def __init__(
        self,
        width,
        heads,
        dropout,
        backend: str,
        schedule: GateSchedule | None = None,
        gated: bool = True,
        aligned: bool = False,
    ):
        super().__init__()
        schedule = schedule or GateSchedule()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.ModuleList(MultiHeadAttention(width, heads, backend) for _ in range(3))
        self.align = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(3)) if aligned else None
        self.mlp = FeedForward(width, dropout)
        self.gates = nn.ModuleList(ContextGate(width, schedule, gated) for _ in range(3))

    def forward(self, xs, masks, context):
        normed = [self.norm(x) for x in xs]
        outs, gate_means = [], []
        for m, (x, mask) in enumerate(zip(xs, masks, strict=True)):
            others = [i for i in range(len(xs)) if i != m]
            y = torch.cat([normed[i] for i in others], 1)
            y_mask = torch.cat([masks[i] for i in others], 1)
            # A pre-LN cross-attention block: the MLP sees the frame itself (its content and time) next to what it
            # found in the other modalities, so it can relate the two (which came first, whether they agree).
            h = x + self.attn[m](normed[m], mask, y, y_mask)
            # The same moment in the other modalities, aligned on the shared clock: attention finds related content
            # wherever it is, this finds what happens at the same time (an event seen and heard at once).
            if self.align is not None:
                h = h + self.align[m](torch.cat([aligned_frames(normed[i], masks[i], mask) for i in others], -1))
            h = h + self.mlp(h)
            out, g = self.gates[m](x, h - x, context, mask)
            outs.append(out)
            gate_means.append(gate_summary(g, mask))
        return outs, torch.stack(gate_means, 1)


class TransformerBlock(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, backend: str):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads, backend)
        self.mlp = FeedForward(width, dropout)

    def forward(self, x, mask):
        normed = self.norm(x)
        x = x + self.attn(normed, mask, normed, mask)
        return (x + self.mlp(x)) * mask[..., None]


class GlobalExpert(nn.Module):
    """Long-range context: transformer blocks over whole sequences.

    scope 'joint': one sequence of all three modalities; it relates them too, overlapping the semantic expert.
    scope 'modality': the blocks run over each modality's sequence with the context vector as one extra token in
    front (it also gives an empty modality a key to attend to), so every frame can relate to any other frame of
    its modality, however far, but not to the other modalities: those relations are the semantic expert's.
    """

    def __init__(
        self,
        width,
        heads,
        layers,
        dropout,
        backend: str,
        schedule: GateSchedule | None = None,
        gated: bool = True,
        scope: str = "joint",
    ):
        super().__init__()
        schedule = schedule or GateSchedule()
        self.scope = scope
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, dropout, backend) for _ in range(layers))
        self.gate = ContextGate(width, schedule, gated)

    def run_blocks(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, mask)
        return h

    def within_modality(self, x: torch.Tensor, mask: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The blocks over [context token; x] of one modality, returned without the token."""
        h = torch.cat([context[:, None, :].to(x.dtype), x], 1)
        return self.run_blocks(h, torch.cat([torch.ones_like(mask[:, :1]), mask], 1))[:, 1:]

    def forward(self, xs, masks, context):
        x, mask = torch.cat(xs, 1), torch.cat(masks, 1)
        if self.scope == "joint":
            h = self.run_blocks(x, mask)
        else:
            h = torch.cat([self.within_modality(x_m, m, context) for x_m, m in zip(xs, masks, strict=True)], 1)
        out, gate = self.gate(x, h - x, context, mask)
        lengths = [m.shape[1] for m in masks]
        gate_means = [gate_summary(g, m) for g, m in zip(gate.split(lengths, 1), masks, strict=True)]
        return list(out.split(lengths, 1)), torch.stack(gate_means, 1)
