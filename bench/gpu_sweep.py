"""The 7B step as the micro-batch grows, on one GPU: where the step stops being held back by the host.

    python bench/gpu_sweep.py                                        # one H100/H200: the default plan
    python bench/gpu_sweep.py --plan off:32,on:128 --plain           # and the first row without DeepSpeed
    python bench/gpu_sweep.py --shape tiny --device cpu --plan off:2,on:3 --steps 2 --warmup 1 --settle 1 --plain

bench/gpu_step.py's model, MOSEI-shaped batches, timing and MFU count, at one
attention backend (flash-attn when installed, else SDPA) and without packing.
The plan is a list of GRAD_CKPT:BATCH rows (off:64 = no activation
checkpointing, micro-batch 64), run in its order on one ZeRO-2 engine after
--settle untimed steps. A row that runs out of GPU memory is recorded as such
and ends the sweep: a backward cut short leaves the engine's gradient buckets
half-filled. So order the plan by memory.

--plain: before the engine exists, the first row is timed as a plain step too
(autograd, gradient clipping, fused AdamW on bf16 LoRA and fusion weights: no
fp32 master copy, no ZeRO bookkeeping), so what the engine costs on one GPU is
measured in the same process on the same batches.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from gpu_step import SHAPES, engine_for, engine_step, mosei_batch, set_variant, settle, start, step_figures, time_steps
from results import add_json_argument, write_results

DEFAULT_PLAN = "on:64,off:32,on:128,off:64,on:256"
"""Ordered by peak memory at the 7B shape: 39, 55, 63, 95 and 111 GiB on an H200 (docs/benchmarks.md); on an
80 GB H100 the sweep ends at off:64."""


def parse_plan(text: str) -> list[tuple[bool, int]]:
    rows = []
    for item in text.split(","):
        checkpointing, _, batch = item.strip().partition(":")
        if checkpointing not in ("on", "off") or not batch.isdigit() or int(batch) < 1:
            raise SystemExit(f"--plan: {item!r} is not GRAD_CKPT:BATCH (e.g. on:128)")
        rows.append((checkpointing == "on", int(batch)))
    return rows


def plain_step(model, clip: float = 1.0):
    """The engine's step without DeepSpeed: backward, clipping at the engine's 1.0, fused AdamW (on a GPU)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=params[0].is_cuda)

    def step(batch) -> int:
        out = model(batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.num_tokens

    return step


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--plan", default=DEFAULT_PLAN, help="GRAD_CKPT:BATCH rows, e.g. off:32,on:128")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each row's timed ones")
    parser.add_argument("--settle", type=int, default=5, help="untimed steps once, before the first row")
    parser.add_argument("--plain", action="store_true", help="also time the first row without DeepSpeed")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak (0: from the GPU's name)")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    plan = parse_plan(args.plan)

    from egmf.distributed import close_distributed
    from egmf.model.attention import flash_attn_installed
    from egmf.train.throughput import llm_flops_per_token, peak_flops

    model, device, dtype = start(args.shape, args.device)
    on_gpu = device.type == "cuda"
    backend = "flash" if on_gpu and flash_attn_installed() else "sdpa"
    peak, per_token = peak_flops(device, args.peak_tflops), llm_flops_per_token(model)

    def batches_of(size: int) -> list:
        rng = np.random.default_rng(0)
        return [mosei_batch(rng, size, 500, 375).to(device) for _ in range(args.warmup + args.steps)]

    def measure(engine: str, step, checkpointing: bool, size: int) -> dict:
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        row = {"engine": engine, "checkpointing": checkpointing, "batch_size": size}
        try:
            seconds, tokens = time_steps(step, batches_of(size), device, args.warmup)
        except torch.OutOfMemoryError:
            return row | {"out_of_memory": True}
        figures = step_figures(seconds, tokens, size, per_token, peak, device)
        return row | {"out_of_memory": False, "seconds_per_step": seconds, **figures}

    print(
        f"{args.shape} shape on {torch.cuda.get_device_name(device) if on_gpu else 'CPU'}, {dtype}, {backend}, "
        f"no packing, {args.settle} settling steps, then per row {args.steps} steps after {args.warmup}"
    )
    print("| engine | grad ckpt | batch | tokens/step | s/step | tokens/s | samples/s | MFU | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    if args.plain:
        model.to(dtype)
        set_variant(model, backend, plan[0][0], 0)
        step = plain_step(model)
        settle(step, batches_of(plan[0][1]), device, args.settle)
        rows.append(measure("plain", step, *plan[0]))
        print_row(rows[-1])
        model.zero_grad(set_to_none=True)
    set_variant(model, backend, plan[0][0], 0)
    step = engine_step(engine_for(model, plan[0][1], bf16=on_gpu))
    settle(step, batches_of(plan[0][1]), device, args.settle)
    for checkpointing, size in plan:
        set_variant(model, backend, checkpointing, 0)
        rows.append(measure("zero2", step, checkpointing, size))
        print_row(rows[-1])
        if rows[-1]["out_of_memory"]:
            break
    close_distributed()
    write_results(args.json, rows)
    return rows


def print_row(row: dict) -> None:
    head = f"| {row['engine']} | {'on' if row['checkpointing'] else 'off'} | {row['batch_size']} |"
    if row["out_of_memory"]:
        print(f"{head} out of GPU memory | | | | | |", flush=True)
        return
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
    memory = f"{row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else "-"
    print(
        f"{head} {row['tokens_per_step']} | {row['seconds_per_step']:.3f} | {row['tokens_per_s']:.0f} "
        f"| {row['samples_per_s']:.1f} | {mfu} | {memory} |",
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
