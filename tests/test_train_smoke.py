"""The entry point's `main([...])` in this process: two steps on the demo, one plain process (a real DeepSpeed
engine, loader, evaluation, checkpoint and MLflow store). It is in the fast tier so that broken wiring between
the parts fails in seconds; the multi-rank and fault runs are in the slow tier."""

from __future__ import annotations

import json
import os
import re
import sys

import torch
import torch.distributed as dist
from run_helpers import REPO, SMALL_EVAL, only_run

from egmf.train.main import main


def test_main_trains_evaluates_saves_and_tracks_two_steps(train_shards, tiny_llm, tmp_path, capsys):
    out = str(tmp_path / "out")
    code = main(
        [
            f"--data.root={train_shards}",
            f"--llm.path={tiny_llm}",
            f"--train.output_dir={out}",
            "--train.steps=2",
            "--eval.every=0",  # the demo recipe's 500 would never come: a degenerate schedule
            "--train.log_every=1",
            "--data.batch_size=4",
            "--optim.global_batch=8",  # one process: 2 micro-batches per step
            "--data.num_workers=0",
            "--eval.batch_size=24",
            "--mlflow.system_metrics=false",
            "--checkpoint.every_minutes=0.0001",  # the clock asks for a save after every step
            "--checkpoint.keep_last=3",
            "--mlflow.log_model=true",
            "--mlflow.register_as=egmf-smoke",
            *SMALL_EVAL,
        ]
    )
    assert code == 0
    assert not dist.is_initialized()  # main() leaves no process group behind
    summary, log = capsys.readouterr()  # the end of the run: where the best model is and what to run next
    assert re.search(r"step 2/2 \| loss .* \| elapsed 0:00:\d\d \| eta 0:00:00", log)
    assert f"best model: {out}/best (step " in summary and f"egmf-predict --model {out}/best" in summary
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step_00000002"
    engine_state = torch.load(
        os.path.join(out, "checkpoints", "step_00000002", "deepspeed", "mp_rank_00_model_states.pt"), weights_only=True
    )  # two optimizer updates of 2 micro-batches x 4 samples, and the schedule stepped with them
    assert (engine_state["global_steps"], engine_state["global_samples"]) == (2, 16)
    assert engine_state["lr_scheduler"]["last_epoch"] == 2
    saved = sorted(n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith("step_"))
    assert saved == ["step_00000001", "step_00000002"]  # step 1: by the clock (the recipe saves every 500 steps)
    final = json.load(open(os.path.join(out, "final_metrics.json")))
    assert final["step"] == 2 and final["best_step"] == 2
    assert final["last"]["eval/test/demo_cls_en/constrained/samples"] == 24
    assert final["reported"]["final/test/demo_cls_en/constrained/samples"] == 24  # chosen on test here (SMALL_EVAL)
    assert final["selected_on"] == "test (constrained): 1 demo_cls_en/wf1"
    evaluation = os.path.join(out, "predictions", "final")
    assert sorted(os.listdir(evaluation)) == ["metrics.json", "test.jsonl"]
    assert len(open(os.path.join(evaluation, "test.jsonl")).readlines()) == 24
    assert os.path.isfile(os.path.join(out, "best", "best.json"))
    client, run = only_run(out)
    assert run.info.status == "FINISHED"
    version = client.get_latest_versions("egmf-smoke")[0]  # the best model, logged and registered at the end
    assert version.run_id == run.info.run_id and os.path.isfile(os.path.join(out, "package", "egmf_package.json"))
    schedule = run.data.tags["schedule"]
    assert schedule.startswith("2 optimizer steps") and "every 0.0001 min" in schedule
    assert run.data.params["optim.grad_accum"] == "2"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")} == {1, 2}
    metrics = run.data.metrics  # the gate telemetry of every window and evaluation
    experts = ("local", "semantic", "global")
    trained = {m.split("/")[1] for m in metrics if m.startswith("gate/demo_")}  # the datasets of the last window
    assert abs(sum(metrics[f"gate/{e}"] for e in experts) - 1) < 1e-5 and trained
    assert all(abs(sum(metrics[f"gate/{d}/{e}"] for e in experts) - 1) < 1e-5 for d in trained)
    assert 0 < metrics["gate/entropy_mean"] <= metrics["gate/entropy_batch"] + 1e-6 <= 1.0987
    assert abs(sum(metrics[f"gate/argmax_share/{e}"] for e in experts) - 1) < 1e-5
    assert all(0 < metrics[f"gate_l1/{e}/{m}"] < 1 for e in experts for m in ("text", "audio", "vision"))
    assert metrics["train/aux/balance"] >= 1.0 and metrics["train/aux/z"] >= 0
    # the task loss per dataset of the last window: the window's loss is their mean over its micro-batches
    assert {m for m in metrics if m.startswith("train/loss/")} == {f"train/loss/{d}" for d in trained}
    assert min(metrics[f"train/loss/{d}"] for d in trained) <= metrics["train/loss"] + 1e-9
    assert abs(sum(metrics[f"gate_eval/test/demo_cls_en/{e}"] for e in experts) - 1) < 1e-5
    assert metrics["data/text_truncated/demo_cls_en/train"] == 0.0  # counted at the start (demo texts are short)
    assert "plots/gates_test.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    # what the MLflow UI shows about the run: its view, description, inputs, epoch; no constant count charts
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["mlflow.note.content"].startswith("EGMF on demo_cls_en (2), demo_cls_zh (2)")
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert {"demo_cls_en/train", "demo_cls_en/test"} <= set(inputs) and len(inputs["demo_cls_en/test"].dataset.digest)
    assert {t.value for t in inputs["demo_cls_en/train"].tags} == {"training"}
    assert 0 < metrics["train/epoch"] < 1 and not any(key.endswith("/samples") for key in metrics)
    assert run.data.tags["eval_samples"] == "test/demo_cls_en 24"


