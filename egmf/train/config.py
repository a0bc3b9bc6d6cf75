"""The trainer's sections of the configuration: optim, train, eval, checkpoint, mlflow, deepspeed."""

from __future__ import annotations

from dataclasses import dataclass, field

from egmf.metrics import metric_names
from egmf.model.egmf_model import DECODING_MODES

SPLITS = ("valid", "test")


@dataclass
class OptimConfig:
    fusion_lr: float = 1e-4
    """Peak learning rate of the fusion module."""
    lora_lr: float = 2e-4
    """Peak learning rate of the LoRA adapters."""
    weight_decay: float = 0.01
    """AdamW weight decay; never applied to norms and biases."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Optimizer steps of linear warm-up from 0 to the peak learning rates."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at this fraction of the peak learning rates."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""

    def problems(self) -> list[str]:
        found = [f"optim.{k} must be > 0" for k in ("fusion_lr", "lora_lr", "eps") if not getattr(self, k) > 0]
        found += [f"optim.{k} must be in [0, 1)" for k in ("beta1", "beta2") if not 0 <= getattr(self, k) < 1]
        if not 0 <= self.min_lr_ratio <= 1:
            found.append(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_accum < 1:
            found.append(f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        found += [
            f"optim.{k} must be >= 0" for k in ("weight_decay", "warmup_steps", "clip_grad") if getattr(self, k) < 0
        ]
        return found


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    """Where checkpoints, predictions and (by default) the MLflow store go."""
    steps: int = 0
    """Optimizer steps to train; 0 means `epochs` epochs of the training mix."""
    epochs: int = 1
    """Epochs to train when `steps` is 0 (an epoch is data.samples_per_epoch samples)."""
    seed: int = 0
    """Seed of the model's initialisation and of dropout (the data has data.seed)."""
    device: str = "auto"
    """'auto' (this rank's CUDA device when there is one, else the CPU), 'cuda' or 'cpu'."""
    log_every: int = 10
    """Optimizer steps per logging window (progress line, MLflow metrics)."""
    max_nonfinite_in_a_row: int = 10
    """Micro-batches with a NaN/inf loss are skipped; this many in a row stop the run."""
    stop_at_step: int = 0
    """End the job after this step with a checkpoint, as a preemption would; a rerun resumes (0: never)."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one device for MFU; 0: known from the GPU's name (no MFU on CPUs)."""
    collective_timeout_s: int = 1800
    """A collective waiting longer than this fails the rank (a dead or hung peer becomes an error, not a hang).
    It must exceed the longest time ranks can drift apart: a checkpoint save, an evaluation pass."""

    def problems(self) -> list[str]:
        found = [f"train.{k} must be >= 0" for k in ("steps", "stop_at_step", "peak_tflops") if getattr(self, k) < 0]
        found += [
            f"train.{k} must be >= 1"
            for k in ("epochs", "log_every", "max_nonfinite_in_a_row", "collective_timeout_s")
            if getattr(self, k) < 1
        ]
        if self.device not in ("auto", "cuda", "cpu"):
            found.append(f"train.device {self.device!r} is not one of auto, cuda, cpu")
        if not self.output_dir:
            found.append("train.output_dir must name a folder")
        return found


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate every this many optimizer steps (0: only at the end)."""
    final: bool = True
    """Evaluate the final model on every split in `splits`."""
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    """Splits to evaluate: valid and/or test."""
    modes: list[str] = field(default_factory=lambda: list(DECODING_MODES))
    """Decoding modes: 'constrained' (scored candidates, never unparseable) and/or 'generate' (free text)."""
    batch_size: int = 0
    """Samples per evaluation batch on each rank (0: data.batch_size)."""
    max_new_tokens: int = 8
    """Longest generated answer in 'generate' mode."""
    select: dict[str, float] = field(default_factory=dict)
    """Best-checkpoint score: {"DATASET/METRIC": weight} summed; empty: mean of wf1 (classification) and -mae."""
    select_split: str = "valid"
    """Split the best checkpoint is chosen on."""
    select_mode: str = "constrained"
    """Decoding mode the best checkpoint is chosen on."""
    patience: int = 0
    """Stop after this many periodic evaluations without a better score (0: never stop early)."""

    def problems(self, eval_datasets: list[str]) -> list[str]:
        found = []
        if any(s not in SPLITS for s in self.splits) or not self.splits:
            found.append(f"eval.splits must name some of {', '.join(SPLITS)}, got {self.splits}")
        if any(m not in DECODING_MODES for m in self.modes) or not self.modes:
            found.append(f"eval.modes must name some of {', '.join(DECODING_MODES)}, got {self.modes}")
        if self.select_split not in self.splits:
            found.append(f"eval.select_split {self.select_split!r} must be one of eval.splits {self.splits}")
        if self.select_mode not in self.modes:
            found.append(f"eval.select_mode {self.select_mode!r} must be one of eval.modes {self.modes}")
        for key in self.select:
            dataset, _, metric = key.partition("/")
            if dataset not in eval_datasets:
                found.append(f"eval.select key {key!r} must be 'DATASET/METRIC' with DATASET in data.eval")
            elif metric not in metric_names(dataset):
                found.append(f"eval.select key {key!r}: {dataset} has the metrics {', '.join(metric_names(dataset))}")
        for key in ("every", "batch_size", "patience"):
            if getattr(self, key) < 0:
                found.append(f"eval.{key} must be >= 0")
        if self.max_new_tokens < 1:
            found.append("eval.max_new_tokens must be >= 1")
        return found


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every this many optimizer steps (0: only at the end and when stopped)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""
    resume: str = "auto"
    """'auto': continue from the latest complete checkpoint in train.output_dir if any; 'never'; or a checkpoint dir."""

    def problems(self) -> list[str]:
        found = []
        if self.every < 0:
            found.append("checkpoint.every must be >= 0")
        if self.keep_last < 1:
            found.append("checkpoint.keep_last must be >= 1")
        if not self.resume:
            found.append("checkpoint.resume must be 'auto', 'never' or a checkpoint folder")
        return found


@dataclass
class MLflowConfig:
    enabled: bool = True
    """Track the run in MLflow (on the logging rank only)."""
    tracking_uri: str = ""
    """Tracking store; empty: $MLFLOW_TRACKING_URI when set, else sqlite:///OUTPUT_DIR/mlflow.db."""
    experiment: str = "egmf"
    """Experiment the run belongs to."""
    run_name: str = ""
    """Run name; empty: the output folder's name."""
    system_metrics: bool = True
    """Log CPU/GPU/memory metrics of the logging rank's node in the background."""


@dataclass
class DeepSpeedConfig:
    config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON config ("auto" values are filled from this config); `--deepspeed PATH` sets it."""
