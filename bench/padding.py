"""Padding waste on both sides of the model: the experts' attention over feature frames, the LLM's tokens.

    python bench/padding.py                         # the 7B recipe's fusion (width 512) and batch (8)
    python bench/padding.py --width 32 --batches 4  # a tiny shape (the test runs this)

Experts. Attention work (sum of query x key pairs) for three layouts of the
same batches: every sample padded to the dataset's maximum length (what the
public pickles hold), padded to the longest sample of its batch (our collate,
SDPA with a key mask), and variable length (flash-attn's varlen kernel on GPU:
no padded position at all). Measured: one forward + backward of the whole
fusion module on this machine's CPU with the first two layouts (the varlen
kernel needs CUDA; bench/gpu_step.py times it).

LLM. Tokens computed (rows x width) against useful tokens (the samples' own),
one left-padded sample per row and packed (prompt.pack_tokens).

Lengths are drawn from log-normal distributions shaped after each set (maximum
from docs/method.md, median and spread assumed, stated in the table), since the
real length lists are the user's data.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from results import add_json_argument, write_results

from egmf.model.config import FusionConfig
from egmf.model.fusion import FusionModule
from egmf.model.prompt import pack_consecutive

# modality: (maximum frames, median frames, log-normal sigma); feature dims from docs/method.md
SHAPES = {
    "mosei": {"audio": (500, 150, 0.6), "vision": (375, 110, 0.6), "dims": (74, 35)},
    "sims2": {"audio": (925, 300, 0.5), "vision": (232, 75, 0.5), "dims": (25, 177)},
    "meld": {"audio": (600, 140, 0.6), "vision": (120, 28, 0.6), "dims": (64, 64)},
}
# LLM prompt: template tokens (with markers and answer cue) + K pseudo tokens + utterance + answer and eos.
TEMPLATE_TOKENS = {"mosei": 62, "sims2": 58, "meld": 70}
UTTERANCE = (20, 0.7, 64)  # median tokens, sigma, prompt.max_text_tokens
ANSWER_TOKENS = 3


def draw_lengths(rng: np.random.Generator, maximum: int, median: int, sigma: float, n: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 1, maximum).astype(int)


def attention_work(lengths: np.ndarray, batch_size: int, maximum: int) -> dict[str, float]:
    """Query x key pairs summed over batches, per layout (self-attention over the frames)."""
    batches = lengths[: len(lengths) // batch_size * batch_size].reshape(-1, batch_size)
    return {
        "dataset_max": float(batches.size * maximum**2),
        "batch_max": float((batches.max(1) ** 2 * batch_size).sum()),
        "varlen": float((batches.astype(float) ** 2).sum()),
    }


def fusion_step_seconds(fusion, dataset, audio_len, vision_len, lengths_a, lengths_v, llm_hidden, repeats) -> float:
    """Mean seconds of a forward + backward of the fusion module on one batch padded to the given widths."""
    da, dv = SHAPES[dataset]["dims"]
    b = len(lengths_a)
    audio_mask = torch.arange(audio_len)[None] < torch.as_tensor(lengths_a)[:, None]
    vision_mask = torch.arange(vision_len)[None] < torch.as_tensor(lengths_v)[:, None]
    args = (
        dataset,
        torch.randn(b, audio_len, da),
        audio_mask,
        torch.randn(b, vision_len, dv),
        vision_mask,
        torch.randn(b, 24, llm_hidden),
        torch.ones(b, 24, dtype=torch.bool),
    )
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        fusion(*args).pseudo_tokens.float().pow(2).mean().backward()
        if i:  # the first pass warms up allocator and kernels
            times.append(time.perf_counter() - start)
    return float(np.mean(times))


def llm_tokens(lengths: np.ndarray, batch_size: int, pack_tokens: int) -> tuple[float, float]:
    """(useful / computed tokens, rows per batch); pack_tokens 0 means one left-padded sample per row."""
    useful = computed = rows = 0
    for start in range(0, len(lengths) - batch_size + 1, batch_size):
        batch = lengths[start : start + batch_size].tolist()
        packs = pack_consecutive(batch, pack_tokens) if pack_tokens else [[i] for i in range(len(batch))]
        useful += sum(batch)
        computed += len(packs) * max(sum(batch[i] for i in pack) for pack in packs)
        rows += len(packs)
    return useful / computed, rows / (len(lengths) // batch_size)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=512, help="fusion width (the 7B recipes use 512)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--llm-hidden", type=int, default=3584)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200, help="batches drawn for the work and token counts")
    parser.add_argument("--timed-batches", type=int, default=3, help="batches timed per layout")
    parser.add_argument("--pseudo-tokens", type=int, default=8)
    parser.add_argument("--pack-tokens", default="512,1024", help="prompt.pack_tokens values to compare")
    parser.add_argument("--seed", type=int, default=0)
    add_json_argument(parser)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    n = args.batches * args.batch_size
    cfg = FusionConfig(width=args.width, heads=args.heads, num_pseudo_tokens=args.pseudo_tokens, attention="sdpa")
    dims = {name: shape["dims"] for name, shape in SHAPES.items()}
    fusion = FusionModule(cfg, dims, args.llm_hidden, llm_embed_rms=0.02)

    expert_rows = []
    print(f"Experts: fusion width {args.width}, batch {args.batch_size}, {args.batches} batches per set")
    print(
        "| set | modality | max / median / sigma | mean length | work: batch max | work: varlen "
        "| CPU fwd+bwd: dataset max | CPU fwd+bwd: batch max | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for dataset, shape in SHAPES.items():
        lengths = {m: draw_lengths(rng, *shape[m], n) for m in ("audio", "vision")}
        work = {m: attention_work(lengths[m], args.batch_size, shape[m][0]) for m in lengths}
        timed = []
        for b in range(args.timed_batches):
            la = lengths["audio"][b * args.batch_size : (b + 1) * args.batch_size]
            lv = lengths["vision"][b * args.batch_size : (b + 1) * args.batch_size]
            common = (fusion, dataset)
            full = fusion_step_seconds(*common, shape["audio"][0], shape["vision"][0], la, lv, args.llm_hidden, 2)
            trimmed = fusion_step_seconds(*common, int(la.max()), int(lv.max()), la, lv, args.llm_hidden, 2)
            timed.append((full, trimmed))
        full, trimmed = np.mean(timed, axis=0)
        for modality in ("audio", "vision"):
            w = work[modality]
            row = {
                "dataset": dataset,
                "modality": modality,
                "mean_length": float(lengths[modality].mean()),
                "batch_max_share": w["batch_max"] / w["dataset_max"],
                "varlen_share": w["varlen"] / w["dataset_max"],
                "seconds_dataset_max": float(full),
                "seconds_batch_max": float(trimmed),
            }
            expert_rows.append(row)
            maximum, median, sigma = shape[modality]
            timing = (
                f"{full * 1e3:.0f} ms | {trimmed * 1e3:.0f} ms | {full / trimmed:.1f}x"
                if modality == "audio"
                else "(same step) | | "
            )
            print(
                f"| {dataset} | {modality} | {maximum} / {median} / {sigma} | {row['mean_length']:.0f} "
                f"| {row['batch_max_share']:.1%} | {row['varlen_share']:.1%} | {timing} |"
            )
    print("(work: query x key pairs of the experts' self-attention as a share of padding every sample to the max)")

    llm_rows = []
    packings = [0] + [int(p) for p in args.pack_tokens.split(",")]
    print(
        f"\nLLM: batch {args.batch_size}, K {args.pseudo_tokens} pseudo tokens, utterance median {UTTERANCE[0]} "
        f"tokens (sigma {UTTERANCE[1]}, at most {UTTERANCE[2]}); useful / computed tokens (rows per batch)"
    )
    packed_headers = " | ".join(f"packed <= {p}" for p in packings[1:])
    print(f"| set | mean sample tokens | one sample per row | {packed_headers} |")
    print("|---|---|" + "---|" * len(packings))
    for dataset in SHAPES:
        utterance = draw_lengths(rng, UTTERANCE[2], UTTERANCE[0], UTTERANCE[1], n)
        lengths = TEMPLATE_TOKENS[dataset] + args.pseudo_tokens + utterance + ANSWER_TOKENS
        results = [llm_tokens(lengths, args.batch_size, p) for p in packings]
        llm_rows.append(
            {
                "dataset": dataset,
                "mean_tokens": float(lengths.mean()),
                "efficiency": {p: eff for p, (eff, _) in zip(packings, results, strict=True)},
                "rows": {p: rows for p, (_, rows) in zip(packings, results, strict=True)},
            }
        )
        cells = " | ".join(f"{eff:.1%} ({rows:.1f})" for eff, rows in results)
        print(f"| {dataset} | {lengths.mean():.0f} | {cells} |")
    write_results(args.json, {"experts": expert_rows, "llm": llm_rows})
    return {"experts": expert_rows, "llm": llm_rows}


if __name__ == "__main__":
    main(sys.argv[1:])
