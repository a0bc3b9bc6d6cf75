"""Training metrics of one logging window: loss, throughput, MFU, gate weights.

MFU counts the LLM's matmul FLOPs only (docs/benchmarks.md):

    FLOPs per token = 4 * N_frozen + 6 * N_trainable

A frozen weight costs a forward (2 FLOPs per parameter per token) and the
backward's activation gradient (2); a trainable one (LoRA) also its weight
gradient (2). N excludes the input embedding table (a lookup, not a matmul).
Attention scores and the fusion module (0.5-3 % of a 7B step, docs/model.md)
are left out, so MFU is slightly under-stated, never over-stated. Recomputation
under gradient checkpointing is not counted (the usual convention).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

# Dense bf16 peak of one device, TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def llm_flops_per_token(model) -> float:
    """4 N_frozen + 6 N_trainable over the LLM's weights (the input embedding table excluded)."""
    embedding = model.llm.get_input_embeddings().weight
    frozen = trainable = 0
    for param in model.llm.parameters():
        if param is embedding:
            continue
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    return 4.0 * frozen + 6.0 * trainable


def peak_flops(device: torch.device, configured_tflops: float) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (CPUs, unlisted GPUs): then no MFU is reported."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


class Window:
    """Sums over the optimizer steps since the last log line, on this rank."""

    def __init__(self, expert_names: list[str]):
        self.expert_names = expert_names
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.loss_sum = self.micro_batches = self.samples = self.tokens = self.skipped = 0.0
        self.gate_sum = torch.zeros(len(self.expert_names), dtype=torch.float64)

    def add_micro_batch(self, loss: float, samples: int, tokens: int, expert_weights: torch.Tensor | None) -> None:
        self.loss_sum += loss
        self.micro_batches += 1
        self.samples += samples
        self.tokens += tokens
        if expert_weights is not None:
            self.gate_sum += expert_weights.detach().float().mean(0).cpu().double()

    def metrics(
        self, world_size: int, device: torch.device, flops_per_token: float, peak: float | None
    ) -> dict[str, float]:
        """Window metrics averaged over all ranks (a collective: every rank calls it)."""
        totals = torch.tensor(
            [self.loss_sum, self.micro_batches, self.samples, self.tokens, self.skipped, *self.gate_sum.tolist()],
            dtype=torch.float64,
            device=device,  # NCCL reduces GPU tensors only
        )
        if world_size > 1:
            dist.all_reduce(totals)
        loss_sum, micro, samples, tokens, skipped, *gates = totals.tolist()
        seconds = max(time.perf_counter() - self.start, 1e-9)
        out = {
            "train/loss": loss_sum / max(micro, 1),
            "train/samples_per_s_per_device": samples / seconds / world_size,
            "train/tokens_per_s_per_device": tokens / seconds / world_size,
            "train/skipped_nonfinite": skipped,
            "train/step_time_s": seconds / max(self.steps, 1),
        }
        if peak:
            out["train/mfu"] = tokens / seconds / world_size * flops_per_token / peak
        if micro:
            out.update({f"gate/{name}": g / micro for name, g in zip(self.expert_names, gates, strict=True)})
        return out
