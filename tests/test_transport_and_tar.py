"""The minimal tar reader agrees with tarfile; batches cross from workers intact; shared memory is freed."""

from __future__ import annotations

import glob
import io
import os
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from egmf.data.config import DataConfig
from egmf.data.loader import EvalLoader, TrainLoader
from egmf.data.tar_members import TarFormatError, iter_members


def tarfile_members(path: str) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def our_members(path: str) -> list[tuple[str, bytes]]:
    with open(path, "rb") as f:
        return list(iter_members(f))


def test_reader_matches_tarfile_on_our_shards(demo_root):
    paths = glob.glob(os.path.join(demo_root, "demo_cls_zh", "*", "*.tar"))
    assert paths
    for path in paths:
        assert our_members(path) == tarfile_members(path)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_reader_handles_long_and_unicode_names(tmp_path, fmt):
    path = str(tmp_path / "long.tar")
    names = ["a/" + "x" * 150 + ".json", "样本_01.audio.npy", "dir/", "plain.txt"]
    with tarfile.open(path, "w", format=fmt) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            data = name.encode() * 3
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert our_members(path) == tarfile_members(path)
    assert [name for name, _ in our_members(path)] == [n for n in names if not n.endswith("/")]


def test_reader_reads_webdataset_tarwriter_output(tmp_path):
    path = str(tmp_path / "wds.tar")
    with wds.TarWriter(path) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "json": {"i": i}, "vision.npy": np.ones((2, 3), np.float16)})
    assert our_members(path) == tarfile_members(path)


def test_reader_reports_truncation_and_corruption(demo_root, tmp_path):
    source = glob.glob(os.path.join(demo_root, "demo_cls_en", "test", "*.tar"))[0]
    data = open(source, "rb").read()
    cases = {
        "data": (data[:700], "truncated member data"),
        "header": (data[: 1024 + 300], "truncated"),
        "checksum": (data[:148] + b"0000001\0" + data[156:], "bad header checksum"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(content)
        with open(path, "rb") as f, pytest.raises(TarFormatError, match=message):
            list(iter_members(f))
    # Cut at a member boundary without end-of-archive blocks: what is there is read, no error.
    path = tmp_path / "boundary.tar"
    path.write_bytes(data[:1024])  # header + one data block of the first json
    with open(path, "rb") as f:
        assert len(list(iter_members(f))) == 1


def features_by_id(loader) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for batch in loader:
        for row, sample_id in enumerate(batch.ids):
            n_a, n_v = int(batch.audio.lengths[row]), int(batch.vision.lengths[row])
            # padding is zero, also in a reused shared-memory slot that held a longer batch before
            assert not batch.audio.values[row, n_a:].any() and not batch.vision.values[row, n_v:].any()
            out[sample_id] = (
                batch.audio.values[row, :n_a].numpy().copy(),
                batch.vision.values[row, :n_v].numpy().copy(),
            )
    return out


def test_worker_batches_are_identical_to_in_process_ones(demo_root):
    in_process = features_by_id(
        EvalLoader(DataConfig(root=demo_root, num_workers=0, batch_size=4), "demo_reg_zh", "test")
    )
    workers = features_by_id(EvalLoader(DataConfig(root=demo_root, num_workers=2, batch_size=4), "demo_reg_zh", "test"))
    assert in_process.keys() == workers.keys() and len(workers) == 40
    for sample_id, (audio, vision) in in_process.items():
        assert np.array_equal(audio, workers[sample_id][0]) and np.array_equal(vision, workers[sample_id][1])


def test_batches_stay_valid_after_later_batches_arrive(demo_root):
    loader = TrainLoader(DataConfig(root=demo_root, num_workers=2, batch_size=4, prefetch_batches=1))
    kept = list(loader)  # slots are reused many times over while these are held
    again = list(TrainLoader(DataConfig(root=demo_root, num_workers=2, batch_size=4, prefetch_batches=1)))
    assert all(torch.equal(a.audio.values, b.audio.values) for a, b in zip(kept, again, strict=True))


def shm_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("psm_")}


def test_shared_memory_is_released_also_after_an_early_stop(demo_root):
    before = shm_segments()
    loader = TrainLoader(DataConfig(root=demo_root, num_workers=2, batch_size=4))
    for step, _ in enumerate(loader):
        if step == 2:
            assert len(shm_segments() - before) == 2  # one ring per worker while running
            break
    list(EvalLoader(DataConfig(root=demo_root, num_workers=2), "demo_cls_en", "valid"))
    assert shm_segments() - before == set()
