"""Load a local causal LLM and its tokenizer, freeze it, and add LoRA adapters (peft).

Any `AutoModelForCausalLM` directory works (Qwen2/Qwen2.5, Llama family, the
tiny test model). Nothing is downloaded: a missing or broken directory is a
clear error before training starts.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from egmf.errors import ConfigError, ModelPathError
from egmf.model.attention import llm_attn_implementation
from egmf.model.config import LLMConfig, LoraConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"llm.dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def check_model_dir(path: str) -> None:
    if not path:
        raise ModelPathError(
            "llm.path is empty: set it to a local model directory (e.g. a Qwen2.5-7B download), "
            "or run the demo, which builds a tiny model"
        )
    if not os.path.isdir(path):
        raise ModelPathError(
            f"llm.path {path} is not a directory; download the model there first "
            "(this system never fetches weights at run time)"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelPathError(
            f"{path} has no config.json; point llm.path at the folder that holds the model's "
            "config.json, weights and tokenizer files"
        )


def load_tokenizer(path: str, pad_token: str = "") -> PreTrainedTokenizerBase:
    check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelPathError(f"cannot load a tokenizer from {path}: {exc}") from None
    if tokenizer.pad_token_id is None and pad_token:
        tokenizer.pad_token = pad_token
    if tokenizer.pad_token_id is None:
        raise ModelPathError(
            f"the tokenizer in {path} has no pad token; set llm.pad_token to one of its tokens "
            '(padding is always masked, so e.g. "<|end_of_text|>" for Llama 3 is fine)'
        )
    if tokenizer.eos_token_id is None:
        raise ModelPathError(f"the tokenizer in {path} has no eos token; the model could not end its answers")
    return tokenizer


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing, under its transformers 5 name or the older one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_llm(cfg: LLMConfig, lora: LoraConfig, attention: str, device: torch.device):
    """(peft model with frozen base and trainable LoRA, tokenizer)."""
    tokenizer = load_tokenizer(cfg.path, cfg.pad_token)
    try:
        base = AutoModelForCausalLM.from_pretrained(
            cfg.path,
            dtype=resolve_dtype(cfg.dtype, device),
            attn_implementation=llm_attn_implementation(attention, device),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelPathError(f"cannot load a causal LM from {cfg.path}: {exc}") from None
    if not lora.enabled:  # the ablation without LoRA: the LLM only reads the pseudo tokens
        return freeze(base, cfg.gradient_checkpointing).to(device), tokenizer
    return add_lora(base, lora, cfg.gradient_checkpointing, cfg.path).to(device), tokenizer


def freeze(base, gradient_checkpointing: bool):
    base.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant: with reentrant checkpointing LoRA gets no gradient when nothing
        # upstream requires grad (peft #137, transformers #42489).
        enable_checkpointing(base)
    return base


def add_lora(base, lora: LoraConfig, gradient_checkpointing: bool, where: str = "the model"):
    """Freeze `base` and wrap it with trainable LoRA adapters (a peft model)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    freeze(base, gradient_checkpointing)
    missing = [m for m in lora.target_modules if not any(name.endswith(m) for name, _ in base.named_modules())]
    if missing:
        raise ConfigError(
            f"lora.target_modules {missing} match no layer of {where}; "
            f"for {type(base).__name__} use names like q_proj, v_proj"
        )
    peft_config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, peft_config)
