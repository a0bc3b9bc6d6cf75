"""`egmf-evaluate`: evaluate a saved model alone, a checkpoint folder or a run's best/ folder.

    egmf-evaluate --checkpoint runs/demo/checkpoints/step_00002000
    egmf-evaluate --checkpoint runs/mosei/best --shards /data/shards --splits test
    torchrun --nproc_per_node 8 launch/evaluate.py --checkpoint ...     # each sample still decoded once

It rebuilds the model from the config saved with the weights (the base LLM
from llm.path, or --llm-path), loads the exported adapter and fusion weights,
decodes the chosen splits in the chosen modes, prints the metrics and writes
them to --out (default: CHECKPOINT/eval) in the layout training uses for its
evaluations: SPLIT.jsonl (one prediction row per sample and mode) per split,
then metrics.json. Any `--section.key=value` overrides the saved config (e.g.
--eval.batch_size=64). Exit code 2: a bad folder, config or data, reported
before anything is decoded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from egmf.errors import CheckpointError, ConfigError
from egmf.train.checkpoint import saved_weights
from egmf.train.config import Config, config_from_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egmf-evaluate", description=__doc__.split("\n")[0].split(": ", 1)[1], allow_abbrev=False
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (step_N) or a best/ folder")
    parser.add_argument("--shards", help="shard root (default: data.root of the saved config)")
    parser.add_argument("--llm-path", help="base model folder (default: llm.path of the saved config)")
    parser.add_argument("--datasets", help="comma-separated (default: data.eval of the saved config)")
    parser.add_argument("--splits", help="comma-separated: valid,test (default: eval.splits)")
    parser.add_argument("--modes", help="comma-separated: constrained,generate (default: eval.modes)")
    parser.add_argument("--out", help="where SPLIT.jsonl and metrics.json go (default: CHECKPOINT/eval)")
    return parser


def evaluation_overrides(args: argparse.Namespace) -> list[str]:
    """The command line's choices as config overrides. Evaluation chooses no best model, so the selection split
    and mode follow the ones asked for (the saved config's may not be among them)."""
    overrides = [f"--{key}={flag}" for flag, key in ((args.shards, "data.root"), (args.llm_path, "llm.path")) if flag]
    for flag, key in ((args.datasets, "data.eval"), (args.splits, "eval.splits"), (args.modes, "eval.modes")):
        if flag:
            overrides.append(f"--{key}={json.dumps(flag.split(','))}")
    if args.splits:
        overrides.append(f"--eval.select_split={args.splits.split(',')[0]}")
    if args.modes:
        overrides.append(f"--eval.select_mode={args.modes.split(',')[0]}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    try:
        table, weights = saved_weights(args.checkpoint)
        cfg = config_from_table(table, evaluation_overrides(args) + overrides)
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(cfg, weights, args.out or os.path.join(args.checkpoint, "eval"))


def run(cfg: Config, weights: str, out_dir: str) -> int:
    import torch

    from egmf.train.evaluation import evaluate, flat_metrics, write_evaluation
    from egmf.train.saved_model import decoding_world, load_saved_model

    with decoding_world(cfg.train.device) as (world, device):
        model = load_saved_model(cfg, weights, device)
        metrics, all_rows = {}, []
        with torch.no_grad():
            for split in cfg.eval.splits:
                results, rows = evaluate(model, cfg, split, world)
                metrics.update(flat_metrics(results, split))
                all_rows += rows
        if world.is_logging_rank:
            write_evaluation(out_dir, all_rows, metrics)
            for key, value in metrics.items():
                print(f"{key:60s} {value:.4f}")
            print(f"\nwritten to {out_dir}")
    return 0
