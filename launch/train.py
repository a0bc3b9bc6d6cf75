"""Train EGMF on a DeepSpeed ZeRO-2 engine, evaluate it, track it in MLflow.

    deepspeed launch/train.py --deepspeed ds_configs/zero2.json --config launch/recipes/mosei.toml \\
        --llm.path=/models/Qwen2.5-7B-Instruct
    deepspeed --num_gpus 2 launch/train.py          # the embedded default on 2 CPU ranks (make train)
    torchrun --nproc_per_node 8 launch/train.py --config ...
    python launch/train.py                          # one plain process

With no --config it runs the embedded default (launch/recipes/demo.toml): the
demo shards and a tiny local LLM, built when missing. Any `--section.key=value`
overrides the recipe. The whole config, the DeepSpeed config, the model
directory, the shards and the checkpoint to resume are checked before any
process group starts; problems are printed together and the exit code is 2.

Exit codes: 0 finished (or stopped at train.stop_at_step), 1 failed, 2 bad
configuration; 143 after SIGTERM and 138 after SIGUSR1 (Slurm's warning before
the time limit): a checkpoint is saved at the next step boundary and the MLflow
run ends KILLED until a rerun resumes it. slurm/train_egmf.sh requeues on 138.

    python launch/train.py [same arguments] --close-run=FAILED

ends the job's MLflow run with that status if it is still RUNNING: the job
script does this when a rank was killed outright and could not end it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback

RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
DEFAULT_RECIPE = os.path.join(RECIPES, "demo.toml")

logger = logging.getLogger("egmf.train")


class StopSignal:
    """Remembers SIGTERM (scancel, the launcher stopping the job) and SIGUSR1 (Slurm's warning before the time
    limit). The handler only sets a flag: a rank may be inside a collective, where a Python exception could not
    be raised anyway. The trainer checks the flag at each step boundary, agrees on it across ranks, saves a
    checkpoint and stops. Installed first thing, so a signal during start-up is not fatal either."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self.previous = {}

    @property
    def received(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)  # what a shell reports for a process the signal ended

    def __call__(self, signum, frame):
        self.signum = self.signum or signum

    def install(self) -> StopSignal:
        self.previous = {signum: signal.signal(signum, self) for signum in self.SIGNALS}
        return self

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--config", help=f"TOML recipe (default: the embedded demo, {DEFAULT_RECIPE})")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON config (default: deepspeed.config of the recipe)")
    parser.add_argument("--resume", help="'auto' (default: the latest complete checkpoint), 'never' or a folder")
    parser.add_argument("--close-run", choices=("FAILED", "KILLED"), help="end the job's MLflow run if still RUNNING")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # from deepspeed; env wins
    return parser.parse_known_args(argv)


def configure(argv: list[str] | None):
    """(config, resolved DeepSpeed config, world, device): everything decided before a process group exists."""
    from egmf.config import load_config
    from egmf.distributed import pick_device, world_info_from_env
    from egmf.train.ds_config import resolve_ds_config
    from egmf.train.preflight import preflight

    args, overrides = parse_args(argv)
    if args.deepspeed:
        overrides.append(f"--deepspeed.config={args.deepspeed}")
    if args.resume:
        overrides.append(f"--checkpoint.resume={args.resume}")
    cfg = load_config(args.config or DEFAULT_RECIPE, overrides)
    world = world_info_from_env()
    device = pick_device(world, cfg.train.device)
    ds_config = resolve_ds_config(cfg.deepspeed.config, cfg, world.world_size, device.type)
    preflight(cfg)
    return cfg, ds_config, world, device


def setup_logging(is_logging_rank: bool) -> None:
    level = logging.INFO if is_logging_rank else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    logging.getLogger("egmf").setLevel(level)
    for noisy in ("DeepSpeed", "deepspeed", "httpx", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    from egmf.config import ConfigError

    stop = StopSignal().install()
    try:
        args, overrides = parse_args(argv)
        if args.close_run:
            return close_run(args, overrides)
        try:
            cfg, ds_config, world, device = configure(argv)
        except (ConfigError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        setup_logging(world.is_logging_rank)
        if world.is_logging_rank:
            logger.info("resolved config:\n%s", format_config(cfg))
        return run(cfg, ds_config, world, device, stop)
    finally:
        stop.uninstall()


def close_run(args: argparse.Namespace, overrides: list[str]) -> int:
    from egmf.config import ConfigError, load_config
    from egmf.tracking import close_unfinished_run

    try:
        cfg = load_config(args.config or DEFAULT_RECIPE, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(close_unfinished_run(cfg.train.output_dir, args.close_run))
    return 0


def run(cfg, ds_config, world, device, stop: StopSignal) -> int:
    from egmf.data.transport import kill_leftover_workers
    from egmf.distributed import barrier, close_distributed, init_distributed
    from egmf.train import checkpoint
    from egmf.train.preflight import build_demo_assets, demo_assets_missing
    from egmf.train.trainer import Trainer, clear_failures, failed_ranks, write_failure

    trainer = None
    try:
        init_distributed(world, device, cfg.train.collective_timeout_s)
        if world.is_logging_rank:
            clear_failures(cfg.train.output_dir)
            if demo_assets_missing(cfg):
                logger.info("building the demo shards (%s) and tiny model (%s)", cfg.data.root, cfg.llm.path)
                build_demo_assets(cfg)
        barrier()
        resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, cfg.train.output_dir)
        trainer = Trainer(cfg, ds_config, world, device, stop_requested=lambda: stop.received)
        trainer.setup(resume_from)
        outcome = trainer.train()
        trainer.end("KILLED" if outcome == "terminated" else "FINISHED")
        if world.is_logging_rank:
            print_browse_hint(trainer, outcome)
        barrier()  # leave together: a job script may cut short ranks that outlive the first one to exit
        return stop.exit_code if outcome == "terminated" else 0
    except BaseException as exc:
        # After a SIGTERM, an error (a collective broken by a peer that stopped) is part of the stop.
        stopped = stop.received or isinstance(exc, KeyboardInterrupt)
        if not stopped:
            write_failure(cfg.train.output_dir, world, traceback.format_exc())
        # The launcher stops every rank when one fails: then the run failed, it was not killed.
        status = "FAILED" if failed_ranks(cfg.train.output_dir) or not stopped else "KILLED"
        if trainer is not None and hasattr(trainer, "tracker"):
            trainer.end(status)
        if stopped:
            logger.warning("stopped (%s); the MLflow run ends %s", type(exc).__name__, status)
            return stop.exit_code
        raise
    finally:
        close_distributed()
        kill_leftover_workers()


def format_config(cfg) -> str:
    lines = []
    for section, fields in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"  {key} = {value!r}" for key, value in fields.items()]
    return "\n".join(lines)


def print_browse_hint(trainer, outcome: str) -> None:
    uri = trainer.tracker.uri
    if not uri:
        return
    print(f"\n{outcome}: {trainer.cfg.train.output_dir} (step {trainer.state.step})")
    if uri.startswith(("http://", "https://")):
        print(f"\nbrowse the run: {uri}/#/experiments/{trainer.tracker.experiment_id}/runs/{trainer.tracker.run_id}")
    else:
        print(f"\nbrowse the run: mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
