"""Fusion module: padding invariance, each expert's reach, both gate levels, pseudo tokens, ablations, errors."""

from __future__ import annotations

import pytest
import torch

from egmf.errors import ConfigError
from egmf.model.attention import masked_attention, resolve_backend
from egmf.model.config import FusionConfig
from egmf.model.experts import GlobalExpert, LocalExpert, SemanticExpert, aligned_frames, masked_mean
from egmf.model.fusion import FusionModule, check_feature_dims, unit_rms

DIMS = {"demo_cls_en": (16, 12), "demo_reg_zh": (12, 20)}
LLM_HIDDEN = 48


def build(**overrides) -> FusionModule:
    torch.manual_seed(0)
    cfg = FusionConfig(width=32, heads=4, num_pseudo_tokens=4, global_layers=1, **overrides)
    return FusionModule(cfg, DIMS, llm_hidden=LLM_HIDDEN, llm_embed_rms=0.05).eval()


def inputs(lengths=((5, 15, 6), (3, 9, 4)), dataset="demo_cls_en", seed=0, pad_value=None):
    """Padded inputs for samples with (text, audio, vision) lengths; padding filled with pad_value or zeros."""
    audio_dim, vision_dim = DIMS[dataset]
    widths = [max(sample[m] for sample in lengths) for m in range(3)]
    dims = (LLM_HIDDEN, audio_dim, vision_dim)
    tensors, masks = [], []
    for m in range(3):
        values = torch.zeros(len(lengths), widths[m], dims[m])
        mask = torch.zeros(len(lengths), widths[m], dtype=torch.bool)
        for b, sample in enumerate(lengths):
            gen = torch.Generator().manual_seed(1000 * seed + 10 * b + m)  # a sample's values don't depend on the batch
            values[b, : sample[m]] = torch.randn(sample[m], dims[m], generator=gen)
            mask[b, : sample[m]] = True
            if pad_value is not None:
                values[b, sample[m] :] = pad_value
        tensors.append(values)
        masks.append(mask)
    text, audio, vision = tensors
    return dict(
        dataset=dataset,
        audio=audio.half(),
        audio_mask=masks[1],
        vision=vision.half(),
        vision_mask=masks[2],
        text_embeds=text,
        text_mask=masks[0],
    )


def test_shapes_and_gate_sums():
    out = build()(**inputs())
    assert out.pseudo_tokens.shape == (2, 4, LLM_HIDDEN)
    assert out.expert_weights.shape == (2, 3)
    torch.testing.assert_close(out.expert_weights.sum(-1), torch.ones(2))
    for gates in out.inner_gates.values():
        assert gates.shape == (2, 3) and ((gates > 0) & (gates < 1)).all()


