"""Ablations: the demo trained once per variant of the model, one table of test scores per demo set.

    python bench/ablations.py                                  # every variant, the demo recipe's schedule
    python bench/ablations.py --variants full,no_local --steps 400 --work-dir /tmp/ablations
    python bench/ablations.py --jobs 2                         # two variants at a time, the cores split between them
    python bench/ablations.py --two-phase --variants full,no_global --steps 3000   # the two-phase demo, five sets
    python bench/ablations.py --two-phase --ranks 2 --seed 1   # each run on 2 DeepSpeed ranks, as the recipes run
    (the same command again reuses every variant already trained in --work-dir with the same settings)

Each variant is `launch/train.py` on the embedded demo recipe (one CPU
process, or --ranks CPU ranks under the DeepSpeed launcher) with a few
overrides, the same data, seed and steps. With --two-phase each variant
trains the two-phase demo instead: launch/recipes/demo-first.toml
(the look-up set demo_key_en alone), then demo-phased.toml from its model (all
five sets), both with the variant's overrides; --steps is the second phase's,
the table shows the second phase's model and the time of both. The scores are
those of the final model on the test splits, constrained decoding; no
checkpoint is selected, so no variant profits from a lucky evaluation. Each
demo set is designed to need one expert (egmf/shards/demo.py), so removing that
expert must cost accuracy on its set. Prints one Markdown table: the test
metric per set (weighted F1 for the class sets, MAE for the score sets) and
the level-2 gate each set gave its designed expert; figures: docs/model.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from results import add_json_argument, comma_list, write_results

from egmf.atomic import write_json
from egmf.datasets import DEMO_DATASETS, get_spec
from egmf.demo_assets import build_demo_assets
from egmf.distributed import free_port
from egmf.shards.demo import DESIGNED_FOR
from egmf.train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_RECIPE = "launch/recipes/demo-first.toml"
PHASED_RECIPE = "launch/recipes/demo-phased.toml"
GATE_OFF = [
    "--fusion.balance_coef=0",
    "--fusion.z_loss_coef=0",
    "--fusion.gate_noise=0",
    "--fusion.gate_warmup_ratio=0",
]
VARIANTS = {
    "full": [],
    "no_local": ["--fusion.experts=['semantic', 'global']"],
    "no_semantic": ["--fusion.experts=['local', 'global']"],
    "no_global": ["--fusion.experts=['local', 'semantic']"],
    "uniform_gate": ["--fusion.gating=uniform"],
    "joint_global": ["--fusion.global_scope=joint"],
    "no_alignment": ["--fusion.semantic_alignment=false"],
    "raw_updates": ["--fusion.normalised_updates=false"],
    "no_level1_gate": ["--fusion.inner_gating=false"],
    "no_gate_regularisation": GATE_OFF,
    "two_pseudo_tokens": ["--fusion.num_pseudo_tokens=2"],
    "free_tokens": ["--fusion.normalised_tokens=false"],
    "no_lora": ["--lora.enabled=false"],
    "text_only": ["--prompt.text_only=true"],
}
VARIANT_RECORD = "ablation_variant.json"
"""Written beside a variant's run once it finished: its command and training time, so a rerun with --work-dir
reuses it instead of training again."""


def headline(dataset: str) -> str:
    """The metric a set is tabled by: weighted F1 for a class set, MAE for a score set."""
    return "wf1" if get_spec(dataset).labels else "mae"


def bench_datasets(two_phase: bool) -> tuple[str, ...]:
    """The sets the variants train and are scored on: the demo mix, or the two-phase demo's second phase's."""
    return tuple(load_config(os.path.join(REPO, PHASED_RECIPE), []).data.eval) if two_phase else DEMO_DATASETS


def train_variant(
    name: str, overrides: list[str], work_dir: str, datasets: tuple[str, ...], args: argparse.Namespace
) -> dict:
    out = os.path.join(work_dir, name)
    shared = [f"--data.root={work_dir}/shards", f"--llm.path={work_dir}/tiny-llm", "--train.log_every=50"]
    shared += ["--eval.every=0", "--eval.splits=['test']", "--eval.select_split=test", "--eval.modes=['constrained']"]
    shared += ["--checkpoint.every=0", "--mlflow.system_metrics=false", f"--data.num_workers={args.num_workers}"]
    shared += [f"--train.seed={args.seed}", f"--data.seed={args.seed}", *args.override, *overrides]
    if args.two_phase:
        first, out = os.path.join(out, "first"), os.path.join(out, "second")
        first_steps = [f"--train.steps={args.first_steps}"] if args.first_steps else []
        seconds = train_once(first, ["--config", FIRST_RECIPE, *first_steps, *shared], name, args)
        phased = ["--config", PHASED_RECIPE, f"--train.init_from={first}/best", f"--train.steps={args.steps}"]
        seconds += train_once(out, [*phased, *shared], name, args)
    else:
        seconds = train_once(out, [f"--train.steps={args.steps}", *shared], name, args)
    with open(os.path.join(out, "final_metrics.json")) as f:
        metrics = json.load(f)["last"]
    with open(os.path.join(out, "predictions", "final", "test.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {
        "variant": name,
        "seconds": seconds,
        # None: not evaluated
        "scores": {d: metrics.get(f"eval/test/{d}/constrained/{headline(d)}") for d in datasets},
        "gates": designed_gates(rows, datasets),
    }


def train_once(out: str, train_args: list[str], name: str, args: argparse.Namespace) -> float:
    """Train one run into `out` (its training time), or reuse it: a run finished there with the same command and
    code is not trained again."""
    command = [*launcher(args.ranks), f"--train.output_dir={out}", *train_args]
    code = code_fingerprint()
    seconds = finished_seconds(out, command, code)
    if seconds is None:
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        port = ["--master_port", str(free_port())] if args.ranks > 1 else []  # not in the record: it changes per run
        run = command[:1] + port + command[1:]
        done = subprocess.run(run, cwd=REPO, capture_output=True, text=True, env=variant_env(args.jobs * args.ranks))
        if done.returncode != 0:
            raise RuntimeError(f"variant {name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        seconds = time.perf_counter() - start
        write_json(os.path.join(out, VARIANT_RECORD), {"command": command, "code": code, "seconds": seconds})
    return seconds


def launcher(ranks: int) -> list[str]:
    """One process, or `ranks` CPU ranks under the DeepSpeed launcher with the ZeRO-2 config, as the recipes run."""
    if ranks == 1:
        return [sys.executable, "launch/train.py"]
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [deepspeed, "--num_gpus", str(ranks), "launch/train.py", "--deepspeed", "ds_configs/zero2.json"]


def variant_env(processes: int) -> dict[str, str]:
    """With several training processes at once, each takes its share of the cores: torch's default (every core per
    process) oversubscribes them and slows every run down many times over (docs/benchmarks.md)."""
    env = dict(os.environ)
    if processes > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return env


def code_fingerprint() -> str:
    """sha256 over the trainer's code and recipes: a variant trained before any of them changed (the model, the
    demo's design, the recipe the command leaves implicit) is trained again, not reported as today's."""
    digest = hashlib.sha256()
    for folder, suffixes in (("egmf", (".py",)), ("launch", (".py", ".toml"))):
        for root, dirs, files in sorted(os.walk(os.path.join(REPO, folder))):
            dirs.sort()
            for name in sorted(f for f in files if f.endswith(suffixes)):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, REPO).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def finished_seconds(out: str, command: list[str], code: str) -> float | None:
    """The training time of a variant already trained in `out` with exactly this command and code, else None."""
    try:
        with open(os.path.join(out, VARIANT_RECORD)) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return record["seconds"] if record.get("command") == command and record.get("code") == code else None


def designed_gates(rows: list[dict], datasets: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """{dataset: {expert: mean level-2 weight on its test split}}; {} without a learned fusion."""
    gates: dict[str, dict[str, float]] = {}
    for dataset in datasets:
        weights = [r["gate"] for r in rows if r["dataset"] == dataset and r["gate"]]
        if weights:
            gates[dataset] = {e: sum(w[e] for w in weights) / len(weights) for e in weights[0]}
    return gates


def format_table(rows: list[dict], steps: int, datasets: tuple[str, ...], two_phase: bool, ranks: int) -> str:
    designed = [d for d in datasets if DESIGNED_FOR[d] != "all"]  # a set that needs every expert has no one gate
    short = ", ".join(d.removeprefix("demo_") for d in designed)
    phase = " (the two-phase demo's second phase)" if two_phase else ""
    processes = "one CPU process" if ranks == 1 else f"{ranks} CPU ranks"
    lines = [
        f"{steps} steps{phase}, {processes}, final model, test splits, constrained decoding",
        "| variant | "
        + " | ".join(f"{d} {headline(d)} ({DESIGNED_FOR[d]})" for d in datasets)
        + f" | designed expert's gate ({short}) | time |",
        "|---|" + "---|" * len(datasets) + "---|---|",
    ]
    for row in rows:
        scores = " | ".join("-" if row["scores"][d] is None else f"{row['scores'][d]:.3f}" for d in datasets)
        gates = ", ".join(
            f"{row['gates'][d].get(DESIGNED_FOR[d], float('nan')):.2f}" if d in row["gates"] else "-" for d in designed
        )
        lines.append(f"| {row['variant']} | {scores} | {gates} | {row['seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=1600, help="optimizer steps per variant (two-phase: the second's)")
    parser.add_argument("--two-phase", action="store_true", help="train the two-phase demo (five sets) per variant")
    parser.add_argument("--first-steps", type=int, help="the first phase's steps (default: its recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at the same time (the cores are split)")
    parser.add_argument("--ranks", type=int, default=1, help="DeepSpeed ranks per run (1: one plain process)")
    parser.add_argument("--work-dir", help="shards, tiny LLM and runs go here (default: a temporary folder)")
    parser.add_argument("--override", action="append", default=[], help="--section.key=value for every variant")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    names = comma_list(parser, args.variants, VARIANTS, "variants")
    if args.ranks < 1:
        parser.error(f"--ranks {args.ranks}: give 1 (one plain process) or more (CPU ranks under DeepSpeed)")
    with tempfile.TemporaryDirectory() as scratch:
        work_dir = args.work_dir or scratch
        datasets = bench_datasets(args.two_phase)
        splits = [(d, s) for d in datasets for s in ("train", "valid", "test")]
        build_demo_assets(os.path.join(work_dir, "shards"), splits, os.path.join(work_dir, "tiny-llm"))
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            running = [pool.submit(train_variant, name, VARIANTS[name], work_dir, datasets, args) for name in names]
            rows = []
            for future in running:  # in the order asked for, whichever finishes first
                rows.append(future.result())
                print(f"{rows[-1]['variant']}: {rows[-1]['scores']} ({rows[-1]['seconds']:.0f} s)", file=sys.stderr)
    print(format_table(rows, args.steps, datasets, args.two_phase, args.ranks))
    write_results(args.json, rows)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
