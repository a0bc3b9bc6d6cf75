"""`egmf-predict`: a saved model's answers for every sample of a shard split, with class probabilities and gates.

    egmf-predict --model runs/demo/best --data shards/demo --split test --out predictions.jsonl
    egmf-predict --model runs/mosei/best --data /data/shards --datasets mosei --out mosei_test.csv
    egmf-predict --model PACKAGE --data clips.jsonl --datasets mosei --out clips_pred.csv
    torchrun --nproc_per_node 8 launch/predict.py --model ... --out ...     # each sample predicted once

--model is a run's best/ folder, a checkpoint or a package (egmf-export); the
model is rebuilt from the config saved with it (the base LLM from llm.path, or
--llm-path). --data is a shard root: every dataset under it that has the split
and that the model knows is predicted, unless --datasets chooses. --data may
also be one split in the builder's JSONL format, with or without labels, with
--datasets naming its dataset. A dataset the model was not trained on, with
features like a known one's, takes that one's front ends with
--fusion.shared_front_ends.NEW=KNOWN. One output row per sample, sorted by
dataset and id (JSONL; CSV flattens the same):

    id, dataset, answer      the answer text
    prediction               class name or score
    probabilities            classes, constrained decoding: class -> probability (the softmax of the
                             answers' scores; they sum to 1)
    score, spread            scores: the prediction, and in constrained decoding the standard deviation of
                             the answer distribution over the one-decimal scores
    gate                     expert -> level-2 weight (absent without a fusion module)
    label                    the sample's label (absent in an unlabeled split)

In constrained mode (the default) the predictions are the ones egmf-evaluate
scores for the same model. Exit code 2: a bad folder, config, data or
output name, reported before anything is decoded.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from dataclasses import replace

from egmf.errors import CheckpointError, ConfigError, DataError
from egmf.model.config import DECODING_MODES
from egmf.model.fusion import check_feature_dims
from egmf.shards.manifest import MissingManifest, load_manifest
from egmf.train.checkpoint import saved_weights
from egmf.train.config import Config, config_from_table

FORMATS = (".jsonl", ".csv")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egmf-predict",
        description=__doc__.split("\n")[0].split(": ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
        allow_abbrev=False,
    )
    parser.add_argument("--model", required=True, help="a run's best/ folder, a checkpoint folder or a package")
    parser.add_argument("--data", required=True, help="a shard root, or one split as FILE.jsonl (docs/data.md)")
    parser.add_argument("--split", default="test", help="the split to predict (default: %(default)s)")
    parser.add_argument("--datasets", help="comma-separated (default: every dataset of the root the model knows)")
    parser.add_argument("--out", required=True, help="FILE.jsonl or FILE.csv")
    parser.add_argument("--mode", default="constrained", choices=DECODING_MODES, help="decoding (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, help="samples per batch on each rank (default: eval.batch_size)")
    parser.add_argument("--llm-path", help="base model folder (default: llm.path of the saved config)")
    parser.add_argument("--merged", action="store_true", help="a package's merged LLM (egmf-export --merge-lora)")
    return parser


def known_datasets(cfg: Config, weights: str) -> dict[str, tuple[int, int]]:
    """{dataset: (audio, vision) dims} of every dataset the model takes: those it was trained on, and those
    fusion.shared_front_ends lets use their front ends."""
    from egmf.train.saved_model import saved_feature_dims

    dims = saved_feature_dims(cfg, weights)
    return dims | {name: dims[front] for name, front in cfg.fusion.shared_front_ends.items() if front in dims}


def chosen_datasets(args: argparse.Namespace, root: str, known: dict[str, tuple[int, int]]) -> list[str]:
    """--datasets, else every dataset the model knows that has the split under the root; DataError if none, or if
    a chosen one lacks the split, is unknown to the model or has other feature dims."""
    if args.datasets:
        chosen = args.datasets.split(",")
        unknown = [d for d in chosen if d not in known]
        if unknown:
            raise DataError(
                f"the model was not trained on {', '.join(unknown)}; it knows {', '.join(known)}. A dataset featurised "
                "like a known one can use its front ends: --fusion.shared_front_ends.NEW=KNOWN"
            )
        manifests = [load_manifest(root, dataset, args.split) for dataset in chosen]  # a DataError if one is missing
    else:
        manifests = []
        for dataset in known:
            try:
                manifests.append(load_manifest(root, dataset, args.split))
            except MissingManifest:
                continue
        if not manifests:
            raise DataError(f"no {args.split} split of a dataset the model knows ({', '.join(known)}) under {root}")
    check_feature_dims(known, manifests)
    return [m.dataset for m in manifests]


def jsonl_split(args: argparse.Namespace, known: dict[str, tuple[int, int]], root: str) -> None:
    """Build --data FILE.jsonl as ROOT/DATASET/SPLIT (the dataset: --datasets, one the model knows)."""
    from egmf.datasets import get_spec
    from egmf.shards.writer import ShardLimits, build_jsonl_split

    if not args.datasets or "," in args.datasets or args.datasets not in known:
        raise DataError(
            f"--data {args.data}: name the file's dataset with --datasets NAME, one the model knows "
            f"({', '.join(known)})"
        )
    build_jsonl_split(args.data, get_spec(args.datasets), args.split, root, ShardLimits(256))


def prediction_overrides(args: argparse.Namespace, root: str, datasets: list[str]) -> list[str]:
    overrides = [f"--data.root={root}", f"--data.eval={json.dumps(datasets)}"]
    overrides += [f"--eval.splits={json.dumps([args.split])}", f"--eval.select_split={args.split}"]
    overrides += [f"--eval.modes={json.dumps([args.mode])}", f"--eval.select_mode={args.mode}"]
    overrides += [f"--eval.periodic_splits={json.dumps([args.split])}"]
    if args.batch_size:
        overrides.append(f"--eval.batch_size={args.batch_size}")
    if args.llm_path:
        overrides.append(f"--llm.path={args.llm_path}")
    if args.merged:  # the adapter is in the merged weights; the LLM gets none on top
        overrides += [f"--llm.path={merged_llm(args.model)}", "--lora.enabled=false"]
    return overrides


def merged_llm(package: str) -> str:
    from egmf.model.egmf_model import MERGED_DIR

    path = os.path.join(package, MERGED_DIR)
    if not os.path.isdir(path):
        raise ConfigError(f"--merged: {package} holds no {MERGED_DIR}/ (export it with egmf-export --merge-lora)")
    return path


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="egmf-predict-") as scratch:
        try:
            if not args.out.endswith(FORMATS):
                raise ConfigError(f"--out {args.out} must end in .jsonl or .csv")
            table, weights = saved_weights(args.model)
            known = known_datasets(config_from_table(copy.deepcopy(table), overrides), weights)
            root = args.data
            if args.data.endswith(".jsonl"):
                jsonl_split(args, known, root := scratch)
            datasets = chosen_datasets(args, root, known)
            cfg = config_from_table(table, prediction_overrides(args, root, datasets) + overrides)
        except (ConfigError, CheckpointError, DataError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return run(cfg, weights, args.split, args.mode, args.out)


def run(cfg: Config, weights: str, split: str, mode: str, out: str) -> int:
    from tqdm import tqdm

    from egmf.data.loader import EvalLoader
    from egmf.train.evaluation import gather_rows
    from egmf.train.prediction_rows import prediction_row, write_rows
    from egmf.train.saved_model import decoding_world, load_saved_model

    with decoding_world(cfg.train.device) as (world, device):
        model = load_saved_model(cfg, weights, device)
        model.eval()
        experts = list(model.fusion.cfg.experts) if model.fusion is not None else []
        data_cfg = replace(cfg.data, batch_size=cfg.eval.batch_size or cfg.data.batch_size)
        loaders = {d: EvalLoader(data_cfg, d, split, world.rank, world.world_size) for d in cfg.data.eval}
        progress = tqdm(total=sum(map(len, loaders.values())), disable=not world.is_logging_rank, unit="batch")
        rows = []
        for dataset, loader in loaders.items():
            verbaliser = model.prompts.verbaliser(dataset)
            for batch in loader:
                progress.update(1)
                valid = batch.valid.tolist()
                if any(valid):
                    preds = model.predict(batch, mode, cfg.eval.max_new_tokens)
                    rows += [prediction_row(batch, i, preds, verbaliser, experts) for i, ok in enumerate(valid) if ok]
        progress.close()
        rows = gather_rows(rows, world)
        if world.is_logging_rank:
            rows.sort(key=lambda row: (row["dataset"], row["id"]))
            write_rows(out, rows)
            print(f"{len(rows)} predictions of {', '.join(cfg.data.eval)} ({split}, {mode}) written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
