"""An exported package: a trained model in one folder, loadable without the run that made it (egmf-export).

    export_package("runs/mosei/best", "packages/egmf-mosei", base_model="Qwen/Qwen2.5-7B-Instruct")
    EGMFModel.from_pretrained("packages/egmf-mosei")          # egmf.model.egmf_model

The layout is described in egmf/train/export_main.py (egmf-export --help).
"""

from __future__ import annotations

import json
import os
import shutil

from egmf.atomic import building, write_atomically, write_json
from egmf.errors import ConfigError
from egmf.model.egmf_model import (
    ADAPTER_DIR,
    FUSION_META,
    FUSION_WEIGHTS,
    MERGED_DIR,
    PACKAGE_CONFIG,
    PACKAGE_RECORD,
)
from egmf.train.checkpoint import BEST_RECORD, saved_weights
from egmf.train.config import Config, config_from_table
from egmf.train.evaluation import describe_selection

TOKENIZER_DIR = "tokenizer"
MODEL_CARD = "README.md"


def chosen_record(model_dir: str) -> dict:
    """best.json of a best/ folder (step, score, the evaluation's metrics); {} for a checkpoint."""
    path = os.path.join(model_dir, BEST_RECORD)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        record = json.load(f)
    return {"step": record["step"], "score": record["score"], "metrics": record.get("metrics", {})}


def export_package(model_dir: str, out: str, base_model: str = "", merge_lora: bool = False) -> str:
    """Write the package of a best/ folder or a checkpoint to `out`; returns `out`."""
    from egmf.model.llm import load_tokenizer

    table, weights = saved_weights(model_dir)
    cfg = config_from_table(table)
    base = base_model or os.path.abspath(cfg.llm.path)
    with building(out) as partial:
        for name in (ADAPTER_DIR, FUSION_WEIGHTS, FUSION_META):
            source = os.path.join(weights, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(partial, name))
            elif os.path.isfile(source):
                shutil.copy2(source, partial)
        point_adapter_at(os.path.join(partial, ADAPTER_DIR), base)
        load_tokenizer(cfg.llm.path, cfg.llm.pad_token).save_pretrained(os.path.join(partial, TOKENIZER_DIR))
        table = cfg.to_dict()
        table["llm"]["path"] = base
        write_json(os.path.join(partial, PACKAGE_CONFIG), table)
        record = {
            "format": 1,
            "base_model": base,
            "datasets": dataset_dims(weights, cfg),
            "chosen": chosen_record(model_dir) | {"selected_on": describe_selection(cfg.eval, cfg.data.eval)},
            "decoding": cfg.eval.select_mode,
        }
        write_json(os.path.join(partial, PACKAGE_RECORD), record)
        write_atomically(os.path.join(partial, MODEL_CARD), model_card(record, cfg).encode("utf-8"))
        if merge_lora:
            write_merged(cfg.llm.path, os.path.join(partial, ADAPTER_DIR), os.path.join(partial, MERGED_DIR))
    return out


def write_merged(base_path: str, adapter_dir: str, out: str) -> None:
    """The base model with the adapter merged into its weights. Merged on the CPU in float32 (peft advises
    against merging into half-precision weights: rounding), then saved in the base model's own dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from egmf.model.llm import load_tokenizer

    if not os.path.isdir(adapter_dir):
        raise ConfigError("--merge-lora: the model has no LoRA adapter (trained with lora.enabled = false)")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    saved_dtype = getattr(base.config, "dtype", None) or getattr(base.config, "torch_dtype", None) or torch.float32
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.to(saved_dtype if isinstance(saved_dtype, torch.dtype) else getattr(torch, str(saved_dtype)))
    merged.save_pretrained(out)
    load_tokenizer(base_path).save_pretrained(out)


def point_adapter_at(adapter_dir: str, base: str) -> None:
    """Set the adapter's base_model_name_or_path, so that peft's Auto classes load the right base model."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path):  # the ablation without LoRA has no adapter
        return
    with open(path) as f:
        adapter = json.load(f)
    adapter["base_model_name_or_path"] = base
    write_json(path, adapter)


def dataset_dims(weights: str, cfg: Config) -> dict[str, list[int]]:
    """{dataset: [audio dims, vision dims]} the fusion module was built for (the evaluated datasets of a text-only
    model, which has no front ends)."""
    path = os.path.join(weights, FUSION_META)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)["feature_dims"]
    return {dataset: [0, 0] for dataset in cfg.data.eval}


def model_card(record: dict, cfg: Config) -> str:
    chosen = record["chosen"]
    metrics = "\n".join(
        f"| {key} | {value:.4f} |" for key, value in sorted(chosen.get("metrics", {}).items()) if "/samples" not in key
    )
    return f"""# EGMF model

Three fusion experts (local, cross-modal semantic, global context) with hierarchical gating, injected as
{cfg.fusion.num_pseudo_tokens} pseudo tokens into the prompt of a LoRA-adapted causal LLM that answers emotion
classes and sentiment scores as text.

- Base model: `{record["base_model"]}` (LoRA rank {cfg.lora.rank}, alpha {cfg.lora.alpha}, on
  {", ".join(cfg.lora.target_modules)})
- Datasets: {", ".join(record["datasets"])}
- Chosen at step {chosen.get("step", "?")} on {chosen["selected_on"]}; decoding: {record["decoding"]}

## Metrics of the evaluation that chose it

| metric | value |
|---|---|
{metrics or "| (none recorded) | |"}

## Use

    egmf-predict --model PACKAGE --data SHARD_ROOT --split test --out predictions.jsonl

or in Python (the egmf package installed):

    from egmf.model.egmf_model import EGMFModel
    model = EGMFModel.from_pretrained("PACKAGE")            # or base_model="/path/to/local/base"

The adapter alone loads with peft: `AutoPeftModelForCausalLM.from_pretrained("PACKAGE/adapter")`. A package
exported with --merge-lora also holds the merged LLM: `EGMFModel.from_pretrained("PACKAGE", merged=True)`.
Features must be given as the datasets' builders write them; the model standardises them itself.
"""
