"""`egmf-shards` (or `python -m egmf.shards`): build shards from public releases, build the demo, inspect shards.

    egmf-shards build --format mmsa --dataset mosei --input unaligned_50.pkl --out data/shards
    egmf-shards build --format mse-adapter --dataset meld --input MELD_DIR --out data/shards
    egmf-shards build --format jsonl --spec my_set.toml --split train --input train.jsonl --out data/shards
    egmf-shards demo --out shards/demo [--datasets demo_key_en --train-size 16384]
    egmf-shards inspect data/shards [--verify] [--tokenizer MODEL_DIR --max-text-tokens 96]

Everything runs on a CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys

from egmf.datasets import (
    ALL_DEMO_DATASETS,
    DEMO_DATASETS,
    SPECS,
    DatasetSpec,
    check_same_dataset,
    get_spec,
    is_known,
    read_spec_file,
    spec_from_dict,
)
from egmf.errors import DataError
from egmf.shards.demo import build_demo
from egmf.shards.manifest import MissingManifest, SplitManifest, find_manifests, load_manifest
from egmf.shards.sources import read_mmsa, read_mse_adapter
from egmf.shards.texts import count_truncated, read_texts
from egmf.shards.writer import ShardLimits, build_jsonl_split, write_splits

FORMATS = {"mmsa": ("mosei", "sims2"), "mse-adapter": ("meld", "cherma"), "jsonl": ()}
"""Input format -> the datasets its releases hold; jsonl holds any dataset with a spec (docs/data.md)."""
DEFAULT_SHARD_BYTES = 256 * 2**20


def parse_size(text: str) -> int:
    """'256MB', '1GiB', '500k', '4096' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 256MB or 1GiB")
    number, unit, _ = match.groups()
    size = int(float(number) * 1024 ** "_kmgt".index(unit or "_"))
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size of at least one byte")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egmf-shards", description=__doc__.split("\n")[0].split(": ", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="convert a public release into shards")
    build.add_argument("--format", required=True, choices=sorted(FORMATS))
    build.add_argument("--dataset", help="mmsa: mosei, sims2; mse-adapter: meld, cherma; jsonl: any name")
    build.add_argument(
        "--input", required=True, help="the MMSA pickle, the folder of *_train/valid/test.pkl, or a split's .jsonl"
    )
    build.add_argument("--out", required=True, help="shard root; writes OUT/DATASET/SPLIT/")
    jsonl = build.add_argument_group("jsonl format (docs/data.md)")
    jsonl.add_argument("--split", help="the split the .jsonl holds: train, valid, test or another name")
    jsonl.add_argument("--spec", help="dataset spec (.toml or .json) of a dataset that is not built in")
    jsonl.add_argument("--lang", help="instead of --spec: the prompt's language (en, zh)")
    jsonl.add_argument("--task", help="instead of --spec: classification or regression")
    jsonl.add_argument("--labels", help="instead of --spec: comma-separated class names (classification)")
    jsonl.add_argument("--label-range", help="instead of --spec: LOW,HIGH of the scores (regression)")
    add_shard_size_args(build)
    build.add_argument(
        "--shuffle-seed",
        type=int,
        default=0,
        help="seed of the build-time shuffle of train (valid/test keep input order)",
    )
    build.add_argument("--label-map", help='JSON file {"raw label": "valid label"} for other label spellings')
    add_text_count_args(build)

    demo = commands.add_parser("demo", help="write the synthetic demo sets")
    demo.add_argument("--out", required=True)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train-size", type=int, default=2048)
    demo.add_argument("--eval-size", type=int, default=128, help="samples in each of valid and test")
    demo.add_argument("--shard-samples", type=positive_int, default=64)
    demo.add_argument(
        "--datasets",
        type=demo_sets,
        default=DEMO_DATASETS,
        help=f"comma-separated demo sets (default: the demo mix); any of {', '.join(ALL_DEMO_DATASETS)}",
    )

    inspect = commands.add_parser("inspect", help="summarise the shards under a root")
    inspect.add_argument("root")
    inspect.add_argument("--verify", action="store_true", help="also check each shard's size and sha256")
    add_text_count_args(inspect)
    return parser


def add_text_count_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", help="a model folder: count the utterances longer than --max-text-tokens")
    parser.add_argument("--max-text-tokens", type=int, default=64, help="prompt.max_text_tokens of the recipe")


