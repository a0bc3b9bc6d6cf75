"""Two real gloo ranks x two workers: collectives every step prove equal step counts (unequal ones hang
into the timeout), and gathered ids prove every evaluation sample is seen exactly once."""

from __future__ import annotations

import datetime
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import write_demo_split

from egmf.data.config import DataConfig
from egmf.data.loader import EvalLoader, TrainLoader


def run_rank(rank: int, world_size: int, root: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    cfg = DataConfig(root=root, train={"demo_cls_en": 1.0, "demo_reg_zh": 1.0}, batch_size=3, num_workers=2)
    train_datasets = []
    for batch in TrainLoader(cfg, rank, world_size):
        dist.all_reduce(torch.ones(1))  # a rank with more batches would wait here until the timeout
        train_datasets.append(batch.dataset)
    eval_ids, eval_steps = [], 0
    for batch in EvalLoader(cfg, "demo_cls_en", "test", rank, world_size):
        dist.all_reduce(torch.ones(1))
        eval_steps += 1
        eval_ids += [i for i, ok in zip(batch.ids, batch.valid.tolist(), strict=True) if ok]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, eval_ids)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"train_datasets": train_datasets, "eval_steps": eval_steps, "all_eval_ids": gathered}, f)
    dist.destroy_process_group()


def test_two_gloo_ranks_equal_steps_and_exactly_once(tmp_path):
    root = str(tmp_path / "shards")
    write_demo_split(root, "demo_cls_en", "train", 29, shard_samples=8)  # 4 shards
    write_demo_split(root, "demo_reg_zh", "train", 50, shard_samples=20)  # 3 shards
    write_demo_split(root, "demo_cls_en", "test", 23, shard_samples=4)  # 6 uneven shards
    mp.spawn(run_rank, args=(2, root, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(results[0]["train_datasets"]) == len(results[1]["train_datasets"]) == -(-(29 + 50) // (3 * 2))
    # every rank trains on the same dataset at each step (same graph for ZeRO-2's bucketed reductions)
    assert results[0]["train_datasets"] == results[1]["train_datasets"]
    assert set(results[0]["train_datasets"]) == {"demo_cls_en", "demo_reg_zh"}
    assert results[0]["eval_steps"] == results[1]["eval_steps"]
    ids = [i for rank_ids in results[0]["all_eval_ids"] for i in rank_ids]
    assert sorted(ids) == [f"demo_cls_en_test_{i:05d}" for i in range(23)]
