"""The shard builder on fixture files in the exact public layouts, and every bad input it rejects."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from conftest import mmsa_split, write_mmsa, write_mse_adapter

from egmf.data.tar_samples import BadSamples, decode_valid, read_shard
from egmf.shards.cli import main as shards_main
from egmf.shards.manifest import load_manifest


def read_split(root: str, dataset: str, split: str):
    manifest = load_manifest(root, dataset, split)
    bad = BadSamples(limit=0)
    samples = []
    for index, shard in enumerate(manifest.shards):
        for raw in read_shard(manifest.shard_url(index), shard.num_samples, bad):
            samples.append(decode_valid(raw, manifest, bad))
    return manifest, samples


def test_mmsa_build_cleans_trims_and_reads_back(tmp_path, capsys):
    data = write_mmsa(str(tmp_path / "mosei.pkl"))
    out = str(tmp_path / "shards")
    assert shards_main(mmsa_args(tmp_path / "mosei.pkl", out) + ["--shard-samples", "5"]) == 0
    assert "audio_nonfinite_zeroed" in capsys.readouterr().out

    for split in ("train", "valid", "test"):
        manifest, samples = read_split(out, "mosei", split)
        source = data[split]
        assert manifest.num_samples == len(samples) == len(source["id"])
        assert (manifest.audio_dim, manifest.vision_dim, manifest.lang, manifest.task) == (74, 35, "en", "regression")
        by_id = {s.id: s for s in samples}
        for i, sid in enumerate(source["id"]):
            sample = by_id[sid]
            assert sample.audio.dtype == np.float16 and sample.audio.shape == (source["audio_lengths"][i], 74)
            assert sample.vision.shape == (source["vision_lengths"][i], 35)
            expected = np.nan_to_num(source["audio"][i, : source["audio_lengths"][i]], nan=0, posinf=0, neginf=0)
            np.testing.assert_allclose(sample.audio, expected.astype(np.float16))
            assert sample.meta["label"] == pytest.approx(float(source["regression_labels"][i]))
            assert sample.meta["text"] == source["raw_text"][i]
        report = manifest.build_report
        # Sample 0 has 3 audio -inf and 2 vision NaN, sample 1 one +inf, all inside the kept frames.
        assert report["audio_nonfinite_zeroed"] == 4 and report["vision_nonfinite_zeroed"] == 2
        assert report["audio_padding_frames_trimmed"] == int(sum(50 - source["audio_lengths"]))
    train = load_manifest(out, "mosei", "train")
    assert [s.num_samples for s in train.shards] == [5, 5, 2]
    assert train.length_stats["audio"]["max"] == int(data["train"]["audio_lengths"].max())


def test_mse_adapter_build_maps_chinese_labels(tmp_path):
    names = ["愤怒", "高兴", "平静", "悲伤", "neutral"]
    data = write_mse_adapter(str(tmp_path / "cherma"), "cherma", names)
    out = str(tmp_path / "shards")
    assert (
        shards_main(
            [
                "build",
                "--format",
                "mse-adapter",
                "--dataset",
                "cherma",
                "--input",
                str(tmp_path / "cherma"),
                "--out",
                out,
            ]
        )
        == 0
    )
    manifest, samples = read_split(out, "cherma", "valid")
    assert [s.meta["label"] for s in samples] == ["anger", "joy", "neutral", "sadness"]
    assert [s.id for s in samples] == [f"cherma_valid_{i:05d}" for i in range(4)]
    assert samples[0].audio.shape == (data["valid"][0]["features"]["audio_len"], 64)
    assert manifest.lang == "zh" and manifest.label_stats["anger"] == 1
    assert manifest.build_report["audio_nonfinite_zeroed"] > 0


def test_builds_are_byte_identical_and_atomic(tmp_path):
    write_mmsa(str(tmp_path / "in.pkl"))
    sums = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        assert shards_main(mmsa_args(tmp_path / "in.pkl", out) + ["--shard-bytes", "40k"]) == 0
        sums.append([s.sha256 for s in load_manifest(out, "mosei", "train").shards])
        leftovers = [f for _, dirs, files in os.walk(out) for f in dirs + files if "partial" in f or f.startswith(".")]
        assert leftovers == []
    assert sums[0] == sums[1] and len(sums[0]) > 1
    # Every shard respects the byte limit.
    for shard in load_manifest(str(tmp_path / "a"), "mosei", "train").shards:
        assert shard.num_bytes <= 40 * 1024


def test_rebuild_replaces_a_split_whole(tmp_path):
    write_mmsa(str(tmp_path / "in.pkl"), sizes=(12, 5, 6))
    out = str(tmp_path / "out")
    args = mmsa_args(tmp_path / "in.pkl", out)
    shards_main(args + ["--shard-samples", "2"])
    shards_main(args + ["--shard-samples", "6"])
    assert sorted(os.listdir(os.path.join(out, "mosei", "train"))) == [
        "manifest.json",
        "mosei-train-000000.tar",
        "mosei-train-000001.tar",
        "texts.jsonl",
    ]


def expect_error(capsys, argv: list[str], *fragments: str) -> str:
    assert shards_main(argv) == 2
    message = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in message, message
    return message


def mmsa_args(input_file, out, dataset="mosei"):
    return ["build", "--format", "mmsa", "--dataset", dataset, "--input", str(input_file), "--out", str(out)]


def mse_args(folder, out, dataset="meld"):
    return ["build", "--format", "mse-adapter", "--dataset", dataset, "--input", str(folder), "--out", str(out)]


def rewrite(path, edit):
    with open(path, "rb") as f:
        data = pickle.load(f)
    edit(data)
    with open(path, "wb") as f:
        pickle.dump(data, f)


def test_unknown_label_names_sample_and_fix(tmp_path, capsys):
    write_mse_adapter(str(tmp_path / "meld"), "meld", ["joy", "anger", "bored"])
    expect_error(
        capsys,
        mse_args(tmp_path / "meld", tmp_path / "out"),
        "meld/train meld_train_00002",
        "unknown label 'bored'",
        "valid labels: neutral",
        "--label-map",
    )
    assert not os.path.exists(tmp_path / "out" / "meld" / "train")  # nothing half-built is left


def test_label_map_fixes_unknown_label(tmp_path):
    write_mse_adapter(str(tmp_path / "meld"), "meld", ["joy", "anger", "bored"])
    (tmp_path / "map.json").write_text(json.dumps({"bored": "neutral"}))
    assert shards_main(mse_args(tmp_path / "meld", tmp_path / "out") + ["--label-map", str(tmp_path / "map.json")]) == 0
    assert load_manifest(str(tmp_path / "out"), "meld", "train").label_stats["neutral"] == 4


def test_shape_mismatch_within_split(tmp_path, capsys):
    write_mse_adapter(str(tmp_path / "meld"), "meld", ["joy"])
    rewrite(
        tmp_path / "meld" / "meld_valid.pkl",
        lambda items: items[2]["features"].__setitem__("video", np.zeros((10, 63), np.float32)),
    )
    expect_error(
        capsys,
        mse_args(tmp_path / "meld", tmp_path / "out"),
        "meld/valid sample 'meld_valid_00002'",
        "vision dim is 63",
        "but the split's is 64",
    )


def test_empty_text(tmp_path, capsys):
    write_mmsa(str(tmp_path / "in.pkl"))
    rewrite(tmp_path / "in.pkl", lambda d: d["test"]["raw_text"].__setitem__(3, "  "))
    expect_error(
        capsys,
        mmsa_args(tmp_path / "in.pkl", tmp_path / "out"),
        "mosei/test sample 'vid1_0'",
        "empty or missing text",
    )


def test_missing_fields(tmp_path, capsys):
    write_mmsa(str(tmp_path / "in.pkl"))
    rewrite(tmp_path / "in.pkl", lambda d: d["valid"].pop("vision"))
    expect_error(
        capsys,
        mmsa_args(tmp_path / "in.pkl", tmp_path / "out"),
        "[valid]",
        "missing field(s) vision",
    )
    write_mse_adapter(str(tmp_path / "meld"), "meld", ["joy"])
    rewrite(tmp_path / "meld" / "meld_test.pkl", lambda items: items[1]["features"].pop("audio"))
    expect_error(
        capsys,
        mse_args(tmp_path / "meld", tmp_path / "out"),
        "meld_test.pkl sample 'meld_test_00001'",
        "features lack audio",
    )


def test_bad_lengths_and_ranges(tmp_path, capsys):
    write_mmsa(str(tmp_path / "in.pkl"))
    rewrite(tmp_path / "in.pkl", lambda d: d["train"]["audio_lengths"].__setitem__(4, 99))
    argv = mmsa_args(tmp_path / "in.pkl", tmp_path / "out")
    expect_error(capsys, argv, "audio length 99 is outside [0, 50]")
    write_mmsa(str(tmp_path / "in.pkl"))  # MOSEI scores do not fit SIMS-V2's range
    expect_error(capsys, argv[:4] + ["sims2"] + argv[5:], "outside sims2's range [-1.0, 1.0]")


def test_missing_inputs(tmp_path, capsys):
    expect_error(
        capsys,
        mmsa_args(tmp_path / "nope.pkl", tmp_path),
        "does not exist",
    )
    expect_error(capsys, mse_args(tmp_path, tmp_path / "out"), "no meld_train.pkl")
    expect_error(
        capsys,
        ["build", "--format", "mmsa", "--dataset", "meld", "--input", "x", "--out", "y"],
        "not in the mmsa format",
    )


def test_zero_length_keeps_one_frame(tmp_path):
    write_mmsa(str(tmp_path / "in.pkl"))
    rewrite(tmp_path / "in.pkl", lambda d: d["valid"]["vision_lengths"].__setitem__(0, 0))
    assert shards_main(mmsa_args(tmp_path / "in.pkl", tmp_path / "out")) == 0
    manifest, samples = read_split(str(tmp_path / "out"), "mosei", "valid")
    assert manifest.build_report["vision_zero_length_samples"] == 1
    assert samples[0].vision.shape == (1, 35) and not samples[0].vision.any()


def test_utterances_beside_the_shards_and_what_the_prompt_cuts(tmp_path, capsys, tiny_llm):
    """texts.jsonl holds each split's utterances in sample order; build and inspect count those the prompt would
    cut at --max-text-tokens with the model's tokenizer."""
    from transformers import AutoTokenizer

    from egmf.shards.texts import count_truncated, read_texts

    data = write_mmsa(str(tmp_path / "in.pkl"))
    data["train"]["raw_text"][0] = "a much longer utterance than all the others " * 5
    with open(tmp_path / "in.pkl", "wb") as f:
        pickle.dump(data, f)
    out = str(tmp_path / "out")
    args = mmsa_args(tmp_path / "in.pkl", out) + ["--tokenizer", tiny_llm, "--max-text-tokens", "20"]
    assert shards_main(args) == 0
    manifest = load_manifest(out, "mosei", "train")
    texts = read_texts(manifest)
    assert sorted(texts) == sorted(str(t).strip() for t in data["train"]["raw_text"])  # as the shards hold them
    assert manifest.text_stats["words"]["max"] == 40 and manifest.text_stats["words"]["p50"] == 3
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    assert count_truncated(tokenizer, texts, 20) == 1
    assert "1 of 12 (8.3%) longer than 20 tokens" in capsys.readouterr().out
    assert shards_main(["inspect", out, "--tokenizer", tiny_llm, "--max-text-tokens", "500"]) == 0
    report = capsys.readouterr().out
    assert "cut     0 of 12 (0.0%) longer than 500 tokens" in report and "text    words p50 3" in report


