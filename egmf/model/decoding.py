"""Answer decoding: greedy generation, and scoring of every valid answer.

- `greedy`: the LLM's own greedy answer, up to `max_new_tokens` or eos. The
  caller parses it; what does not parse is counted as unparseable.
- `score_candidates`: the summed log-probability of every valid answer (class
  words, or every one-decimal score in the range). Constrained decoding picks the
  best class, or the weighted median score (`weighted_median`), which minimises
  the expected absolute error where greedy digit-by-digit decoding does not.

All functions take prompt embeddings already left-padded, with explicit position ids.
"""

from __future__ import annotations

import inspect

import torch


@torch.no_grad()
def greedy(
    llm,
    embed,
    inputs_embeds,
    attention_mask,
    position_ids,
    eos_id: int,
    max_new_tokens: int,
) -> list[list[int]]:
    """Generated token ids per row (eos excluded); `embed` maps ids to input embeddings."""
    batch = inputs_embeds.shape[0]
    generated: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    past, step_embeds, step_positions = None, inputs_embeds, position_ids
    cache_arg = cache_keyword(llm)
    for _ in range(max_new_tokens):
        out = llm(
            inputs_embeds=step_embeds,
            attention_mask=attention_mask,
            position_ids=step_positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_arg: past},
        )
        next_tokens = out.logits[:, -1].argmax(-1)
        for row, token in enumerate(next_tokens.tolist()):
            if not done[row]:
                if token == eos_id:
                    done[row] = True
                else:
                    generated[row].append(token)
        if all(done):
            break
        past = returned_cache(out)
        step_embeds = embed(next_tokens)[:, None, :]
        step_positions = step_positions[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], 1)
    return generated


@torch.no_grad()
def score_candidates(
    llm, embed, inputs_embeds, attention_mask, position_ids, candidates: list[list[int]], pad_id: int
) -> torch.Tensor:
    """[B, C] summed log-probability of each candidate token sequence after each prompt.

    The prompt runs once; its KV cache is repeated for the C candidates, so scoring
    61 score candidates costs about one more prompt's worth of tokens, not 61 prompts.
    """
    batch, num_candidates = inputs_embeds.shape[0], len(candidates)
    width = max(map(len, candidates))
    device = inputs_embeds.device
    cand_ids = torch.tensor([c + [pad_id] * (width - len(c)) for c in candidates], device=device)
    cand_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in candidates], device=device)
    out = llm(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    first = out.logits[:, -1].float().log_softmax(-1)[:, cand_ids[:, 0]]  # [B, C]: each candidate's first token
    if width == 1:
        return first
    cache = returned_cache(out)
    cache.batch_repeat_interleave(num_candidates)
    # Tokens 0..width-2 of every candidate after its prompt predict tokens 1..width-1.
    mask = torch.cat([attention_mask.repeat_interleave(num_candidates, 0), cand_mask[:, :-1].repeat(batch, 1)], 1)
    positions = position_ids[:, -1:].repeat_interleave(num_candidates, 0) + 1 + torch.arange(width - 1, device=device)
    logits = llm(
        inputs_embeds=embed(cand_ids[:, :-1]).repeat(batch, 1, 1),
        attention_mask=mask,
        position_ids=positions,
        use_cache=False,
        **{cache_keyword(llm): cache},
    ).logits
    rest = logits.float().log_softmax(-1).gather(-1, cand_ids[:, 1:].repeat(batch, 1)[..., None]).squeeze(-1)
    rest = (rest * cand_mask[:, 1:].repeat(batch, 1)).sum(-1).view(batch, num_candidates)
    return first + rest


def cache_keyword(llm) -> str:
    """The forward argument that takes a KV cache: `cache` in transformers 5 (which deprecates
    `past_key_values` and removes it in 5.40), `past_key_values` before."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned, under either name (reading the old one warns in transformers 5)."""
    return out["cache"] if "cache" in out else out.past_key_values


def weighted_median(scores: torch.Tensor) -> torch.Tensor:
    """Index of the median of the softmax distribution over ordered candidates (minimises expected |error|)."""
    cumulative = scores.float().softmax(-1).cumsum(-1)
    return (cumulative < 0.5).sum(-1).clamp(max=scores.shape[-1] - 1)
