"""Prompts: task and labels, pseudo tokens between markers, the utterance, an answer cue, then the answer.

    [bos] Task ... one of: neutral, joy, ...  Signals: <signals> P P P P </signals>
          Utterance: <text>  Emotion: | joy [eos]
                                        ^ answer tokens: the only ones with a loss

Templates are config (per dataset, else per task and language); `{signals}`
marks where the pseudo tokens go and must come before `{text}`. Sequences are
left-padded with explicit position ids, so a sample's prompt has the same
positions in training, candidate scoring and generation.

With `pack_tokens`, training rows instead hold several samples one after the
other, each with positions from 0 (`build_packed`). The LLM then gets no 2-D
attention mask: transformers reads the restarting positions as sample
boundaries (varlen flash attention on GPU, a block-diagonal causal mask with
SDPA), so no sample attends to another and each loss is what it was unpacked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from egmf.data.collate import Batch
from egmf.datasets import CLASSIFICATION, get_spec
from egmf.labels import Verbaliser
from egmf.model.config import PromptConfig

IGNORE = -100


@dataclass
class PromptBatch:
    input_ids: torch.Tensor
    """[B, T] token ids; pseudo positions hold the pad id (their embeddings are replaced)."""
    attention_mask: torch.Tensor
    """[B, T] 1 on real tokens, 0 on padding."""
    position_ids: torch.Tensor
    """[B, T] positions; in packed rows they restart at 0 for each sample (and for the trailing padding)."""
    pseudo_mask: torch.Tensor
    """[B, T] True where a pseudo token goes (K per row, in order)."""
    labels: torch.Tensor
    """[B, T] answer tokens and eos, IGNORE elsewhere (all IGNORE without answers)."""
    text_ids: torch.Tensor
    """[B, Lt] utterance tokens for the fusion module's text input (right-padded)."""
    text_mask: torch.Tensor


