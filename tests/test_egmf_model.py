"""The whole model on a tiny real LLM: prompt layout, pseudo-token injection, loss, LoRA + checkpointing,
decoding (both modes), export/load in standard formats, and clear errors for bad model input."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings

import pytest
import torch

from egmf.data.config import DataConfig
from egmf.data.loader import EvalLoader
from egmf.errors import ConfigError
from egmf.model.config import FusionConfig, LLMConfig, LoraConfig, PromptConfig
from egmf.model.decoding import greedy, score_candidates
from egmf.model.egmf_model import EGMFModel
from egmf.model.llm import ModelPathError, load_tokenizer
from egmf.model.prompt import IGNORE, pack_consecutive

DIMS = {"demo_cls_en": (16, 12), "demo_cls_zh": (12, 20), "demo_reg_en": (16, 12), "demo_reg_zh": (12, 20)}
K = 4


def build_model(
    tiny_llm, checkpointing=False, text_only=False, lora=True, aligned=True, normalised=False, score_read=0.0
) -> EGMFModel:
    torch.manual_seed(0)
    fusion = dict(width=32, heads=4, num_pseudo_tokens=K, global_layers=1, dropout=0.0, score_read_coef=score_read)
    return EGMFModel.build(
        FusionConfig(**fusion, semantic_alignment=aligned, normalised_updates=normalised),
        PromptConfig(text_only=text_only),
        LLMConfig(path=tiny_llm, gradient_checkpointing=checkpointing),
        LoraConfig(enabled=lora, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        DIMS,
        torch.device("cpu"),
    )


def first_batch(demo_root, dataset, batch_size=3):
    return next(iter(EvalLoader(DataConfig(root=demo_root, batch_size=batch_size, num_workers=0), dataset, "valid")))


def test_prompt_layout(tiny_llm, demo_root):
    model = build_model(tiny_llm)
    batch = first_batch(demo_root, "demo_cls_en")
    prompt = model.prompts.build(batch, with_answers=True)
    tok = model.tokenizer
    for row in range(len(batch)):
        real = prompt.attention_mask[row].bool()
        ids = prompt.input_ids[row][real].tolist()
        text = tok.decode(ids)
        assert text.index("Answer with one of: neutral, joy, sadness, anger") < text.index("<signals>")
        assert text.index("</signals>") < text.index(batch.texts[row]) < text.index("Emotion:")
        assert ids[-1] == tok.eos_token_id and ids[0] == tok.bos_token_id
        # K pseudo positions, contiguous, right after the opening marker
        pseudo = prompt.pseudo_mask[row][real].nonzero().flatten().tolist()
        assert len(pseudo) == K and pseudo == list(range(pseudo[0], pseudo[0] + K))
        assert tok.decode(ids[: pseudo[0]]).endswith("<signals>")
        # loss only on the answer and eos
        answer = [t for t in prompt.labels[row].tolist() if t != IGNORE]
        assert tok.decode(answer[:-1]).strip() == batch.labels[row] and answer[-1] == tok.eos_token_id
        assert prompt.labels[row][real].tolist()[-len(answer) :] == answer
        # left padding; positions restart at 0 on the first real token
        assert prompt.position_ids[row][real].tolist() == list(range(int(real.sum())))


def test_pseudo_tokens_are_injected_at_their_positions(tiny_llm, demo_root):
    model = build_model(tiny_llm).eval()
    batch = first_batch(demo_root, "demo_reg_zh")
    prompt, embeds, fused = model.prompt_embeddings(batch, with_answers=True)
    torch.testing.assert_close(embeds[prompt.pseudo_mask].view(len(batch), K, -1), fused.pseudo_tokens)
    plain = model.embed(prompt.input_ids)
    torch.testing.assert_close(embeds[~prompt.pseudo_mask], plain[~prompt.pseudo_mask])


def test_loss_counts_only_answer_tokens(tiny_llm, demo_root):
    model = build_model(tiny_llm).eval()
    batch = first_batch(demo_root, "demo_cls_en", batch_size=1)
    out = model(batch)
    loss = out.task_loss
    cfg = model.fusion.cfg  # what training minimises adds the gate's auxiliary losses, weighted
    expected = loss + cfg.balance_coef * out.aux_losses["balance"] + cfg.z_loss_coef * out.aux_losses["z"]
    torch.testing.assert_close(out.loss, expected)
    prompt, embeds, _ = model.prompt_embeddings(batch, with_answers=True)
    logits = model.llm(
        inputs_embeds=embeds, attention_mask=prompt.attention_mask, position_ids=prompt.position_ids
    ).logits[0]
    answer_positions = (prompt.labels[0] != IGNORE).nonzero().flatten()
    manual = torch.nn.functional.cross_entropy(logits[answer_positions - 1], prompt.labels[0][answer_positions])
    torch.testing.assert_close(loss, manual)


def per_sample_losses(model: EGMFModel, batch, packed: bool) -> tuple[torch.Tensor, int]:
    """(summed answer-token loss of each sample, rows used): samples are told apart by their first real token
    (position 0), in row-major order, so one function reads both layouts."""
    prompt, embeds, _ = model.prompt_embeddings(batch, with_answers=True, packed=packed)
    logits = model.llm(
        inputs_embeds=embeds,
        attention_mask=None if packed else prompt.attention_mask,
        position_ids=prompt.position_ids,
        use_cache=False,
    ).logits
    rows, width = prompt.labels.shape
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), prompt.labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="none"
    )
    starts = (prompt.position_ids == 0) & (prompt.attention_mask == 1)
    sample_of = (starts.flatten().cumsum(0) - 1).view(rows, width)[:, 1:].flatten()
    has_loss = prompt.labels[:, 1:].flatten() != IGNORE
    losses = torch.zeros(len(batch.ids)).index_add_(0, sample_of[has_loss], token_loss[has_loss])
    return losses, rows


def test_sample_losses_are_each_samples_share_of_the_task_loss(tiny_llm, demo_root):
    """Evaluation's per-sample loss: each sample's mean answer-token loss; weighted by answer tokens, the batch's
    task loss."""
    model = build_model(tiny_llm).eval()
    batch = first_batch(demo_root, "demo_reg_zh", batch_size=5)
    losses = torch.tensor(model.sample_losses(batch))
    summed, _ = per_sample_losses(model, batch, packed=False)
    prompt, _, _ = model.prompt_embeddings(batch, with_answers=True)
    answer_tokens = (prompt.labels != IGNORE).sum(1).float()
    torch.testing.assert_close(losses, summed / answer_tokens)
    with torch.no_grad():
        task_loss = model(batch, packed=False).task_loss
    torch.testing.assert_close((losses * answer_tokens).sum() / answer_tokens.sum(), task_loss)
    assert len(set(losses.tolist())) == 5  # one per sample, not the batch's mean repeated


@pytest.mark.parametrize("dataset", ["demo_cls_en", "demo_reg_zh"])
def test_packed_rows_give_each_sample_its_unpacked_loss(tiny_llm, demo_root, dataset):
    """Packing several samples per row (positions restarting, no 2-D mask) must not let samples see each other."""
    model = build_model(tiny_llm).eval()
    batch = first_batch(demo_root, dataset, batch_size=7)
    longest = max(map(len, model.prompts.sample_rows(batch, with_answers=True)[0]))
    model.prompts.cfg.pack_tokens = 3 * longest
    unpacked, rows_unpacked = per_sample_losses(model, batch, packed=False)
    packed, rows_packed = per_sample_losses(model, batch, packed=True)
    assert rows_unpacked == 7 and rows_packed == 3  # 3 + 3 + 1 samples
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5)
    assert (unpacked > 0).all()
    # the model's own loss (mean over answer tokens) is the same either way
    torch.testing.assert_close(model(batch).loss, model(batch, packed=False).loss, rtol=1e-5, atol=1e-6)


def test_packed_layout(tiny_llm, demo_root):
    model = build_model(tiny_llm)
    batch = first_batch(demo_root, "demo_cls_en", batch_size=5)
    rows = model.prompts.sample_rows(batch, with_answers=True)[0]
    prompt = model.prompts.build_packed(batch, max_tokens=len(rows[0]) + len(rows[1]))
    first = prompt.position_ids[0]
    assert first[: len(rows[0])].tolist() == list(range(len(rows[0])))
    assert first[len(rows[0]) : len(rows[0]) + len(rows[1])].tolist() == list(range(len(rows[1])))
    assert int(prompt.pseudo_mask.sum()) == 5 * K and int(prompt.attention_mask.sum()) == sum(map(len, rows))
    assert (prompt.labels[prompt.attention_mask == 0] == IGNORE).all()


def test_the_score_read_reads_each_samples_answer_cue_packed_or_not(tiny_llm, demo_root):
    """fusion.score_read_coef: a squared error of a linear read of the LLM's last hidden state at the position
    that predicts the first answer token, against the score scaled to -1..1; on score batches only."""
    assert build_model(tiny_llm).fusion.score_read is None  # off by default: no extra weights
    model = build_model(tiny_llm, score_read=0.5).eval()
    batch = first_batch(demo_root, "demo_reg_zh", batch_size=7)
    with torch.no_grad():
        out = model(batch, packed=False)
        prompt, embeds, _ = model.prompt_embeddings(batch, with_answers=True)
        hidden = model.llm(
            inputs_embeds=embeds,
            attention_mask=prompt.attention_mask,
            position_ids=prompt.position_ids,
            output_hidden_states=True,
        ).hidden_states[-1]
        answer_length = int((prompt.labels[0] != IGNORE).sum())  # left-padded rows: every answer ends its row
        read = model.fusion.score_read(hidden[:, -answer_length - 1]).squeeze(-1)
        low, high = model.prompts.verbaliser("demo_reg_zh").spec.label_range
        scaled = (torch.tensor(batch.labels) - (low + high) / 2) / ((high - low) / 2)
        torch.testing.assert_close(out.aux_losses["score_read"], (read - scaled).pow(2).mean())
        expected = (
            model.fusion.weighted_aux_loss(out.aux_losses, onto=out.task_loss) + 0.5 * out.aux_losses["score_read"]
        )
        torch.testing.assert_close(out.loss, expected)
        longest = max(map(len, model.prompts.sample_rows(batch, with_answers=True)[0]))
        model.prompts.cfg.pack_tokens = 3 * longest
        torch.testing.assert_close(model(batch).aux_losses["score_read"], out.aux_losses["score_read"])
        assert "score_read" not in model(first_batch(demo_root, "demo_cls_en")).aux_losses
    model.train()
    model.prompts.cfg.pack_tokens = 0
    model(batch).aux_losses["score_read"].backward()
    assert model.fusion.pseudo.queries.grad.abs().sum() > 0 and model.fusion.score_read.weight.grad.abs().sum() > 0


def test_the_score_read_trains_only_on_the_score_sets_it_names(tiny_llm, demo_root):
    """fusion.score_read_datasets: the read's loss on those sets' batches only; the others keep their text loss
    and the gate's auxiliary losses alone."""
    model = build_model(tiny_llm, score_read=0.5)
    model.fusion.cfg.score_read_datasets = ["demo_reg_zh"]
    with torch.no_grad():
        named, other = (model(first_batch(demo_root, name)) for name in ("demo_reg_zh", "demo_reg_en"))
    assert "score_read" in named.aux_losses and "score_read" not in other.aux_losses
    torch.testing.assert_close(other.loss, model.fusion.weighted_aux_loss(other.aux_losses, onto=other.task_loss))


