"""A trained model rebuilt from what training saved: a checkpoint's export/ or a run's best/ folder.

    table, weights = saved_weights(folder)              # egmf.train.checkpoint: the config and the weights folder
    model = load_saved_model(config_from_table(table), weights, device)

The base LLM comes from llm.path of the config (an override may point elsewhere); the fusion module's front ends
are built as trained (fusion.json), so only the splits that are decoded need shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from egmf.model.egmf_model import FUSION_META, EGMFModel
from egmf.train.config import Config
from egmf.train.preflight import feature_dims


def saved_feature_dims(cfg: Config, weights: str) -> dict[str, tuple[int, int]]:
    """The fusion module's front ends as trained (fusion.json); the text-only ablation has none, so the dims come
    from the shards."""
    path = os.path.join(weights, FUSION_META)
    if not os.path.isfile(path):
        return feature_dims(cfg)
    with open(path) as f:
        return {name: tuple(dims) for name, dims in json.load(f)["feature_dims"].items()}


def load_saved_model(cfg: Config, weights: str, device: torch.device) -> EGMFModel:
    model = EGMFModel.build(cfg.fusion, cfg.prompt, cfg.llm, cfg.lora, saved_feature_dims(cfg, weights), device)
    model.load_exported(weights)
    return model


@contextmanager
def decoding_world(device_choice: str) -> Iterator[tuple]:
    """(world, device) for decoding a saved model on the launcher's ranks (one process, torchrun, deepspeed,
    srun): the process group when there are several ranks, and afterwards no process group, launcher variables
    or loader workers left behind."""
    from egmf.data.transport import kill_leftover_workers
    from egmf.distributed import close_distributed, init_distributed, pick_device, world_info_from_env

    world = world_info_from_env()
    device = pick_device(world, device_choice)
    if world.world_size > 1:
        init_distributed(world, device)
    try:
        yield world, device
    finally:
        close_distributed()
        kill_leftover_workers()