class PromptBuilder:
    def __init__(self, cfg: PromptConfig, tokenizer: PreTrainedTokenizerBase, num_pseudo_tokens: int):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.num_pseudo = 0 if cfg.text_only else num_pseudo_tokens
        self.verbalisers: dict[str, Verbaliser] = {}
        self._pieces: dict[str, tuple[list[int], list[int], list[int]]] = {}
        self._candidates: dict[str, list[list[int]]] = {}

    def verbaliser(self, dataset: str) -> Verbaliser:
        if dataset not in self.verbalisers:
            self.verbalisers[dataset] = Verbaliser.for_dataset(dataset, self.cfg.label_words.get(dataset))
        return self.verbalisers[dataset]

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def answer_tokens(self, answer: str) -> list[int]:
        """How an answer is written after the cue, eos included (the same in training and decoding)."""
        return self.tokens(" " + answer) + [self.tokenizer.eos_token_id]

    def candidate_tokens(self, dataset: str) -> list[list[int]]:
        """The answer tokens of every valid answer of a dataset (cached: evaluation asks every batch)."""
        if dataset not in self._candidates:
            self._candidates[dataset] = [self.answer_tokens(c) for c in self.verbaliser(dataset).candidates()]
        return self._candidates[dataset]

    def pieces(self, dataset: str) -> tuple[list[int], list[int], list[int]]:
        """Token ids of the template around the pseudo tokens and the utterance (cached per dataset)."""
        if dataset not in self._pieces:
            spec, verbaliser = get_spec(dataset), self.verbaliser(dataset)
            values = (
                {"labels": ", ".join(verbaliser.candidates())}
                if spec.task == CLASSIFICATION
                else {
                    "low": verbaliser.verbalise(spec.label_range[0]),
                    "high": verbaliser.verbalise(spec.label_range[1]),
                }
            )
            template = self.cfg.template_for(dataset)
            head, rest = template.split("{signals}")
            middle, tail = rest.split("{text}")
            if self.num_pseudo:
                head, middle = head + self.cfg.signals_open, self.cfg.signals_close + middle
            bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
            self._pieces[dataset] = (
                bos + self.tokens(head.format(**values)),
                self.tokens(middle.format(**values)),
                self.tokens(tail.format(**values)),
            )
        return self._pieces[dataset]

    def sample_rows(self, batch: Batch, with_answers: bool) -> tuple[list, list, list, list]:
        """Per sample: token ids, pseudo-token flags, labels, and the utterance tokens for the fusion module."""
        head, middle, tail = self.pieces(batch.dataset)
        verbaliser = self.verbaliser(batch.dataset)
        rows, pseudo_rows, label_rows, texts = [], [], [], []
        for text, label in zip(batch.texts, batch.labels, strict=True):
            text_ids = self.tokens(text)[: self.cfg.max_text_tokens] if text else []
            prompt = head + [self.tokenizer.pad_token_id] * self.num_pseudo + middle + text_ids + tail
            answer = self.answer_tokens(verbaliser.verbalise(label)) if with_answers else []
            rows.append(prompt + answer)
            pseudo_rows.append(
                [False] * len(head) + [True] * self.num_pseudo + [False] * (len(rows[-1]) - len(head) - self.num_pseudo)
            )
            label_rows.append([IGNORE] * len(prompt) + answer)
            texts.append(text_ids or [self.tokenizer.pad_token_id])
        return rows, pseudo_rows, label_rows, texts

    def build(self, batch: Batch, with_answers: bool) -> PromptBatch:
        """One sample per row, left-padded (evaluation always; training unless packing)."""
        rows, pseudo_rows, label_rows, texts = self.sample_rows(batch, with_answers)
        width = max(map(len, rows))

        def left_pad(seqs, value):
            return torch.tensor([[value] * (width - len(s)) + s for s in seqs])

        attention_mask = left_pad([[1] * len(r) for r in rows], 0)
        return PromptBatch(
            input_ids=left_pad(rows, self.tokenizer.pad_token_id),
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0),
            pseudo_mask=left_pad(pseudo_rows, False).bool(),
            labels=left_pad(label_rows, IGNORE),
            **self.text_tensors(texts),
        )

    def build_packed(self, batch: Batch, max_tokens: int) -> PromptBatch:
        """Training rows holding consecutive samples, each with positions from 0, right-padded. The samples stay
        in batch order, row after row, so the pseudo-token slots still take the fusion outputs in order."""
        rows, pseudo_rows, label_rows, texts = self.sample_rows(batch, with_answers=True)
        packs = pack_consecutive([len(r) for r in rows], max_tokens)
        width = max(sum(len(rows[j]) for j in pack) for pack in packs)

        def packed(seqs, value):
            out = []
            for pack in packs:
                joined = [x for j in pack for x in seqs[j]]
                out.append(joined + [value] * (width - len(joined)))
            return torch.tensor(out)

        # The padding after the last sample is a segment of its own (positions from 0 again): nothing attends to
        # it, and it has no loss.
        positions = [list(range(len(r))) for r in rows]
        position_ids = torch.tensor(
            [
                [p for j in pack for p in positions[j]] + list(range(width - sum(len(rows[j]) for j in pack)))
                for pack in packs
            ]
        )
        return PromptBatch(
            input_ids=packed(rows, self.tokenizer.pad_token_id),
            attention_mask=packed([[1] * len(r) for r in rows], 0),
            position_ids=position_ids,
            pseudo_mask=packed(pseudo_rows, False).bool(),
            labels=packed(label_rows, IGNORE),
            **self.text_tensors(texts),
        )

    def text_tensors(self, texts: list[list[int]]) -> dict[str, torch.Tensor]:
        """The utterances for the fusion module's text input, one per sample, right-padded."""
        pad, width = self.tokenizer.pad_token_id, max(map(len, texts))
        return {
            "text_ids": torch.tensor([t + [pad] * (width - len(t)) for t in texts]),
            "text_mask": torch.tensor([[True] * len(t) + [False] * (width - len(t)) for t in texts]),
        }


def pack_consecutive(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of consecutive samples per row: as few rows as fit in `max_tokens` (a longer sample gets a row of
    its own), and among those layouts the one whose longest row is shortest, since every row is padded to it."""

    def fill(capacity: int) -> list[list[int]]:
        packs: list[list[int]] = []
        total = 0
        for i, length in enumerate(lengths):
            if packs and total + length <= capacity:
                packs[-1].append(i)
                total += length
            else:
                packs.append([i])
                total = length
        return packs

    rows = len(fill(max_tokens))
    low, high = max(lengths), max(max_tokens, max(lengths))
    while low < high:  # the smallest capacity that still needs no more rows
        middle = (low + high) // 2
        if len(fill(middle)) <= rows:
            high = middle
        else:
            low = middle + 1
    return fill(low)
