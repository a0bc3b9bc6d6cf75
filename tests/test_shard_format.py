"""Shards are plain WebDataset tars: readable with `webdataset` and with `tar` alone, no pickles."""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import webdataset as wds

from egmf.errors import DataError
from egmf.shards.cli import main as shards_main
from egmf.shards.format import check_features
from egmf.shards.manifest import load_manifest


def test_plain_webdataset_reads_every_sample(demo_root):
    manifest = load_manifest(demo_root, "demo_cls_zh", "train")
    urls = [manifest.shard_url(i) for i in range(len(manifest.shards))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == manifest.num_samples
    first = samples[0]
    assert set(first) >= {"__key__", "json", "audio.npy", "vision.npy"}
    assert first["json"]["lang"] == "zh" and first["json"]["label"] in manifest.labels
    assert first["audio.npy"].dtype == np.float16 and first["audio.npy"].shape[1] == manifest.audio_dim
    assert first["vision.npy"].shape[1] == manifest.vision_dim


def test_tar_alone_extracts_json_and_npy(demo_root, tmp_path):
    manifest = load_manifest(demo_root, "demo_reg_en", "valid")
    subprocess.run(["tar", "-xf", manifest.shard_url(0), "-C", str(tmp_path)], check=True)
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 3 * manifest.shards[0].num_samples
    assert {name.split(".", 1)[1] for name in names} == {"json", "audio.npy", "vision.npy"}
    key = names[0].split(".")[0]
    meta = json.loads((tmp_path / f"{key}.json").read_text(encoding="utf-8"))
    assert set(meta) == {"dataset", "split", "id", "lang", "task", "text", "label"}
    assert meta["task"] == "regression" and -3 <= meta["label"] <= 3
    audio = np.load(tmp_path / f"{key}.audio.npy", allow_pickle=False)  # raises if a pickle were inside
    assert audio.dtype == np.float16 and audio.ndim == 2


def test_no_member_is_a_pickle(demo_root):
    for path in glob.glob(os.path.join(demo_root, "*", "*", "*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                assert member.name.endswith((".json", ".audio.npy", ".vision.npy")), member.name
                if member.name.endswith(".npy"):
                    np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)


def test_inspect_reports_counts_dims_labels_lengths(demo_root, capsys):
    assert shards_main(["inspect", demo_root, "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.count("== demo_") == 12
    manifest = load_manifest(demo_root, "demo_cls_en", "train")
    assert f"samples {manifest.num_samples}  shards {len(manifest.shards)}" in out
    assert "dims    audio 16  vision 12" in out
    histogram = "  ".join(f"{k}={v}" for k, v in manifest.label_stats.items())
    assert histogram in out and "p90" in out and "verify  ok" in out
    assert "range   [" in out  # regression sets show their score range


def test_inspect_verify_catches_a_changed_shard(tmp_path, capsys):
    shards_main(["demo", "--out", str(tmp_path), "--train-size", "8", "--eval-size", "4"])
    capsys.readouterr()
    path = load_manifest(str(tmp_path), "demo_cls_en", "test").shard_url(0)
    with open(path, "r+b") as f:
        f.seek(600)
        f.write(b"X")
    assert shards_main(["inspect", str(tmp_path), "--verify"]) == 1
    assert "FAILED: demo_cls_en-test-000000.tar differs from the manifest" in capsys.readouterr().out


def test_demo_command_builds_the_sets_asked_for_and_names_the_known_ones(tmp_path, capsys):
    out = str(tmp_path)
    shards_main(["demo", "--out", out, "--datasets", "demo_key_en", "--train-size", "8", "--eval-size", "4"])
    assert os.listdir(out) == ["demo_key_en"] and load_manifest(out, "demo_key_en", "train").num_samples == 8
    with pytest.raises(SystemExit):
        shards_main(["demo", "--out", out, "--datasets", "demo_cls_en,demo_nope"])
    assert "['demo_nope']: demo sets are demo_cls_en, demo_cls_zh, demo_reg_en, demo_reg_zh, demo_key_en" in (
        capsys.readouterr().err
    )


def test_fast_npy_decode_matches_np_load_and_never_unpickles():
    from egmf.shards.format import decode_npy, encode_npy

    rng = np.random.default_rng(0)
    for array in (
        rng.standard_normal((7, 3)).astype(np.float16),
        np.zeros((1, 1), np.float32),
        np.arange(24, dtype=np.int64).reshape(2, 3, 4),
        np.asfortranarray(np.ones((3, 2), np.float16)),
    ):
        decoded = decode_npy(encode_npy(array))  # fast path or np.load fallback
        assert decoded.dtype == array.dtype and np.array_equal(decoded, array)
    truncated = encode_npy(np.ones((4, 4), np.float16))[:-2]
    with pytest.raises(ValueError):
        decode_npy(truncated)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_npy(buffer.getvalue())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_feature_check_finds_every_non_finite_float16(bad):
    """The check reads the float16 bits as integers; NaN, +inf and -inf must all be caught, the largest finite
    values must not."""
    array = np.full((3, 4), 65504, np.float16)  # the largest finite float16
    array[1, 2] = -65504
    check_features(array, "audio", 4)
    array[2, 3] = bad
    with pytest.raises(DataError, match="audio holds NaN or inf values"):
        check_features(array, "audio", 4)


@pytest.mark.parametrize(
    "name", ["../../outside.tar", "/etc/passwd.tar", "x.tar; touch pwned", "$(id).tar", ".hidden.tar"]
)
def test_a_tampered_manifest_cannot_point_outside_the_split_or_into_a_shell(demo_root, tmp_path, name):
    """Shard names are joined to the root (and, under a pipe: root, passed to a shell): only plain names load."""
    root = str(tmp_path / "root")
    shutil.copytree(demo_root, root)
    path = os.path.join(root, "demo_cls_en", "test", "manifest.json")
    manifest = json.load(open(path))
    manifest["shards"][0]["name"] = name
    json.dump(manifest, open(path, "w"))
    with pytest.raises(DataError, match="not plain .tar file names"):
        load_manifest(root, "demo_cls_en", "test")
    with pytest.raises(DataError, match="not plain .tar file names"):
        load_manifest(f"pipe:cat {root}", "demo_cls_en", "test")  # read through the shell as a pipe: root would be
