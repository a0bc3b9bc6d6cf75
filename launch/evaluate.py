"""Evaluate a saved model alone: a checkpoint folder, or a run's best/ folder.

    python launch/evaluate.py --checkpoint runs/demo/checkpoints/step_00001000
    python launch/evaluate.py --checkpoint runs/mosei/best --shards /data/shards --splits test
    torchrun --nproc_per_node 8 launch/evaluate.py --checkpoint ...     # each sample still decoded once

It rebuilds the model from the config saved with the weights (the base LLM
from llm.path, or --llm-path), loads the exported adapter and fusion weights,
decodes the chosen splits in the chosen modes, prints the metrics and writes
metrics.json plus predictions per split to --out (default: CHECKPOINT/eval).
Any `--section.key=value` overrides the saved config (e.g. --eval.batch_size=64).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (step_N) or a best/ folder")
    parser.add_argument("--shards", help="shard root (default: data.root of the saved config)")
    parser.add_argument("--llm-path", help="base model folder (default: llm.path of the saved config)")
    parser.add_argument("--datasets", help="comma-separated (default: data.eval of the saved config)")
    parser.add_argument("--splits", help="comma-separated: valid,test (default: eval.splits)")
    parser.add_argument("--modes", help="comma-separated: constrained,generate (default: eval.modes)")
    parser.add_argument("--out", help="where metrics.json and predictions go (default: CHECKPOINT/eval)")
    return parser.parse_known_args(argv)


def saved_weights(checkpoint: str) -> tuple[dict, str]:
    """(saved config table, folder with adapter/ and fusion.safetensors)."""
    if os.path.isfile(os.path.join(checkpoint, "best.json")):
        with open(os.path.join(checkpoint, "best.json")) as f:
            return json.load(f)["config"], checkpoint
    if os.path.isfile(os.path.join(checkpoint, "config.json")) and os.path.isdir(os.path.join(checkpoint, "export")):
        with open(os.path.join(checkpoint, "config.json")) as f:
            return json.load(f), os.path.join(checkpoint, "export")
    raise FileNotFoundError(
        f"{checkpoint} is neither a checkpoint (config.json + export/) nor a best/ folder (best.json); "
        "pass a folder under OUTPUT_DIR/checkpoints or OUTPUT_DIR/best"
    )


def saved_feature_dims(cfg, weights: str) -> dict[str, tuple[int, int]]:
    """The fusion module's front ends as trained (fusion.json), so only the evaluated splits need shards."""
    from egmf.model.egmf_model import FUSION_META
    from egmf.train.preflight import feature_dims

    path = os.path.join(weights, FUSION_META)
    if not os.path.isfile(path):  # the text-only ablation has no fusion module
        return feature_dims(cfg)
    with open(path) as f:
        return {name: tuple(dims) for name, dims in json.load(f)["feature_dims"].items()}


def main(argv: list[str] | None = None) -> int:
    from egmf.config import ConfigError, config_from_table

    args, overrides = parse_args(argv)
    try:
        table, weights = saved_weights(args.checkpoint)
        for flag, key in ((args.shards, "data.root"), (args.llm_path, "llm.path")):
            if flag:
                overrides.append(f"--{key}={flag}")
        for flag, key in ((args.datasets, "data.eval"), (args.splits, "eval.splits"), (args.modes, "eval.modes")):
            if flag:
                overrides.append(f"--{key}={json.dumps(flag.split(','))}")
        cfg = config_from_table(table, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(cfg, weights, args.out or os.path.join(args.checkpoint, "eval"))


def run(cfg, weights: str, out_dir: str) -> int:
    import torch

    from egmf.data.transport import kill_leftover_workers
    from egmf.distributed import close_distributed, init_distributed, pick_device, world_info_from_env
    from egmf.model.egmf_model import EGMFModel
    from egmf.train.evaluation import evaluate, flat_metrics, write_predictions

    world = world_info_from_env()
    device = pick_device(world, cfg.train.device)
    if world.world_size > 1:
        init_distributed(world, device)
    try:
        model = EGMFModel.build(cfg.fusion, cfg.prompt, cfg.llm, cfg.lora, saved_feature_dims(cfg, weights), device)
        model.load_exported(weights)
        metrics = {}
        with torch.no_grad():
            for split in cfg.eval.splits:
                results, rows = evaluate(model, cfg, split, world)
                if world.is_logging_rank:
                    metrics.update(flat_metrics(results, split))
                    write_predictions(rows, os.path.join(out_dir, f"predictions_{split}.jsonl"))
        if world.is_logging_rank:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=1)
            for key, value in metrics.items():
                print(f"{key:60s} {value:.4f}")
            print(f"\nwritten to {out_dir}")
    finally:
        close_distributed()
        kill_leftover_workers()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
