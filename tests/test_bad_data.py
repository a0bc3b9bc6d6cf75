"""Bad data at load time is skipped, counted and reported; past the limit, loading stops clearly."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from dataclasses import replace

import numpy as np
import pytest
from conftest import write_demo_split

from egmf.data.config import DataConfig
from egmf.data.loader import EvalLoader, TrainLoader
from egmf.errors import DataError
from egmf.shards.format import encode_npy


def edit_members(path: str, edit) -> None:
    """Rewrite a shard, passing each (name, bytes) through `edit` (return None to drop a member)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            data = edit(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def key(index: int) -> str:
    return f"demo_cls_en_test_{index:07d}"


def edit_json(data: bytes, **changes) -> bytes:
    meta = json.loads(data)
    meta.update(changes)
    return json.dumps(meta).encode()


@pytest.fixture
def broken_split(tmp_path):
    """20 test samples in 2 shards; five of them broken in different ways."""
    root = str(tmp_path)
    manifest = write_demo_split(root, "demo_cls_en", "test", 20, shard_samples=10)

    def edit(name, data):
        if name == f"{key(1)}.audio.npy":
            return b"\x93NUMPY garbage"  # corrupt member
        if name == f"{key(3)}.vision.npy":
            array = np.load(io.BytesIO(data))
            array[0, 0] = np.nan
            return encode_npy(array)  # fails validation: NaN
        if name == f"{key(5)}.json":
            return edit_json(data, label="bored")  # unknown label
        if name == f"{key(6)}.audio.npy":
            return encode_npy(np.zeros((4, 15), np.float16))  # wrong feature dim
        if name == f"{key(8)}.json":
            return None  # missing member
        return data

    edit_members(manifest.shard_url(0), edit)
    return root, manifest


def valid_ids(loader) -> list[str]:
    return [i for b in loader for i, ok in zip(b.ids, b.valid.tolist(), strict=True) if ok]


def test_eval_skips_counts_and_reports_bad_samples(broken_split, caplog):
    root, _ = broken_split
    loader = EvalLoader(DataConfig(root=root, batch_size=4, num_workers=0), "demo_cls_en", "test")
    with caplog.at_level(logging.WARNING, logger="egmf.data"):
        ids = valid_ids(loader)
    assert len(ids) == 15 and loader.bad_samples == 5
    assert "demo_cls_en_test_00001" not in ids
    for reason in (
        "audio.npy is not a readable npy array",
        "vision holds NaN or inf values",
        "label 'bored' is not one of",
        "audio has shape [4, 15], expected [L >= 1, 16]",
        "missing member(s) json",
    ):
        assert reason in caplog.text
    assert f"{key(3)}" in caplog.text and "sample #3" in caplog.text  # says where


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_and_missing_shards_are_counted(tmp_path, caplog, num_workers):
    root = str(tmp_path)
    manifest = write_demo_split(root, "demo_cls_en", "test", 30, shard_samples=10)
    path = manifest.shard_url(1)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    os.remove(manifest.shard_url(2))
    loader = EvalLoader(DataConfig(root=root, batch_size=4, num_workers=num_workers), "demo_cls_en", "test")
    with caplog.at_level(logging.WARNING, logger="egmf.data"):
        ids = valid_ids(loader)
    # Shard 0 whole, the first part of shard 1; shard 2's 10 samples and the rest of shard 1 counted as bad.
    assert 10 < len(ids) < 20 and len(ids) + loader.bad_samples == 30
    if num_workers == 0:  # worker processes log to their own stderr, out of caplog's reach
        assert "unreadable" in caplog.text or "ends after" in caplog.text
        assert "No such file" in caplog.text


def test_too_many_bad_samples_stop_with_a_clear_error(broken_split):
    root, _ = broken_split
    with pytest.raises(DataError, match=r"more than data.max_bad_samples=3.*inspect ROOT --verify"):
        list(EvalLoader(DataConfig(root=root, batch_size=4, num_workers=0, max_bad_samples=3), "demo_cls_en", "test"))


def test_training_worker_stops_past_the_limit(tmp_path):
    root = str(tmp_path)
    manifest = write_demo_split(root, "demo_cls_en", "train", 12, shard_samples=6)
    for index in range(len(manifest.shards)):
        edit_members(
            manifest.shard_url(index),
            lambda name, data: edit_json(data, task="regression") if name.endswith(".json") else data,
        )
    cfg = DataConfig(root=root, train={"demo_cls_en": 1.0}, batch_size=2, num_workers=1, max_bad_samples=4)
    with pytest.raises(DataError, match="task is 'regression', the manifest says 'classification'"):
        list(TrainLoader(cfg))


def test_a_failed_worker_does_not_hold_up_the_interpreter_exit(tmp_path):
    """Workers ignore SIGTERM (a stop is the training process's to handle). When a worker's error propagates and
    its traceback is kept (as pytest.raises or a caller's `except ... as exc` keeps it), the loader must still
    stop the workers; the interpreter's exit would otherwise wait for them forever."""
    import subprocess
    import sys

    root = str(tmp_path)
    manifest = write_demo_split(root, "demo_cls_en", "train", 12, shard_samples=6)
    for index in range(len(manifest.shards)):
        edit_members(manifest.shard_url(index), lambda name, data: b"junk" if name.endswith(".json") else data)
    code = (
        "from egmf.data.config import DataConfig\n"
        "from egmf.data.loader import TrainLoader\n"
        "from egmf.errors import DataError\n"
        f"cfg = DataConfig(root={root!r}, train={{'demo_cls_en': 1.0}}, batch_size=2, num_workers=1, "
        "max_bad_samples=2)\n"
        "try:\n    list(TrainLoader(cfg))\nexcept DataError as exc:\n    kept = exc\n    print('failed as expected')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "failed as expected" in done.stdout, done.stderr[-3000:]


def test_training_skips_a_few_bad_samples(tmp_path):
    root = str(tmp_path)
    manifest = write_demo_split(root, "demo_cls_en", "train", 20, shard_samples=10)
    broken = "demo_cls_en_train_0000004"
    edit_members(manifest.shard_url(0), lambda name, data: b"junk" if name == f"{broken}.json" else data)
    cfg = DataConfig(root=root, train={"demo_cls_en": 1.0}, batch_size=2, num_workers=1, samples_per_epoch=200)
    loader = TrainLoader(cfg)
    batches = list(loader)
    ids = [i for batch in batches for i in batch.ids]
    assert len(batches) == 100 and all(batch.valid.all() for batch in batches)
    assert len(ids) == 190 and broken not in ids  # ten passes over the 20 samples: it is dropped from its batch
    assert loader.bad_samples == 10  # counted once per pass, by the one reader whose position it is

    one = TrainLoader(replace(cfg, batch_size=1, num_workers=0))  # a micro-batch without a good sample
    padding = [batch for batch in one if not batch.valid.any()]
    assert len(padding) == 10 and one.bad_samples == 10  # comes as padding, which the trainer skips


def test_missing_manifest_says_how_to_build(tmp_path):
    with pytest.raises(DataError, match=r"no shards for demo_cls_en/train.*python -m egmf.shards demo --out"):
        TrainLoader(DataConfig(root=str(tmp_path)))


def test_every_skipped_shard_is_named_even_past_the_sample_count_of_the_log(tmp_path, caplog):
    """A missing shard skips many samples at once; the log still names it (logging counts events, not samples)."""
    root = str(tmp_path)
    manifest = write_demo_split(root, "demo_cls_en", "test", 90, shard_samples=30)
    os.remove(manifest.shard_url(0))
    os.remove(manifest.shard_url(2))
    loader = EvalLoader(DataConfig(root=root, batch_size=8, num_workers=0), "demo_cls_en", "test")
    with caplog.at_level(logging.WARNING, logger="egmf.data"):
        assert len(valid_ids(loader)) == 30
    for index in (0, 2):
        assert f"skipped 30 bad sample(s) at {manifest.shard_url(index)}" in caplog.text


def test_an_npy_header_declaring_a_huge_array_is_a_bad_sample_not_a_crash(tmp_path, caplog):
    root = str(tmp_path)
    manifest = write_demo_split(root, "demo_cls_en", "test", 10, shard_samples=10)
    header = b"{'descr': '<f2', 'fortran_order': False, 'shape': (4000000000, 16), }"
    header += b" " * (63 - len(header) % 64) + b"\n"
    huge = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x00" * 64
    edit_members(manifest.shard_url(0), lambda name, data: huge if name == f"{key(2)}.audio.npy" else data)
    loader = EvalLoader(DataConfig(root=root, batch_size=4, num_workers=0), "demo_cls_en", "test")
    with caplog.at_level(logging.WARNING, logger="egmf.data"):
        assert len(valid_ids(loader)) == 9 and loader.bad_samples == 1
    assert f"{key(2)}" in caplog.text and "declares shape (4000000000, 16)" in caplog.text


def test_an_empty_split_is_refused_when_its_manifest_is_read(tmp_path):
    root = str(tmp_path)
    manifest = write_demo_split(root, "demo_cls_en", "train", 4, shard_samples=4)
    path = os.path.join(root, "demo_cls_en", "train", "manifest.json")
    data = json.load(open(path))
    json.dump({**data, "num_samples": 0, "shards": []}, open(path, "w"))
    with pytest.raises(DataError, match="the split holds no samples"):
        TrainLoader(DataConfig(root=root, train={"demo_cls_en": 1.0}))
    assert manifest.num_samples == 4


def test_the_bad_sample_limit_holds_for_the_whole_run_not_each_epoch(tmp_path):
    """One broken sample met once per epoch: past max_bad_samples epochs the run stops (workers count per epoch,
    the loader adds the epochs up, also across a resume)."""
    root = str(tmp_path)
    manifest = write_demo_split(root, "demo_cls_en", "train", 8, shard_samples=8)
    edit_members(manifest.shard_url(0), lambda name, data: b"junk" if name.endswith("0000003.json") else data)
    settings = dict(batch_size=8, num_workers=0, open_shards=1, max_bad_samples=2)  # one pass over the shard per epoch
    cfg = DataConfig(root=root, train={"demo_cls_en": 1.0}, **settings)
    loader = TrainLoader(cfg)
    for _ in range(2):
        list(loader)
    assert loader.bad_samples == 2
    resumed = TrainLoader(cfg)
    resumed.load_state_dict(loader.state_dict())
    with pytest.raises(DataError, match="3 bad samples skipped on this rank, more than data.max_bad_samples=2"):
        list(resumed)
