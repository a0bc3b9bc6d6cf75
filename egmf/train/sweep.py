"""`egmf-sweep`: one recipe trained once per seed, as MLflow child runs of one parent run, then the report.

    egmf-sweep --config launch/recipes/mosei.toml --seeds 1111,2222,3333,4444,5555 --llm.path=/models/Qwen2.5-7B
    egmf-sweep --seeds 1,2,3 --train.steps=400           # the demo, one process per seed, one after another
    egmf-sweep --nproc-per-node 8 --config ...           # each seed on 8 local GPUs (torchrun)
    egmf-sweep --slurm --config ... [--sbatch=--nodes=2]  # a Slurm job array, one task per seed

The sweep lives in train.output_dir (ROOT): ROOT/sweep.json records the
recipe, the overrides, the seeds and the parent run; seed S trains in
ROOT/seed_S with train.seed = data.seed = S. A seed is finished when its
final_metrics.json exists. Run the same command again and it skips finished
seeds and resumes the others from their checkpoints; a different recipe,
overrides or seeds in the same ROOT is refused (exit 2). When every seed is
finished, the report (egmf/train/report.py) is written to ROOT and logged to
the parent run, which then ends FINISHED.

Exit codes: 0 every seed finished and reported (or, with --slurm, the array
submitted), 2 a configuration problem found before anything ran, else the
exit code of the first seed that failed (the parent run ends FAILED).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from egmf.atomic import write_json
from egmf.errors import ConfigError
from egmf.train.config import Config, load_config
from egmf.train.plan import make_plan, refuse_degenerate_schedule
from egmf.train.report import SEED_PREFIX, SWEEP_RECORD, write_report
from egmf.train.trainer import FINAL_METRICS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_SCRIPT = os.path.join(REPO, "launch", "train.py")
SWEEP_SCRIPT = os.path.join(REPO, "slurm", "sweep_egmf.sh")


@dataclass
class Sweep:
    """What ROOT/sweep.json holds: enough to run any seed again, from any machine that sees ROOT."""

    root: str
    recipe: str | None
    overrides: list[str]
    seeds: list[int]
    tracking_uri: str = ""
    parent_run_id: str = ""

    def seed_dir(self, seed: int) -> str:
        return os.path.join(self.root, f"{SEED_PREFIX}{seed}")

    def finished(self, seed: int) -> bool:
        return os.path.isfile(os.path.join(self.seed_dir(seed), FINAL_METRICS))

    def seed_args(self, seed: int) -> list[str]:
        """launch/train.py's arguments for one seed: the sweep's recipe and overrides, then the seed's own."""
        args = ["--config", self.recipe] if self.recipe else []
        args += self.overrides + [
            f"--train.output_dir={self.seed_dir(seed)}",
            f"--train.seed={seed}",
            f"--data.seed={seed}",
            f"--mlflow.run_name={SEED_PREFIX}{seed}",
        ]
        if self.parent_run_id:
            args += [f"--mlflow.tracking_uri={self.tracking_uri}", f"--mlflow.parent_run_id={self.parent_run_id}"]
        return args

    def save(self) -> None:
        write_json(os.path.join(self.root, SWEEP_RECORD), self.__dict__)


def read_sweep(root: str) -> Sweep | None:
    path = os.path.join(root, SWEEP_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return Sweep(**json.load(f))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} must be comma-separated integers, e.g. 1111,2222,3333") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} must name at least one seed, each once")
    return seeds


def open_sweep(recipe: str | None, overrides: list[str], seeds: list[int], world_size: int) -> tuple[Sweep, Config]:
    """The sweep of this command: the one recorded in ROOT when it is the same, else a new one. ConfigError for a
    bad config or schedule (checked as each seed's run would check it, at `world_size` devices) or for a different
    sweep already in ROOT."""
    cfg = load_config(recipe, overrides)
    refuse_degenerate_schedule(make_plan(cfg, world_size), cfg)
    root = os.path.abspath(cfg.train.output_dir)
    recipe = os.path.abspath(recipe) if recipe else None
    sweep = Sweep(root, recipe, list(overrides), seeds)
    recorded = read_sweep(root)
    if recorded is None:
        return sweep, cfg
    if (recorded.recipe, recorded.overrides, recorded.seeds) != (recipe, sweep.overrides, seeds):
        raise ConfigError(
            f"{root} holds another sweep (recipe {recorded.recipe}, seeds {recorded.seeds}, overrides "
            f"{recorded.overrides}); run that one again to resume it, or choose another --train.output_dir"
        )
    return recorded, cfg


