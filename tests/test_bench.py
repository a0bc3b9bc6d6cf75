"""Benchmarks run on a tiny shape so they cannot rot (their figures live in docs/benchmarks.md)."""

from __future__ import annotations

import loader as bench_loader


def test_loader_bench_prints_a_table(capsys):
    tables = bench_loader.main(
        ["--samples", "48", "--joint-samples", "32", "--workers", "0,1", "--batch-size", "8", "--shard-samples", "16"]
    )
    out = capsys.readouterr().out
    for rows in tables.values():
        assert [r["reader"] for r in rows] == ["raw bytes", "plain tarfile (ceiling)", "TrainLoader", "TrainLoader"]
        assert all(r["samples_s"] > 0 and r["ratio"] > 0 for r in rows)
    assert "| plain tarfile (ceiling) | - |" in out and "| TrainLoader | 1 |" in out and "peak RSS" in out
    assert "joint mix (mosei, sims2, meld, cherma): 32 samples" in out


def test_fusion_cost_bench_counts_params_and_flops(capsys):
    import fusion_cost

    rows = fusion_cost.main(
        ["--width", "32", "--heads", "4", "--pseudo-tokens", "2", "--llm-hidden", "64", "--llm-params", "2e5"]
    )
    assert [r["dataset"] for r in rows] == ["mosei", "sims2", "meld", "cherma"]
    assert all(r["params"] > 0 and r["fusion_gflop"] > 0 and 0 < r["share"] < 1 for r in rows)
    assert rows[3]["params"] > rows[2]["params"]  # CHERMA's 1024/2048-dim front ends are the largest
    assert "| mosei |" in capsys.readouterr().out


def test_padding_bench_counts_work_and_tokens(capsys):
    import padding

    result = padding.main(
        ["--width", "32", "--heads", "4", "--llm-hidden", "64", "--batches", "6", "--timed-batches", "1"]
    )
    experts, llm = result["experts"], result["llm"]
    assert [r["dataset"] for r in experts[::2]] == ["mosei", "sims2", "meld"]
    for row in experts:  # varlen does less work than batch-max padding, which does less than padding to the max
        assert 0 < row["varlen_share"] < row["batch_max_share"] <= 1
        assert row["seconds_dataset_max"] > 0 and row["seconds_batch_max"] > 0
    for row in llm:  # packing a whole batch into one row wastes nothing
        assert row["efficiency"][0] <= row["efficiency"][512] <= row["efficiency"][1024] == 1.0
        assert row["rows"][0] == 8 and row["rows"][1024] == 1
    assert "| mosei | audio |" in capsys.readouterr().out


def test_overhead_bench_times_both_loops_on_two_ranks(capsys):
    import overhead

    rows = overhead.main(["--steps", "3", "--warmup", "1", "--log-every", "2"])
    assert [r["loop"] for r in rows] == ["bare", "trainer"]
    assert all(r["mean_ms"] > 0 for r in rows) and rows[0]["ratio"] == 1.0
    assert "| trainer |" in capsys.readouterr().out


def test_gpu_step_bench_runs_every_variant_on_a_tiny_cpu_shape(capsys):
    """On a CPU only the SDPA variants run (flash-attn needs CUDA); MFU needs a known peak, so none here."""
    import gpu_step

    rows = gpu_step.main(["--shape", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "3"])
    variants = [(r["checkpointing"], r["packing"]) for r in rows]
    assert variants == [(False, False), (False, True), (True, False), (True, True)]
    assert all(r["attention"] == "sdpa" and r["tokens_per_s"] > 0 and 0 < r["fusion_share"] for r in rows)
    assert rows[0]["tokens_per_step"] == rows[1]["tokens_per_step"]  # packing changes the layout, not the tokens
    assert all(r["mfu"] is None for r in rows)
    out = capsys.readouterr().out
    assert "flash-attn variants need CUDA" in out and "| sdpa | on | on |" in out
