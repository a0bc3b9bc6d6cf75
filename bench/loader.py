"""Loader throughput: the full training loader against the ceiling of plain tar iteration.

    python bench/loader.py                      # 2000 MOSEI-shaped samples, then the joint mix; workers 0/1/2
    python bench/loader.py --samples 64 --joint-samples 32 --workers 0,1   # a quick look
    python bench/loader.py --samples 0 --joint-samples 0                   # the padding table alone

Writes synthetic MOSEI-shaped shards (audio L ~ U{100..500} x 74, vision
L ~ U{75..375} x 35, float16, as the builder writes them), then reads them
(a) as raw bytes (1 MiB reads, no parsing: what the page cache delivers),
(b) with plain `tarfile` iteration, no decoding (the ceiling the issue names,
one process), and (c) with `TrainLoader` (sample order, decode, validate,
collate) for each worker count, one epoch of the same number of samples.
Prints one table; "x ceiling" is relative to (b). Page cache is warm for all:
the shards were just written and are read once before timing.

A second table does the same for the joint recipe's four-dataset mix (equal
weights): MOSEI, SIMS-V2, MELD and CHERMA shapes (SHAPES below), where a
CHERMA sample (about 0.9 MB) weighs fifteen MOSEI ones.

A third table times one step of a loader worker per dataset shape: padding a
batch's features straight into its shared-memory slot (what workers do,
egmf/data/transport.py) against padding into fresh memory and copying that into
the slot (median of several alternating rounds).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.shared_memory import SharedMemory

import numpy as np
from results import add_json_argument, write_results

from egmf.data.collate import collate_features
from egmf.data.config import DataConfig
from egmf.data.loader import TrainLoader
from egmf.datasets import get_spec
from egmf.shards.clean import RawRecord
from egmf.shards.writer import ShardLimits, write_split

# dataset: (audio frames low..high, audio dim, vision frames low..high, vision dim); docs/method.md
SHAPES = {
    "mosei": ((100, 500), 74, (75, 375), 35),
    "sims2": ((300, 925), 25, (75, 232), 177),
    "meld": ((50, 300), 64, (10, 60), 64),
    "cherma": ((300, 543), 1024, (8, 16), 2048),
}


class ShapedRecords(Sequence):
    """Synthetic records of one dataset's shape, made on access (seeded by index) so none are held in memory."""

    def __init__(self, num_samples: int, dataset: str = "mosei", seed: int = 0):
        self.num_samples, self.dataset, self.seed = num_samples, dataset, seed
        self.spec = get_spec(dataset)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> RawRecord:
        rng = np.random.default_rng([self.seed, index])
        (a_low, a_high), a_dim, (v_low, v_high), v_dim = SHAPES[self.dataset]
        if self.spec.labels:
            label = self.spec.labels[int(rng.integers(len(self.spec.labels)))]
        else:
            label = round(float(rng.uniform(*self.spec.label_range)), 1)
        return RawRecord(
            id=f"bench_{index:06d}",
            text="a synthetic utterance",
            label=label,
            audio=rng.standard_normal((int(rng.integers(a_low, a_high + 1)), a_dim), dtype=np.float32),
            vision=rng.standard_normal((int(rng.integers(v_low, v_high + 1)), v_dim), dtype=np.float32),
        )


def plain_tar_pass(paths: list[str]) -> tuple[int, int]:
    """(samples, bytes) of one pass reading every member's bytes with tarfile."""
    samples = num_bytes = 0
    for path in paths:
        with tarfile.open(path, mode="r|") as tar:
            for info in tar:
                data = tar.extractfile(info).read()
                num_bytes += len(data)
                samples += info.name.endswith(".json")
                tar.members = []
    return samples, num_bytes


def raw_read_pass(paths: list[str]) -> int:
    num_bytes = 0
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                num_bytes += len(block)
    return num_bytes


def loader_pass(root: str, datasets: list[str], num_samples: int, workers: int, batch_size: int) -> int:
    cfg = DataConfig(
        root=root,
        train={name: 1.0 for name in datasets},
        batch_size=batch_size,
        num_workers=workers,
        samples_per_epoch=num_samples,
        max_audio_frames=max(SHAPES[name][0][1] for name in datasets),
        max_vision_frames=max(SHAPES[name][2][1] for name in datasets),
    )
    return sum(len(batch) for batch in TrainLoader(cfg))


