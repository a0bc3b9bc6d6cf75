"""The EGMF fusion module: front ends -> three experts -> hierarchical gating -> K pseudo tokens.

    fusion = FusionModule(cfg, feature_dims={"mosei": (74, 35)}, llm_hidden=3584, llm_embed_rms=0.02,
                          feature_stats={"mosei": manifest.feature_stats})   # standardise the inputs
    out = fusion(dataset, audio, audio_mask, vision, vision_mask, text_embeds, text_mask)
    out.pseudo_tokens   # [B, K, llm_hidden], to be placed in the prompt
    out.expert_weights  # [B, num_experts] level-2 gate (softmax over experts)
    out.inner_gates     # {expert: [B, 3]} level-1 gate means per modality (text, audio, vision)
    out.aux_losses      # {"balance", "z"}: the level-2 gate's auxiliary losses (egmf.model.gates)
    fusion.weighted_aux_loss(out.aux_losses, task_loss)  # task_loss + the auxiliary losses, weighted
    fusion.set_training_progress(step / total_steps)     # the gates' noise and warm-up follow it

Runs on a CPU (SDPA) or on CUDA (flash-attn when installed). Padded positions
never change a result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from egmf.errors import ConfigError, DataError
from egmf.model.config import FusionConfig
from egmf.model.experts import (
    GlobalExpert,
    LocalExpert,
    MultiHeadAttention,
    SemanticExpert,
    masked_mean,
    normalised_time,
)
from egmf.model.gates import ExpertGate, GateSchedule

MODALITIES = ("text", "audio", "vision")


@dataclass
class FusionOutput:
    pseudo_tokens: torch.Tensor
    expert_weights: torch.Tensor
    inner_gates: dict[str, torch.Tensor]
    aux_losses: dict[str, torch.Tensor]


class TimeEncoding(nn.Module):
    """Fourier features of normalised time (0 at the first real frame, 1 at the last).

    Normalised rather than frame-indexed so that audio and vision, sampled at
    different rates, share one clock: relative timing across modalities is
    visible to every expert.
    """

    def __init__(self, width: int, num_frequencies: int):
        super().__init__()
        self.register_buffer("frequencies", math.pi * torch.arange(1, num_frequencies + 1).float(), persistent=False)
        self.proj = nn.Linear(2 * num_frequencies, width)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        angles = normalised_time(mask)[..., None] * self.frequencies
        return self.proj(torch.cat([angles.sin(), angles.cos()], -1).to(self.proj.weight.dtype))


class FrontEnd(nn.Module):
    """Features [B, L, D_in] -> [B, L, d]: standardised per dimension with the train split's statistics
    (egmf.shards.stats), then LayerNorm and a projection. The statistics are buffers: checkpoints and exports
    carry them, so evaluation and prediction standardise with the numbers training used."""

    def __init__(self, in_dim: int, width: int, stats: dict | None = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(stats["mean"]) if stats else torch.zeros(in_dim))
        self.register_buffer("std", torch.tensor(stats["std"]).clamp_min(1e-6) if stats else torch.ones(in_dim))
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std  # in float32: raw features may exceed what half precision holds
        return self.proj(self.norm(x.to(self.proj.weight.dtype)))

    def _apply(self, fn, recurse: bool = True):
        """Casting the module (bf16 training casts every floating buffer) moves the statistics but keeps them in
        float32: in bf16 a mean of 10000 would be off by 32, many standard deviations of a narrow feature."""
        mean, std = self.mean, self.std
        super()._apply(fn, recurse)
        self.mean = mean.to(self.mean.device, torch.float32)
        self.std = std.to(self.std.device, torch.float32)
        return self


class PseudoTokens(nn.Module):
    """K learned queries attend over the fused sequence; each becomes one LLM input embedding.

    The tokens start at the RMS of the LLM's own token embeddings (`llm_embed_rms`, times a learned scale). With
    `normalised`, every token is rescaled to that RMS on each forward pass; without, only the projection's start is
    scaled, and a token's magnitude is free to carry what it read (docs/model.md: the per-token rescaling kept the
    global expert's key look-up from being learned)."""

    def __init__(
        self,
        width: int,
        heads: int,
        num_tokens: int,
        llm_hidden: int,
        llm_embed_rms: float,
        backend: str,
        normalised: bool = True,
    ):
        super().__init__()
        self.normalised = normalised
        self.queries = nn.Parameter(torch.randn(num_tokens, width) * width**-0.5)
        self.norm = nn.LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads, backend)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, llm_hidden))
        if not normalised:
            # After the LayerNorm each channel has variance 1, so weights of std width^-0.5 start the tokens at RMS 1.
            # Rescaled tokens keep nn.Linear's own start: the rescaling sets their size.
            nn.init.normal_(self.out[1].weight, std=width**-0.5)
            nn.init.zeros_(self.out[1].bias)
        # Shape [1], not a 0-d scalar: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse.
        self.scale = nn.Parameter(torch.full((1,), float(llm_embed_rms)))

    def forward(self, fused: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b = fused.shape[0]
        queries = self.queries[None].expand(b, -1, -1)
        query_mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=fused.device)
        tokens = self.out(queries + self.attn(queries, query_mask, self.norm(fused), mask))
        if self.normalised:
            tokens = tokens * tokens.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
        return tokens * self.scale


