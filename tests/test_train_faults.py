"""Faults injected into real single-process runs (a real DeepSpeed engine and MLflow store): a crash in the
middle of a checkpoint save, non-finite losses. Each run is `main()` in a fresh spawned process with the fault
patched in (DeepSpeed keeps its process groups in module globals: one run per process)."""

from __future__ import annotations

import io
import json
import multiprocessing
import os

import pytest
import torch
from mlflow.tracking import MlflowClient

from egmf.model.egmf_model import EGMFModel
from egmf.train.checkpoint import read_meta

pytestmark = pytest.mark.slow


def args(shards: str, llm: str, out: str, *extra: str) -> list[str]:
    return [
        f"--data.root={shards}",
        f"--llm.path={llm}",
        f"--train.output_dir={out}",
        "--train.steps=8",
        "--train.log_every=1",
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--data.eval=['demo_cls_en']",
        "--eval.splits=['test']",
        "--eval.select_split=test",
        "--eval.modes=['constrained']",
        "--eval.batch_size=24",
        "--checkpoint.every=4",
        "--eval.every=0",  # the demo recipe's 500 would never come in 8 steps: a degenerate schedule
        "--optim.warmup_steps=2",
        "--mlflow.system_metrics=false",
        *extra,
    ]


def crash_in_second_export() -> None:
    """The step-8 save fails after DeepSpeed's files are written, before the export is."""
    export, calls = EGMFModel.export, []

    def export_then_crash(self, out_dir):
        calls.append(out_dir)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        export(self, out_dir)

    EGMFModel.export = export_then_crash


def nan_loss(on_calls: set[int] | None, counter: list[int]) -> None:
    """NaN loss on the given forward calls (None: on every call from the third on)."""
    forward = EGMFModel.forward

    def forward_with_nan(self, batch):
        out = forward(self, batch)
        counter.append(1)
        if (on_calls is None and len(counter) >= 3) or (on_calls is not None and len(counter) in on_calls):
            out.loss = out.loss * torch.tensor(float("nan"))
        return out

    EGMFModel.forward = forward_with_nan


def usr1_during_setup() -> None:
    """Slurm's time-limit warning arrives while the job is still starting (before its first step)."""
    import signal

    from egmf.train.trainer import Trainer

    setup = Trainer.setup

    def setup_then_warning(self, candidates):
        setup(self, candidates)
        os.kill(os.getpid(), signal.SIGUSR1)

    Trainer.setup = setup_then_warning


def child(argv: list[str], fault: str, results) -> None:
    from egmf.train import main as train_entry

    counter: list[int] = []
    if fault == "crash_in_second_export":
        crash_in_second_export()
    elif fault == "nan_once":
        nan_loss({3}, counter)
    elif fault == "nan_always":
        nan_loss(None, counter)
    elif fault == "usr1_during_setup":
        usr1_during_setup()
    try:
        results.put((train_entry.main(argv), "", len(counter)))
    except Exception as exc:
        results.put((None, f"{type(exc).__name__}: {exc}", len(counter)))