def test_packing_keeps_order_uses_fewest_rows_and_balances_them():
    assert pack_consecutive([5, 4, 3, 9, 2], 10) == [[0, 1], [2], [3], [4]]  # 9 + 3 and 9 + 2 do not fit
    assert pack_consecutive([5, 4, 3, 9, 2], 100) == [[0, 1, 2, 3, 4]]
    # 2 rows are needed; greedy filling would give 9 + 9 | 2 (width 18), balanced is 9 | 9 + 2 (width 11)
    assert pack_consecutive([9, 9, 2], 18) == [[0], [1, 2]]
    assert pack_consecutive([30, 4], 10) == [[0], [1]]  # longer than a row: a row of its own


def test_text_only_ablation_has_no_pseudo_tokens(tiny_llm, demo_root):
    model = build_model(tiny_llm, text_only=True)
    batch = first_batch(demo_root, "demo_cls_en")
    prompt = model.prompts.build(batch, with_answers=True)
    assert model.fusion is None and not prompt.pseudo_mask.any()
    assert "<signals>" not in model.tokenizer.decode(prompt.input_ids[0])
    out = model(batch)
    assert torch.isfinite(out.loss) and out.expert_weights is None


def test_lora_and_fusion_learn_under_gradient_checkpointing(tiny_llm, demo_root):
    model = build_model(tiny_llm, checkpointing=True).train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.llm.modules())
    frozen = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_" not in n}
    lora_b = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_B" in n}
    fusion = {n: p.detach().clone() for n, p in model.fusion.named_parameters()}
    assert all(not p.requires_grad for n, p in model.llm.named_parameters() if "lora_" not in n)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = first_batch(demo_root, "demo_cls_en")
    for _ in range(3):
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    assert lora_b and all(not torch.equal(lora_b[n], p) for n, p in model.llm.named_parameters() if n in lora_b)
    changed = {n for n, p in model.fusion.named_parameters() if not torch.equal(fusion[n], p)}
    other_datasets = {n for n in fusion if "_front.demo_" in n and "demo_cls_en" not in n}
    assert changed == set(fusion) - other_datasets  # every fusion weight this batch reaches
    assert all(torch.equal(frozen[n], p) for n, p in model.llm.named_parameters() if n in frozen)


