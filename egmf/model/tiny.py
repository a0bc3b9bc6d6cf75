"""A tiny real LLM for tests and the embedded default job: a 2-layer Llama and a SentencePiece tokenizer.

    python -m egmf.model.tiny runs/tiny-llm     # writes config, weights and tokenizer

Built from a real `transformers` config and a tokenizer trained here on prompt-like
English and Chinese lines (byte fallback, so any text encodes), deterministic for
a given seed. Loads like any model directory: AutoModelForCausalLM / AutoTokenizer.
"""

from __future__ import annotations

import io
import json
import os
import sys

import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from egmf.labels import DEFAULT_WORDS
from egmf.shards.demo import TEXTS

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def tokenizer_corpus() -> list[str]:
    lines = []
    for i in range(300):
        for lang in ("en", "zh"):
            lines += TEXTS[lang]
            lines.append(" ".join(DEFAULT_WORDS[lang].values()))
        lines.append(
            f"Intensity: {i / 100 - 1.5:+.1f}. Task: rate the sentiment intensity; emotion; utterance; signals"
        )
        lines.append(f"强度：{i / 300 - 0.5:+.1f}。任务：判断情感强度；识别说话人的情绪；话语；信号")
    return lines


def write_tokenizer(out_dir: str, vocab_size: int = 1000) -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        **SPECIAL_IDS,
    )
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": False,
        "add_eos_token": False,
        "padding_side": "left",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


def build_tiny_llm(out_dir: str, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> str:
    """Write a tiny Llama model directory to out_dir (if it has no config.json yet); returns out_dir."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    write_tokenizer(out_dir)
    # Llama architecture: AutoTokenizer then picks the SentencePiece LlamaTokenizer (for a qwen2
    # config it picks Qwen2Tokenizer, which ignores tokenizer.model and drops unknown characters).
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        bos_token_id=SPECIAL_IDS["bos_id"],
        eos_token_id=SPECIAL_IDS["eos_id"],
        pad_token_id=SPECIAL_IDS["pad_id"],
        tie_word_embeddings=False,
        # With the default 0.02 a frozen random lm_head caps every logit near +-1.3, so no answer can get
        # more than ~0.4 % probability and nothing is learnable. A pretrained head has no such cap.
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    print(build_tiny_llm(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-llm"))
