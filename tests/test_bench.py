"""Benchmarks run as a user runs them (`python bench/X.py ... --json PATH`) on a tiny shape, so they cannot rot
(their figures live in docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from run_helpers import REPO, run_bench

pytestmark = pytest.mark.slow


def test_loader_bench_prints_a_table(tmp_path):
    args = ["--samples", "48", "--joint-samples", "32", "--workers", "0,1", "--batch-size", "8"]
    args += ["--shard-samples", "16", "--padding-rounds", "1"]
    out, tables = run_bench("loader.py", args, tmp_path)
    for name in ("mosei", "joint"):
        rows = tables[name]
        assert [r["reader"] for r in rows] == ["raw bytes", "plain tarfile (ceiling)", "TrainLoader", "TrainLoader"]
        assert all(r["samples_s"] > 0 and r["ratio"] > 0 for r in rows)
    assert "| plain tarfile (ceiling) | - |" in out and "| TrainLoader | 1 |" in out and "peak RSS" in out
    assert "joint mix (mosei, sims2, meld, cherma): 32 samples" in out
    padding = tables["padding"]
    assert [r["dataset"] for r in padding] == ["mosei", "sims2", "meld", "cherma"]
    assert all(r["into_slot_ms"] > 0 and r["then_copy_ms"] > 0 for r in padding)
    assert padding[3]["mb"] > 10 * padding[0]["mb"]  # a CHERMA batch: 1024/2048-dim frames
    assert "| cherma | " in out and "fresh memory + copy ms" in out


def test_fusion_cost_bench_counts_params_and_flops(tmp_path):
    args = ["--width", "32", "--heads", "4", "--pseudo-tokens", "2", "--llm-hidden", "64", "--llm-params", "2e5"]
    out, rows = run_bench("fusion_cost.py", args, tmp_path)
    assert [r["dataset"] for r in rows] == ["mosei", "sims2", "meld", "cherma"]
    assert all(r["params"] > 0 and r["fusion_gflop"] > 0 and 0 < r["share"] < 1 for r in rows)
    assert rows[3]["params"] > rows[2]["params"]  # CHERMA's 1024/2048-dim front ends are the largest
    assert "| mosei |" in out


def test_padding_bench_counts_work_and_tokens(tmp_path):
    args = ["--width", "32", "--heads", "4", "--llm-hidden", "64", "--batches", "6", "--timed-batches", "1"]
    out, result = run_bench("padding.py", args, tmp_path)
    experts, llm = result["experts"], result["llm"]
    assert [r["dataset"] for r in experts[::2]] == ["mosei", "sims2", "meld"]
    for row in experts:  # varlen does less work than batch-max padding, which does less than padding to the max
        assert 0 < row["varlen_share"] < row["batch_max_share"] <= 1
        assert row["seconds_dataset_max"] > 0 and row["seconds_batch_max"] > 0
    for row in llm:  # packing a whole batch into one row wastes nothing (JSON keys: the packing limit as text)
        assert row["efficiency"]["0"] <= row["efficiency"]["512"] <= row["efficiency"]["1024"] == 1.0
        assert row["rows"]["0"] == 8 and row["rows"]["1024"] == 1
    assert "| mosei | audio |" in out


def test_overhead_bench_times_both_loops_on_two_ranks(tmp_path):
    out, rows = run_bench("overhead.py", ["--steps", "3", "--warmup", "1", "--log-every", "2"], tmp_path)
    assert [r["loop"] for r in rows] == ["bare", "trainer"]
    assert all(r["mean_ms"] > 0 for r in rows) and rows[0]["ratio"] == 1.0
    assert "| trainer |" in out


def test_gpu_step_bench_runs_every_variant_on_a_tiny_cpu_shape(tmp_path):
    """On a CPU only the SDPA variants run (flash-attn needs CUDA); MFU needs a known peak, so none here."""
    args = ["--shape", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "3"]
    out, rows = run_bench("gpu_step.py", args + ["--settle", "1", "--profile", "1"], tmp_path)
    variants = [(r["checkpointing"], r["packing"]) for r in rows]
    assert variants == [(False, False), (False, True), (True, False), (True, True)]
    assert all(r["attention"] == "sdpa" and r["tokens_per_s"] > 0 and 0 < r["fusion_share"] for r in rows)
    assert rows[0]["tokens_per_step"] == rows[1]["tokens_per_step"]  # packing changes the layout, not the tokens
    assert all(r["mfu"] is None for r in rows)
    assert "flash-attn variants need CUDA" in out and "| sdpa | on | on |" in out
    assert "torch.profiler over 1 steps" in out and "Self CPU" in out  # the profile of the first variant


def test_gpu_sweep_bench_times_each_row_and_the_plain_step(tmp_path):
    """The plan's rows in order on one engine, after the first row timed without DeepSpeed (--plain)."""
    args = ["--shape", "tiny", "--device", "cpu", "--plan", "off:2,on:3", "--steps", "2", "--warmup", "1"]
    out, rows = run_bench("gpu_sweep.py", args + ["--settle", "1", "--plain"], tmp_path)
    assert [(r["engine"], r["checkpointing"], r["batch_size"]) for r in rows] == [
        ("plain", False, 2),
        ("zero2", False, 2),
        ("zero2", True, 3),
    ]
    assert not any(r["out_of_memory"] for r in rows) and all(r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["tokens_per_step"] == rows[1]["tokens_per_step"] < rows[2]["tokens_per_step"]  # same batches
    assert all(r["mfu"] is None and r["peak_gib"] is None for r in rows)  # no known peak, no CUDA memory
    assert "| plain | off | 2 |" in out and "| zero2 | on | 3 |" in out


def test_gpu_sweep_bench_rejects_a_bad_plan_row():
    command = [sys.executable, "bench/gpu_sweep.py", "--device", "cpu", "--plan", "on:64,maybe:8"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "'maybe:8' is not GRAD_CKPT:BATCH (e.g. on:128)" in done.stderr


def write_wheel(folder) -> str:
    """A minimal pure-Python wheel (a wheel is a zip with its metadata), standing in for the ones a GPU machine
    lacks, so the install stage runs without a network."""
    import zipfile

    path = folder / "gpu_check_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("gpu_check_probe/__init__.py", "__version__ = '1.0'\n")
        info = "gpu_check_probe-1.0.dist-info"
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 1.0\n")
        tags = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        wheel.writestr(f"{info}/WHEEL", tags)
        wheel.writestr(f"{info}/RECORD", "")
    return str(path)


def test_gpu_check_runs_every_stage_and_records_each(tmp_path):
    """The CPU-runnable parts of `make gpu-check`: wheels installed offline, the environment read, the parity test
    skipped with its reason (no CUDA), the step bench on a tiny shape, two training steps on the demo."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels)
    small_eval = ["--data.eval=['demo_cls_en']", "--eval.splits=['test']", "--eval.select_split=test"]
    small_eval += ["--eval.modes=['constrained']"]
    args = ["--wheels", str(wheels), "--device", "cpu", "--shape", "tiny", "--batch-size", "3"]
    args += ["--step-steps", "2", "--step-warmup", "1", "--sweep-plan", "off:2", "--train-steps", "2"]
    args += [f"--train-override={o}" for o in small_eval] + ["--out", str(tmp_path / "gpu_check.json")]
    command = [sys.executable, "bench/gpu_check.py", *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = {s["stage"]: s for s in json.load(open(tmp_path / "gpu_check.json"))["stages"]}
    assert list(stages) == ["install", "environment", "parity", "step", "sweep", "train"]
    assert stages["install"]["status"] == "ok"
    assert stages["install"]["figures"]["wheels"] == ["gpu_check_probe-1.0-py3-none-any.whl"]
    environment = stages["environment"]["figures"]
    assert environment["cuda_available"] is False and environment["deepspeed"] and environment["torch"]
    assert stages["parity"]["status"] == "skipped" and stages["parity"]["figures"] == {"skipped": 1}
    assert "needs a CUDA GPU" in stages["parity"]["output"]
    step = stages["step"]
    assert step["status"] == "ok" and len(step["figures"]) == 4 and all(r["tokens_per_s"] > 0 for r in step["figures"])
    sweep = stages["sweep"]
    assert sweep["status"] == "ok" and [r["engine"] for r in sweep["figures"]] == ["plain", "zero2"]
    train = stages["train"]["figures"]
    assert stages["train"]["status"] == "ok" and train["steps"] == 2 and train["samples_per_s_per_device"] > 0
    assert train["test_metrics"]["eval/test/demo_cls_en/constrained/samples"] == 128
    assert "| train | ok |" in done.stdout


def test_ablations_bench_trains_each_variant_and_tables_it(tmp_path):
    """Two steps per variant, two variants at a time: the table has the full model on top and the variants in the
    order asked for, a score per demo set, and the designed experts' gates where a learned gate exists (text only
    has no fusion, so no gate)."""
    args = [
        "--variants",
        "full,no_local,text_only",
        "--steps",
        "2",
        "--jobs",
        "2",
        "--work-dir",
        str(tmp_path / "work"),
    ]
    out, rows = run_bench("ablations.py", args, tmp_path, timeout=900)
    assert [r["variant"] for r in rows] == ["full", "no_local", "text_only"]
    for row in rows:
        assert set(row["scores"]) == {"demo_cls_en", "demo_cls_zh", "demo_reg_en", "demo_reg_zh"}
        assert all(0 <= score <= 6 for score in row["scores"].values()), row
    assert set(rows[0]["gates"]["demo_cls_en"]) == {"local", "semantic", "global"}
    assert set(rows[1]["gates"]["demo_cls_en"]) == {"semantic", "global"}
    assert rows[2]["gates"] == {}
    table = [line for line in out.splitlines() if line.startswith("| ")]  # the header, then one row per variant
    assert table[0].startswith("| variant |") and table[1].startswith("| full |") and table[3].startswith("| text_only")
    _, again = run_bench("ablations.py", args, tmp_path, timeout=300)  # a rerun reuses the finished variants
    assert again == rows


def test_ablations_bench_tables_a_run_evaluated_on_one_set(tmp_path):
    """A variant trained and evaluated on one demo set (the way a candidate set is tried alone) has a score for that
    set and a dash for the others, not a crash."""
    args = ["--variants", "full", "--steps", "2", "--work-dir", str(tmp_path / "work")]
    args += ["--override=--data.train={demo_reg_en=1.0}", "--override=--data.eval=['demo_reg_en']"]
    out, rows = run_bench("ablations.py", args, tmp_path, timeout=600)
    scores = rows[0]["scores"]
    assert scores["demo_cls_en"] is None and scores["demo_reg_zh"] is None and 0 <= scores["demo_reg_en"] <= 6
    row = next(line for line in out.splitlines() if line.startswith("| full |"))
    assert row.split(" | ")[1:4] == ["-", "-", f"{scores['demo_reg_en']:.3f}"], row


def test_ablations_bench_trains_the_two_phase_demo_per_variant(tmp_path):
    """--two-phase: each variant trains the look-up set alone, then all five sets from that model, both phases with
    the variant's overrides (here on 2 DeepSpeed ranks each, as the recipes run); the table scores the five sets and
    shows the look-up's designed (global) expert."""
    work = tmp_path / "work"
    args = ["--two-phase", "--ranks", "2", "--variants", "full,no_global", "--first-steps", "2", "--steps", "2"]
    args += ["--work-dir", str(work)]
    out, rows = run_bench("ablations.py", args, tmp_path, timeout=900)
    five = {"demo_cls_en", "demo_cls_zh", "demo_reg_en", "demo_reg_zh", "demo_key_en"}
    assert [r["variant"] for r in rows] == ["full", "no_global"]
    assert all(set(r["scores"]) == five and all(0 <= v <= 6 for v in r["scores"].values()) for r in rows), rows
    assert set(rows[0]["gates"]["demo_key_en"]) == {"local", "semantic", "global"}
    assert set(rows[1]["gates"]["demo_key_en"]) == {"local", "semantic"}
    for variant, experts in (("full", ["local", "semantic", "global"]), ("no_global", ["local", "semantic"])):
        first = json.loads((work / variant / "first" / "config.json").read_text())
        second = json.loads((work / variant / "second" / "config.json").read_text())
        assert first["data"]["train"] == {"demo_key_en": 1.0} and first["train"]["steps"] == 2
        assert second["train"]["init_from"] == str(work / variant / "first" / "best")
        assert set(second["data"]["train"]) == five
        assert first["fusion"]["experts"] == second["fusion"]["experts"] == experts
        for phase in ("first", "second"):  # 2 ranks of the recipe's 16 samples
            assert json.loads((work / variant / phase / "ds_config.json").read_text())["train_batch_size"] == 32
    assert "demo_key_en mae (global)" in out and "designed expert's gate (cls_en, cls_zh, reg_en, key_en)" in out
    assert "(the two-phase demo's second phase), 2 CPU ranks" in out


def test_ablations_refuse_fewer_than_one_rank_before_building_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    import ablations

    with pytest.raises(SystemExit) as exit_info:
        ablations.main(["--ranks", "0", "--work-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--ranks 0: give 1 (one plain process) or more" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no shards, no tiny LLM


def test_ablations_reuse_a_finished_variant_only_for_the_same_command_and_code(tmp_path, monkeypatch):
    """A variant trained before the model, the demo or a recipe changed is trained again, never reported as
    today's (the command alone does not show a change of code or of the recipe it leaves implicit)."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    import ablations

    code, command = ablations.code_fingerprint(), ["python", "launch/train.py", "--train.steps=2"]
    assert len(code) == 64 and ablations.code_fingerprint() == code
    record = tmp_path / ablations.VARIANT_RECORD
    record.write_text(json.dumps({"command": command, "code": code, "seconds": 5.0}))
    assert ablations.finished_seconds(str(tmp_path), command, code) == 5.0
    assert ablations.finished_seconds(str(tmp_path), command, "0" * 64) is None
    assert ablations.finished_seconds(str(tmp_path), [*command, "--train.seed=1"], code) is None
    record.write_text(json.dumps({"command": command, "seconds": 5.0}))  # written before the code was recorded
    assert ablations.finished_seconds(str(tmp_path), command, code) is None


def test_reader_probe_trains_both_readers_on_every_set(tmp_path):
    out, rows = run_bench("reader_probe.py", ["--steps", "3", "--train-size", "64"], tmp_path)
    assert [r["set"] for r in rows] == ["drift", "level", "pair", "key"]
    for row in rows:
        assert row["median_mae"] > 0.9  # no set can be answered by a constant, and each by its rule
        assert row["rule_mae"] < {"drift": 0.6, "level": 0.05, "pair": 0.1, "key": 0.45}[row["set"]], row
        assert all(0 < row[reader]["mae"] < 10 for reader in ("pseudo_tokens", "with_global"))
    assert "| level |" in out and "+ global expert |" in out


def test_reader_probes_two_value_key_set_is_answered_by_its_rule_and_not_by_their_mean(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    import reader_probe

    clips, scores = reader_probe.make_split("key2", 256, seed=0)
    values = clips[reader_probe.marked(clips)].view(len(clips), -1, reader_probe.DIM)[..., reader_probe.LEVEL_AXIS]
    assert values.shape == (256, 2)  # two value events in every clip
    assert (reader_probe.RULES["key2"](clips) - scores).abs().mean() < 0.45
    assert (values.mean(1) - scores).abs().mean() > 0.5  # their mean is not the answer


def test_reader_probe_trains_the_whole_fusion_module_and_reports_its_gate(tmp_path):
    args = ["--sets", "key", "--steps", "3", "--train-size", "64", "--readers", "fusion_module,fusion_no_global"]
    out, rows = run_bench("reader_probe.py", args + ["--lr", "1e-3", "--free-tokens"], tmp_path)
    (row,) = rows
    assert "pseudo_tokens" not in row and "with_global" not in row  # only the readers asked for are trained
    full, without = row["fusion_module"], row["fusion_no_global"]
    assert list(full["gate"]) == ["local", "semantic", "global"] and list(without["gate"]) == ["local", "semantic"]
    for result in (full, without):
        assert abs(sum(result["gate"].values()) - 1) < 1e-4 and 0 < result["mae"] < 10
    assert "Adam 0.001" in out and "| fusion module | fusion module without global |" in out and "[local 0." in out


def test_reader_probe_trains_the_module_read_by_the_tiny_llm(tmp_path):
    readers = "llm_linear,llm_linear_no_global,llm_text_and_linear"
    args = ["--sets", "key", "--steps", "3", "--train-size", "64", "--test-size", "40", "--readers", readers]
    out, rows = run_bench("reader_probe.py", args, tmp_path)
    (row,) = rows
    assert list(row["llm_linear"]["gate"]) == ["local", "semantic", "global"]
    assert list(row["llm_linear_no_global"]["gate"]) == ["local", "semantic"]
    for reader in readers.split(","):
        assert abs(sum(row[reader]["gate"].values()) - 1) < 1e-4 and 0 < row[reader]["mae"] < 10, row[reader]
    assert "test MAE over 40 clips" in out and "| fusion module + LLM, linear read |" in out


def test_the_probes_text_answer_is_scored_as_the_llm_scores_it(monkeypatch):
    """The text reader's loss is the LLM's own teacher-forced loss on the answer as the verbaliser writes it (an
    answer position off by one would train on the wrong tokens), and it answers with one of the ordered
    candidates that the weighted median needs."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    import reader_probe
    import torch

    torch.manual_seed(0)
    reader = reader_probe.LLMReader(["local", "global"], normalised_tokens=False, answer="text").eval()
    clips, _ = reader_probe.make_split("key", 4, seed=0)
    scores = torch.tensor([-2.96, -0.04, 0.06, 1.26])
    assert [reader.verbaliser.candidates()[i] for i in (0, 30, 31, 43)] == ["-3.0", "+0.0", "+0.1", "+1.3"]
    with torch.no_grad():
        prompt = reader.prompt(clips)
        answers = reader.candidate_ids[[0, 30, 31, 43]]
        labels = torch.cat([torch.full(prompt.shape[:2], -100), answers], 1)
        rows = torch.cat([prompt, reader.llm.get_input_embeddings()(answers)], 1)
        expected = reader.llm(inputs_embeds=rows, labels=labels, use_cache=False).loss
        assert torch.allclose(reader.loss(clips, scores), expected, atol=1e-5)
        candidates = [float(c) for c in reader.verbaliser.candidates()]
        assert candidates == sorted(candidates)
        assert all(min(abs(p - c) for c in candidates) < 1e-6 for p in reader.predict(clips).tolist())


def test_reader_probe_rejects_an_unknown_set():
    command = [sys.executable, "bench/reader_probe.py", "--sets", "pair,nope"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "unknown sets nope; known: drift, level, pair, key, key2" in done.stderr
