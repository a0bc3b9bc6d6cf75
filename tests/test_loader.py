"""Training and evaluation loaders: equal steps, determinism, exact resume, exactly-once evaluation."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import write_demo_split

from egmf.data.collate import collate, truncate_frames
from egmf.data.config import DataConfig
from egmf.data.loader import EvalLoader, TrainLoader
from egmf.shards.format import Sample
from egmf.shards.manifest import load_manifest


def ids_of(loader, limit=None) -> list[tuple[str, ...]]:
    out = []
    for batch in loader:
        out.append(tuple(batch.ids))
        if limit is not None and len(out) == limit:
            break
    return out


def uneven_root(tmp_path) -> str:
    """Two train sets with different sizes and shard counts (3 and 7 shards, uneven last shards)."""
    root = str(tmp_path)
    write_demo_split(root, "demo_cls_en", "train", 41, shard_samples=16)
    write_demo_split(root, "demo_reg_zh", "train", 97, shard_samples=15)
    return root


@pytest.mark.parametrize("num_workers", [0, 1, 3])
def test_every_rank_takes_the_same_number_of_steps(tmp_path, num_workers):
    cfg = DataConfig(
        root=uneven_root(tmp_path),
        train={"demo_cls_en": 1.0, "demo_reg_zh": 3.0},
        batch_size=5,
        num_workers=num_workers,
    )
    lengths = []
    for rank in range(3):
        loader = TrainLoader(cfg, rank=rank, world_size=3)
        batches = [len(b) for b in loader]
        assert len(batches) == len(loader) == -(-(41 + 97) // (5 * 3))
        assert set(batches) == {5}
        lengths.append(len(batches))
    assert len(set(lengths)) == 1


def test_epoch_length_does_not_depend_on_workers(tmp_path):
    root = uneven_root(tmp_path)
    steps = {
        w: len(
            list(
                TrainLoader(
                    DataConfig(root=root, train={"demo_cls_en": 1.0}, batch_size=4, num_workers=w, samples_per_epoch=50)
                )
            )
        )
        for w in (0, 2, 3)
    }
    assert set(steps.values()) == {13}


def test_same_seed_same_order_other_seed_other_order(demo_root):
    def order(seed, rank=0):
        return ids_of(
            TrainLoader(DataConfig(root=demo_root, num_workers=2, batch_size=4, seed=seed), rank=rank, world_size=2)
        )

    first = order(0)
    assert first == order(0)
    assert first != order(1)
    assert first != order(0, rank=1)
    assert len({i for batch in first for i in batch}) > 0.5 * sum(map(len, first))  # mostly distinct


def test_next_epoch_differs_and_is_deterministic(demo_root):
    cfg = DataConfig(root=demo_root, num_workers=2, batch_size=4)
    a, b = TrainLoader(cfg), TrainLoader(cfg)
    epochs_a = [ids_of(a), ids_of(a)]
    epochs_b = [ids_of(b), ids_of(b)]
    assert epochs_a == epochs_b and epochs_a[0] != epochs_a[1]
    assert a.epoch == 2 and a.step == 0


@pytest.mark.parametrize("num_workers,stop_at", [(2, 7), (2, 8), (3, 1), (0, 5)])
def test_resume_continues_the_stream(demo_root, num_workers, stop_at):
    cfg = DataConfig(root=demo_root, num_workers=num_workers, batch_size=4, open_shards=3)
    full = TrainLoader(cfg, rank=1, world_size=2)
    reference = ids_of(full) + ids_of(full)  # two whole epochs

    first = TrainLoader(cfg, rank=1, world_size=2)
    consumed = ids_of(first, limit=stop_at)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip

    resumed = TrainLoader(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    continued = ids_of(resumed) + ids_of(resumed)
    assert consumed + continued == reference


def test_resume_at_epoch_end_starts_next_epoch(demo_root):
    cfg = DataConfig(root=demo_root, num_workers=2, batch_size=4)
    full = TrainLoader(cfg)
    reference = ids_of(full) + ids_of(full)
    first = TrainLoader(cfg)
    consumed = ids_of(first, limit=len(first))  # break right after the last batch of epoch 0
    resumed = TrainLoader(cfg)
    resumed.load_state_dict(first.state_dict())
    assert resumed.epoch == 1 and resumed.step == 0
    assert consumed + ids_of(resumed) == reference


def test_resume_with_other_worker_count_continues_exactly(demo_root):
    reference = ids_of(TrainLoader(DataConfig(root=demo_root, num_workers=2, batch_size=4)))
    first = TrainLoader(DataConfig(root=demo_root, num_workers=2, batch_size=4))
    consumed = ids_of(first, limit=7)
    resumed = TrainLoader(DataConfig(root=demo_root, num_workers=3, batch_size=4))
    resumed.load_state_dict(first.state_dict())
    assert consumed + ids_of(resumed) == reference


def test_mixing_weights_set_dataset_shares_exactly(demo_root):
    cfg = DataConfig(
        root=demo_root,
        train={"demo_cls_en": 4.0, "demo_reg_en": 1.0},
        num_workers=0,
        batch_size=2,
        samples_per_epoch=800,
    )
    counts = Counter(batch.dataset for batch in TrainLoader(cfg))
    assert counts == {"demo_cls_en": 320, "demo_reg_en": 80}


def global_batches(cfg: DataConfig, world_size: int, grad_accum: int, state: dict | None, steps: int | None):
    """([the sample ids of each optimizer step, over all ranks], the loaders' state after them): every rank's
    loader in lockstep, as ranks run."""
    loaders = [TrainLoader(cfg, rank, world_size, grad_accum) for rank in range(world_size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))
    streams = [iter(loader) for loader in loaders]
    done = []
    while steps is None or len(done) < steps:
        step = []
        for stream in streams:
            micro = [next(stream, None) for _ in range(grad_accum)]
            if micro[0] is None:
                return done, loaders[0].state_dict()
            assert all(len(batch) == cfg.batch_size for batch in micro)
            assert len({batch.dataset for batch in micro}) == 1
            step += [(batch.dataset, i) for batch in micro for i in batch.ids]
        done.append(sorted(step))
    states = [loader.state_dict() for loader in loaders]
    assert all(s == states[0] for s in states)  # the same position on every rank
    return done, states[0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_stream_resized_from_2_to_1_to_3_ranks_takes_the_same_global_batches(tmp_path, num_workers):
    """Global batch 12 = micro-batch 2 x (2 ranks x 3, 1 rank x 6, 3 ranks x 2 accumulated): each optimizer step
    takes the same samples as the unresized run, and the epoch (its dataset weights proportional to the sizes,
    which are multiples of 12) takes each training sample exactly once."""
    root = str(tmp_path)
    write_demo_split(root, "demo_cls_en", "train", 96, shard_samples=10)
    write_demo_split(root, "demo_reg_zh", "train", 48, shard_samples=7)
    cfg = DataConfig(root=root, train={"demo_cls_en": 2.0, "demo_reg_zh": 1.0}, batch_size=2, num_workers=num_workers)
    unresized, _ = global_batches(cfg, 2, 3, None, None)
    assert len(unresized) == 12
    seen = [sample for step in unresized for sample in step]
    assert len(seen) == len(set(seen)) == 144  # every sample of the epoch once

    on_two, state = global_batches(cfg, 2, 3, None, 4)
    on_one, state = global_batches(cfg, 1, 6, state, 3)
    on_three, state = global_batches(cfg, 3, 2, state, None)
    assert on_two + on_one + on_three == unresized
    assert state["epoch"] == 1 and state["step"] == 0


@pytest.mark.parametrize("num_samples,shard_samples", [(37, 10), (25, 10), (3, 2), (61, 7)])
def test_eval_sees_every_sample_once_with_equal_steps(tmp_path, num_samples, shard_samples):
    root = str(tmp_path)
    write_demo_split(root, "demo_cls_zh", "test", num_samples, shard_samples)
    cfg = DataConfig(root=root, batch_size=4, num_workers=2)
    seen, steps = [], []
    for rank in range(2):
        loader = EvalLoader(cfg, "demo_cls_zh", "test", rank=rank, world_size=2)
        batches = list(loader)
        steps.append(len(batches))
        assert len(batches) == len(loader)
        for batch in batches:
            assert batch.valid.shape == (len(batch),)
            seen += [i for i, ok in zip(batch.ids, batch.valid.tolist(), strict=True) if ok]
    assert steps[0] == steps[1]
    assert sorted(seen) == sorted(f"demo_cls_zh_test_{i:05d}" for i in range(num_samples))


def test_eval_padding_batches_are_masked(tmp_path):
    root = str(tmp_path)
    write_demo_split(root, "demo_reg_en", "valid", 3, 2)
    cfg = DataConfig(root=root, batch_size=4, num_workers=2)
    # 4 slots (2 ranks x 2 workers) for 3 samples: rank 0 holds the empty slot.
    rank0, rank1 = (list(EvalLoader(cfg, "demo_reg_en", "valid", rank=r, world_size=2)) for r in (0, 1))
    assert len(rank0) == len(rank1) == 2
    assert [int(b.valid.sum()) for b in rank0] == [1, 0] and [int(b.valid.sum()) for b in rank1] == [1, 1]
    assert rank0[1].ids == [""] and rank0[1].audio.values.shape[-1] == 16


def test_collate_lengths_masks_and_cu_seqlens(demo_root):
    manifest = load_manifest(demo_root, "demo_cls_en", "train")
    rng = np.random.default_rng(0)
    samples = [
        Sample(
            {"id": str(i), "text": "t", "label": "joy"},
            rng.standard_normal((n, 16)).astype(np.float16),
            rng.standard_normal((m, 12)).astype(np.float16),
        )
        for i, (n, m) in enumerate([(5, 2), (9, 7), (1, 3)])
    ]
    batch = collate(samples, manifest, max_audio_frames=8, max_vision_frames=512)
    assert batch.audio.values.shape == (3, 8, 16) and batch.audio.max_len == 8
    assert batch.audio.lengths.tolist() == [5, 8, 1]
    assert batch.audio.cu_seqlens.tolist() == [0, 5, 13, 14] and batch.audio.cu_seqlens.dtype == torch.int32
    assert batch.audio.mask.sum(1).tolist() == [5, 8, 1]
    assert torch.equal(batch.audio.values[0, :5], torch.from_numpy(samples[0].audio))
    assert not batch.audio.values[0, 5:].any()  # zero padding
    packed = batch.vision.values[batch.vision.mask]
    assert packed.shape == (12, 12) and batch.vision.cu_seqlens[-1] == 12
    assert batch.target.tolist() == [manifest.labels.index("joy")] * 3


def test_truncation_policies():
    frames = np.arange(10)[:, None].astype(np.float16)
    assert truncate_frames(frames, 4, "head")[:, 0].tolist() == [0, 1, 2, 3]
    assert truncate_frames(frames, 4, "uniform")[:, 0].tolist() == [0, 3, 6, 9]  # first and last survive
    assert truncate_frames(frames, 20, "uniform").shape == (10, 1)


def test_config_problems_name_the_key():
    cfg = DataConfig(train={"mosei": 0.0, "nope": 1.0}, batch_size=0, truncation="tail")
    problems = "\n".join(cfg.problems())
    for fragment in (
        "unknown dataset 'nope'",
        "data.train.mosei must be > 0, got 0.0",
        "data.batch_size must be >= 1, got 0",
        "data.truncation",
    ):
        assert fragment in problems
    assert DataConfig().problems() == []


def test_shards_over_http_read_like_local_ones(demo_root):
    """A root that is a URL (an object store's HTTPS endpoint; here Python's HTTP server) streams the same
    batches as the local folder: manifests and shards are fetched through webdataset (curl)."""
    import subprocess
    import sys
    import time
    import urllib.request

    from egmf.distributed import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", demo_root],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/demo_cls_en/train/manifest.json", timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        local = TrainLoader(DataConfig(root=demo_root, num_workers=2, batch_size=4))
        remote = TrainLoader(DataConfig(root=url, num_workers=2, batch_size=4))
        pairs = list(zip(local, remote, strict=True))
        assert len(pairs) == len(local) > 0
        for a, b in pairs:
            assert a.ids == b.ids and torch.equal(a.audio.values, b.audio.values)
        test = EvalLoader(DataConfig(root=url, num_workers=1, batch_size=8), "demo_reg_zh", "test")
        assert sum(int(batch.valid.sum()) for batch in test) == 40
    finally:
        server.terminate()
        server.wait(10)