class FusionModule(nn.Module):
    def __init__(
        self,
        cfg: FusionConfig,
        feature_dims: dict[str, tuple[int, int]],
        llm_hidden: int,
        llm_embed_rms: float,
        feature_stats: dict[str, dict] | None = None,
    ):
        """`feature_dims`: {dataset: (audio, vision)} of every dataset it takes (those of cfg.shared_front_ends may
        be left out: they take their front ends' dims); `feature_stats`: {dataset: {"audio": {"mean", "std"},
        "vision": ...}} from the train manifests; a dataset without them is not standardised (its values pass
        through unchanged)."""
        super().__init__()
        self.front_of = {name: cfg.shared_front_ends.get(name, name) for name in feature_dims}
        self.front_of.update(cfg.shared_front_ends)
        own = {name: dims for name, dims in feature_dims.items() if name not in cfg.shared_front_ends}
        problems = cfg.problems() + shared_front_end_problems(cfg.shared_front_ends, feature_dims)
        if problems:
            raise ConfigError("invalid fusion config: " + "; ".join(problems))
        d = cfg.width
        self.cfg, self.feature_dims = cfg, {name: tuple(own[front]) for name, front in self.front_of.items()}
        self.text_front = FrontEnd(llm_hidden, d)
        stats = feature_stats or {}
        self.audio_front = nn.ModuleDict(
            {name: FrontEnd(dims[0], d, stats.get(name, {}).get("audio")) for name, dims in own.items()}
        )
        self.vision_front = nn.ModuleDict(
            {name: FrontEnd(dims[1], d, stats.get(name, {}).get("vision")) for name, dims in own.items()}
        )
        self.time = TimeEncoding(d, cfg.time_frequencies)
        self.modality = nn.Embedding(len(MODALITIES), d)
        self.context = nn.Sequential(nn.Linear(len(MODALITIES) * d, d), nn.GELU())
        self.schedule = GateSchedule()  # shared by every gate; set_training_progress moves it
        gated = cfg.inner_gating
        builders = {
            "local": lambda: LocalExpert(d, cfg.local_kernel, cfg.dropout, self.schedule, gated),
            "semantic": lambda: SemanticExpert(
                d, cfg.heads, cfg.dropout, cfg.attention, self.schedule, gated, cfg.semantic_alignment
            ),
            "global": lambda: GlobalExpert(
                d, cfg.heads, cfg.global_layers, cfg.dropout, cfg.attention, self.schedule, gated, cfg.global_scope
            ),
        }
        self.experts = nn.ModuleDict({name: builders[name]() for name in cfg.experts})
        self.datasets = list(own)  # the gate keeps statistics per front end
        self.gate = ExpertGate(
            d,
            len(cfg.experts),
            cfg.gating == "dynamic",
            self.schedule,
            len(self.datasets),
            cfg.usage_momentum,
            cfg.gate_router,
        )
        self.pseudo = PseudoTokens(
            d, cfg.heads, cfg.num_pseudo_tokens, llm_hidden, llm_embed_rms, cfg.attention, cfg.normalised_tokens
        )
        # Shape [1] for DeepSpeed (as PseudoTokens.scale). 0.5: at initialisation the experts' updates are 0.1-0.35
        # of RMS against 1.25 for the input (demo shapes, width 128), so this starts the fused update of the same
        # order as the input's, below it.
        self.update_scale = nn.Parameter(torch.full((1,), 0.5)) if cfg.normalised_updates else None
        # The score read (fusion.score_read_coef): trained with the fusion module, saved with it, used in training.
        self.score_read = nn.Linear(llm_hidden, 1) if cfg.score_read_coef > 0 else None

    def forward(
        self,
        dataset: str,
        audio: torch.Tensor,
        audio_mask: torch.Tensor,
        vision: torch.Tensor,
        vision_mask: torch.Tensor,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> FusionOutput:
        self.check_dims(dataset, audio, vision)
        dataset = self.front_of[dataset]
        masks = [text_mask, audio_mask, vision_mask]
        raw = [self.text_front(text_embeds), self.audio_front[dataset](audio), self.vision_front[dataset](vision)]
        xs = [
            (x + self.time(mask) + self.modality.weight[i]) * mask[..., None]
            for i, (x, mask) in enumerate(zip(raw, masks, strict=True))
        ]
        context = self.context(torch.cat([masked_mean(x, m) for x, m in zip(xs, masks, strict=True)], -1))
        x_all, all_mask = torch.cat(xs, 1), torch.cat(masks, 1)
        updates, inner_gates, pooled = [], {}, []
        for name, expert in self.experts.items():
            out, inner_gates[name] = expert(xs, masks, context)
            out = torch.cat(out, 1)
            pooled.append(masked_mean(out, all_mask))
            update = out - x_all
            updates.append(unit_rms(update, all_mask) if self.update_scale is not None else update)
        weights, logits = self.gate(torch.stack(pooled, 1), context)
        # The gate's weights sum to one, so mixing the experts' outputs x + u_i is x + the mix of their updates.
        mixed = torch.einsum("be,beld->bld", weights.to(x_all.dtype), torch.stack(updates, 1))
        if self.update_scale is not None:
            mixed = mixed * self.update_scale
        fused = x_all + mixed
        aux = self.gate.aux_losses(weights, logits, self.datasets.index(dataset))
        return FusionOutput(self.pseudo(fused, all_mask), weights, inner_gates, aux)

    def weighted_aux_loss(self, aux_losses: dict[str, torch.Tensor], onto: torch.Tensor | float = 0.0) -> torch.Tensor:
        """The level-2 gate's auxiliary losses (FusionOutput.aux_losses) weighted by their coefficients and added
        onto `onto` (the model passes its task loss). One term at a time onto the task loss, in this order: summed
        another way the loss rounds differently and a seeded run takes another path from its first step, so the
        figures recorded in docs/ would no longer reproduce."""
        return onto + self.cfg.balance_coef * aux_losses["balance"] + self.cfg.z_loss_coef * aux_losses["z"]

    def reads_scores_of(self, dataset: str) -> bool:
        """Whether the score read trains on `dataset`'s score batches (fusion.score_read_coef, score_read_datasets)."""
        return self.score_read is not None and dataset in (self.cfg.score_read_datasets or [dataset])

    def record_gate_usage(self, dataset: str, batch_mean: torch.Tensor) -> None:
        """After an optimizer step on `dataset`: its mean level-2 gate (over micro-batches and ranks) for the
        balance loss."""
        self.gate.record_usage(self.datasets.index(self.front_of[dataset]), batch_mean)

    def set_training_progress(self, progress: float) -> None:
        """The fraction of training done; the gates' noise and warm-up mixing follow it (egmf.model.gates)."""
        self.schedule.update(self.cfg, progress)

    def check_dims(self, dataset: str, audio: torch.Tensor, vision: torch.Tensor) -> None:
        if dataset not in self.feature_dims:
            raise DataError(
                f"the fusion module has no front end for dataset {dataset!r}; it was built for "
                f"{', '.join(self.feature_dims)}. Add the dataset to the model's feature_dims"
            )
        expected = self.feature_dims[dataset]
        if (audio.shape[-1], vision.shape[-1]) != tuple(expected):
            raise DataError(
                f"{dataset}: features have dims audio {audio.shape[-1]} / vision {vision.shape[-1]}, "
                f"the model expects {expected[0]} / {expected[1]}; rebuild the shards or the model "
                "config so they agree"
            )


def unit_rms(update: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """update [B, L, d] scaled per sample to RMS 1 over its real positions and channels (padding stays zero).
    Per sample, not per position: where in the sequence an expert acts (its level-1 gates) is kept."""
    mean_square = masked_mean(update.float().pow(2).mean(-1, keepdim=True), mask)  # [B, 1]
    return update * mean_square.add(1e-6).rsqrt()[:, :, None].to(update.dtype)


def shared_front_end_problems(shared: dict[str, str], feature_dims: dict[str, tuple[int, int]]) -> list[str]:
    """fusion.shared_front_ends must point at datasets with front ends of the same feature dims."""
    found = []
    for name, front in shared.items():
        if front not in feature_dims or front in shared:
            found.append(f"fusion.shared_front_ends.{name}: {front!r} is not a dataset with its own front ends")
        elif name in feature_dims and tuple(feature_dims[name]) != tuple(feature_dims[front]):
            found.append(
                f"fusion.shared_front_ends.{name}: its features have dims {tuple(feature_dims[name])}, "
                f"{front}'s front ends take {tuple(feature_dims[front])}"
            )
    return found


def check_feature_dims(feature_dims: dict[str, tuple[int, int]], manifests: list) -> None:
    """Before training: every split's feature dims (from its manifest) must match the model's, all named at once."""
    problems = []
    for m in manifests:
        if m.dataset not in feature_dims:
            problems.append(f"{m.dataset}/{m.split}: the model has no front end for it (add it to feature_dims)")
        elif (m.audio_dim, m.vision_dim) != tuple(feature_dims[m.dataset]):
            expected = feature_dims[m.dataset]
            problems.append(
                f"{m.dataset}/{m.split}: shards have audio {m.audio_dim} / vision {m.vision_dim}, "
                f"the model expects {expected[0]} / {expected[1]}"
            )
    if problems:
        raise DataError(
            "feature dims do not match: " + "; ".join(problems) + ". Rebuild the shards or fix the model's feature_dims"
        )