def peak_rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def run(
    num_samples: int, worker_counts: list[int], batch_size: int, shard_samples: int, datasets: list[str]
) -> list[dict]:
    with tempfile.TemporaryDirectory() as root:
        paths, total_bytes = [], 0
        for dataset in datasets:
            manifest = write_split(
                ShapedRecords(num_samples // len(datasets), dataset),
                get_spec(dataset),
                "train",
                root,
                ShardLimits(max_samples=shard_samples),
                source={"format": "bench"},
            )
            paths += [manifest.shard_url(i) for i in range(len(manifest.shards))]
            total_bytes += sum(s.num_bytes for s in manifest.shards)
        num_samples = num_samples // len(datasets) * len(datasets)
        plain_tar_pass(paths)  # warm the page cache
        start = time.perf_counter()
        samples, _ = plain_tar_pass(paths)
        ceiling = samples / (time.perf_counter() - start)
        start = time.perf_counter()
        raw_read_pass(paths)
        raw = num_samples / (time.perf_counter() - start)
        rows = [
            {"reader": "raw bytes", "workers": "-", "samples_s": raw, "ratio": raw / ceiling},
            {"reader": "plain tarfile (ceiling)", "workers": "-", "samples_s": ceiling, "ratio": 1.0},
        ]
        for workers in worker_counts:
            start = time.perf_counter()
            samples = loader_pass(root, datasets, num_samples, workers, batch_size)
            rate = samples / (time.perf_counter() - start)
            rows.append({"reader": "TrainLoader", "workers": str(workers), "samples_s": rate, "ratio": rate / ceiling})
    for row in rows:
        row["mb_s"] = row["samples_s"] * total_bytes / num_samples / 2**20
        row["rss_main"] = peak_rss_mib(resource.RUSAGE_SELF)
        row["rss_worker"] = peak_rss_mib(resource.RUSAGE_CHILDREN)
    return rows


def padding_cost(batch_size: int, rounds: int) -> list[dict]:
    """Per dataset shape: ms to pad one batch's features into a shared-memory slot, directly and through fresh
    memory plus a copy."""
    rows = []
    for dataset in SHAPES:
        records = [ShapedRecords(batch_size, dataset)[i] for i in range(batch_size)]
        audio = [r.audio.astype(np.float16) for r in records]
        vision = [r.vision.astype(np.float16) for r in records]
        padded = [batch_size * max(a.shape[0] for a in arrays) * arrays[0].shape[1] * 2 for arrays in (audio, vision)]
        slot = SharedMemory(create=True, size=sum(padded))
        try:
            times = time_padding(audio, vision, slot, rounds)
        finally:
            slot.close()
            slot.unlink()
        into, copied = (float(np.median(times[name])) for name in ("into_slot", "then_copy"))
        rows.append({"dataset": dataset, "mb": sum(padded) / 1e6, "into_slot_ms": into, "then_copy_ms": copied})
    return rows


class SlotViews:
    """An `allocate` for collate: consecutive views into one shared-memory slot, from its start."""

    def __init__(self, slot: SharedMemory):
        self.slot, self.used = slot, 0

    def __call__(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        view = np.ndarray(shape, dtype, buffer=self.slot.buf, offset=self.used)
        self.used += view.nbytes
        return view


def time_padding(audio: list[np.ndarray], vision: list[np.ndarray], slot: SharedMemory, rounds: int) -> dict:
    def into_slot():
        views = SlotViews(slot)
        for arrays in (audio, vision):
            collate_features(arrays, 10**6, "uniform", views)

    def then_copy():
        views = SlotViews(slot)
        for arrays in (audio, vision):
            values = collate_features(arrays, 10**6, "uniform").values.numpy()
            views(values.shape, values.dtype)[...] = values

    times = {"into_slot": [], "then_copy": []}
    for _ in range(rounds):
        for step in (then_copy, into_slot):
            start = time.perf_counter()
            for _ in range(5):
                step()
            times[step.__name__].append((time.perf_counter() - start) / 5 * 1000)
    return times


def format_padding_table(rows: list[dict], batch_size: int) -> str:
    lines = [
        f"loader worker: padding one batch of {batch_size} into its shared-memory slot",
        "| dataset | MB per batch | into the slot ms | fresh memory + copy ms | saved |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['dataset']} | {r['mb']:.2f} | {r['into_slot_ms']:.2f} | {r['then_copy_ms']:.2f} | "
        f"{1 - r['into_slot_ms'] / r['then_copy_ms']:.0%} |"
        for r in rows
    ]
    return "\n".join(lines)


def format_table(rows: list[dict], title: str, num_samples: int, batch_size: int) -> str:
    lines = [
        f"{title}: {num_samples} samples, batch {batch_size}, cpus {os.cpu_count()}",
        "| reader | workers | samples/s | MB/s | x ceiling |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['reader']} | {r['workers']} | {r['samples_s']:.0f} | {r['mb_s']:.0f} | {r['ratio']:.2f} |" for r in rows
    ]
    lines.append(
        f"peak RSS: main process {rows[-1]['rss_main']:.0f} MiB, largest worker {rows[-1]['rss_worker']:.0f} MiB"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2000, help="MOSEI-shaped samples (0: skip)")
    parser.add_argument("--joint-samples", type=int, default=800, help="samples of the four-dataset mix (0: skip)")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-samples", type=int, default=250)
    parser.add_argument("--padding-rounds", type=int, default=5, help="rounds of the padding table (0: skip)")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    tables = {}
    if args.samples:
        tables["mosei"] = run(args.samples, workers, args.batch_size, args.shard_samples, ["mosei"])
        print(format_table(tables["mosei"], "MOSEI-shaped", args.samples, args.batch_size))
    if args.joint_samples:
        shard_samples = max(1, args.shard_samples // 4)  # CHERMA samples are large; several shards per set
        tables["joint"] = run(args.joint_samples, workers, args.batch_size, shard_samples, list(SHAPES))
        print()
        title = "joint mix (mosei, sims2, meld, cherma)"
        print(format_table(tables["joint"], title, args.joint_samples, args.batch_size))
    if args.padding_rounds:
        tables["padding"] = padding_cost(args.batch_size, args.padding_rounds)
        print()
        print(format_padding_table(tables["padding"], args.batch_size))
    write_results(args.json, tables)
    return tables


if __name__ == "__main__":
    main(sys.argv[1:])
