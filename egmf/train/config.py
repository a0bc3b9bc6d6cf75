"""The whole configuration tree, and the trainer's own sections: optim, train, eval, checkpoint, deepspeed.

    cfg = load_config("launch/recipes/mosei.toml", ["--llm.path=/models/Qwen2.5-7B-Instruct", "--data.batch_size=4"])
    cfg = config_from_table(json.load(open("runs/demo/config.json")))     # a saved config, checked again

Each component owns its section (data: `egmf.data.config`; fusion, prompt,
llm, lora: `egmf.model.config`; mlflow: `egmf.tracking`); the root `Config`
gathers them here, at the top, where the trainer and the entry points use the
whole tree. Recipes, overrides and checks: `egmf.config`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from egmf.config import build_tree, range_problems, read_recipe, table_valued_fields
from egmf.data.config import DataConfig
from egmf.datasets import get_spec, is_known
from egmf.metrics import metric_names
from egmf.model.config import DECODING_MODES, FusionConfig, LLMConfig, LoraConfig, PromptConfig
from egmf.tracking import MLflowConfig

SPLITS = ("valid", "test")


@dataclass
class OptimConfig:
    fusion_lr: float = 1e-4
    """Peak learning rate of the fusion module."""
    lora_lr: float = 2e-4
    """Peak learning rate of the LoRA adapters."""
    gate_lr_ratio: float = 1.0
    """The level-2 gate's learning rate as a fraction of fusion_lr (below 1: a gate that moves slower than the
    experts it weighs; docs/model.md). 1 keeps the gate in the fusion groups."""
    weight_decay: float = 0.01
    """AdamW weight decay; never applied to norms and biases."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Optimizer steps of linear warm-up from 0 to the peak learning rates (when warmup_ratio is 0)."""
    warmup_ratio: float = 0.0
    """> 0: warm-up over this fraction of all optimizer steps instead of warmup_steps (holds at any device count)."""
    global_batch: int = 0
    """> 0: samples per optimizer step over all devices; grad_accum follows from it, data.batch_size and the device
    count (egmf/train/schedule.py), and a combination that cannot reach it exactly is an error. 0: grad_accum."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at this fraction of the peak learning rates."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""

    def problems(self) -> list[str]:
        return (
            range_problems("optim", self, ("fusion_lr", "lora_lr", "gate_lr_ratio", "eps"), low=0, low_open=True)
            + range_problems("optim", self, ("beta1", "beta2"), low=0, high=1, high_open=True)
            + range_problems("optim", self, ["min_lr_ratio"], low=0, high=1)
            + range_problems("optim", self, ["grad_accum"], low=1)
            + range_problems("optim", self, ("weight_decay", "warmup_steps", "clip_grad", "global_batch"), low=0)
            + range_problems("optim", self, ["warmup_ratio"], low=0, high=1, high_open=True)
        )


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
    init_from: str = ""
    """A trained model (a checkpoint, a run's best/ folder, an egmf-export package) whose LoRA adapter and fusion
    weights a new run starts from; datasets it did not train get new front ends, and the optimizer, schedule and
    data start new (docs/training.md). A run that resumes takes its weights from its checkpoint instead."""
    init_from_adapter: bool = True
    """Take train.init_from's LoRA adapter too (false: the adapter starts new, as in a fresh run, so the LLM answers
    as the base model at the first step; the fusion weights are still taken)."""
    collective_timeout_s: int = 1800
    """A collective waiting longer than this fails the rank (a dead or hung peer becomes an error, not a hang).
    It must exceed the longest time ranks can drift apart: a checkpoint save, an evaluation pass."""

    def problems(self) -> list[str]:
        found = range_problems("train", self, ("steps", "stop_at_step", "peak_tflops"), low=0)
        found += range_problems(
            "train", self, ("epochs", "log_every", "max_nonfinite_in_a_row", "collective_timeout_s"), low=1
        )
        if self.device not in ("auto", "cuda", "cpu"):
            found.append(f"train.device {self.device!r} is not one of auto, cuda, cpu")
        if not self.output_dir:
            found.append("train.output_dir must name a folder")
        if not self.init_from_adapter and not self.init_from:
            found.append("train.init_from_adapter = false only applies with train.init_from: set both, or neither")
        return found


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate every this many optimizer steps (0: only at the end; see per_epoch and every_samples)."""
    per_epoch: int = 0
    """> 0: evaluate this many times per epoch instead of every `every` steps (holds at any device count)."""
    every_samples: int = 0
    """> 0: evaluate every this many training samples (rounded to whole optimizer steps; holds at any device count)."""
    final: bool = True
    """Evaluate the last model on every split in `splits` at the end (false: only the periodic evaluations)."""
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    """Splits evaluated at the end: the last model on each, and the best model once on every split but
    select_split (the run's reported numbers, final/SPLIT/...)."""
    periodic_splits: list[str] = field(default_factory=list)
    """Splits the periodic evaluations score; empty: select_split alone (the validation split by default), so
    that the test split steers neither the choice of the best model nor early stopping."""
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
        if any(s not in SPLITS for s in self.periodic_splits):
            found.append(f"eval.periodic_splits must name some of {', '.join(SPLITS)}, got {self.periodic_splits}")
        elif self.periodic_splits and self.select_split not in self.periodic_splits:
            found.append(f"eval.periodic_splits {self.periodic_splits} must hold eval.select_split {self.select_split}")
        if self.select_mode not in self.modes:
            found.append(f"eval.select_mode {self.select_mode!r} must be one of eval.modes {self.modes}")
        for key in self.select:
            dataset, _, metric = key.partition("/")
            if dataset not in eval_datasets:
                found.append(f"eval.select key {key!r} must be 'DATASET/METRIC' with DATASET in data.eval")
            elif metric not in metric_names(dataset):
                found.append(f"eval.select key {key!r}: {dataset} has the metrics {', '.join(metric_names(dataset))}")
        found += range_problems("eval", self, ("every", "per_epoch", "every_samples", "batch_size", "patience"), low=0)
        found += one_interval_problems("eval", self)
        found += range_problems("eval", self, ["max_new_tokens"], low=1)
        return found

    def splits_in_training(self) -> list[str]:
        """The splits each periodic evaluation scores."""
        return self.periodic_splits or [self.select_split]


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every this many optimizer steps (0: only at the end and when stopped; see per_epoch, every_samples)."""
    per_epoch: int = 0
    """> 0: save this many times per epoch instead of every `every` steps."""
    every_samples: int = 0
    """> 0: save every this many training samples (rounded to whole optimizer steps)."""
    every_minutes: float = 0.0
    """> 0: also save when this many minutes have passed since the last save, so that a long epoch on a
    preemptible cluster never loses more than this (checked after every optimizer step)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""
    resume: str = "auto"
    """'auto': continue from the latest complete checkpoint in train.output_dir if any; 'never'; or a checkpoint dir."""

    def problems(self) -> list[str]:
        found = range_problems("checkpoint", self, ("every", "per_epoch", "every_samples", "every_minutes"), low=0)
        found += one_interval_problems("checkpoint", self)
        found += range_problems("checkpoint", self, ["keep_last"], low=1)
        if not self.resume:
            found.append("checkpoint.resume must be 'auto', 'never' or a checkpoint folder")
        return found


