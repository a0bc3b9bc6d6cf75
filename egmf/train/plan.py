"""`egmf-train --plan`: the run's schedule and memory, resolved without a process group, weights or samples.

    plan = make_plan(cfg, world_size)            # train sizes from manifests, else the public releases'
    problems = plan_problems(plan, cfg)          # a degenerate schedule, refused before training
    print(format_plan(plan))                     # or json.dumps(plan.as_json())

Train split sizes come from the shards' manifests when they exist, else from
the public releases' known sizes (the plan says which). The LLM's shape comes
from its `config.json` when the model directory exists, else from a table of
the backbones the recipes name. The memory figure is an estimate for ZeRO-2
with LoRA in bfloat16 (see `memory_gb`); it leaves out the CUDA context,
allocator fragmentation and DeepSpeed's communication buckets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from egmf.data.loader import steps_per_epoch
from egmf.datasets import ALL_DEMO_DATASETS
from egmf.demo_assets import demo_split_size
from egmf.errors import ConfigError, DataError
from egmf.shards.manifest import load_manifest
from egmf.train.schedule import StepPlan, fit_to_world, plan_steps

PUBLIC_TRAIN_SIZES = {"mosei": 16326, "sims2": 2722, "meld": 9989}
"""Train utterances of the public releases (MMSA's MOSEI and CH-SIMS v2 pickles; MELD's MSE-Adapter split)."""

KNOWN_SHAPES = {
    "qwen2.5-7b": {"hidden": 3584, "layers": 28, "intermediate": 18944, "vocab": 152064, "heads": 28, "kv_heads": 4},
    "llama-3-8b": {"hidden": 4096, "layers": 32, "intermediate": 14336, "vocab": 128256, "heads": 32, "kv_heads": 8},
}
"""Published shapes of the recipes' backbones, matched on the model folder's name, for a plan without the model."""

PROMPT_TOKENS = 64
"""Prompt tokens besides the utterance and the pseudo tokens (task words, label set, markers, answer), an upper
bound for the built-in templates."""


@dataclass(frozen=True)
class Plan:
    world_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    train_samples: int
    sizes_from: str
    steps: StepPlan
    epochs: float
    eval_steps: list[int]
    checkpoint_steps: list[int]
    tokens_per_step: int
    memory_gb_per_device: float | None
    model_from: str
    device_memory_gb: float | None

    def as_json(self) -> dict:
        return {
            "world_size": self.world_size,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "global_batch": self.global_batch,
            "steps_per_epoch": self.steps.steps_per_epoch,
            "epochs": self.epochs,
            "total_steps": self.steps.total_steps,
            "warmup_steps": self.steps.warmup_steps,
            "eval_steps": self.eval_steps,
            "checkpoint_steps": self.checkpoint_steps,
            "checkpoint_every_minutes": self.steps.checkpoint_minutes,
            "tokens_per_step": self.tokens_per_step,
            "memory_gb_per_device": self.memory_gb_per_device,
            "train_samples": self.train_samples,
            "sizes_from": self.sizes_from,
            "model_from": self.model_from,
            "device_memory_gb": self.device_memory_gb,
        }


def train_sizes(cfg) -> tuple[int, str]:
    """(train samples over the mix, where the sizes came from); ConfigError for a dataset with neither."""
    total, sources = 0, []
    for dataset in cfg.data.train:
        try:
            total += load_manifest(cfg.data.root, dataset, "train").num_samples
            sources.append(f"{dataset}: manifest")
        except DataError:
            if dataset in ALL_DEMO_DATASETS:  # built at the run's start when missing, at this size
                total += demo_split_size(dataset, "train")
                sources.append(f"{dataset}: demo size")
                continue
            if dataset not in PUBLIC_TRAIN_SIZES:
                raise ConfigError(
                    f"the size of {dataset}'s train split is unknown: no manifest under {cfg.data.root} and no "
                    f"public size known; build its shards first (egmf-shards build ... --out {cfg.data.root}), or "
                    "give the size of the training mix with --plan --train-samples N"
                ) from None
            total += PUBLIC_TRAIN_SIZES[dataset]
            sources.append(f"{dataset}: public release size")
    return total, ", ".join(sources)


def model_shape(llm_path: str) -> tuple[dict | None, str]:
    config_path = os.path.join(llm_path, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            c = json.load(f)
        heads = c["num_attention_heads"]
        shape = {
            "hidden": c["hidden_size"],
            "layers": c["num_hidden_layers"],
            "intermediate": c["intermediate_size"],
            "vocab": c["vocab_size"],
            "heads": heads,
            "kv_heads": c.get("num_key_value_heads", heads),
        }
        return shape, config_path
    name = os.path.basename(os.path.normpath(llm_path)).lower().replace("llama3", "llama-3")
    for key, shape in KNOWN_SHAPES.items():
        if name.startswith(key):
            return shape, f"published {key} shape (no {config_path})"
    return None, f"unknown (no {config_path})"


def llm_params(shape: dict) -> int:
    h, kv = shape["hidden"], shape["hidden"] * shape["kv_heads"] // shape["heads"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * shape["intermediate"]
    return shape["layers"] * per_layer + 2 * shape["vocab"] * h  # embeddings and an untied output layer


def lora_params(shape: dict, cfg) -> int:
    """r (d_in + d_out) per targeted linear layer of every block."""
    if not cfg.lora.enabled:
        return 0
    h, inter = shape["hidden"], shape["intermediate"]
    kv = h * shape["kv_heads"] // shape["heads"]
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
    dims |= {"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    per_layer = sum(cfg.lora.rank * sum(dims[m]) for m in cfg.lora.target_modules if m in dims)
    return shape["layers"] * per_layer


def memory_gb(shape: dict, cfg, world_size: int, seq_len: int) -> float:
    """Frozen weights in bf16 (2 bytes each, a full copy per device under ZeRO-2); trainable weights (LoRA, and the
    fusion module at about 3 % of them is ignored) in bf16 plus their fp32 master copy, Adam moments and gradients,
    partitioned over the devices; activations of the micro-batch: with gradient checkpointing one bf16 hidden state
    per layer plus one layer's full set (about 34 bytes per token and hidden unit, Korthikanti et al. 2022, with
    flash attention), without it that full set for every layer; and the float32 logits of the micro-batch."""
    frozen = llm_params(shape)
    trainable = lora_params(shape, cfg)
    tokens = cfg.data.batch_size * seq_len
    h = shape["hidden"]
    layer_full = 34 * tokens * h
    if cfg.llm.gradient_checkpointing:
        activations = shape["layers"] * 2 * tokens * h + layer_full
    else:
        activations = shape["layers"] * layer_full
    logits = 4 * tokens * shape["vocab"]
    total = 2 * frozen + 2 * trainable + 14 * trainable / world_size + activations + logits
    return round(total / 2**30, 1)


def event_steps(every: int, total: int, at_end: bool) -> list[int]:
    steps = list(range(every, total, every)) if every else []
    return steps + [total] if at_end else steps


def device_memory_gb() -> float | None:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return None


def make_plan(cfg, world_size: int, device_memory: float | None = None, train_samples: int | None = None) -> Plan:
    """`device_memory`: GB of the device the plan is shown beside (`device_memory_gb()`, --plan only: a run's start
    must not touch CUDA before each rank has picked its device). `train_samples`: the size of the training mix
    when the user knows it (--train-samples), instead of manifests and public sizes."""
    cfg = fit_to_world(cfg, world_size)
    samples, sizes_from = (train_samples, "--train-samples") if train_samples else train_sizes(cfg)
    per_epoch = cfg.data.samples_per_epoch or samples
    global_batch = cfg.data.batch_size * cfg.optim.grad_accum * world_size
    steps = plan_steps(cfg, steps_per_epoch(per_epoch, global_batch) * cfg.optim.grad_accum, world_size)
    seq_len = PROMPT_TOKENS + cfg.prompt.max_text_tokens + (0 if cfg.prompt.text_only else cfg.fusion.num_pseudo_tokens)
    shape, model_from = model_shape(cfg.llm.path)
    return Plan(
        world_size=world_size,
        micro_batch=cfg.data.batch_size,
        grad_accum=cfg.optim.grad_accum,
        global_batch=global_batch,
        train_samples=samples,
        sizes_from=sizes_from,
        steps=steps,
        epochs=round(steps.total_steps / steps.steps_per_epoch, 2),
        eval_steps=event_steps(steps.eval_every, steps.total_steps, cfg.eval.final),
        checkpoint_steps=event_steps(steps.checkpoint_every, steps.total_steps, True),
        tokens_per_step=global_batch * seq_len,
        memory_gb_per_device=memory_gb(shape, cfg, world_size, seq_len) if shape else None,
        model_from=model_from,
        device_memory_gb=device_memory,
    )


def plan_problems(plan: Plan, cfg) -> list[str]:
    """What makes a schedule degenerate; each a reason a run is refused (exit 2) before training."""
    found = []
    total = plan.steps.total_steps
    if plan.steps.eval_every and plan.steps.eval_every >= total:
        found.append(
            f"no validation before the end: evaluation every {plan.steps.eval_every} steps, but the run is {total} "
            "steps; no best model can be chosen. Use eval.per_epoch, or a smaller eval.every"
        )
    if not plan.eval_steps:
        found.append("no validation at all: eval.every/eval.per_epoch are 0 and eval.final is false")
    if plan.steps.warmup_steps > total / 2:
        found.append(
            f"warm-up is {plan.steps.warmup_steps} of {total} steps (over 50 %); use optim.warmup_ratio (e.g. 0.1)"
        )
    if not cfg.train.steps and plan.epochs * plan.steps.steps_per_epoch * plan.global_batch < plan.train_samples:
        found.append(
            f"{cfg.train.epochs} epoch(s) of data.samples_per_epoch {cfg.data.samples_per_epoch} samples do not "
            f"cover the {plan.train_samples} train samples once; raise train.epochs or data.samples_per_epoch"
        )
    if plan.global_batch > plan.train_samples:
        found.append(
            f"the global batch {plan.global_batch} is larger than the train split ({plan.train_samples} samples); "
            "lower optim.global_batch or data.batch_size"
        )
    return found


def refuse_degenerate_schedule(plan: Plan, cfg) -> None:
    """ConfigError naming every reason `plan_problems` finds."""
    problems = plan_problems(plan, cfg)
    if problems:
        raise ConfigError("degenerate schedule (see it with --plan):\n  " + "\n  ".join(problems))


def format_plan(plan: Plan) -> str:
    memory = "unknown (model shape unknown)"
    if plan.memory_gb_per_device is not None:
        memory = f"about {plan.memory_gb_per_device} GB per device (estimate)"
        if plan.device_memory_gb:
            memory += f", this device has {plan.device_memory_gb} GB"
    rows = [
        ("devices", plan.world_size),
        ("micro-batch", plan.micro_batch),
        ("gradient accumulation", plan.grad_accum),
        ("global batch", plan.global_batch),
        ("train samples", f"{plan.train_samples} ({plan.sizes_from})"),
        ("steps per epoch", plan.steps.steps_per_epoch),
        ("epochs", plan.epochs),
        ("total steps", plan.steps.total_steps),
        ("warm-up steps", plan.steps.warmup_steps),
        ("evaluations at", steps_text(plan.eval_steps)),
        ("checkpoints at", steps_text(plan.checkpoint_steps) + clock_text(plan.steps.checkpoint_minutes)),
        ("tokens per step", f"at most {plan.tokens_per_step}"),
        ("memory", memory),
        ("model shape", plan.model_from),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def clock_text(minutes: float) -> str:
    return f", and every {minutes:g} min since the last save" if minutes else ""


def steps_text(steps: list[int]) -> str:
    if len(steps) > 8:
        return f"{', '.join(map(str, steps[:6]))}, ... {steps[-1]} ({len(steps)} in all)"
    return ", ".join(map(str, steps)) or "none"
