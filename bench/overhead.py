"""The trainer's overhead: one step of our trainer against a bare DeepSpeed loop, same engine, 2 CPU ranks.

    python bench/overhead.py                       # the demo model and batch, 40 timed steps per loop
    python bench/overhead.py --steps 4 --warmup 2  # a tiny run (the test runs this)

Both loops run on the same DeepSpeed engine (ZeRO-2, ds_configs/zero2.json),
model (the demo recipe: tiny LLM + fusion) and batch size, in 2 processes
started as the launchers start them (RANK, WORLD_SIZE, MASTER_ADDR in the
environment):

- bare: `out = engine(batch); engine.backward(out.loss); engine.step()` on
  batches built before timing;
- trainer: `Trainer.train_loop` as `launch/train.py` runs it, with the loader
  streaming from the shards, the non-finite check, the stop-signal check, the
  logging windows and MLflow (SQLite) included; checkpoints and evaluation off.

A step is timed from one step's start to the next one's, on rank 0 (which
also does the logging).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from results import add_json_argument, write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_SIZE = 2


def step_times(stamps: list[float], warmup: int) -> list[float]:
    return list(np.diff(stamps)[warmup:])


def bare_loop(engine, batches, warmup: int) -> list[float]:
    from egmf.distributed import barrier

    barrier()
    stamps = []
    for batch in batches:
        stamps.append(time.perf_counter())
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
    stamps.append(time.perf_counter())
    return step_times(stamps, warmup)


def trainer_loop(trainer, steps: int, warmup: int) -> list[float]:
    """Our loop, unchanged, stamped at each optimizer step's start; it stops (and saves) after the last one."""
    from egmf.distributed import barrier

    stamps = []
    step = trainer.train_step

    def stamped(batches, window):
        stamps.append(time.perf_counter())
        step(batches, window)

    trainer.train_step = stamped
    trainer.cfg.train.stop_at_step = trainer.state.step + warmup + steps + 1
    barrier()
    batches = trainer.batches()
    try:
        trainer.train_loop(batches)
    finally:
        batches.close()
    return step_times(stamps, warmup)


def allreduce_seconds(repeats: int = 200) -> float:
    """One all-reduce of a one-element tensor plus its host read: what the trainer's per-step checks cost."""
    import torch
    import torch.distributed as dist

    flag = torch.zeros(1)
    for _ in range(10):
        dist.all_reduce(flag)
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(flag)
        flag.item()
    return (time.perf_counter() - start) / repeats


def worker(args) -> None:
    from egmf.distributed import close_distributed, init_distributed
    from egmf.train import main as entry
    from egmf.train.trainer import Trainer

    train_args = [
        f"--data.root={args.shards}",
        f"--llm.path={args.llm}",
        f"--train.output_dir={args.out}",
        "--train.steps=1000000",
        f"--train.log_every={args.log_every}",
        f"--data.batch_size={args.batch_size}",
        f"--data.num_workers={args.num_workers}",
        "--eval.every=0",
        "--checkpoint.every=0",
        "--mlflow.system_metrics=false",
        "--deepspeed=ds_configs/zero2.json",
    ]
    cfg, ds_config, world, device = entry.configure(*entry.build_parser().parse_known_args(train_args))
    entry.setup_logging(world)
    init_distributed(world, device)
    trainer = Trainer(cfg, ds_config, world, device)
    trainer.setup([])
    trainer.engine.train()
    source = trainer.batches()
    prebuilt = [next(source).to(device) for _ in range(args.warmup + args.steps)]
    source.close()
    results = {"bare": bare_loop(trainer.engine, prebuilt, args.warmup)}
    results["trainer"] = trainer_loop(trainer, args.steps, args.warmup)
    results["allreduce"] = allreduce_seconds()
    trainer.end("FINISHED")
    if world.rank == 0:
        with open(os.path.join(args.out, "overhead.json"), "w") as f:
            json.dump(results, f)
    close_distributed()


def demo_assets(folder: str) -> tuple[str, str]:
    from egmf.model.tiny import build_tiny_llm
    from egmf.shards.demo import build_demo

    shards, llm = os.path.join(folder, "shards"), os.path.join(folder, "tiny-llm")
    build_demo(shards, {"train": 256, "valid": 8, "test": 8}, seed=0, shard_samples=32)
    build_tiny_llm(llm)
    return shards, llm


def launch(args, folder: str) -> dict[str, list[float]]:
    from egmf.distributed import free_port

    shards, llm = demo_assets(folder)
    out = os.path.join(folder, "out")
    command = [sys.executable, os.path.abspath(__file__), "--worker", f"--shards={shards}", f"--llm={llm}"]
    command += [f"--out={out}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
    command += [f"--batch-size={args.batch_size}", f"--num-workers={args.num_workers}"]
    command += [f"--log-every={args.log_every}"]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(WORLD_SIZE)}
    ranks = [
        subprocess.Popen(command, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE)
        for r in range(WORLD_SIZE)
    ]
    errors = [rank.communicate(timeout=1800)[1] for rank in ranks]
    for rank, error in zip(ranks, errors, strict=True):
        if rank.returncode:
            raise RuntimeError(f"a rank failed ({rank.returncode}):\n{error.decode()[-4000:]}")
    with open(os.path.join(out, "overhead.json")) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=5, help="steps run before timing")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=1, help="loader workers per rank (trainer loop)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--shards", "--llm", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    add_json_argument(parser)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return []
    with tempfile.TemporaryDirectory() as folder:
        results = launch(args, folder)
    allreduce = results.pop("allreduce")
    bare = float(np.mean(results["bare"]))
    rows = []
    print(
        f"2 CPU ranks, ZeRO-2, batch {args.batch_size} per rank, {args.steps} timed steps after {args.warmup}, "
        f"{args.num_workers} loader worker(s) per rank, logging every {args.log_every} steps"
    )
    print("| loop | ms/step mean | median | p90 | vs bare |")
    print("|---|---|---|---|---|")
    for name, seconds in results.items():
        # The ratio from the seconds, as `bare` is: the bare loop's is then exactly 1 (scaling first is not).
        times, ratio = np.asarray(seconds) * 1e3, float(np.mean(seconds) / bare)
        row = {"loop": name, "mean_ms": float(times.mean()), "ratio": ratio}
        rows.append(row)
        print(
            f"| {name} | {times.mean():.1f} | {np.median(times):.1f} | {np.percentile(times, 90):.1f} "
            f"| {row['ratio']:.3f}x |"
        )
    print(f"one 1-element all-reduce + .item(): {allreduce * 1e6:.0f} us (the trainer does 2 per step)")
    write_results(args.json, rows)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
