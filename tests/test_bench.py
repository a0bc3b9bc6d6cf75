"""Benchmarks run on a tiny shape so they cannot rot (their figures live in docs/benchmarks.md)."""

from __future__ import annotations

import loader as bench_loader


def test_loader_bench_prints_a_table(capsys):
    rows = bench_loader.main(["--samples", "48", "--workers", "0,1", "--batch-size", "8", "--shard-samples", "16"])
    out = capsys.readouterr().out
    assert [r["reader"] for r in rows] == ["raw bytes", "plain tarfile (ceiling)", "TrainLoader", "TrainLoader"]
    assert all(r["samples_s"] > 0 and r["ratio"] > 0 for r in rows)
    assert "| plain tarfile (ceiling) | - |" in out and "| TrainLoader | 1 |" in out and "peak RSS" in out


def test_fusion_cost_bench_counts_params_and_flops(capsys):
    import fusion_cost

    rows = fusion_cost.main(
        ["--width", "32", "--heads", "4", "--pseudo-tokens", "2", "--llm-hidden", "64", "--llm-params", "2e5"]
    )
    assert [r["dataset"] for r in rows] == ["mosei", "sims2", "meld", "cherma"]
    assert all(r["params"] > 0 and r["fusion_gflop"] > 0 and 0 < r["share"] < 1 for r in rows)
    assert rows[3]["params"] > rows[2]["params"]  # CHERMA's 1024/2048-dim front ends are the largest
    assert "| mosei |" in capsys.readouterr().out
