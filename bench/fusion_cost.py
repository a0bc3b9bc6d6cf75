"""The fusion module's parameters and FLOPs per sample, next to a 7B LLM's.

    python bench/fusion_cost.py                    # the 7B recipe (Qwen2.5-7B: hidden 3584, 7.6e9 params)
    python bench/fusion_cost.py --width 32 --llm-hidden 64 --llm-params 2e5   # a tiny shape

FLOPs are counted by torch.utils.flop_counter on one forward pass of one sample
(a multiply-add = 2 FLOPs; matmuls, convolutions and attention). The LLM's
forward is 2 * N * T for T prompt tokens; the training-step share compares
3x the fusion forward (forward + backward) with 4 * N * T for the LoRA LLM
(forward 2NT plus the backward through the frozen weights 2NT; attention score
FLOPs left out on both sides, as they are a few percent at these lengths).
"""

from __future__ import annotations

import argparse
import sys

import torch
from results import add_json_argument, write_results
from torch.utils.flop_counter import FlopCounterMode

from egmf.model.config import FusionConfig
from egmf.model.fusion import FusionModule

# dataset: (audio frames, audio dim, vision frames, vision dim, utterance tokens, prompt tokens); sizes from
# docs/method.md (padded maxima for MOSEI/SIMS-V2, typical for MELD/CHERMA), prompts measured with our templates.
SHAPES = {
    "mosei": (500, 74, 375, 35, 50, 120),
    "sims2": (925, 25, 232, 177, 40, 110),
    "meld": (157, 64, 32, 64, 30, 110),
    "cherma": (543, 1024, 16, 2048, 30, 100),
}


def fusion_forward_flops(fusion: FusionModule, dataset: str, llm_hidden: int) -> int:
    la, da, lv, dv, lt, _ = SHAPES[dataset]
    args = (
        dataset,
        torch.randn(1, la, da),
        torch.ones(1, la, dtype=torch.bool),
        torch.randn(1, lv, dv),
        torch.ones(1, lv, dtype=torch.bool),
        torch.randn(1, lt, llm_hidden),
        torch.ones(1, lt, dtype=torch.bool),
    )
    counter = FlopCounterMode(display=False)
    with counter:  # (under no_grad the counter's module tracker fails on expanded parameters)
        fusion(*args)
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--pseudo-tokens", type=int, default=8)
    parser.add_argument("--llm-hidden", type=int, default=3584)
    parser.add_argument("--llm-params", type=float, default=7.6e9)
    add_json_argument(parser)
    args = parser.parse_args(argv)
    cfg = FusionConfig(width=args.width, heads=args.heads, num_pseudo_tokens=args.pseudo_tokens, attention="sdpa")
    dims = {name: (shape[1], shape[3]) for name, shape in SHAPES.items()}
    fusion = FusionModule(cfg, dims, args.llm_hidden, llm_embed_rms=0.02).eval()
    shared = sum(p.numel() for n, p in fusion.named_parameters() if "_front." not in n or "text_front" in n)
    rows = []
    print(
        f"fusion: width {cfg.width}, heads {cfg.heads}, global layers {cfg.global_layers}, K {cfg.num_pseudo_tokens}; "
        f"LLM hidden {args.llm_hidden}, {args.llm_params:.2g} params"
    )
    print("| dataset | fusion params used | fusion fwd GFLOP | LLM fwd GFLOP (2NT) | fusion share of a LoRA step |")
    print("|---|---|---|---|---|")
    for dataset, shape in SHAPES.items():
        front = sum(p.numel() for n, p in fusion.named_parameters() if f"_front.{dataset}." in n)
        flops = fusion_forward_flops(fusion, dataset, args.llm_hidden)
        llm = 2 * args.llm_params * (shape[5] + cfg.num_pseudo_tokens)
        share = 3 * flops / (3 * flops + 2 * llm)  # step: fusion 3x forward, LoRA LLM 4NT = 2 x forward
        rows.append(
            {
                "dataset": dataset,
                "params": shared + front,
                "fusion_gflop": flops / 1e9,
                "llm_gflop": llm / 1e9,
                "share": share,
            }
        )
        print(f"| {dataset} | {(shared + front) / 1e6:.1f} M | {flops / 1e9:.2f} | {llm / 1e9:.0f} | {share:.2%} |")
    write_results(args.json, rows)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
