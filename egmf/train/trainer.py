"""The training loop on a DeepSpeed engine, with evaluation, best-model choice and checkpoints between steps.

    trainer = Trainer(cfg, ds_config, world, device)   # the config was validated before any process group
    trainer.setup(resume_candidates)                   # model, engine, loader, tracker; restores a checkpoint
    trainer.train()                                    # -> train_step() -> forward_backward()

Every rank runs the same number of micro-batches (TrainLoader) and takes every
decision the same way: skipping a non-finite loss is agreed by all-reduce,
early stopping is broadcast from rank 0. Anything that could differ between
ranks and lead to a collective on one rank only is a hang.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from egmf.atomic import building, write_json
from egmf.data.loader import TrainLoader
from egmf.distributed import WorldInfo, host_names
from egmf.errors import CheckpointError, NonFiniteLossError
from egmf.model.egmf_model import EGMFModel
from egmf.shards.manifest import load_manifest
from egmf.shards.texts import MAX_TRUNCATED_SHARE, count_truncated, read_texts
from egmf.tracking import DESCRIPTION_TAG, flatten, open_tracker, write_run_record
from egmf.train import checkpoint
from egmf.train.config import Config
from egmf.train.ds_config import offloads_optimizer, precision_name
from egmf.train.evaluation import (
    describe_selection,
    evaluate,
    flat_metrics,
    mean_gates,
    read_rows,
    selection_score,
    write_evaluation,
)
from egmf.train.gate_watch import DEAD_WINDOWS, MERGED_SPREAD, dataset_gates, newly_merged, pair_spreads
from egmf.train.init_from import init_from_saved
from egmf.train.optim import build_optimizer, build_scheduler, param_groups
from egmf.train.preflight import feature_dims, feature_stats, splits_read
from egmf.train.schedule import plan_steps
from egmf.train.throughput import Window, llm_flops_per_token, peak_flops

logger = logging.getLogger("egmf.train")
NON_FINITE, NO_SAMPLES = "non-finite loss", "no good sample"
"""Why `forward_backward` skipped a micro-batch."""

FINAL_METRICS = "final_metrics.json"
PACKAGE = "package"
"""OUTPUT_DIR/package: the best model exported for MLflow (mlflow.log_model)."""
PREDICTIONS = "predictions"
# A gate that gives one expert more than this weight for this many logging windows in a row has collapsed.
COLLAPSE_WEIGHT = 0.95
COLLAPSE_WINDOWS = 3


@dataclass
class RunState:
    """What a checkpoint's meta.json carries to continue the run."""

    step: int = 0
    mlflow_run_id: str | None = None
    best_score: float = -math.inf
    best_step: int = 0
    evals_without_improvement: int = 0
    skipped_nonfinite: int = 0
    stopped_early: bool = False
    metrics: dict = field(default_factory=dict)
    """The latest evaluation's metrics (MLflow keys)."""
    collapsed_windows: int = 0
    """Logging windows in a row in which one expert held more than COLLAPSE_WEIGHT of the level-2 gate."""
    gate_history: list = field(default_factory=list)
    """[step, {dataset: {expert: mean weight}}] of each evaluation on eval.select_split (for the gate plot)."""
    gate_pairs_apart: list = field(default_factory=list)
    """Pairs of datasets ("A & B") the level-2 gate has told apart (egmf/train/gate_watch.py)."""
    gate_merged_windows: dict = field(default_factory=dict)
    """Logging windows in a row in which each told-apart pair got the same gate."""