@pytest.mark.parametrize("aligned,normalised", [(False, False), (True, False), (True, True)])
def test_padding_values_never_change_a_result(aligned, normalised):
    model = build(semantic_alignment=aligned, normalised_updates=normalised)
    clean = model(**inputs(pad_value=None))
    noisy = model(**inputs(pad_value=1e3))
    torch.testing.assert_close(clean.pseudo_tokens, noisy.pseudo_tokens, rtol=0, atol=1e-5)
    torch.testing.assert_close(clean.expert_weights, noisy.expert_weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize("aligned,normalised", [(False, False), (True, False), (True, True)])
def test_a_sample_gives_the_same_output_alone_or_batched(aligned, normalised):
    model = build(semantic_alignment=aligned, normalised_updates=normalised)
    together = model(**inputs(lengths=((5, 15, 6), (3, 9, 4))))
    alone = model(**inputs(lengths=((5, 15, 6),)))
    torch.testing.assert_close(together.pseudo_tokens[0], alone.pseudo_tokens[0], rtol=0, atol=1e-5)


def trained_gates(model: FusionModule) -> FusionModule:
    """The gates' last layers start at zero (uniform gates); give them the weights training would."""
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "gate" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model


def test_the_level_2_gate_starts_uniform():
    out = build()(**inputs())
    torch.testing.assert_close(out.expert_weights, torch.full((2, 3), 1 / 3))


def test_gates_respond_to_the_input():
    model = trained_gates(build())
    a, b = model(**inputs(seed=0)), model(**inputs(seed=1))
    assert not torch.allclose(a.expert_weights, b.expert_weights)
    assert not torch.allclose(a.inner_gates["local"], b.inner_gates["local"])


def test_uniform_gating_and_expert_ablations():
    out = build(gating="uniform")(**inputs())
    torch.testing.assert_close(out.expert_weights, torch.full((2, 3), 1 / 3))
    only_global = build(experts=["global"])(**inputs())
    assert only_global.expert_weights.shape == (2, 1) and set(only_global.inner_gates) == {"global"}
    torch.testing.assert_close(only_global.expert_weights, torch.ones(2, 1))
    assert not torch.allclose(only_global.pseudo_tokens, build()(**inputs()).pseudo_tokens)


@pytest.mark.parametrize("normalised", [False, True])
def test_with_normalised_updates_an_expert_cannot_outweigh_the_others_by_growing(normalised):
    """The local expert's update made 10 times larger: with normalised updates the fused sequence (and so the
    pseudo tokens) stay the same under a fixed gate, only the gate can give an expert more say; without, they move."""
    model = build(gating="uniform", normalised_updates=normalised)
    before = model(**inputs()).pseudo_tokens
    with torch.no_grad():
        for mlp in model.experts["local"].mlps:  # each modality's MLP output layer: the update is linear in it
            mlp[-1].weight.mul_(10)
            mlp[-1].bias.mul_(10)
    after = model(**inputs()).pseudo_tokens
    assert torch.allclose(before, after, atol=1e-5) == normalised


def test_unit_rms_scales_each_sample_over_its_real_positions():
    update = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([3.0, 0.1])[:, None, None]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    update = update * mask[..., None]
    scaled = unit_rms(update, mask)
    mean_square = masked_mean(scaled.pow(2).mean(-1, keepdim=True), mask)
    torch.testing.assert_close(mean_square, torch.ones(2, 1), atol=1e-3, rtol=0)
    assert (scaled[0, 3:] == 0).all()  # padding stays zero
    ratio = scaled[mask] / update[mask]  # [8 real positions, 4]: one factor per sample, so where it acts is kept
    assert torch.allclose(ratio[:3], ratio[0, 0]) and torch.allclose(ratio[3:], ratio[3, 0])
    assert ratio[0, 0] < 1 < ratio[3, 0]


@pytest.mark.parametrize("normalised", [False, True])
def test_pseudo_tokens_are_distinct_and_scaled_like_llm_embeddings(normalised):
    tokens = build(normalised_tokens=normalised)(**inputs()).pseudo_tokens  # [B, K, H]
    unit = torch.nn.functional.normalize(tokens[0], dim=-1)
    assert (unit @ unit.T - torch.eye(4)).abs().max() < 0.99
    rms = tokens.pow(2).mean(-1).sqrt()  # [B, K]; the LLM's embeddings have RMS 0.05 here
    if normalised:  # every token rescaled to that RMS
        torch.testing.assert_close(rms, torch.full((2, 4), 0.05), rtol=1e-3, atol=1e-4)
    else:  # they start near it, and their magnitudes differ: a token's size carries what it read
        assert ((rms > 0.025) & (rms < 0.1)).all() and rms.std() > 0.001, rms


def test_free_pseudo_tokens_grow_with_their_projection_and_normalised_ones_do_not():
    """Scaling the projection's weights (what training may do) scales free tokens but not normalised ones."""
    for normalised, expected in ((False, 2.0), (True, 1.0)):
        model = build(normalised_tokens=normalised)
        before = model(**inputs()).pseudo_tokens.pow(2).mean().sqrt()
        with torch.no_grad():
            model.pseudo.out[1].weight.mul_(2.0)
        after = model(**inputs()).pseudo_tokens.pow(2).mean().sqrt()
        torch.testing.assert_close(after / before, torch.tensor(expected), rtol=1e-3, atol=1e-4)


def test_every_parameter_gets_a_gradient():
    model = build().train()
    out = model(**inputs())
    (out.pseudo_tokens.pow(2).sum() + out.expert_weights[:, 0].sum()).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None and "demo_reg_zh" not in n]
    assert unused == []


def expert_inputs(lengths=(6, 10, 4), width=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(1, n, width, generator=gen) for n in lengths]
    masks = [torch.ones(1, n, dtype=torch.bool) for n in lengths]
    return xs, masks, torch.randn(1, width, generator=gen)


