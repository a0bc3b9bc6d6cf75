"""A split's utterances beside its shards, to count what `prompt.max_text_tokens` cuts without reading the tars.

    ROOT/DATASET/SPLIT/texts.jsonl    one JSON string per line, in sample order (written with the shards)

    texts = read_texts(manifest)                          # None for shards built before texts.jsonl existed
    cut = count_truncated(tokenizer, texts, max_tokens)   # utterances longer than the prompt keeps

The prompt keeps the first `prompt.max_text_tokens` tokens of an utterance (the
LLM's tokenizer, no special tokens). The count is made at build and inspect time
(`--tokenizer DIR --max-text-tokens N`) and at the start of every training run,
which warns above 1 %.
"""

from __future__ import annotations

import json
import os

import numpy as np

from egmf.atomic import write_atomically
from egmf.shards.manifest import SplitManifest, join_location, read_bytes

TEXTS_NAME = "texts.jsonl"
MAX_TRUNCATED_SHARE = 0.01


def write_texts(folder: str, texts: list[str]) -> None:
    lines = "".join(json.dumps(text, ensure_ascii=False) + "\n" for text in texts)
    write_atomically(os.path.join(folder, TEXTS_NAME), lines.encode("utf-8"))


def read_texts(manifest: SplitManifest) -> list[str] | None:
    if not manifest.text_stats:
        return None
    data = read_bytes(join_location(manifest.location, TEXTS_NAME)).decode("utf-8")
    return [json.loads(line) for line in data.splitlines()]


def text_stats(texts: list[str]) -> dict:
    """Length quantiles in words and characters (tokenizer-free: the tokenizer is the model's choice)."""
    stats = {}
    for unit, lengths in (("words", [len(t.split()) for t in texts]), ("chars", [len(t) for t in texts])):
        values = np.asarray(lengths)
        stats[unit] = {q: float(np.percentile(values, int(q[1:]))) for q in ("p50", "p90", "p99")}
        stats[unit]["max"] = int(values.max())
    return stats


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Tokens per utterance, tokenized as the prompt tokenizes it (egmf.model.prompt)."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids] if texts else []


def count_truncated(tokenizer, texts: list[str], max_tokens: int) -> int:
    return sum(n > max_tokens for n in token_lengths(tokenizer, texts))