def build_model(cfg: Config, device: torch.device, resuming: bool = False) -> EGMFModel:
    """The model a run starts from: new weights, or train.init_from's unless the run resumes (its checkpoint's
    weights replace them, and the folder may be gone by the time a requeued job resumes)."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = EGMFModel.build(cfg.fusion, cfg.prompt, cfg.llm, cfg.lora, feature_dims(cfg), device, feature_stats(cfg))
    if cfg.train.init_from and not resuming:
        fronts = init_from_saved(model, cfg.train.init_from, adapter=cfg.train.init_from_adapter)
        logger.info(
            "weights from %s (LoRA adapter %s; front ends taken: %s; new: %s)",
            cfg.train.init_from,
            "taken" if cfg.train.init_from_adapter else "new",
            ", ".join(fronts["loaded"]) or "none",
            ", ".join(fronts["new"]) or "none",
        )
    return model


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Trainer:
    def __init__(self, cfg: Config, ds_config: dict, world: WorldInfo, device: torch.device, stop_requested=None):
        self.cfg, self.ds_config, self.world, self.device = cfg, ds_config, world, device
        self.stop_requested = stop_requested or (lambda: False)
        """True once this rank was asked to stop (SIGTERM, SIGUSR1); `agreed_flags` shares it with every rank."""
        self.output_dir = cfg.train.output_dir
        self.state = RunState()
        self.saved_step = -1
        self.nonfinite_in_a_row = 0
        self.last_save_time = time.monotonic()
        """When this process last saved (or started): checkpoint.every_minutes counts from it."""

    # ---- setup ---------------------------------------------------------------------------------

    def setup(self, resume_candidates: list[str]) -> None:
        """Build the model, engine, loader and tracker, and continue from the first checkpoint of
        `resume_candidates` that loads on every rank (checkpoint.resume_candidates: newest first)."""
        import deepspeed

        cfg = self.cfg
        model = build_model(cfg, self.device, resuming=bool(resume_candidates))
        self.flops_per_token = llm_flops_per_token(model)
        self.peak = peak_flops(self.device, cfg.train.peak_tflops)
        self.expert_names = list(model.fusion.cfg.experts) if model.fusion is not None else []
        optimizer = build_optimizer(param_groups(model, cfg.optim), cfg.optim, offloads_optimizer(self.ds_config))
        self.loader = TrainLoader(cfg.data, self.world.rank, self.world.world_size, cfg.optim.grad_accum)
        self.plan = plan_steps(cfg, len(self.loader), self.world.world_size)
        self.total_steps = self.plan.total_steps
        scheduler = build_scheduler(optimizer, cfg.optim, self.total_steps, self.plan.warmup_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config, dist_init_required=False
        )
        resume_from, unusable = self.resume(resume_candidates)
        if self.world.is_logging_rank:
            checkpoint.remove_partial_saves(self.output_dir)
        hosts = host_names(self.world)
        self.tracker = open_tracker(cfg.mlflow, self.output_dir, self.world, self.state.mlflow_run_id)
        self.state.mlflow_run_id = self.tracker.run_id
        self.start_tracking(hosts)
        if unusable:
            self.tracker.set_tags(
                {"resume_fallback": f"resumed from {resume_from}; did not load: " + "; ".join(unusable)}
            )
        if self.world.is_logging_rank and not resume_from:
            self.report_text_truncation(model.tokenizer)

    def resume(self, candidates: list[str]) -> tuple[str | None, list[str]]:
        """(the checkpoint resumed from or None, why each newer one did not load). The ranks agree on each try, so
        all fall back together; only when none loads does the run stop."""
        unusable = []
        for candidate in candidates:
            problem = ""
            try:
                checkpoint.verify_checkpoint(candidate)
                loader_state = checkpoint.load_checkpoint(self.engine, self.world, candidate)
                meta = checkpoint.read_meta(candidate)
            except Exception as exc:  # a damaged checkpoint: any reader's error
                problem = f"{type(exc).__name__}: {str(exc)[:500]}"
            if self.agreed_failure(bool(problem)):
                unusable.append(f"{candidate} ({problem or 'failed on another rank'})")
                logger.warning(
                    "checkpoint %s does not load (%s); falling back to the previous complete one",
                    candidate,
                    problem or "failed on another rank",
                )
                continue
            self.loader.load_state_dict(loader_state)
            self.state = RunState(**{k: meta[k] for k in asdict(RunState()) if k in meta})
            self.saved_step = self.state.step
            logger.info("resumed from %s at step %d", candidate, self.state.step)
            return candidate, unusable
        if candidates:
            raise CheckpointError(
                "no checkpoint of the run loads: " + "; ".join(unusable) + ". Resume from another run's checkpoint "
                "(checkpoint.resume=PATH) or start over (checkpoint.resume=never, or another train.output_dir)"
            )
        return None, unusable

    def agreed_failure(self, failed: bool) -> bool:
        """True on every rank when any rank failed."""
        if self.world.world_size == 1:
            return failed
        flag = torch.tensor([float(failed)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def report_text_truncation(self, tokenizer) -> None:
        """Rank 0: how many utterances of each split the prompt cuts at prompt.max_text_tokens (MLflow
        data/text_truncated/DATASET/SPLIT, a share); a warning above 1 %."""
        limit, shares = self.cfg.prompt.max_text_tokens, {}
        for dataset, split in splits_read(self.cfg):
            texts = read_texts(load_manifest(self.cfg.data.root, dataset, split))
            if texts is None:
                logger.info("%s/%s: utterances not counted (no texts.jsonl: shards built before it)", dataset, split)
                continue
            cut = count_truncated(tokenizer, texts, limit)
            shares[f"data/text_truncated/{dataset}/{split}"] = cut / len(texts)
            if cut > MAX_TRUNCATED_SHARE * len(texts):
                logger.warning(
                    "%s/%s: %d of %d utterances (%.1f%%) are longer than prompt.max_text_tokens=%d and lose their end; "
                    "raise it (egmf-shards inspect ROOT --tokenizer %s --max-text-tokens N counts for N)",
                    dataset,
                    split,
                    cut,
                    len(texts),
                    100 * cut / len(texts),
                    limit,
                    self.cfg.llm.path,
                )
        self.tracker.log_metrics(shares, self.state.step)

    def start_tracking(self, hosts: list[str]) -> None:
        import deepspeed

        tracker = self.tracker
        tracker.log_params(flatten(self.cfg.to_dict()))
        tracker.set_tags(
            {
                "git_commit": git_commit(),
                "world_size": self.world.world_size,
                "num_nodes": len(set(hosts)),
                "hosts": ",".join(sorted(set(hosts))),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
                "slurm_restarts": os.environ.get("SLURM_RESTART_COUNT", "0"),
                "deepspeed_version": deepspeed.__version__,
                "torch_version": torch.__version__,
                "device": self.device.type,
                "precision": precision_name(self.ds_config),
                "schedule": self.plan.describe(),
                DESCRIPTION_TAG: self.description(),
            }
        )
        tracker.log_inputs(self.dataset_inputs())
        if self.world.is_logging_rank:
            os.makedirs(self.output_dir, exist_ok=True)
            write_run_record(self.output_dir, tracker)
            for name, value in (("config.json", self.cfg.to_dict()), ("ds_config.json", self.ds_config)):
                write_json(os.path.join(self.output_dir, name), value)
                tracker.log_artifact(os.path.join(self.output_dir, name), "config")
            logger.info("MLflow run %s in %s", tracker.run_id, tracker.uri)
            global_batch = self.cfg.data.batch_size * self.cfg.optim.grad_accum * self.world.world_size
            logger.info("schedule: %s, global batch %d", self.plan.describe(), global_batch)

    def description(self) -> str:
        """The run's description in MLflow: what it trains on, with what, and how long."""
        cfg = self.cfg
        train = ", ".join(f"{name} ({weight:g})" for name, weight in cfg.data.train.items())
        experts = ", ".join(cfg.fusion.experts) + (" (uniform gate)" if cfg.fusion.gating == "uniform" else "")
        return (
            f"EGMF on {train}; evaluated on {', '.join(cfg.data.eval)} ({', '.join(cfg.eval.splits)}).\n\n"
            f"LLM `{cfg.llm.path}` with LoRA r={cfg.lora.rank}{'' if cfg.lora.enabled else ' (off)'}; experts: "
            f"{experts}; {cfg.fusion.num_pseudo_tokens} pseudo tokens.\n\nSchedule: {self.plan.describe()}; "
            f"{self.world.world_size} rank(s). Output: `{os.path.abspath(self.output_dir)}`."
        )

    def dataset_inputs(self) -> list[dict]:
        """Every split the run reads, as MLflow dataset inputs (name, a digest of its shards, where it is)."""
        inputs = []
        for dataset, split in splits_read(self.cfg):
            manifest = load_manifest(self.cfg.data.root, dataset, split)
            digest = hashlib.sha256("".join(shard.sha256 for shard in manifest.shards).encode()).hexdigest()[:10]
            profile = {"num_samples": manifest.num_samples, "lang": manifest.lang, "task": manifest.task}
            inputs.append(
                {
                    "name": f"{dataset}/{split}",
                    "digest": digest,
                    "source": manifest.location,
                    "context": "training" if split == "train" else "evaluation",
                    "profile": json.dumps(profile),
                }
            )
        return inputs

    # ---- the loop ------------------------------------------------------------------------------

    def train(self) -> str:
        """Train to the end or a stop; returns 'finished', 'stopped' (train.stop_at_step), 'terminated' (a signal)
        or 'complete' (nothing left to do)."""
        done_training = self.state.step >= self.total_steps or self.state.stopped_early
        if done_training and os.path.exists(os.path.join(self.output_dir, FINAL_METRICS)):
            logger.info("the run in %s is already complete (step %d)", self.output_dir, self.state.step)
            return "complete"
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.engine.train()
        batches = self.batches()
        try:
            with logging_redirect_tqdm():  # log lines (warnings included) go above the progress bar, not through it
                return self.train_loop(batches)
        finally:
            batches.close()  # stops the loader's workers now, not at garbage collection

    def train_loop(self, batches) -> str:
        window = Window(self.expert_names, list(self.cfg.data.train))
        progress = self.progress_bar()
        while self.state.step < self.total_steps and not self.state.stopped_early:
            self.train_step(batches, window)
            step = self.state.step
            progress.update(1)
            if step % self.cfg.train.log_every == 0 or step == self.total_steps:
                self.log_window(window, progress)
            paused = time.perf_counter()  # evaluation and saving do not count against throughput
            stop, save_due = self.agreed_flags()
            if stop:
                self.save()
                progress.close()
                if self.world.is_logging_rank:
                    logger.warning("stop signal: checkpoint saved at step %d; run again to resume", step)
                return "terminated"
            if self.plan.eval_every and step % self.plan.eval_every == 0 and step < self.total_steps:
                self.state.stopped_early = self.periodic_evaluation()
            if self.cfg.train.stop_at_step and step == self.cfg.train.stop_at_step and step < self.total_steps:
                self.save()
                progress.close()
                logger.info("stopped at step %d as train.stop_at_step asks; run again to resume", step)
                return "stopped"
            on_schedule = self.plan.checkpoint_every and step % self.plan.checkpoint_every == 0
            if (on_schedule or save_due) and step < self.total_steps:
                self.save()
            window.start += time.perf_counter() - paused
        progress.close()
        self.save()
        self.final_evaluation()
        return "finished"

    def agreed_flags(self) -> tuple[bool, bool]:
        """(stop, save_due), the same on every rank: whether any rank was asked to stop, and whether any rank's
        clock says checkpoint.every_minutes have passed since the last save. Every rank must leave the loop, and
        enter a save's collectives, at the same step."""
        minutes = self.cfg.checkpoint.every_minutes
        due = bool(minutes) and time.monotonic() - self.last_save_time >= 60 * minutes
        flags = torch.tensor([float(self.stop_requested()), float(due)], device=self.device)  # NCCL: GPU tensors
        if self.world.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), bool(flags[1].item())

    def batches(self):
        """Training batches across epoch boundaries."""
        while True:
            yield from self.loader

    def train_step(self, batches, window: Window) -> None:
        """One optimizer step: `grad_accum` micro-batches, the step's global batch (egmf/data/train_stream.py). A
        micro-batch skipped on every rank (a non-finite loss, or no good sample on some rank) adds zero gradient,
        so that each step uses its own samples and no other's."""
        self.engine.module.set_training_progress(self.state.step / self.total_steps)
        gate_means = []  # each used micro-batch's mean level-2 gate over all ranks
        for _ in range(self.cfg.optim.grad_accum):
            batch = next(batches)
            problem = self.forward_backward(batch, window, gate_means)
            if problem:
                self.backward_zero()
                window.skipped += 1
                self.state.skipped_nonfinite += problem == NON_FINITE
                self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if problem == NON_FINITE else 0
            else:
                self.nonfinite_in_a_row = 0
            # after every backward, as DeepSpeed counts micro-steps: it updates on the grad_accum-th call
            self.engine.step()
            if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_in_a_row:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} micro-batches in a row had a NaN/inf loss at step "
                    f"{self.state.step + 1}; the run is diverging. Lower optim.fusion_lr/optim.lora_lr, raise "
                    "optim.warmup_steps, or resume from an earlier checkpoint (checkpoint.resume=PATH)"
                )
        if gate_means:
            # Once per step, with the step's mean over its micro-batches (all of one dataset): the balance loss's
            # moving averages then move per step whatever grad_accum is, so also after a resume on other ranks.
            self.engine.module.record_gate_usage(batch.dataset, torch.stack(gate_means).mean(0))
        self.state.step += 1
        window.steps += 1

    def forward_backward(self, batch, window: Window, gate_means: list[torch.Tensor]) -> str:
        """'' after the backward; NON_FINITE or NO_SAMPLES (and no backward) when the loss is not finite, or the
        batch holds no good sample, on some rank: every rank skips it together.

        One all-reduce carries what the ranks must agree on: whether every loss is finite and every batch holds
        samples, and the batch's mean level-2 gate over all ranks, appended to `gate_means` for the balance loss,
        which keeps it per dataset (identical on every rank; every batch of a step comes from the same dataset)."""
        out = self.engine(batch)
        finite = torch.isfinite(out.loss.detach()).float().reshape(1)
        has_samples = batch.valid.any().float().reshape(1).to(finite.device)
        stats = torch.cat([finite, has_samples])
        if out.expert_weights is not None:
            stats = torch.cat([stats, out.expert_weights.detach().float().mean(0)])
        if self.world.world_size > 1:
            dist.all_reduce(stats)
        if stats[1].item() < self.world.world_size:
            logger.warning(
                "step %d: a %s micro-batch without good samples on some rank; skipped on every rank",
                self.state.step + 1,
                batch.dataset,
            )
            return NO_SAMPLES
        if stats[0].item() < self.world.world_size:
            logger.warning("non-finite loss at step %d (%s batch); skipped", self.state.step + 1, batch.dataset)
            return NON_FINITE
        if out.expert_weights is not None:
            gate_means.append(stats[2:] / self.world.world_size)
        self.engine.backward(out.loss)
        window.add_micro_batch(out, batch.dataset, int(batch.valid.sum()))
        return ""

    def backward_zero(self) -> None:
        """A backward that adds zero to every trainable gradient: DeepSpeed's micro-step count and ZeRO-2's
        gradient reduction go on as for any micro-batch, the same on every rank."""
        zero = sum(p.sum() for p in self.engine.module.parameters() if p.requires_grad) * 0.0
        self.engine.backward(zero)

    # ---- logging -------------------------------------------------------------------------------

    def progress_bar(self):
        from tqdm import tqdm

        self.started = (time.monotonic(), self.state.step)  # for the log's elapsed time and ETA
        interactive = self.world.is_logging_rank and sys.stderr.isatty()
        return tqdm(total=self.total_steps, initial=self.state.step, disable=not interactive, unit="step")

    def log_window(self, window: Window, progress) -> None:
        metrics = window.metrics(self.world.world_size, self.device, self.flops_per_token, self.peak)
        for group in self.optimizer.param_groups:
            metrics[f"train/lr_{group['name']}"] = group["lr"]
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        metrics["train/epoch"] = self.loader.epoch_progress
        if self.loader.bad_samples:  # skipped bad training samples on this rank, so far (no chart while none)
            metrics["data/bad_samples"] = self.loader.bad_samples
        self.tracker.log_metrics(metrics, self.state.step)
        self.watch_gate_collapse(metrics)
        self.watch_dead_gate(metrics)
        summary = {
            # a window whose every micro-batch was skipped has no loss
            "loss": f"{metrics['train/loss']:.4f}" if "train/loss" in metrics else "- (all skipped)",
            "lr": f"{self.optimizer.param_groups[0]['lr']:.2e}",
            "samples/s/dev": f"{metrics['train/samples_per_s_per_device']:.1f}",
            "tok/s/dev": f"{metrics['train/tokens_per_s_per_device']:.0f}",
        }
        if "train/mfu" in metrics:
            summary["mfu"] = f"{metrics['train/mfu']:.1%}"
        if progress.disable and self.world.is_logging_rank:
            summary |= self.elapsed_and_eta()
            logger.info(
                "step %d/%d | %s", self.state.step, self.total_steps, " | ".join(f"{k} {v}" for k, v in summary.items())
            )
        progress.set_postfix(summary, refresh=False)
        window.reset()

    def elapsed_and_eta(self) -> dict[str, str]:
        """Time since this process started training, and the rest at its pace so far (evaluations included)."""
        started_at, first_step = self.started
        elapsed, done = time.monotonic() - started_at, self.state.step - first_step
        eta = elapsed / done * (self.total_steps - self.state.step) if done else 0.0
        return {"elapsed": clock(elapsed), "eta": clock(eta)}

    def watch_gate_collapse(self, metrics: dict[str, float]) -> None:
        """Warn (once per collapse) and tag the run when one expert holds the level-2 gate for several windows."""
        weights = {name: metrics[f"gate/{name}"] for name in self.expert_names if f"gate/{name}" in metrics}
        if len(weights) < 2:
            return
        expert, weight = max(weights.items(), key=lambda item: item[1])
        self.state.collapsed_windows = self.state.collapsed_windows + 1 if weight > COLLAPSE_WEIGHT else 0
        if self.state.collapsed_windows != COLLAPSE_WINDOWS or not self.world.is_logging_rank:
            return
        fusion = self.cfg.fusion
        message = (
            f"the level-2 gate has given the {expert} expert {weight:.2f} of the weight for {COLLAPSE_WINDOWS} "
            f"logging windows: the other experts get almost no gradient, and the model has collapsed to one expert "
            f"(mixture-of-experts collapse). Raise fusion.z_loss_coef (now {fusion.z_loss_coef}), which pulls a "
            f"saturated gate back, or fusion.balance_coef (now {fusion.balance_coef}), or lengthen "
            f"fusion.gate_warmup_ratio (now {fusion.gate_warmup_ratio}); gate/DATASET/EXPERT in MLflow shows which "
            f"datasets collapsed"
        )
        self.warn_and_tag("gate_collapse", f"{expert} {weight:.3f}", message)

    def watch_dead_gate(self, metrics: dict[str, float]) -> None:
        """Warn and tag the run when datasets the level-2 gate had told apart get the same gate for several windows:
        its output no longer depends on the input (egmf/train/gate_watch.py)."""
        spreads = pair_spreads(dataset_gates(metrics, self.expert_names))
        merged = newly_merged(spreads, self.state.gate_pairs_apart, self.state.gate_merged_windows)
        if not merged or not self.world.is_logging_rank:
            return
        message = (
            f"the level-2 gate gives {', '.join(merged)} the same weights (within {MERGED_SPREAD} on every expert) "
            f"for {DEAD_WINDOWS} logging windows after it had told them apart: its output no longer depends on the "
            f"input (a dead router: every hidden unit negative for every sample), and those datasets will keep one "
            f"mix of the experts. Set fusion.gate_router = 'norm_mlp' (now '{self.cfg.fusion.gate_router}'), which "
            f"normalises the router's input, or slow the gate with optim.gate_lr_ratio below 1 (now "
            f"{self.cfg.optim.gate_lr_ratio}); docs/model.md"
        )
        self.warn_and_tag("gate_dead", "; ".join(merged), message)

    def warn_and_tag(self, tag: str, what: str, message: str) -> None:
        """Log a gate warning and keep it on the run as tag `tag` ("WHAT at step N: MESSAGE")."""
        logger.warning("step %d: %s", self.state.step, message)
        self.tracker.set_tags({tag: f"{what} at step {self.state.step}: {message}"})

    # ---- evaluation ----------------------------------------------------------------------------

    def run_evaluation(self, tag: str, splits: list[str], prefix: str = "eval") -> tuple[dict, list, dict]:
        """(results by split, prediction rows, MLflow metrics) of `splits` in every mode; rank 0 logs the metrics as
        PREFIX/SPLIT/DATASET/MODE/METRIC and writes the predictions under predictions/TAG/ (other ranks: empty)."""
        all_metrics, all_rows, by_split = {}, [], {}
        for split in splits:
            results, rows = evaluate(self.engine.module, self.cfg, split, self.world)
            by_split[split] = results
            all_metrics.update(flat_metrics(results, split, prefix))
            all_rows += rows
        if self.world.is_logging_rank:
            self.tracker.log_metrics(charted(all_metrics), self.state.step)
            if tag == "final":
                self.tracker.set_tags({"eval_samples": sample_counts(all_metrics)})
            write_evaluation(os.path.join(self.output_dir, PREDICTIONS, tag), all_rows, all_metrics)
            # the best model is an earlier step's weights, evaluated now: say which step they are
            what = f"best model (step {self.state.best_step})" if tag == "best" else f"{tag} at step {self.state.step}"
            logger.info("%s: %s", what, headline(by_split, self.cfg.eval.select_mode))
        return by_split, all_rows, all_metrics

    def evaluate_model_in_training(self, tag: str, splits: list[str]) -> dict:
        """An evaluation of the weights being trained: metrics and gates logged, a candidate for the best model."""
        by_split, rows, metrics = self.run_evaluation(tag, splits)
        if self.world.is_logging_rank:
            self.state.metrics = metrics
            self.log_evaluation_gates(rows)
            self.maybe_keep_best(by_split)
        return by_split

    def log_evaluation_gates(self, rows: list) -> None:
        """Rank 0: the mean level-2 gate per split and dataset (gate_eval/SPLIT/DATASET/EXPERT), and a plot of the
        selection split's gates over the evaluations so far (plots/gates_SPLIT.png)."""
        import matplotlib.pyplot as plt

        from egmf.train.plots import gate_history_figure

        mode, select_split = self.cfg.eval.select_mode, self.cfg.eval.select_split
        for split in self.cfg.eval.splits:
            gates = mean_gates([r for r in rows if r.split == split], mode)
            metrics = {f"gate_eval/{split}/{d}/{e}": w for d, by_expert in gates.items() for e, w in by_expert.items()}
            self.tracker.log_metrics(metrics, self.state.step)
            if split == select_split and gates:
                self.state.gate_history.append([self.state.step, gates])
        if self.state.gate_history:
            figure = gate_history_figure(self.state.gate_history, select_split)
            self.tracker.log_figure(figure, f"plots/gates_{select_split}.png")
            plt.close(figure)

    def periodic_evaluation(self) -> bool:
        """Evaluate eval.periodic_splits (by default the selection split alone, valid), keep the best model; True
        when early stopping says to stop (the same on every rank)."""
        self.evaluate_model_in_training(checkpoint.step_name(self.state.step), self.cfg.eval.splits_in_training())
        stop = [False]
        if self.world.is_logging_rank:
            patience = self.cfg.eval.patience
            stop[0] = bool(patience and self.state.evals_without_improvement >= patience)
            if stop[0]:
                logger.info("early stop: %d evaluations without a better score", patience)
        if self.world.world_size > 1:
            dist.broadcast_object_list(stop, src=0)
        return stop[0]

    def maybe_keep_best(self, by_split: dict) -> None:
        """Rank 0: export the model to OUTPUT_DIR/best when its selection score is the best so far."""
        results = by_split.get(self.cfg.eval.select_split)
        if results is None:
            return
        score = selection_score(results, self.cfg.eval, self.cfg.data.eval)
        self.tracker.log_metrics({"eval/selection_score": score}, self.state.step)
        if score <= self.state.best_score:
            self.state.evals_without_improvement += 1
            return
        self.state.best_score, self.state.best_step, self.state.evals_without_improvement = score, self.state.step, 0
        with building(os.path.join(self.output_dir, checkpoint.BEST)) as partial:
            self.engine.module.export(partial)
            write_json(
                os.path.join(partial, checkpoint.BEST_RECORD),
                {"step": self.state.step, "score": score, "config": self.cfg.to_dict(), "metrics": self.state.metrics},
            )

    def final_evaluation(self) -> None:
        """The last model on every split of eval.splits (unless eval.final is false; it may still become the best),
        then the best model on the splits it was not chosen on: the run's reported numbers (final/SPLIT/...) in
        MLflow and final_metrics.json, beside the last model's (eval/SPLIT/... at the last step). The run is
        complete once final_metrics.json is written."""
        last = self.evaluate_model_in_training("final", self.cfg.eval.splits) if self.cfg.eval.final else {}
        best_step = [self.state.best_step]
        if self.world.world_size > 1:  # rank 0 chose (and wrote best/); the others wait for it here
            dist.broadcast_object_list(best_step, src=0)
        reported = self.evaluate_best(best_step[0], last)
        if not self.world.is_logging_rank:
            return
        selection = describe_selection(self.cfg.eval, self.cfg.data.eval)
        self.tracker.log_metrics(
            {"best/step": self.state.best_step, "best/selection_score": self.state.best_score}, self.state.step
        )
        self.tracker.set_tags({"selection": f"step {self.state.best_step} of {self.state.step}, on {selection}"})
        self.log_final_artifacts()
        self.log_best_model()
        write_json(
            os.path.join(self.output_dir, FINAL_METRICS),
            {
                "step": self.state.step,
                "best_step": self.state.best_step,
                "selected_on": selection,
                "selection_score": self.state.best_score,
                "reported": reported,
                "last": self.state.metrics,
            },
        )

    def evaluate_best(self, best_step: int, last: dict) -> dict[str, float]:
        """final/SPLIT/... metrics of the best model (rank 0; {} elsewhere or without a best model): its own
        evaluation on the selection split, and every other split of eval.splits decoded once now, with the best
        weights loaded (the last checkpoint is saved already), or taken from `last` when the last model is the
        best."""
        if not best_step:
            if self.world.is_logging_rank:
                logger.warning("no best model was chosen (no evaluation scored eval.select metrics); nothing reported")
            return {}
        others = [split for split in self.cfg.eval.splits if split != self.cfg.eval.select_split]
        if best_step == self.state.step and self.cfg.eval.final:
            by_split = {split: results for split, results in last.items() if split in others}
            reported = {k: v for split in by_split for k, v in flat_metrics(by_split[split], split, "final").items()}
            self.tracker.log_metrics(charted(reported), self.state.step)
        elif others:
            self.engine.module.load_exported(os.path.join(self.output_dir, checkpoint.BEST))
            _, _, reported = self.run_evaluation("best", others, prefix="final")
        else:
            reported = {}
        if not self.world.is_logging_rank:
            return {}
        with open(os.path.join(self.output_dir, checkpoint.BEST, checkpoint.BEST_RECORD)) as f:
            chosen_on = json.load(f)["metrics"]
        prefix = f"eval/{self.cfg.eval.select_split}/"
        own = {"final/" + k.removeprefix("eval/"): v for k, v in chosen_on.items() if k.startswith(prefix)}
        self.tracker.log_metrics(charted(own), self.state.step)
        return own | reported

    def log_final_artifacts(self) -> None:
        import matplotlib.pyplot as plt

        from egmf.train.plots import evaluation_figures

        for tag in ("final", "best"):  # the last model's evaluation; the best model's reported one
            folder = os.path.join(self.output_dir, PREDICTIONS, tag)
            if not os.path.isdir(folder):
                continue
            plots = "plots" if tag == "final" else f"plots/{tag}"
            for artifact_file, figure in evaluation_figures(read_rows(folder), self.cfg.eval.select_mode, plots):
                self.tracker.log_figure(figure, artifact_file)
                plt.close(figure)
            self.tracker.log_artifact(folder, f"predictions/{tag}")
        if os.path.isdir(os.path.join(self.output_dir, checkpoint.BEST)):
            self.tracker.log_artifact(os.path.join(self.output_dir, checkpoint.BEST), "best_model")

    def log_best_model(self) -> None:
        """mlflow.log_model: the best model as a package and an MLflow pyfunc model (registered as
        mlflow.register_as); a run with no best model or without MLflow logs none."""
        best = os.path.join(self.output_dir, checkpoint.BEST)
        if not (self.cfg.mlflow.log_model and self.tracker.run_id and os.path.isdir(best)):
            return
        from egmf.train.package import export_package
        from egmf.train.pyfunc_model import log_package_model

        package = export_package(best, os.path.join(self.output_dir, PACKAGE))
        try:
            uri = log_package_model(package, self.tracker.run_id, self.tracker.uri, self.cfg.mlflow.register_as)
        except Exception as exc:  # the tracking server's failure must not fail a finished run
            logger.warning(
                "could not log the best model to MLflow (%s: %s); log it later with egmf-export --model %s --out "
                "PACKAGE --mlflow",
                type(exc).__name__,
                str(exc)[:300],
                best,
            )
            return
        logger.info(
            "best model logged to MLflow as %s%s",
            uri,
            f" ({self.cfg.mlflow.register_as})" * bool(self.cfg.mlflow.register_as),
        )

    # ---- checkpoints ---------------------------------------------------------------------------

    def save(self) -> None:
        if self.saved_step == self.state.step:
            return
        path = checkpoint.save_checkpoint(
            self.engine,
            self.world,
            self.output_dir,
            self.state.step,
            self.loader.state_dict(),
            self.cfg.checkpoint.keep_last,
            config=self.cfg.to_dict(),
            ds_config=self.ds_config,
            meta=asdict(self.state),
        )
        self.saved_step = self.state.step
        self.last_save_time = time.monotonic()
        logger.info("checkpoint %s", path)

    def end(self, status: str) -> None:
        self.tracker.end(status)


def charted(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics worth a chart in MLflow: sample counts are constant per split (they go to a tag and to the
    evaluation's metrics.json instead)."""
    return {key: value for key, value in metrics.items() if not key.endswith("/samples")}


def sample_counts(metrics: dict[str, float]) -> str:
    """'valid/demo_cls_en 24, test/demo_cls_en 24' from PREFIX/SPLIT/DATASET/MODE/samples keys."""
    counts = {"/".join(k.split("/")[1:3]): int(v) for k, v in metrics.items() if k.endswith("/samples")}
    return ", ".join(f"{where} {count}" for where, count in counts.items())


def clock(seconds: float) -> str:
    """1:02:03 for 3723 s."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def headline(by_split: dict, mode: str) -> str:
    """One line of the main metric per split and dataset, for the log."""
    parts = []
    for split, results in by_split.items():
        for dataset, by_mode in results.items():
            metrics = by_mode.get(mode, {})
            name = "wf1" if "wf1" in metrics else "mae"
            if name in metrics:
                parts.append(f"{split}/{dataset} {name} {metrics[name]:.3f}")
    return ", ".join(parts)