def test_candidate_scoring_matches_one_forward_per_candidate(tiny_llm, demo_root):
    model = build_model(tiny_llm).eval()
    batch = first_batch(demo_root, "demo_cls_zh", batch_size=2)
    prompt, embeds, _ = model.prompt_embeddings(batch, with_answers=False)
    candidates = model.prompts.candidate_tokens("demo_cls_zh")
    scores = score_candidates(
        model.llm,
        model.embed,
        embeds,
        prompt.attention_mask,
        prompt.position_ids,
        candidates,
        model.tokenizer.pad_token_id,
    )
    for row in range(2):
        real = prompt.attention_mask[row].bool()
        for c, cand in enumerate(candidates):
            seq = torch.cat([embeds[row][real], model.embed(torch.tensor(cand))])[None]
            log_probs = model.llm(inputs_embeds=seq).logits[0].log_softmax(-1)
            start = int(real.sum())
            expected = sum(log_probs[start - 1 + i, t] for i, t in enumerate(cand))
            torch.testing.assert_close(scores[row, c], expected, atol=1e-4, rtol=1e-4)


def test_cached_greedy_matches_recomputing_everything(tiny_llm, demo_root):
    model = build_model(tiny_llm).eval()
    batch = first_batch(demo_root, "demo_reg_en", batch_size=2)
    prompt, embeds, _ = model.prompt_embeddings(batch, with_answers=False)
    fast = greedy(
        model.llm,
        model.embed,
        embeds,
        prompt.attention_mask,
        prompt.position_ids,
        model.tokenizer.eos_token_id,
        max_new_tokens=5,
    )
    for row in range(2):
        real = prompt.attention_mask[row].bool()
        seq, slow = embeds[row][real][None], []
        for _ in range(5):
            token = int(model.llm(inputs_embeds=seq).logits[0, -1].argmax())
            if token == model.tokenizer.eos_token_id:
                break
            slow.append(token)
            seq = torch.cat([seq, model.embed(torch.tensor([[token]]))], 1)
        assert fast[row] == slow