INTERVALS = ("every", "per_epoch", "every_samples")


def one_interval_problems(section: str, settings) -> list[str]:
    """Steps, times per epoch and samples are three ways to say one interval: at most one may be set."""
    chosen = [f"{section}.{name} ({getattr(settings, name)})" for name in INTERVALS if getattr(settings, name)]
    return [f"set one of {', '.join(chosen)}, not several"] if len(chosen) > 1 else []


@dataclass
class DeepSpeedConfig:
    config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON config ("auto" values are filled from this config); `--deepspeed PATH` sets it."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, mixing, batching, workers."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """The fusion module's architecture."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt templates, label words, the text-only ablation."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """The causal LLM backbone."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters on the LLM."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, learning-rate schedule, accumulation, clipping."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Length of the run, output folder, logging, device."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic and final evaluation, best-checkpoint choice, early stopping."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    """Experiment tracking."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """The DeepSpeed engine's JSON config."""

    def problems(self) -> list[str]:
        data_problems = self.data.problems()  # first: it makes the datasets that are not built in known
        known = [d for d in sorted(set(self.data.train) | set(self.data.eval)) if is_known(d)]
        nothing_trains = self.prompt.text_only and not self.lora.enabled
        return ["prompt.text_only with lora.enabled = false leaves nothing to train"] * nothing_trains + (
            data_problems
            + self.fusion.problems()
            + self.score_read_problems()
            + self.prompt.problems(known)
            + self.optim.problems()
            + self.train.problems()
            + self.eval.problems([d for d in self.data.eval if is_known(d)])
            + self.checkpoint.problems()
        )

    def score_read_problems(self) -> list[str]:
        """fusion.score_read_datasets must name score datasets that train."""
        found = []
        for name in self.fusion.score_read_datasets:
            if name not in self.data.train:
                found.append(f"fusion.score_read_datasets: {name!r} does not train (data.train has no such dataset)")
            elif is_known(name) and get_spec(name).labels:
                found.append(f"fusion.score_read_datasets: {name!r} is a classification set; the read reads scores")
        return found

    def to_dict(self) -> dict:
        return asdict(self)


def load_config(recipe: str | None = None, overrides: list[str] = ()) -> Config:
    """A checked Config from a TOML recipe (None: the defaults) plus `--section.key=value` overrides."""
    return config_from_table(read_recipe(recipe, table_valued_fields(Config)) if recipe else {}, overrides)


def config_from_table(table: dict, overrides: list[str] = ()) -> Config:
    """A checked Config from a parsed recipe (or a saved config.json) plus overrides."""
    return build_tree(Config, table, overrides)
