"""Everything this project measures on a GPU, in one run that writes one results file: `make gpu-check`.

    make gpu-wheels                 # here, with network: .whl/ holds deepspeed, webdataset and their needs
    make gpu-check                  # on the GPU machine (no network): installs .whl/, runs every stage
    python bench/gpu_check.py --wheels .whl --out gpu_check.json
    python bench/gpu_check.py --device cpu --shape tiny --train-steps 2 --out check.json   # the CPU-runnable parts

Made for a bare GPU machine that has torch, transformers and peft but not
deepspeed, webdataset or mlflow: the wheels in --wheels are installed into a
private folder (`pip --no-index`, nothing is downloaded) that every stage gets
on its PYTHONPATH, with this checkout. About 5 minutes on one H200.

Stages, each in its own process under its own time limit, each recorded even
when it fails or is skipped (with the reason):

1. install      the wheels (none given: what is installed is used as it is);
2. environment  GPU, memory, driver, torch/CUDA, flash-attn, deepspeed, mlflow versions;
3. parity       the flash-attn vs SDPA test in bf16 (`pytest -m gpu`), outputs and gradients;
4. step         bench/gpu_step.py at the 7B shape: tokens/s, MFU, peak memory, per variant
                (flash vs SDPA, gradient checkpointing, packing);
5. sweep        bench/gpu_sweep.py at the 7B shape: the same as the micro-batch grows, and the first row
                without DeepSpeed (--plain);
6. train        launch/train.py on the demo for a few dozen steps, one process, bf16 on CUDA
                (MLflow when it is installed): loss, throughput, test metrics.

The results file holds, per stage: status (ok, failed, skipped, timeout),
seconds, figures, and the tail of its output. A Markdown summary is printed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAIL = 4000

ENVIRONMENT_PROBE = """
import importlib, json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1), "gpus": torch.cuda.device_count()}
for name in ("deepspeed", "transformers", "peft", "flash_attn", "mlflow", "webdataset"):
    try:
        info[name] = getattr(importlib.import_module(name), "__version__", "installed")
    except Exception as exc:  # not installed (None), or installed without something it needs
        info[name] = None if getattr(exc, "name", "") == name else f"import failed: {exc}"
print("ENVIRONMENT " + json.dumps(info))
"""


def run_stage(name: str, command: list[str], env: dict, timeout: int) -> dict:
    """Run one stage's command; its status, seconds and output tail (a stage that fails never stops the rest)."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        output, status = done.stdout + done.stderr, "ok" if done.returncode == 0 else "failed"
    except subprocess.TimeoutExpired as exc:
        output, status = _text(exc.stdout) + _text(exc.stderr), "timeout"
    return {"stage": name, "status": status, "seconds": round(time.perf_counter() - start, 1), "output": output}


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def install_wheels(wheels: str, site: str) -> dict:
    files = sorted(glob.glob(os.path.join(wheels, "*.whl"))) if wheels else []
    if not files:
        return {"stage": "install", "status": "skipped", "seconds": 0.0, "output": f"no wheels in {wheels!r}"}
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
    command += ["--target", site, *files]
    result = run_stage("install", command, dict(os.environ), timeout=300)
    result["figures"] = {"wheels": [os.path.basename(f) for f in files]}
    return result


def environment(env: dict) -> dict:
    result = run_stage("environment", [sys.executable, "-c", ENVIRONMENT_PROBE], env, timeout=120)
    found = re.search(r"^ENVIRONMENT (.*)$", result["output"], re.M)
    result["figures"] = json.loads(found.group(1)) if found else {}
    return result


def parity(env: dict) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider"]
    result = run_stage("parity", command + ["tests/test_fusion.py"], env, timeout=300)
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", result["output"])}
    result["figures"] = counts
    if result["status"] == "ok" and not counts.get("passed"):
        result["status"] = "skipped"  # e.g. no flash-attn: the test says why in its skip reason
    return result


def gpu_sweep(env: dict, args: argparse.Namespace, folder: str) -> dict:
    figures = os.path.join(folder, "gpu_sweep.json")
    command = [sys.executable, "bench/gpu_sweep.py", "--shape", args.shape, "--device", args.device, "--plain"]
    command += ["--steps", str(args.step_steps), "--warmup", str(args.step_warmup)]
    command += ["--plan", args.sweep_plan] if args.sweep_plan else []
    result = run_stage("sweep", command + ["--json", figures], env, timeout=args.step_timeout)
    result["figures"] = _read_json(figures)
    return result