@pytest.mark.parametrize("dataset", ["demo_cls_en", "demo_reg_zh", "demo_reg_en"])
def test_constrained_answers_are_always_valid_and_generate_counts_failures(tiny_llm, demo_root, dataset):
    model = build_model(tiny_llm).eval()
    batch = first_batch(demo_root, dataset, batch_size=4)
    verbaliser = model.prompts.verbaliser(dataset)
    constrained = model.predict(batch, "constrained")
    assert constrained.num_unparseable == 0
    assert all(answer in verbaliser.candidates() for answer in constrained.answers)
    assert [verbaliser.parse(a) for a in constrained.answers] == constrained.labels

    generated = model.predict(batch, "generate")  # an untrained model babbles
    assert generated.num_unparseable == sum(label is None for label in generated.labels)
    assert all(
        label is None or verbaliser.parse(a) == label
        for a, label in zip(generated.answers, generated.labels, strict=True)
    )


def test_weighted_median_picks_the_middle_of_the_mass():
    from egmf.model.decoding import weighted_median

    probs = torch.tensor([[0.1, 0.2, 0.15, 0.05, 0.5], [0.6, 0.1, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0, 1.0]])
    assert weighted_median(probs.clamp(min=1e-9).log()).tolist() == [3, 0, 4]


def test_export_loads_with_plain_peft_and_back_into_the_model(tiny_llm, demo_root, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = build_model(tiny_llm).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = first_batch(demo_root, "demo_cls_en")
    for _ in range(2):
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    model.eval()
    model.export(str(tmp_path / "export"))
    assert sorted(os.listdir(tmp_path / "export")) == ["adapter", "fusion.json", "fusion.safetensors"]
    assert json.loads((tmp_path / "export" / "fusion.json").read_text())["config"]["num_pseudo_tokens"] == K

    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llm), str(tmp_path / "export" / "adapter")
    )
    ids = torch.tensor([[1, 50, 60, 70]])
    torch.testing.assert_close(plain(input_ids=ids).logits, model.llm(input_ids=ids).logits)

    fresh = build_model(tiny_llm).eval()
    fresh.load_exported(str(tmp_path / "export"))
    torch.testing.assert_close(fresh(batch).loss, model(batch).loss)