def start_parent_run(sweep: Sweep, cfg: Config) -> None:
    """Create (or reopen) the parent run and record it in ROOT/sweep.json."""
    if not cfg.mlflow.enabled:
        sweep.save()
        return
    from egmf.tracking import MLflowTracker, flatten

    mlflow_cfg = copy.deepcopy(cfg.mlflow)
    mlflow_cfg.system_metrics = False  # the parent only waits
    mlflow_cfg.run_name = mlflow_cfg.run_name or f"{os.path.basename(sweep.root)} sweep"
    tracker = MLflowTracker(mlflow_cfg, sweep.root, sweep.parent_run_id or None)
    if not sweep.parent_run_id:
        params = {k: v for k, v in flatten(cfg.to_dict()).items() if k not in ("train.seed", "data.seed")}
        tracker.log_params(params | {"sweep.seeds": ",".join(map(str, sweep.seeds))})
        tracker.set_tags({"sweep": "parent", "sweep_root": sweep.root})
    tracker.flush()
    sweep.tracking_uri, sweep.parent_run_id = tracker.uri, tracker.run_id
    sweep.save()


def end_parent_run(sweep: Sweep, status: str) -> None:
    if not sweep.parent_run_id:
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(sweep.tracking_uri).set_terminated(sweep.parent_run_id, status)


def train_command(sweep: Sweep, seed: int, nproc_per_node: int) -> list[str]:
    if nproc_per_node > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}"]
    else:
        launcher = [sys.executable]
    return launcher + [TRAIN_SCRIPT] + sweep.seed_args(seed)


def run_locally(sweep: Sweep, nproc_per_node: int) -> int:
    """Each unfinished seed in turn; the first failure stops the sweep with its exit code."""
    for seed in sweep.seeds:
        if sweep.finished(seed):
            print(f"egmf-sweep: seed {seed} finished already ({sweep.seed_dir(seed)})", flush=True)
            continue
        print(f"egmf-sweep: training seed {seed} in {sweep.seed_dir(seed)}", flush=True)
        code = subprocess.run(train_command(sweep, seed, nproc_per_node), cwd=REPO).returncode
        if code != 0:
            print(f"egmf-sweep: seed {seed} ended with exit code {code}; run the same command to resume", flush=True)
            return code
    return 0


def submit_array(sweep: Sweep, sbatch_args: list[str]) -> int:
    """sbatch one array task per unfinished seed (index = position in sweep.seeds); the task that finds every
    seed finished writes the report."""
    todo = [str(i) for i, seed in enumerate(sweep.seeds) if not sweep.finished(seed)]
    if not todo:
        return finish(sweep)
    command = ["sbatch", "--parsable", f"--array={','.join(todo)}", *sbatch_args, SWEEP_SCRIPT, sweep.root]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:  # with --sbatch=--wait also when a task failed: its log says why
        print(f"egmf-sweep: sbatch ended with exit code {done.returncode}: {done.stderr.strip()}", file=sys.stderr)
        return done.returncode
    print(f"egmf-sweep: submitted job array {done.stdout.strip()} (seeds {', '.join(todo)} by index)", flush=True)
    return 0


def finish(sweep: Sweep) -> int:
    """Write the report and end the parent run FINISHED when every seed is finished; 0 either way."""
    left = [seed for seed in sweep.seeds if not sweep.finished(seed)]
    if left:
        print(f"egmf-sweep: seeds {', '.join(map(str, left))} not finished yet; no report", flush=True)
        return 0
    print(write_report(sweep.root), flush=True)
    end_parent_run(sweep, "FINISHED")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egmf-sweep",
        description=__doc__.split("\n")[0].split(": ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="TOML recipe (default: the embedded demo)")
    parser.add_argument("--seeds", default="1111,2222,3333,4444,5555", help="comma-separated (default: %(default)s)")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="ranks per seed on this machine (torchrun)")
    parser.add_argument("--slurm", action="store_true", help="submit a Slurm job array (slurm/sweep_egmf.sh)")
    parser.add_argument("--sbatch", action="append", default=[], help="an sbatch option for the array, repeatable")
    parser.add_argument("--task", metavar="ROOT:INDEX", help=argparse.SUPPRESS)  # slurm/sweep_egmf.sh: print args
    parser.add_argument("--finish", metavar="ROOT", help=argparse.SUPPRESS)  # slurm/sweep_egmf.sh: report if done
    return parser


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    if args.task or args.finish:  # from slurm/sweep_egmf.sh
        root, _, index = (args.task or args.finish + ":").rpartition(":")
        sweep = read_sweep(root)
        if sweep is None:
            print(f"error: no {SWEEP_RECORD} in {root}; start the sweep with egmf-sweep --slurm", file=sys.stderr)
            return 2
        if args.finish:
            return finish(sweep)
        # one array task's seed, as NUL-separated launch/train.py arguments
        sys.stdout.write("\0".join(sweep.seed_args(sweep.seeds[int(index)])))
        return 0
    try:
        # a Slurm array's device count is the sbatch options' business: the schedule is checked at one device,
        # where it has the most steps (a check that can miss, never one that refuses a sound schedule)
        sweep, cfg = open_sweep(args.config, overrides, parse_seeds(args.seeds), args.nproc_per_node)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(sweep.root, exist_ok=True)
    start_parent_run(sweep, cfg)
    if args.slurm:
        return submit_array(sweep, args.sbatch)
    code = run_locally(sweep, args.nproc_per_node)
    if code != 0:
        end_parent_run(sweep, "FAILED")
        return code
    return finish(sweep)


if __name__ == "__main__":
    sys.exit(main())