def truncation_counter(args: argparse.Namespace):
    """A function manifest -> report line of the utterances the prompt would cut, or None without --tokenizer."""
    if not args.tokenizer:
        return None
    if args.max_text_tokens < 1:
        raise DataError(f"--max-text-tokens must be >= 1, got {args.max_text_tokens}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    except (OSError, ValueError) as exc:
        raise DataError(f"--tokenizer {args.tokenizer}: cannot load a tokenizer ({exc})") from None

    def report(manifest: SplitManifest) -> str:
        texts = read_texts(manifest)
        if texts is None:
            return "not counted: the split has no texts.jsonl (built before it existed); rebuild it"
        cut = count_truncated(tokenizer, texts, args.max_text_tokens)
        return f"{cut} of {len(texts)} ({cut / len(texts):.1%}) longer than {args.max_text_tokens} tokens"

    return report


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def add_shard_size_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard-samples", type=positive_int, help="at most this many samples per shard")
    parser.add_argument(
        "--shard-bytes",
        type=parse_size,
        help="at most this many bytes per shard (default 256MB when --shard-samples is not given)",
    )


def run_build(args: argparse.Namespace) -> list[SplitManifest]:
    inline_spec = [flag for flag in ("spec", "lang", "task", "labels", "label_range") if getattr(args, flag)]
    if args.format != "jsonl" and (args.split or inline_spec):
        flags = ", ".join(f"--{flag.replace('_', '-')}" for flag in ["split"] * bool(args.split) + inline_spec)
        raise DataError(f"{flags}: only the jsonl format takes these; {args.format} releases hold known datasets")
    if args.format != "jsonl" and args.dataset not in FORMATS[args.format]:
        raise DataError(
            (f"--dataset {args.dataset} is not in the {args.format} format" if args.dataset else "--dataset is needed")
            + f"; {args.format} holds {', '.join(FORMATS[args.format])}"
        )
    label_map = read_label_map(args.label_map) if args.label_map else None
    limits = ShardLimits(args.shard_samples, args.shard_bytes or (None if args.shard_samples else DEFAULT_SHARD_BYTES))
    source = {"format": args.format, "input": os.path.abspath(args.input)}
    if args.format == "jsonl":
        if not args.split:
            raise DataError("--split: name the split the .jsonl file holds (train, valid, test, ...)")
        spec = jsonl_spec(args)
        check_other_splits(args.out, spec, args.split)
        seed = args.shuffle_seed if args.split == "train" else None
        return [build_jsonl_split(args.input, spec, args.split, args.out, limits, seed, label_map)]
    splits = read_mmsa(args.input) if args.format == "mmsa" else read_mse_adapter(args.input, args.dataset)
    return write_splits(splits, get_spec(args.dataset), args.out, limits, source, args.shuffle_seed, label_map)


def jsonl_spec(args: argparse.Namespace) -> DatasetSpec:
    """The dataset's spec: --spec FILE, or --lang/--task/--labels/--label-range, or a known dataset's."""
    given = {
        "lang": args.lang,
        "task": args.task,
        "labels": args.labels and [name.strip() for name in args.labels.split(",")],
        "label_range": args.label_range and parse_range(args.label_range),
    }
    given = {key: value for key, value in given.items() if value}
    if args.spec and given:
        raise DataError("give the dataset's spec as --spec FILE or as --lang/--task/--labels/--label-range, not both")
    if args.spec:
        spec = read_spec_file(args.spec)
        if args.dataset and args.dataset != spec.name:
            raise DataError(f"--dataset {args.dataset} differs from the name in {args.spec} ({spec.name})")
    elif given:
        spec = spec_from_dict({"name": args.dataset, **given}, "the command line (--dataset/--lang/--task/...)")
    elif args.dataset and is_known(args.dataset):
        return get_spec(args.dataset)
    else:
        raise DataError(
            f"--dataset {args.dataset} is not built in: describe it with --spec FILE (docs/data.md) or with --lang, "
            "--task and --labels or --label-range"
        )
    if spec.name in SPECS:
        check_same_dataset(SPECS[spec.name], spec, "built in")
    return spec


def check_other_splits(out: str, spec: DatasetSpec, split: str) -> None:
    """The dataset's other splits under OUT must have been built with the same spec (a model reads them as one)."""
    folder = os.path.join(out, spec.name)
    others = sorted(name for name in os.listdir(folder) if name != split) if os.path.isdir(folder) else []
    for other in others:
        try:
            built = load_manifest(out, spec.name, other)
        except MissingManifest:
            continue
        try:
            check_same_dataset(built.spec(), spec, f"built in {built.location}")
        except DataError as exc:
            raise DataError(
                f"{exc}, or rebuild every split of {folder} with this spec (remove the folder first)"
            ) from None


def demo_sets(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in ALL_DEMO_DATASETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{unknown or text!r}: demo sets are {', '.join(ALL_DEMO_DATASETS)}")
    return names


def parse_range(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise DataError(f"--label-range {text!r} must be LOW,HIGH (two numbers)") from None


def read_label_map(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            label_map = json.load(f)
    except OSError as exc:
        raise DataError(f"--label-map {path}: cannot read it ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f'--label-map {path} is not valid JSON ({exc}); write {{"raw label": "valid label"}}') from None
    if not isinstance(label_map, dict) or not all(isinstance(v, str) for v in label_map.values()):
        raise DataError(f'--label-map {path} must be one JSON object {{"raw label": "valid label", ...}}')
    return label_map


def build_summary(manifests: list[SplitManifest], count_cut=None) -> str:
    lines = []
    for m in manifests:
        fixes = {k: v for k, v in m.build_report.items() if k != "samples" and v}
        fixed = ", ".join(f"{k}={v}" for k, v in fixes.items()) or "nothing to fix"
        lines.append(
            f"{m.dataset}/{m.split}: {m.num_samples} samples in {len(m.shards)} shard(s) -> {m.location}; "
            f"cleaning: {fixed}"
        )
        if count_cut:
            lines.append(f"  utterances: {count_cut(m)}")
    return "\n".join(lines)


def inspect_report(root: str, verify: bool = False, count_cut=None) -> str:
    manifests = find_manifests(root)
    if not manifests:
        raise DataError(f"no manifest.json under {root}; build shards first (egmf-shards build/demo)")
    lines = []
    for m in manifests:
        size = sum(s.num_bytes for s in m.shards)
        lines.append(f"== {m.dataset}/{m.split}  ({m.lang}, {m.task})")
        lines.append(f"   samples {m.num_samples}  shards {len(m.shards)}  bytes {size}")
        lines.append(f"   dims    audio {m.audio_dim}  vision {m.vision_dim}")
        if not m.labeled:
            lines.append("   labels  none (an unlabeled split: for evaluation and prediction only)")
        elif m.task == "classification":
            lines.append("   labels  " + "  ".join(f"{name}={count}" for name, count in m.label_stats.items()))
        else:
            s = m.label_stats
            lines.append(f"   range   [{s['min']}, {s['max']}] of {m.label_range}  mean {s['mean']}  std {s['std']}")
        for modality, s in m.length_stats.items():
            lines.append(
                f"   {modality:<7} frames min {s['min']} p50 {s['p50']:g} p90 {s['p90']:g} "
                f"p99 {s['p99']:g} max {s['max']}"
            )
        for unit, s in m.text_stats.items():
            lines.append(f"   text    {unit:<5} p50 {s['p50']:g} p90 {s['p90']:g} p99 {s['p99']:g} max {s['max']}")
        if count_cut:
            lines.append(f"   cut     {count_cut(m)}")
        for modality, s in m.feature_stats.items():
            if s.get("zero_variance_dims"):
                lines.append(f"   {modality:<7} {s['zero_variance_dims']} dims of zero variance (standardised to 0)")
        fixes = {k: v for k, v in m.build_report.items() if k != "samples" and v}
        if fixes:
            lines.append("   fixed   " + "  ".join(f"{k}={v}" for k, v in fixes.items()))
        if verify:
            lines.append("   verify  " + verify_shards(m))
    return "\n".join(lines)


def verify_shards(manifest: SplitManifest) -> str:
    problems = []
    for index, shard in enumerate(manifest.shards):
        path = manifest.shard_url(index)
        if not os.path.isfile(path):
            problems.append(f"{shard.name} missing")
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if os.path.getsize(path) != shard.num_bytes or digest.hexdigest() != shard.sha256:
            problems.append(f"{shard.name} differs from the manifest (size or sha256)")
    return "ok" if not problems else "FAILED: " + "; ".join(problems)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "build":
            count_cut = truncation_counter(args)
            print(build_summary(run_build(args), count_cut))
        elif args.command == "demo":
            sizes = {"train": args.train_size, "valid": args.eval_size, "test": args.eval_size}
            print(build_summary(build_demo(args.out, sizes, args.seed, args.shard_samples, args.datasets)))
        else:
            report = inspect_report(args.root, args.verify, truncation_counter(args))
            print(report)
            return 1 if "FAILED" in report else 0
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable or full output: nothing half-written is published
        print(f"error: cannot write the shards: {exc}; choose an --out you can write to", file=sys.stderr)
        return 2
    return 0
