"""The trainable weights and their Adam moments, saved whole, so that a run resumes on another number of ranks.

    state = gather_trainable_state(engine)          # every rank (collectives); rank 0 saves it
    restore_trainable_state(engine, state)          # every rank, after loading the checkpoint without optimizer

ZeRO-2 keeps each rank's slice of the fp32 master weights and of Adam's moments
in one file per rank, laid out for that number of ranks. DeepSpeed's own
re-partitioning of those files (`elastic_checkpoint`) needs the optimizer step
in the parameter groups, where torch's AdamW does not keep it, and its universal
checkpoint needs an offline conversion. The trainable part of an EGMF model
(LoRA adapters + fusion module) is small, so a checkpoint also holds it whole,
per parameter name: three fp32 tensors per trainable weight.
"""

from __future__ import annotations

import torch

from egmf.errors import CheckpointError

TRAINABLE_STATE = "trainable_state.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")


def trainable_parameters(engine) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in engine.module.named_parameters() if p.requires_grad}


def gather_trainable_state(engine) -> dict:
    """{'params': {name: {'fp32', 'exp_avg', 'exp_avg_sq'}}, 'step': Adam's step}, whole on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    link_optimizer_state(engine.optimizer)
    params = {}
    for name, p in trainable_parameters(engine).items():
        params[name] = {"fp32": safe_get_full_fp32_param(p).cpu()}
        for key in MOMENTS:
            params[name][key] = safe_get_full_optimizer_state(p, key).cpu()
    first_state = next(iter(engine.optimizer.optimizer.state.values()))
    return {"params": params, "step": float(first_state["step"])}


def restore_trainable_state(engine, state: dict) -> None:
    """Put the saved masters and moments into this engine's ZeRO partitions, and the learning rates of the
    restored scheduler into the optimizer (a load without optimizer states leaves them at their start values)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = engine.optimizer
    if not isinstance(zero.optimizer, torch.optim.AdamW):
        raise CheckpointError(
            f"resuming on another number of ranks needs torch's AdamW; this run uses {type(zero.optimizer).__name__} "
            "(an offloaded optimizer): resume on the number of ranks the checkpoint was saved with"
        )
    params = trainable_parameters(engine)
    if set(params) != set(state["params"]):
        differ = sorted(set(params) ^ set(state["params"]))
        raise CheckpointError(f"the checkpoint's trainable weights differ from this model's: {', '.join(differ[:5])}")
    # Adam creates its state at the first step; the saved run is past it
    for flat in zero.single_partition_of_fp32_groups:
        zero.optimizer.state[flat] = {"step": torch.tensor(state["step"])}
        zero.optimizer.state[flat].update({key: torch.zeros_like(flat) for key in MOMENTS})
    link_optimizer_state(zero)
    for name, p in params.items():
        saved = state["params"][name]
        safe_set_full_fp32_param(p, saved["fp32"].to(p.device))
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, saved[key].to(p.device), key)
    for group, lr in zip(zero.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


def link_optimizer_state(zero) -> None:
    """Point each weight's view of the optimizer state at the state of its ZeRO partition as it is now: DeepSpeed
    links them once, and a link made before Adam created its state stays empty."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    for index, flat in enumerate(zero.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(zero.bit16_groups[index], flat, zero.optimizer.state)