def terminal_output(command: list[str], timeout_s: float = 600) -> tuple[int, str]:
    """Run `command` with stdout and stderr on a pseudo-terminal, as in a user's shell (the progress bar only
    draws on a terminal); (exit code, everything it wrote)."""
    import fcntl
    import pty
    import struct
    import subprocess
    import termios
    import time

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))  # 50 rows, 160 columns
    process = subprocess.Popen(command, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL, cwd=REPO)
    os.close(follower)
    chunks, deadline = [], time.time() + timeout_s
    while time.time() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process and its children are gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def test_log_lines_and_warnings_stay_off_the_progress_bar(train_shards, tiny_llm, tmp_path):
    """On a terminal, every log line (warnings included) is written on a line of its own above the progress bar,
    never appended to the bar's current line."""
    out = str(tmp_path / "out")
    args = [f"--data.root={train_shards}", f"--llm.path={tiny_llm}", f"--train.output_dir={out}"]
    args += ["--train.steps=6", "--train.log_every=2", "--data.batch_size=4", "--eval.every=0", "--checkpoint.every=2"]
    args += ["--optim.warmup_steps=1", "--mlflow.system_metrics=false", *SMALL_EVAL]
    code, text = terminal_output([sys.executable, "launch/train.py", *args])
    assert code == 0, text[-4000:]
    pieces = re.split(r"[\r\n]+", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text))  # what each redraw leaves on screen
    bar = re.compile(r"\d+/6 \[")
    assert any(bar.search(p) for p in pieces), "no progress bar was drawn"
    log_line = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \S+ (INFO|WARNING)")
    saves = [p for p in pieces if re.search(r"INFO checkpoint .*step_0000000[246]", p)]
    assert len(saves) == 3, pieces  # logged at steps 2, 4 and 6, while the bar was on the screen
    mixed = [p for p in pieces if bar.search(p) and log_line.search(p)]
    assert not mixed, mixed[:3]
