"""Benchmarks run on a tiny shape so they cannot rot (their figures live in docs/benchmarks.md)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import loader as bench_loader  # noqa: E402


def test_loader_bench_prints_a_table(capsys):
    rows = bench_loader.main(["--samples", "48", "--workers", "0,1", "--batch-size", "8", "--shard-samples", "16"])
    out = capsys.readouterr().out
    assert [r["reader"] for r in rows] == ["raw bytes", "plain tarfile (ceiling)", "TrainLoader", "TrainLoader"]
    assert all(r["samples_s"] > 0 and r["ratio"] > 0 for r in rows)
    assert "| plain tarfile (ceiling) | - |" in out and "| TrainLoader | 1 |" in out and "peak RSS" in out