def run_main(argv: list[str], fault: str = "") -> tuple[int | None, str, int]:
    """(exit code or None when main raised, the exception, forward calls) of main(argv) in a fresh process."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=child, args=(argv, fault, results))
    process.start()
    outcome = results.get(timeout=600)
    process.join(60)
    return outcome


def the_run(out: str):
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def test_crash_mid_save_keeps_latest_usable_and_the_run_failed(train_shards, tiny_llm, tmp_path):
    out = str(tmp_path / "out")
    code, error, _ = run_main(args(train_shards, tiny_llm, out), "crash_in_second_export")
    assert code is None and error == "OSError: disk full (injected)"
    checkpoints = os.path.join(out, "checkpoints")
    assert open(os.path.join(checkpoints, "latest")).read().strip() == "step_00000004"
    assert os.path.isdir(os.path.join(checkpoints, ".partial-step_00000008"))
    assert not os.path.exists(os.path.join(checkpoints, "step_00000008"))
    _, run = the_run(out)
    assert run.info.status == "FAILED"
    assert "injected" in open(os.path.join(out, "failures", "rank0.txt")).read()

    assert run_main(args(train_shards, tiny_llm, out))[0] == 0  # resume auto: from step 4
    assert read_meta(os.path.join(checkpoints, "step_00000008"))["step"] == 8
    assert not any(name.startswith(".partial") for name in os.listdir(checkpoints))
    client, resumed = the_run(out)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert "eval/test/demo_cls_en/constrained/acc" in resumed.data.metrics


def test_a_nan_loss_is_skipped_and_counted(train_shards, tiny_llm, tmp_path):
    out = str(tmp_path / "out")
    code, _, forward_calls = run_main(args(train_shards, tiny_llm, out), "nan_once")
    assert code == 0
    assert forward_calls == 8  # not replaced: its step adds zero gradient for it and takes no other samples
    assert read_meta(os.path.join(out, "checkpoints", "step_00000008"))["skipped_nonfinite"] == 1
    client, run = the_run(out)
    skipped = client.get_metric_history(run.info.run_id, "train/skipped_nonfinite")
    assert sum(m.value for m in skipped) == 1
    assert all(m.value == m.value for m in client.get_metric_history(run.info.run_id, "train/loss"))  # no NaN


def test_nan_losses_in_a_row_stop_the_run(train_shards, tiny_llm, tmp_path):
    out = str(tmp_path / "out")
    code, error, _ = run_main(args(train_shards, tiny_llm, out, "--train.max_nonfinite_in_a_row=3"), "nan_always")
    assert code is None and "NonFiniteLossError: 3 micro-batches in a row had a NaN/inf loss" in error
    _, run = the_run(out)
    assert run.info.status == "FAILED"


def test_early_stopping_and_a_complete_run_is_not_rerun(train_shards, tiny_llm, tmp_path):
    out = str(tmp_path / "out")
    frozen_lr = ["--optim.fusion_lr=1e-12", "--optim.lora_lr=1e-12"]  # the score cannot improve after step 2
    argv = args(train_shards, tiny_llm, out, "--eval.every=2", "--eval.patience=1", *frozen_lr)
    assert run_main(argv)[0] == 0
    latest = os.path.join(out, "checkpoints", open(os.path.join(out, "checkpoints", "latest")).read().strip())
    meta = read_meta(latest)
    assert meta["step"] == 4 and meta["stopped_early"] and meta["best_step"] == 2
    assert json.load(open(os.path.join(out, "best", "best.json")))["step"] == 2
    _, run = the_run(out)
    assert run.info.status == "FINISHED"
    assert run_main(argv)[0] == 0  # resume auto finds the run complete
    assert read_meta(latest)["step"] == 4
    assert the_run(out)[1].info.status == "FINISHED"


def test_final_evaluation_can_be_switched_off(train_shards, tiny_llm, tmp_path):
    """eval.final=false: the periodic evaluations and best/ as usual, no evaluation of the final weights; the run
    still ends complete (final_metrics.json) and FINISHED."""
    out = str(tmp_path / "out")
    assert run_main(args(train_shards, tiny_llm, out, "--eval.every=4", "--eval.final=false"))[0] == 0
    assert sorted(os.listdir(os.path.join(out, "predictions"))) == ["step_00000004"]
    final = json.load(open(os.path.join(out, "final_metrics.json")))
    assert final["step"] == 8 and final["best_step"] == 4
    _, run = the_run(out)
    assert run.info.status == "FINISHED"
    assert json.load(open(os.path.join(out, "best", "best.json")))["step"] == 4


def truncate_optimizer_state(checkpoint: str) -> str:
    """Cut the checkpoint's optimizer file in half (a copy or a disk that ran out); returns its path."""
    import glob

    (path,) = glob.glob(os.path.join(checkpoint, "deepspeed", "*optim_states.pt"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path


def test_a_checkpoint_that_does_not_load_falls_back_to_the_previous_one(train_shards, tiny_llm, tmp_path):
    """The newest checkpoint's optimizer file is truncated: the run names it, resumes from the one before (a
    warning and the MLflow tag resume_fallback), and finishes. When no checkpoint loads, the run stops and names
    each one's problem."""
    out = str(tmp_path / "out")
    checkpoints = os.path.join(out, "checkpoints")
    assert run_main(args(train_shards, tiny_llm, out, "--train.steps=12", "--train.stop_at_step=8"))[0] == 0
    broken = truncate_optimizer_state(os.path.join(checkpoints, "step_00000008"))
    size = os.path.getsize(broken)
    assert run_main(args(train_shards, tiny_llm, out, "--train.steps=12"))[0] == 0
    _, run = the_run(out)
    fallback = run.data.tags["resume_fallback"]
    assert fallback.startswith(f"resumed from {checkpoints}/step_00000004; did not load: ")
    assert f"{broken} has {size} bytes" in fallback  # (step 8 is saved anew on the way to 12)
    assert read_meta(os.path.join(checkpoints, "step_00000012"))["step"] == 12 and run.info.status == "FINISHED"

    alone = str(tmp_path / "alone")
    assert run_main(args(train_shards, tiny_llm, alone, "--train.steps=12", "--train.stop_at_step=4"))[0] == 0
    broken = truncate_optimizer_state(os.path.join(alone, "checkpoints", "step_00000004"))
    code, error, _ = run_main(args(train_shards, tiny_llm, alone, "--train.steps=12"))
    assert code is None and error.startswith("CheckpointError: no checkpoint of the run loads")
    assert broken in error and "checkpoint.resume=never" in error


def test_a_time_limit_warning_during_start_up_is_not_requeued(train_shards, tiny_llm, tmp_path):
    """Start-up longer than the warning's lead time would recur in every requeue (one step each time): the run
    saves its checkpoint and exits 1, which slurm/train_egmf.sh does not requeue, instead of 138."""
    out = str(tmp_path / "out")
    code, error, _ = run_main(args(train_shards, tiny_llm, out, "--train.steps=12"), "usr1_during_setup")
    assert (code, error) == (1, "")
    assert read_meta(os.path.join(out, "checkpoints", "step_00000001"))["step"] == 1
    _, run = the_run(out)
    assert run.info.status == "KILLED"


def test_skipped_training_samples_reach_mlflow(train_shards, tiny_llm, tmp_path):
    """Broken samples in the training shards are skipped and counted in MLflow (data/bad_samples), a chart that
    exists only once something was skipped."""
    import shutil
    import tarfile

    shards = str(tmp_path / "shards")
    shutil.copytree(train_shards, shards)
    folder = os.path.join(shards, "demo_cls_en", "train")
    for name in (n for n in os.listdir(folder) if n.endswith(".tar")):
        path = os.path.join(folder, name)
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        first_json = next(m.name for m, _ in members if m.name.endswith(".json"))
        with tarfile.open(path, "w") as tar:  # each shard's first sample is broken: whichever shard is read, one is
            for member, data in members:
                data = b"{broken" if member.name == first_json else data
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    out = str(tmp_path / "out")
    assert run_main(args(shards, tiny_llm, out, "--data.train={demo_cls_en = 1.0}"))[0] == 0
    client, run = the_run(out)
    history = client.get_metric_history(run.info.run_id, "data/bad_samples")
    assert history and history[-1].value >= 1


def test_a_micro_batch_without_a_good_sample_is_skipped_and_the_run_goes_on(train_shards, tiny_llm, tmp_path, capfd):
    """One sample per micro-batch, every sample of four of demo_cls_en's eight train shards broken: the micro-batches
    at those positions hold no good sample, come as padding and are skipped (a zero-gradient backward)."""
    import shutil
    import tarfile

    shards = str(tmp_path / "shards")
    shutil.copytree(train_shards, shards)
    folder = os.path.join(shards, "demo_cls_en", "train")
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".tar"))[::2]:
        path = os.path.join(folder, name)
        with tarfile.open(path) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(path, "w") as tar:
            for member, data in members:
                data = b"junk" if member.endswith(".json") else data
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = str(tmp_path / "out")
    extra = ["--data.train={demo_cls_en = 1.0}", "--data.batch_size=1", "--train.steps=12"]
    code, error, _ = run_main(args(shards, tiny_llm, out, *extra))
    assert code == 0, error
    log = capfd.readouterr().err
    skipped = log.count("micro-batch without good samples on some rank; skipped on every rank")
    assert 1 <= skipped < 12
    client, run = the_run(out)
    bad = client.get_metric_history(run.info.run_id, "data/bad_samples")
    assert bad and max(m.value for m in bad) == skipped  # one bad sample per skipped micro-batch
    assert all(m.value == m.value for m in client.get_metric_history(run.info.run_id, "train/loss"))
