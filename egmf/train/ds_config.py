"""The DeepSpeed JSON config, with its "auto" values filled from the trainer's config.

One source of truth: batch size, accumulation and clipping live in the recipe
(data.batch_size, optim.grad_accum, optim.clip_grad); the JSON says "auto" for
them, or a value that must agree. Precision follows the device: bf16 "auto" is
on for CUDA and off for CPUs, and a half precision asked for on a CPU is
turned off with a warning, so the same files run everywhere. The optimizer
and scheduler come from [optim] (parameter groups need them built in Python):
JSON "optimizer"/"scheduler" sections are an error.
"""

from __future__ import annotations

import json
import logging

from egmf.errors import ConfigError
from egmf.train.config import Config

logger = logging.getLogger("egmf.train")


def read_ds_config(path: str) -> dict:
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"DeepSpeed config {path} does not exist; pass --deepspeed ds_configs/zero2.json (or zero2_offload.json)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
    return ds


def resolve_ds_config(path: str, cfg: Config, world_size: int, device_type: str) -> dict:
    """The config DeepSpeed gets: autos filled, precision fitted to the device; ConfigError lists every problem."""
    ds = read_ds_config(path)
    problems = []
    filled = {
        "train_micro_batch_size_per_gpu": (cfg.data.batch_size, "data.batch_size"),
        "gradient_accumulation_steps": (cfg.optim.grad_accum, "optim.grad_accum"),
        "train_batch_size": (
            cfg.data.batch_size * cfg.optim.grad_accum * world_size,
            "data.batch_size x optim.grad_accum x ranks",
        ),
        "gradient_clipping": (cfg.optim.clip_grad, "optim.clip_grad"),
    }
    for key, (value, source) in filled.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            problems.append(f'{path}: {key} is {given!r} but {source} gives {value!r}; set it to "auto"')
        ds[key] = value
    for section in ("optimizer", "scheduler"):
        if section in ds:
            problems.append(f'{path}: remove the "{section}" section; the trainer builds it from [optim]')
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2):
        problems.append(
            f"{path}: zero_optimization.stage {zero.get('stage')} is not supported; use 2 (ZeRO-3 would partition "
            "the frozen base model that evaluation decodes with)"
        )
    if zero.get("overlap_comm"):
        logger.warning("%s: overlap_comm is on; it has produced NaN gradient norms with LoRA (docs/method.md)", path)
    fit_precision(ds, path, device_type, problems)
    if problems:
        raise ConfigError("invalid DeepSpeed config:\n  " + "\n  ".join(problems))
    ds["zero_allow_untested_optimizer"] = True  # our AdamW with parameter groups
    return ds


def fit_precision(ds: dict, path: str, device_type: str, problems: list[str]) -> None:
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        enabled = section.get("enabled", False)
        if enabled not in (True, False, "auto"):
            problems.append(f'{path}: {name}.enabled must be true, false or "auto", got {enabled!r}')
            continue
        wanted = device_type == "cuda" if enabled == "auto" and name == "bf16" else enabled is True
        if wanted and device_type != "cuda":
            logger.warning("%s: %s is not used on CPU ranks; training in float32", path, name)
            wanted = False
        section["enabled"] = wanted
    if ds["bf16"]["enabled"] and ds["fp16"]["enabled"]:
        problems.append(f"{path}: bf16 and fp16 are both enabled; pick one")


def offloads_optimizer(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def precision_name(ds: dict) -> str:
    return "bf16" if ds["bf16"]["enabled"] else "fp16" if ds["fp16"]["enabled"] else "fp32"
