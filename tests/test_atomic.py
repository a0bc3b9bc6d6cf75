"""Files and folders are complete or absent: the helpers every writer uses (shards, checkpoints, best model,
tracking records, evaluation results)."""

from __future__ import annotations

import json
import os

import pytest

from egmf.atomic import building, partial_folder, publish, remove_partials, start_partial, write_atomically, write_json


def test_write_atomically_replaces_whole_and_leaves_no_partial(tmp_path):
    path = str(tmp_path / "f.bin")
    write_atomically(path, b"old")
    write_atomically(path, b"new")
    assert open(path, "rb").read() == b"new"
    assert os.listdir(tmp_path) == ["f.bin"]
    write_json(str(tmp_path / "v.json"), {"text": "高兴", "n": 1})
    assert json.load(open(tmp_path / "v.json", encoding="utf-8")) == {"text": "高兴", "n": 1}


def test_a_built_folder_replaces_the_old_one_only_when_complete(tmp_path):
    final = str(tmp_path / "best")
    with building(final) as partial:
        assert partial == partial_folder(final) == str(tmp_path / ".partial-best")
        open(os.path.join(partial, "a"), "w").write("1")
        assert not os.path.exists(final)  # nothing half-built is visible under the final name
    assert os.listdir(final) == ["a"]
    with pytest.raises(OSError, match="disk full"), building(final) as partial:
        open(os.path.join(partial, "b"), "w").write("2")
        raise OSError("disk full")
    assert os.listdir(final) == ["a"]  # the failed build left the old folder as it was
    assert sorted(os.listdir(tmp_path)) == ["best"]  # and no build folder behind
    with building(final) as partial:
        open(os.path.join(partial, "c"), "w").write("3")
    assert os.listdir(final) == ["c"]
    assert sorted(os.listdir(tmp_path)) == ["best"]


def test_an_interrupted_build_is_cleared_by_the_next_one(tmp_path):
    final = str(tmp_path / "step_1")
    partial = start_partial(final)
    open(os.path.join(partial, "stale"), "w").write("x")  # a crash here leaves .partial-step_1
    assert os.listdir(start_partial(final)) == []  # a new build starts empty
    open(os.path.join(partial, "fresh"), "w").write("y")
    publish(partial, final)
    assert os.listdir(final) == ["fresh"]
    start_partial(str(tmp_path / "step_2"))
    remove_partials(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["step_1"]
