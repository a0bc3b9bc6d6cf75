"""Answer decoding: greedy generation (optionally restricted by a token trie) and candidate scoring.

- `greedy`: the LLM's own greedy answer, up to `max_new_tokens` or eos. The
  caller parses it; what does not parse is counted as unparseable.
- `greedy` with a `TokenTrie`: at each step only tokens that continue some valid
  answer are allowed (the numeric grammar for scores), so the result is always valid.
- `score_candidates`: the summed log-probability of every valid answer (class
  words), highest wins; logits are computed only where candidate tokens are predicted.

All functions take prompt embeddings already left-padded, with explicit position ids.
"""

from __future__ import annotations

import torch


class TokenTrie:
    """The token sequences of the valid answers (each ending in eos), as a prefix tree."""

    def __init__(self, sequences: list[list[int]]):
        self.root: dict = {}
        self.answers: dict[tuple[int, ...], int] = {}
        for index, seq in enumerate(sequences):
            node = self.root
            for token in seq:
                node = node.setdefault(token, {})
            self.answers[tuple(seq)] = index

    def allowed(self, prefix: list[int]) -> list[int]:
        node = self.root
        for token in prefix:
            node = node.get(token, {})
        return list(node)


@torch.no_grad()
def greedy(
    llm,
    embed,
    inputs_embeds,
    attention_mask,
    position_ids,
    eos_id: int,
    max_new_tokens: int,
    trie: TokenTrie | None = None,
) -> list[list[int]]:
    """Generated token ids per row (eos excluded); `embed` maps ids to input embeddings."""
    batch = inputs_embeds.shape[0]
    generated: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    past, step_embeds, step_positions = None, inputs_embeds, position_ids
    for _ in range(max_new_tokens):
        out = llm(
            inputs_embeds=step_embeds,
            attention_mask=attention_mask,
            position_ids=step_positions,
            past_key_values=past,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].float()
        if trie is not None:
            allowed = torch.full_like(logits, float("-inf"))
            for row in range(batch):
                allowed[row, trie.allowed(generated[row]) or [eos_id]] = 0.0
            logits = logits + allowed
        next_tokens = logits.argmax(-1)
        for row, token in enumerate(next_tokens.tolist()):
            if not done[row]:
                if token == eos_id:
                    done[row] = True
                else:
                    generated[row].append(token)
        if all(done):
            break
        past = out.past_key_values
        step_embeds = embed(next_tokens)[:, None, :]
        step_positions = step_positions[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], 1)
    return generated


@torch.no_grad()
def score_candidates(
    llm, embed, inputs_embeds, attention_mask, position_ids, candidates: list[list[int]], pad_id: int
) -> torch.Tensor:
    """[B, C] summed log-probability of each candidate token sequence after each prompt."""
    batch, num_candidates = inputs_embeds.shape[0], len(candidates)
    width = max(map(len, candidates))
    cand_ids = torch.tensor([c + [pad_id] * (width - len(c)) for c in candidates], device=inputs_embeds.device)
    cand_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in candidates], device=inputs_embeds.device)
    # Every (prompt, candidate) pair as one row: prompt (left-padded) then candidate (right-padded).
    embeds = torch.cat([inputs_embeds.repeat_interleave(num_candidates, 0), embed(cand_ids).repeat(batch, 1, 1)], 1)
    mask = torch.cat([attention_mask.repeat_interleave(num_candidates, 0), cand_mask.repeat(batch, 1)], 1)
    positions = torch.cat(
        [
            position_ids.repeat_interleave(num_candidates, 0),
            position_ids[:, -1:].repeat_interleave(num_candidates, 0) + 1 + torch.arange(width, device=mask.device),
        ],
        1,
    )
    # The last prompt position predicts the first candidate token: keep width + 1 positions.
    logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=width + 1).logits
    log_probs = logits[:, :-1].float().log_softmax(-1)
    targets = cand_ids.repeat(batch, 1)
    token_scores = log_probs.gather(-1, targets[..., None]).squeeze(-1) * cand_mask.repeat(batch, 1)
    return token_scores.sum(-1).view(batch, num_candidates)
