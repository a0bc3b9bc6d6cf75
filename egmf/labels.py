"""Labels as text: what the LLM is taught to answer, and how an answer is read back.

Classes are written as words (configurable per dataset and language; defaults
below), scores as signed one-decimal numbers ("+0.6", "-1.2", "+0.0").
`parse` returns None for an answer that is none of these: it is counted as
unparseable, never mapped to some class. `candidates` lists every valid answer,
for constrained decoding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from egmf.datasets import CLASSIFICATION, DatasetSpec, get_spec
from egmf.errors import ConfigError

DEFAULT_WORDS = {
    "en": {
        "neutral": "neutral",
        "surprise": "surprise",
        "fear": "fear",
        "sadness": "sadness",
        "joy": "joy",
        "disgust": "disgust",
        "anger": "anger",
    },
    # CHERMA's own label words.
    "zh": {
        "neutral": "平静",
        "surprise": "惊奇",
        "fear": "恐惧",
        "sadness": "悲伤",
        "joy": "高兴",
        "disgust": "厌恶",
        "anger": "愤怒",
    },
}
NUMBER = re.compile(r"[+\-−]?\d+(?:\.\d+)?")
STRIP = " \t\n.。,，!！:：;；\"'“”「」()（）"


@dataclass
class Verbaliser:
    spec: DatasetSpec
    words: dict[str, str]
    """Canonical class name -> the word the model answers with (classification only)."""

    @classmethod
    def for_dataset(cls, dataset: str, words: dict[str, str] | None = None) -> Verbaliser:
        spec = get_spec(dataset)
        if spec.task != CLASSIFICATION:
            return cls(spec, {})
        defaults = {name: spec.label_words.get(name, DEFAULT_WORDS[spec.lang].get(name, name)) for name in spec.labels}
        chosen = {name: (words or {}).get(name, default) for name, default in defaults.items()}
        unknown = set(words or {}) - set(spec.labels)
        if unknown:
            raise ConfigError(
                f"prompt.label_words for {dataset} name unknown classes {sorted(unknown)}; "
                f"classes: {', '.join(spec.labels)}"
            )
        if len(set(chosen.values())) != len(chosen):
            raise ConfigError(f"prompt.label_words for {dataset} are not distinct: {chosen}")
        return cls(spec, chosen)

    def verbalise(self, label: str | float) -> str:
        if self.spec.task == CLASSIFICATION:
            if label not in self.words:
                raise ValueError(f"label {label!r} is not a class of {self.spec.name} ({', '.join(self.spec.labels)})")
            return self.words[label]
        lo, hi = self.spec.label_range
        value = round(min(max(float(label), lo), hi), 1) + 0.0  # + 0.0: no "-0.0"
        return f"{value:+.1f}"

    def parse(self, answer: str) -> str | float | None:
        """The label an answer names, or None when it names none."""
        text = answer.strip(STRIP)
        if self.spec.task == CLASSIFICATION:
            by_word = {word.lower(): name for name, word in self.words.items()}
            if text.lower() in by_word:
                return by_word[text.lower()]
            # A word followed by more text ("joy, I think"): the longest word it starts with.
            starts = [w for w in by_word if text.lower().startswith(w) and not text[len(w) : len(w) + 1].isalpha()]
            return by_word[max(starts, key=len)] if starts else None
        match = NUMBER.match(text)
        if match is None:
            return None
        lo, hi = self.spec.label_range
        return min(max(float(match.group().replace("−", "-")), lo), hi)

    def candidates(self) -> list[str]:
        """Every valid answer string: the class words, or each one-decimal score in the range."""
        if self.spec.task == CLASSIFICATION:
            return [self.words[name] for name in self.spec.labels]
        lo, hi = self.spec.label_range
        return [self.verbalise(tenths / 10) for tenths in range(round(lo * 10), round(hi * 10) + 1)]

    def candidate_label(self, index: int) -> str | float:
        """The label of candidates()[index]."""
        if self.spec.task == CLASSIFICATION:
            return self.spec.labels[index]
        return round(self.spec.label_range[0] + index / 10, 1) + 0.0