def test_a_rebuild_that_fails_in_a_later_split_leaves_the_old_build_whole(tmp_path, capsys):
    """All splits of a release are swapped in together or not at all: new train shards never sit beside old
    valid/test shards."""
    write_mmsa(str(tmp_path / "in.pkl"), seed=0)
    out = tmp_path / "out"
    assert shards_main(mmsa_args(tmp_path / "in.pkl", out)) == 0
    before = {split: load_manifest(str(out), "mosei", split).shards[0].sha256 for split in ("train", "valid", "test")}
    write_mmsa(str(tmp_path / "in.pkl"), seed=1)
    rewrite(tmp_path / "in.pkl", lambda d: d["valid"]["raw_text"].__setitem__(2, " "))
    expect_error(capsys, mmsa_args(tmp_path / "in.pkl", out), "mosei/valid sample", "empty or missing text")
    after = {split: load_manifest(str(out), "mosei", split).shards[0].sha256 for split in ("train", "valid", "test")}
    assert after == before
    assert not [name for name in os.listdir(out / "mosei") if name.startswith(".")]  # no build folders left


def test_splits_with_different_dims_or_a_missing_modality_are_refused(tmp_path, capsys):
    data = write_mmsa(str(tmp_path / "in.pkl"))
    test = mmsa_split(np.random.default_rng(1), 6, "test", dims=(74, 20))
    rewrite(tmp_path / "in.pkl", lambda d: d.__setitem__("test", test))
    expect_error(capsys, mmsa_args(tmp_path / "in.pkl", tmp_path / "out"), "different feature dims", "vision 20")
    assert not os.path.exists(tmp_path / "out" / "mosei" / "train")
    write_mmsa(str(tmp_path / "in.pkl"))
    rewrite(tmp_path / "in.pkl", lambda d: d["valid"]["vision"].fill(np.nan))
    expect_error(capsys, mmsa_args(tmp_path / "in.pkl", tmp_path / "out"), "mosei/valid: the vision features hold no")
    assert data  # the fixture's own data is untouched by the rewrites above


def test_the_builder_cli_names_bad_arguments_and_outputs(tmp_path, capsys):
    write_mmsa(str(tmp_path / "in.pkl"))
    args = mmsa_args(tmp_path / "in.pkl", tmp_path / "out")
    for bad in ("0", "-3", "x"):
        with pytest.raises(SystemExit):  # argparse: exit 2 with the usage line
            shards_main([*args, "--shard-samples", bad])
        assert "not a whole number >= 1" in capsys.readouterr().err
    expect_error(capsys, mmsa_args(tmp_path, tmp_path / "out"), "is a folder; this format reads one release pickle")
    expect_error(capsys, mse_args(tmp_path / "in.pkl", tmp_path / "out"), "is a file; this format reads the folder")
    (tmp_path / "map.json").write_text("{not json")
    expect_error(capsys, [*args, "--label-map", str(tmp_path / "map.json")], "--label-map", "is not valid JSON")
    blocked = tmp_path / "a_file"  # an output under a file: unwritable even for root, which ignores permissions
    blocked.write_text("")
    expect_error(capsys, mmsa_args(tmp_path / "in.pkl", blocked / "out"), "cannot write the shards", "--out")
