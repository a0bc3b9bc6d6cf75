"""`egmf-train`: train EGMF on a DeepSpeed ZeRO-2 engine, evaluate it, track it in MLflow.

    egmf-train --config launch/recipes/mosei.toml --llm.path=/models/Qwen2.5-7B-Instruct   # one process
    deepspeed launch/train.py --deepspeed ds_configs/zero2.json --config launch/recipes/mosei.toml ...
    deepspeed --num_gpus 2 launch/train.py       # the embedded default on 2 CPU ranks (make train)
    torchrun --nproc_per_node 8 launch/train.py --config ...
    sbatch slurm/train_egmf.sh --config ...      # srun: one rank per GPU (docs/cluster.md)
    egmf-train --help                            # every config section and key, with its default

With no --config it runs the embedded default (launch/recipes/demo.toml): the
demo shards and a tiny local LLM, built when missing. Any `--section.key=value`
overrides the recipe. The whole config, the DeepSpeed config, the model
directory, the shards and the checkpoint to resume are checked before any
process group starts; problems are printed together and the exit code is 2.

Exit codes: 0 finished (or stopped at train.stop_at_step), 1 failed, 2 a
configuration or input problem found before training; 143 after SIGTERM and
138 after SIGUSR1 (Slurm's warning before the time limit): a checkpoint is
saved at the next step boundary and the MLflow run ends KILLED until a rerun
resumes it. slurm/train_egmf.sh requeues on 138.

    egmf-train [same arguments] --close-run=FAILED

ends the job's MLflow run with that status if it is still RUNNING: the job
script does this when a rank was killed outright and could not end it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
import warnings

from egmf.config import describe_tree
from egmf.errors import ConfigError
from egmf.mlflow_local import store_uri
from egmf.train.config import Config, load_config
from egmf.train.plan import device_memory_gb, format_plan, make_plan, refuse_degenerate_schedule
from egmf.train.run_markers import (
    all_peers_stopped,
    clear_failures,
    failed_ranks,
    failure_notes,
    write_failure,
    write_stop,
)
from egmf.train.stop_signal import StopSignal

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_RECIPE = os.path.join(REPO, "launch", "recipes", "demo.toml")

logger = logging.getLogger("egmf.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egmf-train",
        description=__doc__.split("\n")[0].split(": ", 1)[1],
        epilog="Config keys (set any as --section.key=value; values are TOML: 4, 2e-4, true, ['a'], {a = 1.0}):\n\n"
        + describe_tree(Config),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", help=f"TOML recipe (default: the embedded demo, {DEFAULT_RECIPE})")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON config (default: deepspeed.config of the recipe)")
    parser.add_argument("--resume", help="'auto' (default: the latest complete checkpoint), 'never' or a folder")
    parser.add_argument("--close-run", choices=("FAILED", "KILLED"), help="end the job's MLflow run if still RUNNING")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print the schedule (steps, warm-up, evaluations, checkpoints) and a memory estimate, then exit; "
        "starts nothing, loads no weights, reads no samples; exit 2 when the schedule is degenerate",
    )
    parser.add_argument("--world-size", type=int, help="devices for --plan (default: $WORLD_SIZE, else 1)")
    parser.add_argument("--json", action="store_true", help="--plan as one JSON object")
    parser.add_argument(
        "--train-samples",
        type=int,
        help="train samples for --plan when the shards are not built yet and the dataset's public size is unknown",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # from deepspeed; env wins
    return parser


def resolve_config(args: argparse.Namespace, overrides: list[str]) -> Config:
    """The checked config of a run: the recipe, then --deepspeed/--resume, then the overrides."""
    overrides = list(overrides)
    if args.deepspeed:
        overrides.append(f"--deepspeed.config={args.deepspeed}")
    if args.resume:
        overrides.append(f"--checkpoint.resume={args.resume}")
    recipe = args.config or DEFAULT_RECIPE
    if not args.config and not os.path.isfile(recipe):
        raise ConfigError(f"no --config given and the embedded demo recipe is not at {recipe}; pass --config RECIPE")
    return load_config(recipe, overrides)


def configure(args: argparse.Namespace, overrides: list[str]):
    """(config, resolved DeepSpeed config, world, device): everything decided before a process group exists."""
    from egmf.distributed import check_rendezvous, pick_device, world_info_from_env
    from egmf.train.ds_config import resolve_ds_config
    from egmf.train.preflight import preflight
    from egmf.train.schedule import fit_to_world

    cfg = resolve_config(args, overrides)
    world = world_info_from_env()
    check_rendezvous(world)
    cfg = fit_to_world(cfg, world.world_size)
    device = pick_device(world, cfg.train.device)
    ds_config = resolve_ds_config(cfg.deepspeed.config, cfg, world.world_size, device.type)
    preflight(cfg)
    refuse_degenerate_schedule(make_plan(cfg, world.world_size), cfg)
    return cfg, ds_config, world, device


def show_plan(args: argparse.Namespace, overrides: list[str]) -> int:
    """`--plan`: the resolved schedule and memory estimate on stdout; exit 2 when it is degenerate."""
    cfg = resolve_config(args, overrides)
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world_size}")
    plan = make_plan(cfg, world_size, device_memory_gb(), args.train_samples)
    print(json.dumps(plan.as_json(), indent=2) if args.json else format_plan(plan))
    refuse_degenerate_schedule(plan, cfg)
    return 0


def setup_logging(world) -> None:
    """Rank 0 logs from INFO, the others from WARNING with their rank in each line. Python warnings go through
    logging too; the deprecation notices of third-party code (the same on every rank) appear once, from rank 0."""
    level = logging.INFO if world.is_logging_rank else logging.WARNING
    who = "" if world.world_size == 1 else f"[rank {world.rank}] "
    logging.basicConfig(level=level, format=f"%(asctime)s {who}%(name)s %(levelname)s %(message)s", force=True)
    logging.captureWarnings(True)
    if not world.is_logging_rank:
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
    logging.getLogger("egmf").setLevel(level)
    for noisy in ("DeepSpeed", "deepspeed", "httpx", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    stop = StopSignal().install()
    try:
        args, overrides = build_parser().parse_known_args(argv)
        try:
            if args.close_run:
                return close_run(resolve_config(args, overrides).train.output_dir, args.close_run)
            if args.plan:
                return show_plan(args, overrides)
            cfg, ds_config, world, device = configure(args, overrides)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        setup_logging(world)
        if world.is_logging_rank:
            logger.info("resolved config:\n%s", format_config(cfg))
        return run(cfg, ds_config, world, device, stop)
    finally:
        stop.uninstall()


def close_run(output_dir: str, status: str) -> int:
    from egmf.tracking import close_unfinished_run

    print(close_unfinished_run(output_dir, status, failure_notes(output_dir)))
    return 0


def run(cfg: Config, ds_config: dict, world, device, stop: StopSignal) -> int:
    from egmf.data.transport import kill_leftover_workers
    from egmf.demo_assets import build_demo_assets
    from egmf.distributed import barrier, close_distributed, init_distributed
    from egmf.train import checkpoint
    from egmf.train.preflight import needs_demo_assets, splits_read
    from egmf.train.trainer import Trainer

    trainer = None
    try:
        try:
            init_distributed(world, device, cfg.train.collective_timeout_s)
        except Exception as exc:
            if port_in_use(exc):
                print(f"error: {port_in_use(exc)}", file=sys.stderr)
                return 2
            raise
        if world.is_logging_rank:
            clear_failures(cfg.train.output_dir)
            if needs_demo_assets(cfg):
                logger.info("building the demo shards (%s) and tiny model (%s)", cfg.data.root, cfg.llm.path)
                build_demo_assets(cfg.data.root, splits_read(cfg), cfg.llm.path)
        barrier()
        candidates = checkpoint.resume_candidates(cfg.checkpoint.resume, cfg.train.output_dir)
        trainer = Trainer(cfg, ds_config, world, device, stop_requested=lambda: stop.received)
        trainer.setup(candidates)
        warned_during_startup = stop.signum == signal.SIGUSR1
        outcome = trainer.train()
        trainer.end("KILLED" if outcome == "terminated" else "FINISHED")
        if world.is_logging_rank:
            print_browse_hint(trainer, outcome)
        barrier()  # leave together: a job script may cut short ranks that outlive the first one to exit
        if outcome == "terminated":
            write_stop(cfg.train.output_dir, world)
        if outcome == "terminated" and warned_during_startup:
            logger.error(
                "the time-limit warning (SIGUSR1) came before the first step: start-up takes longer than the warning's "
                "lead time, so a requeued job would do the same again. Not requeued (exit 1): give the warning more "
                "lead time (sbatch --signal=USR1@900) or the job a longer --time"
            )
            return 1
        return stop.exit_code if outcome == "terminated" else 0
    except BaseException as exc:
        # A peer that went away by the stop (its marker) is part of the stop; one killed outright is a failure.
        lost_peer = peer_lost(exc) and not all_peers_stopped(cfg.train.output_dir, world)
        stopped = (stop.received or isinstance(exc, KeyboardInterrupt)) and not lost_peer
        if not stopped:
            note = f"a peer rank was lost: this rank's collective broke ({str(exc)[:200]})" if lost_peer else ""
            write_failure(cfg.train.output_dir, world, traceback.format_exc() + note)
        # The launcher stops every rank when one fails: then the run failed, it was not killed.
        status = "FAILED" if failed_ranks(cfg.train.output_dir) or not stopped else "KILLED"
        if trainer is not None and hasattr(trainer, "tracker"):
            trainer.end(status)
        if stopped:
            write_stop(cfg.train.output_dir, world)
            logger.warning("stopped (%s: %s); the MLflow run ends %s", type(exc).__name__, str(exc)[:200], status)
            return stop.exit_code
        raise
    finally:
        close_distributed()
        kill_leftover_workers()


LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "DistNetworkError")
"""How a collective fails when the rank at its other end is gone (killed outright, out of memory)."""


def peer_lost(exc: BaseException) -> bool:
    """Whether `exc` is a collective broken by a rank that went away: this rank is a witness, not the cause."""
    text = f"{type(exc).__name__}: {exc}"
    return any(sign in text for sign in LOST_PEER)


def port_in_use(exc: Exception) -> str:
    """What to do when the rendezvous port is taken (another job, a leftover process); '' for other errors."""
    text = str(exc)
    if "EADDRINUSE" not in text and "address already in use" not in text.lower():
        return ""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return (
        f"the rendezvous port {where} is already in use (another job or a leftover process holds it); choose a "
        "free one: deepspeed --master_port N ..., torchrun --master_port N ..., or MASTER_PORT=N for srun "
        "(slurm/train_egmf.sh picks one per job)"
    )


def format_config(cfg: Config) -> str:
    lines = []
    for section, fields in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"  {key} = {value!r}" for key, value in fields.items()]
    return "\n".join(lines)


def print_browse_hint(trainer, outcome: str) -> None:
    """The end of a run in a few lines: where it is, the best model, what to run next, where to browse it."""
    out = trainer.cfg.train.output_dir
    print(f"\n{outcome}: {out} (step {trainer.state.step})")
    from egmf.train.checkpoint import BEST

    best = os.path.join(out, BEST)
    if os.path.isdir(best):
        state = trainer.state
        print(f"best model: {best} (step {state.best_step}, selection score {state.best_score:.4f})")
        print("next:")
        print(f"  egmf-evaluate --checkpoint {best} --splits test")
        print(f"  egmf-predict --model {best} --data SHARDS_OR_FILE.jsonl --out predictions.jsonl")
        print(f"  egmf-export --model {best} --out PACKAGE [--merge-lora] [--mlflow]")
    uri = trainer.tracker.uri
    if not uri:
        return
    if uri.startswith(("http://", "https://")):
        print(f"\nbrowse the run: {uri}/#/experiments/{trainer.tracker.experiment_id}/runs/{trainer.tracker.run_id}")
    elif uri == store_uri(out):  # the folder's own store: egmf-mlflow-ui also finds it after the folder moved
        print(f"\nbrowse the run: egmf-mlflow-ui {out}  (then open http://127.0.0.1:5000)")
    else:
        print(f"\nbrowse the run: mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)")
