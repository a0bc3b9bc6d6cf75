"""Training metrics of one logging window: losses, throughput, MFU, gate telemetry.

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

from egmf.model.fusion import MODALITIES

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
    """Sums over the optimizer steps since the last log line, on this rank; `metrics` averages them over ranks.

    `train/loss/DATASET`: the task loss per dataset of the mix, so that a set stuck on a plateau shows while it
    trains, not only at the next evaluation. `train/aux/NAME`: the model's auxiliary losses, unweighted (the
    level-2 gate's balance and z; the score read's on score batches, when it is on).

    Gate telemetry per micro-batch (natural-log entropies: ln 3 = 1.10 is a uniform gate over three experts):
    `gate/EXPERT` and `gate/DATASET/EXPERT` (mean level-2 weight), `gate/entropy_mean` (mean per-sample entropy),
    `gate/entropy_batch` (entropy of the batch-mean gate), `gate/argmax_share/EXPERT` (share of samples whose
    largest weight is that expert's), `gate_l1/EXPERT/MODALITY` (mean level-1 gate).
    """

    def __init__(self, expert_names: list[str], datasets: list[str]):
        self.expert_names = list(expert_names)
        # Every rank reduces the same vector, so its layout is fixed here, not by what a window happened to see.
        keys = ["train/loss", "train/aux/balance", "train/aux/z", "train/aux/score_read"]
        keys += [f"train/loss/{d}" for d in datasets]
        if self.expert_names:
            keys += [f"gate/{e}" for e in self.expert_names] + ["gate/entropy_mean", "gate/entropy_batch"]
            keys += [f"gate/argmax_share/{e}" for e in self.expert_names]
            keys += [f"gate/{d}/{e}" for d in datasets for e in self.expert_names]
            keys += [f"gate_l1/{e}/{m}" for e in self.expert_names for m in MODALITIES]
        self.index = {key: i for i, key in enumerate(keys)}
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.micro_batches = self.samples = self.tokens = self.skipped = 0.0
        self.sums = torch.zeros(len(self.index), dtype=torch.float64)
        self.counts = torch.zeros(len(self.index), dtype=torch.float64)

    def add(self, key: str, value: float) -> None:
        self.sums[self.index[key]] += value
        self.counts[self.index[key]] += 1

    def add_micro_batch(self, out, dataset: str, samples: int) -> None:
        """`out`: the model's EGMFOutput for one micro-batch of `dataset`."""
        self.micro_batches += 1
        self.samples += samples
        self.tokens += out.num_tokens
        loss = out.task_loss.item()  # one device sync, not one per key
        self.add("train/loss", loss)
        self.add(f"train/loss/{dataset}", loss)
        for name, value in out.aux_losses.items():
            self.add(f"train/aux/{name}", value.item())
        if out.expert_weights is None:
            return
        weights = out.expert_weights.detach().float().cpu()  # [B, E]
        mean, winners = weights.mean(0), weights.argmax(1)
        for e, name in enumerate(self.expert_names):
            self.add(f"gate/{name}", mean[e].item())
            self.add(f"gate/{dataset}/{name}", mean[e].item())
            self.add(f"gate/argmax_share/{name}", (winners == e).float().mean().item())
        self.add("gate/entropy_mean", entropy(weights).mean().item())
        self.add("gate/entropy_batch", entropy(mean).item())
        for expert, gates in out.inner_gates.items():  # [B, 3]: mean level-1 gate per modality
            for m, modality in enumerate(MODALITIES):
                self.add(f"gate_l1/{expert}/{modality}", gates[:, m].float().mean().item())

    def metrics(
        self, world_size: int, device: torch.device, flops_per_token: float, peak: float | None
    ) -> dict[str, float]:
        """Window metrics averaged over all ranks (a collective: every rank calls it)."""
        counters = torch.tensor([self.micro_batches, self.samples, self.tokens, self.skipped], dtype=torch.float64)
        totals = torch.cat([counters, self.sums, self.counts]).to(device)  # NCCL reduces GPU tensors only
        if world_size > 1:
            dist.all_reduce(totals)
        totals = totals.cpu()
        micro, samples, tokens, skipped = totals[:4].tolist()
        sums, counts = totals[4:].split(len(self.index))
        seconds = max(time.perf_counter() - self.start, 1e-9)
        out = {key: (sums[i] / counts[i]).item() for key, i in self.index.items() if counts[i] > 0}
        out |= {
            "train/samples_per_s_per_device": samples / seconds / world_size,
            "train/tokens_per_s_per_device": tokens / seconds / world_size,
            "train/skipped_nonfinite": skipped,
            "train/step_time_s": seconds / max(self.steps, 1),
        }
        if peak:
            out["train/mfu"] = tokens / seconds / world_size * flops_per_token / peak
        return out


def entropy(weights: torch.Tensor) -> torch.Tensor:
    """Natural-log entropy over the last axis (0 log 0 = 0)."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(-1)