def changed_positions(before, after) -> list[list[int]]:
    return [((b - a).abs().amax(-1)[0] > 1e-6).nonzero().flatten().tolist() for b, a in zip(before, after, strict=True)]


def test_local_expert_sees_only_nearby_frames_of_its_own_modality():
    torch.manual_seed(0)
    expert = LocalExpert(32, kernel=5, dropout=0.0).eval()
    xs, masks, context = expert_inputs()
    before, _ = expert(xs, masks, context)
    xs[1] = xs[1].clone()
    xs[1][0, 5] += torch.randn(32)  # one audio frame
    after, _ = expert(xs, masks, context)
    changed = changed_positions(before, after)
    assert changed[0] == [] and changed[2] == []  # other modalities untouched
    assert changed[1] == [3, 4, 5, 6, 7]  # kernel 5: frames 5 +- 2


def test_semantic_expert_links_modalities():
    torch.manual_seed(0)
    expert = SemanticExpert(32, heads=4, dropout=0.0, backend="sdpa").eval()
    xs, masks, context = expert_inputs()
    before, _ = expert(xs, masks, context)
    xs[2] = xs[2] + torch.randn_like(xs[2])  # change vision only (not by a constant: LayerNorm would remove it)
    after, _ = expert(xs, masks, context)
    changed = changed_positions(before, after)
    assert changed[0] == list(range(6)) and changed[1] == list(range(10))  # text and audio attend to vision


def test_aligned_frames_are_the_other_modalitys_frames_at_the_same_relative_time():
    y = torch.arange(1.0, 5.0)[None, :, None].expand(2, 4, 1)  # frame i holds i + 1
    y_mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    x_mask = torch.tensor([[True] * 7 + [False], [True, True] + [False] * 6])
    found = aligned_frames(y, y_mask, x_mask)[..., 0]
    # 7 frames against 3 on one clock (0 to 1): 0, 1/6, ..., 1 -> nearest of 0, 1/2, 1; padding stays zero
    assert found[0].tolist() == [1, 1, 2, 2, 2, 3, 3, 0]
    assert found[1].tolist() == [1, 1] + [0] * 6  # y's one frame is at every time; x's padding stays zero
    assert aligned_frames(y, torch.zeros_like(y_mask), x_mask).abs().max() == 0  # y without frames: nothing found


@pytest.mark.parametrize("scope", ["modality", "joint"])
def test_global_expert_reaches_across_a_whole_modality_or_the_whole_sample(scope):
    torch.manual_seed(0)
    expert = GlobalExpert(32, heads=4, layers=1, dropout=0.0, backend="sdpa", scope=scope).eval()
    xs, masks, context = expert_inputs()
    before, _ = expert(xs, masks, context)
    xs[2] = xs[2].clone()
    xs[2][0, -1] += torch.randn(32)  # the last vision frame
    after, _ = expert(xs, masks, context)
    changed = changed_positions(before, after)
    assert changed[2] == list(range(4))  # every vision frame, however far
    if scope == "modality":  # the other modalities are the semantic expert's to relate
        assert changed[0] == [] and changed[1] == []
    else:
        assert changed[0] == list(range(6)) and changed[1] == list(range(10))


def test_global_expert_handles_a_modality_without_frames():
    """Within each modality, the context token gives an empty modality's attention a key: no NaN, and the empty
    frames stay zero."""
    expert = GlobalExpert(32, heads=4, layers=1, dropout=0.0, backend="sdpa", scope="modality").eval()
    xs, masks, context = expert_inputs()
    masks[2] = torch.zeros_like(masks[2])
    xs[2] = torch.zeros_like(xs[2])
    out, gates = expert(xs, masks, context)
    assert all(torch.isfinite(o).all() for o in out) and torch.isfinite(gates).all()
    assert out[2].abs().max() == 0


def test_masked_sdpa_matches_a_plain_reference():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 2, 8, generator=gen) for _ in range(3))
    q_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    k_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    out = masked_attention(q, k, v, q_mask, k_mask, "sdpa")
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5
    scores = scores.masked_fill(~k_mask[:, None, None, :], float("-inf"))
    reference = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v) * q_mask[..., None, None]
    torch.testing.assert_close(out, reference)