def test_bad_model_inputs_fail_before_training(tiny_llm, tmp_path):
    with pytest.raises(ModelPathError, match="is not a directory"):
        load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(ModelPathError, match="has no config.json"):
        load_tokenizer(str(tmp_path))
    no_pad = str(tmp_path / "no-pad")
    shutil.copytree(tiny_llm, no_pad)
    config_path = os.path.join(no_pad, "tokenizer_config.json")
    config = json.load(open(config_path))
    del config["pad_token"]
    json.dump(config, open(config_path, "w"))
    with pytest.raises(ModelPathError, match="has no pad token; set llm.pad_token"):
        load_tokenizer(no_pad)
    assert load_tokenizer(no_pad, pad_token="<unk>").pad_token_id == 0  # the recipe's way out
    with pytest.raises(ValueError, match=r"target_modules \['c_attn'\] match no layer"):
        EGMFModel.build(
            FusionConfig(width=32, heads=4),
            PromptConfig(),
            LLMConfig(path=tiny_llm),
            LoraConfig(target_modules=["c_attn"]),
            DIMS,
            torch.device("cpu"),
        )
    with pytest.raises(ValueError, match=r"lacks \{text\}"):
        EGMFModel.build(
            FusionConfig(width=32, heads=4),
            PromptConfig(templates={"demo_cls_en": "{signals} {labels}"}),
            LLMConfig(path=tiny_llm),
            LoraConfig(),
            DIMS,
            torch.device("cpu"),
        )


def test_without_lora_only_the_fusion_module_trains(tiny_llm, demo_root, tmp_path):
    """The ablation lora.enabled = false (MSE-Adapter's frozen LLM): no adapter, gradients reach the fusion module
    only, and its export and reload work without one."""
    model = build_model(tiny_llm, lora=False)
    assert not model.has_lora
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("fusion.") for name in trainable)
    model.train()
    model(first_batch(demo_root, "demo_cls_en")).loss.backward()
    assert all(p.grad is None for p in model.llm.parameters())
    model.export(str(tmp_path))
    assert not os.path.exists(tmp_path / "adapter") and os.path.exists(tmp_path / "fusion.safetensors")
    fresh = build_model(tiny_llm, lora=False)
    fresh.load_exported(str(tmp_path))
    for (name, a), b in zip(model.fusion.state_dict().items(), fresh.fusion.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_fusion_weights_of_another_config_say_which_field_to_set(tiny_llm, tmp_path):
    """A model saved without the semantic expert's aligned path (the ablation, or a model from before it existed)
    does not load into one built with it: the error names the field and the value that fits."""
    build_model(tiny_llm, aligned=False).export(str(tmp_path))
    with pytest.raises(ConfigError, match="fusion.semantic_alignment = false") as error:
        build_model(tiny_llm).load_exported(str(tmp_path))
    assert "fusion.safetensors" in str(error.value) and "experts.semantic.align" in str(error.value)
    build_model(tiny_llm, aligned=False).load_exported(str(tmp_path))  # the fitting config loads
    build_model(tiny_llm, normalised=True).export(str(tmp_path))  # both fields differ: both are named
    with pytest.raises(ConfigError, match="fusion.normalised_updates = true") as error:
        build_model(tiny_llm, aligned=False).load_exported(str(tmp_path))
    assert "fusion.semantic_alignment = true" in str(error.value)
    build_model(tiny_llm, score_read=1.0).export(str(tmp_path))
    with pytest.raises(ConfigError, match="fusion.score_read_coef > 0"):
        build_model(tiny_llm).load_exported(str(tmp_path))


def test_our_calls_raise_no_deprecation_warnings(tiny_llm, demo_root, caplog):
    """Training steps (with gradient checkpointing) and both decoding modes warn of nothing our code could change:
    a deprecated argument or attribute of transformers, peft or torch would fail here before its removal breaks
    a fresh install. Deprecations raised inside those libraries by their own code are not ours, and named."""
    model = build_model(tiny_llm, checkpointing=True)
    batch = first_batch(demo_root, "demo_reg_zh")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model.train()
        model(batch).loss.backward()
        model.eval()
        for mode in ("generate", "constrained"):
            model.predict(batch, mode, max_new_tokens=4)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    deprecations = [m for m in messages if "deprecat" in m.lower() and not any(t in m for t in THEIRS)]
    assert deprecations == []


THEIRS = ("is_gradient_checkpointing",)
"""Deprecations raised by peft's own code (peft calls transformers' is_gradient_checkpointing), not by our calls."""