def gpu_step(env: dict, args: argparse.Namespace, folder: str) -> dict:
    figures = os.path.join(folder, "gpu_step.json")
    command = [sys.executable, "bench/gpu_step.py", "--shape", args.shape, "--device", args.device]
    command += ["--steps", str(args.step_steps), "--warmup", str(args.step_warmup), "--json", figures]
    command += ["--batch-size", str(args.batch_size)]
    result = run_stage("step", command, env, timeout=args.step_timeout)
    result["figures"] = _read_json(figures)
    return result


DEMO_BUILD = (
    "import sys; from egmf.datasets import DEMO_DATASETS; from egmf.demo_assets import build_demo_assets; "
    "build_demo_assets(sys.argv[1], [(d, s) for d in DEMO_DATASETS for s in ('train', 'valid', 'test')], sys.argv[2])"
)
"""Runs build the demo's shards and model only at the demo recipe's own paths; this scratch copy is built here."""


def train(env: dict, args: argparse.Namespace, folder: str, mlflow_installed: bool) -> dict:
    out = os.path.join(folder, "train")
    build = [sys.executable, "-c", DEMO_BUILD, f"{folder}/shards", f"{folder}/tiny-llm"]
    built = subprocess.run(build, cwd=REPO, env=env, capture_output=True, text=True)
    if built.returncode != 0:
        return {"stage": "train", "status": "failed", "output": built.stderr[-4000:], "figures": {}}
    command = [sys.executable, "launch/train.py", "--deepspeed", "ds_configs/zero2.json"]
    command += [f"--data.root={folder}/shards", f"--llm.path={folder}/tiny-llm", f"--train.output_dir={out}"]
    command += [f"--train.steps={args.train_steps}", "--train.log_every=5", f"--train.device={args.device}"]
    command += ["--eval.every=0", "--checkpoint.every=0", "--mlflow.system_metrics=false", "--optim.warmup_ratio=0.1"]
    command += ([] if mlflow_installed else ["--mlflow.enabled=false"]) + args.train_override
    result = run_stage("train", command, env, timeout=args.train_timeout)
    final = _read_json(os.path.join(out, "final_metrics.json")) or {}
    window = r"step (\d+)/\d+ \| loss ([\d.]+) .*?samples/s/dev ([\d.]+) \| tok/s/dev (\d+)"
    windows = re.findall(window, result["output"])
    result["figures"] = {
        "mlflow": mlflow_installed,
        "steps": final.get("step"),
        "loss_first_window": float(windows[0][1]) if windows else None,
        "loss_last_window": float(windows[-1][1]) if windows else None,
        "samples_per_s_per_device": float(windows[-1][2]) if windows else None,
        "tokens_per_s_per_device": int(windows[-1][3]) if windows else None,
        "test_metrics": {k: v for k, v in final.get("last", {}).items() if "/test/" in k and "constrained" in k},
    }
    return result


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def summary(results: list[dict]) -> str:
    lines = ["| stage | status | seconds | figures |", "|---|---|---|---|"]
    for r in results:
        figures = json.dumps(r.get("figures"), ensure_ascii=False)
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']} | {figures[:300]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheels", default=".whl", help="folder of wheels to install first ('' or missing: none)")
    parser.add_argument("--out", default="gpu_check.json", help="the results file")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for the CPU-runnable parts")
    parser.add_argument("--shape", default="7b", help="bench/gpu_step.py's model shape (7b, or tiny)")
    parser.add_argument("--batch-size", type=int, default=8, help="bench/gpu_step.py's batch")
    parser.add_argument("--step-steps", type=int, default=6, help="timed steps per gpu_step variant")
    parser.add_argument("--step-warmup", type=int, default=2)
    parser.add_argument("--step-timeout", type=int, default=300, help="seconds, for the step and sweep stages each")
    parser.add_argument("--sweep-plan", help="bench/gpu_sweep.py's GRAD_CKPT:BATCH rows (default: its own plan)")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--train-timeout", type=int, default=240)
    parser.add_argument(
        "--train-override", action="append", default=[], help="--section.key=value for the train stage (repeatable)"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        site = os.path.join(folder, "site")
        results = [install_wheels(args.wheels, site)]
        path = os.pathsep.join(p for p in (site, REPO, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
        results.append(environment(env))
        results.append(parity(env))
        results.append(gpu_step(env, args, folder))
        results.append(gpu_sweep(env, args, folder))
        mlflow = str(results[1]["figures"].get("mlflow"))
        results.append(train(env, args, folder, mlflow[:1].isdigit()))
    for result in results:
        result["output"] = result["output"][-TAIL:]
    with open(args.out, "w") as f:
        json.dump({"argv": argv if argv is not None else sys.argv[1:], "stages": results}, f, indent=1)
    print(summary(results))
    print(f"\nresults: {args.out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