def test_bad_inputs_and_config_fail_clearly():
    model = build()
    bad = inputs()
    bad["audio"] = torch.zeros(2, 15, 17).half()
    with pytest.raises(ValueError, match="audio 17 / vision 12, the model expects 16 / 12"):
        model(**bad)
    with pytest.raises(ValueError, match="no front end for dataset 'mosei'"):
        model(**{**inputs(), "dataset": "mosei"})
    problems = FusionConfig(
        width=30, heads=4, experts=["local", "nope"], gating="max", local_kernel=4, global_scope="all"
    ).problems()
    assert len(problems) == 5 and any("fusion.global_scope 'all' is not one of modality, joint" in p for p in problems)
    with pytest.raises(ValueError, match="invalid fusion config"):
        FusionModule(FusionConfig(heads=3), DIMS, LLM_HIDDEN, 0.05)


def test_forcing_flash_without_it_says_how_to_get_it():
    with pytest.raises((ImportError, ValueError), match=r"pip install \.\[gpu\]|needs CUDA tensors"):
        resolve_backend("flash", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"


def flash_ready() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not flash_ready(), reason="needs a CUDA GPU and the flash-attn package (pip install .[gpu])")
def test_flash_matches_sdpa_in_bf16_outputs_and_gradients():
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (3, 37, 4, 64)
    q, k, v = (
        torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True) for _ in range(3)
    )
    lengths_q, lengths_k = torch.tensor([37, 20, 1], device="cuda"), torch.tensor([5, 37, 30], device="cuda")
    q_mask = torch.arange(37, device="cuda")[None] < lengths_q[:, None]
    k_mask = torch.arange(37, device="cuda")[None] < lengths_k[:, None]
    results = {}
    for backend in ("flash", "sdpa"):
        out = masked_attention(q, k, v, q_mask, k_mask, backend)
        grads = torch.autograd.grad(out.float().pow(2).sum(), (q, k, v))
        results[backend] = (out, grads)
    torch.testing.assert_close(results["flash"][0], results["sdpa"][0], atol=2e-2, rtol=2e-2)
    for g_flash, g_sdpa in zip(results["flash"][1], results["sdpa"][1], strict=True):
        torch.testing.assert_close(g_flash, g_sdpa, atol=5e-2, rtol=5e-2)


def test_feature_dims_are_checked_against_the_manifests_before_training(demo_root):
    from egmf.shards.manifest import load_manifest

    manifests = [load_manifest(demo_root, name, "train") for name in ("demo_cls_en", "demo_reg_zh", "demo_cls_zh")]
    check_feature_dims({"demo_cls_en": (16, 12), "demo_reg_zh": (12, 20), "demo_cls_zh": (12, 20)}, manifests)
    with pytest.raises(
        ValueError,
        match=r"demo_reg_zh/train: shards have audio 12 / vision 20, the model expects "
        r"12 / 21.*demo_cls_zh/train: the model has no front end",
    ):
        check_feature_dims({"demo_cls_en": (16, 12), "demo_reg_zh": (12, 21)}, manifests)


def test_a_shared_front_end_serves_a_second_dataset_exactly_like_its_own():
    """fusion.shared_front_ends: a dataset featurised like a known one takes its front ends (no new weights) and
    gets the very output the known one gets; other feature dims are refused."""
    shared = build(shared_front_ends={"my_clips": "demo_cls_en"})
    assert sorted(shared.audio_front) == sorted(DIMS) and shared.feature_dims["my_clips"] == DIMS["demo_cls_en"]
    own, borrowed = shared(**inputs()), shared(**{**inputs(), "dataset": "my_clips"})
    torch.testing.assert_close(borrowed.pseudo_tokens, own.pseudo_tokens)
    with pytest.raises(ConfigError, match="my_clips: its features have dims"):
        cfg = FusionConfig(width=32, heads=4, shared_front_ends={"my_clips": "demo_cls_en"})
        FusionModule(cfg, {**DIMS, "my_clips": (5, 12)}, llm_hidden=LLM_HIDDEN, llm_embed_rms=0.05)
    with pytest.raises(ConfigError, match="'meld' is not a dataset with its own front ends"):
        build(shared_front_ends={"my_clips": "meld"})
