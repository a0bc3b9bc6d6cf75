"""Gating against collapse: the schedule (noise, warm-up), the balance loss and router z-loss, level-1 gating off;
that the balance loss holds a gate that, without it, collapses onto one expert; and that, balanced over the mix,
each dataset keeps the expert it needs."""

from __future__ import annotations

import pytest
import torch
from test_fusion import DIMS, LLM_HIDDEN, build, inputs, trained_gates

from egmf.errors import ConfigError
from egmf.model.config import FusionConfig
from egmf.model.egmf_model import check_fusion_weights
from egmf.model.fusion import FusionModule
from egmf.model.gates import ROUTERS, ExpertGate, GateSchedule, saved_router


def test_schedule_anneals_noise_and_warms_up():
    cfg = FusionConfig(gate_noise=2.0, gate_noise_ratio=0.5, gate_warmup_ratio=0.1)
    schedule = GateSchedule()
    for progress, noise, mix in ((0.0, 2.0, 0.0), (0.05, 1.8, 0.5), (0.25, 1.0, 1.0), (0.5, 0.0, 1.0), (0.9, 0, 1)):
        schedule.update(cfg, progress)
        assert schedule.noise_std == pytest.approx(noise) and schedule.mix == pytest.approx(mix), progress
    schedule.update(FusionConfig(gate_noise=0.0, gate_warmup_ratio=0.0), 0.0)
    assert schedule.noise_std == 0.0 and schedule.mix == 1.0


def test_warm_up_starts_from_the_uniform_gate_and_noise_only_in_training():
    model = trained_gates(build(gate_noise=1.0, gate_noise_ratio=0.5, gate_warmup_ratio=0.1, dropout=0.0)).train()
    model.set_training_progress(0.0)  # warm-up: λ = 0, the gates are the uniform ones whatever their weights
    out = model(**inputs())
    torch.testing.assert_close(out.expert_weights, torch.full((2, 3), 1 / 3))
    for gates in out.inner_gates.values():
        torch.testing.assert_close(gates, torch.full((2, 3), 0.5))
    model.set_training_progress(0.2)  # past the warm-up, inside the noise: two passes differ
    assert not torch.allclose(model(**inputs()).expert_weights, model(**inputs()).expert_weights)
    model.eval()  # evaluation: no noise, no mixing
    torch.testing.assert_close(model(**inputs()).expert_weights, model(**inputs()).expert_weights)
    model.train().set_training_progress(0.6)  # noise annealed to zero
    torch.testing.assert_close(model(**inputs()).expert_weights, model(**inputs()).expert_weights)


def test_balance_and_z_losses_are_float32_and_what_they_say():
    gate = ExpertGate(8, 3, dynamic=True, schedule=GateSchedule())
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=torch.bfloat16)
    weights = torch.softmax(logits.float(), -1).to(torch.bfloat16)
    losses = gate.aux_losses(weights, logits.float())
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in losses.values())
    mean = weights.float().mean(0)
    assert losses["balance"].item() == pytest.approx(3 * mean.pow(2).sum().item())
    torch.testing.assert_close(losses["z"], torch.logsumexp(logits.float(), -1).pow(2).mean())
    uniform, one_expert = torch.full((4, 3), 1 / 3), torch.tensor([[1.0, 0.0, 0.0]] * 4)
    assert gate.aux_losses(uniform, logits.float())["balance"].item() == pytest.approx(1.0)  # its minimum
    assert gate.aux_losses(one_expert, logits.float())["balance"].item() == pytest.approx(3.0)  # its maximum
    fixed = ExpertGate(8, 3, dynamic=False, schedule=GateSchedule())
    assert all(v.item() == 0 for v in fixed.aux_losses(weights, None).values())


def test_balance_gradient_moves_weight_off_the_most_used_expert():
    gate = ExpertGate(8, 3, dynamic=True, schedule=GateSchedule())
    logits = torch.tensor([[1.0, 0.0, 0.0]] * 4, requires_grad=True)
    gate.aux_losses(torch.softmax(logits, -1), logits)["balance"].backward()
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1:] < 0).all()  # descent lowers expert 0's logit


def test_level_1_gating_can_be_switched_off():
    model = build(inner_gating=False)
    out = model(**inputs())
    for gates in out.inner_gates.values():
        torch.testing.assert_close(gates, torch.ones(2, 3))
    assert not any("gates." in name or name.startswith("experts.global.gate") for name, _ in model.named_parameters())


def train_gate(
    model: FusionModule, rewarded: dict[str, int], balance_coef: float, steps: int = 300, z_coef: float = 0.0
) -> dict:
    """Train only the gate, batches alternating over the datasets of `rewarded`, on a loss that rewards each
    dataset's expert (as a task that one expert serves best would), as the trainer does: the balance loss in the
    loss, each batch's mean gate recorded after it. Returns each dataset's final mean gate."""
    optimizer = torch.optim.Adam(model.gate.parameters(), lr=0.01)
    model.train()
    for step in range(steps):
        dataset = list(rewarded)[step % len(rewarded)]
        out = model(**inputs(dataset=dataset))
        loss = -out.expert_weights[:, rewarded[dataset]].mean() + balance_coef * out.aux_losses["balance"]
        loss = loss + z_coef * out.aux_losses["z"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.record_gate_usage(dataset, out.expert_weights.detach().float().mean(0))
    return {d: model(**inputs(dataset=d)).expert_weights.mean(0).tolist() for d in rewarded}


def gate_only(balance_coef: float, datasets=DIMS, router: str = "mlp") -> FusionModule:
    torch.manual_seed(0)
    cfg = FusionConfig(
        width=32,
        heads=4,
        num_pseudo_tokens=4,
        global_layers=1,
        balance_coef=balance_coef,
        gate_noise=0.0,
        gate_warmup_ratio=0.0,
        gate_router=router,
    )
    return FusionModule(cfg, {d: DIMS[d] for d in datasets}, llm_hidden=LLM_HIDDEN, llm_embed_rms=0.05)


def test_the_balance_loss_holds_a_gate_that_would_collapse():
    one = ["demo_cls_en"]
    assert train_gate(gate_only(0.0, one), {"demo_cls_en": 0}, 0.0)["demo_cls_en"][0] > 0.99  # nothing stops it
    # with one dataset M = P: -P_0 + c·3·Σ P_i² is minimal at P_0 = 1/3 + 1/(9c), the others equal: 0.44 at c = 1
    held = train_gate(gate_only(1.0, one), {"demo_cls_en": 0}, 1.0)["demo_cls_en"][0]
    assert held == pytest.approx(1 / 3 + 1 / 9, abs=0.05)


def test_the_z_loss_sees_a_saturated_gate_and_holds_it():
    """The gate's logits are centred, so a saturated softmax cannot hide from the z-loss behind logsumexp = 0
    (uncentred [0, -20, -20]); alone, the z-loss keeps the gate off saturation."""
    model = gate_only(0.0, ["demo_cls_en"])
    with torch.no_grad():
        model.gate.score[-1].bias.copy_(torch.tensor([0.0, -20.0, -20.0]))
    out = model.train()(**inputs(dataset="demo_cls_en"))
    assert out.expert_weights[:, 0].min() > 0.999
    assert out.aux_losses["z"].item() > 100  # centred: [13.3, -6.7, -6.7], logsumexp 13.3
    held = train_gate(gate_only(0.0, ["demo_cls_en"]), {"demo_cls_en": 0}, 0.0, z_coef=0.05)["demo_cls_en"][0]
    assert 0.5 < held < 0.95


def test_balance_over_the_mix_leaves_each_dataset_its_expert():
    """Two datasets that each need their own expert: balanced over the mix, each still takes its expert (a batch's
    own balance would have held both near 0.44), and the expert neither uses is kept alive."""
    rewarded = {"demo_cls_en": 0, "demo_reg_zh": 1}
    free = train_gate(gate_only(0.0), rewarded, 0.0)
    balanced = train_gate(gate_only(1.0), rewarded, 1.0)
    assert balanced["demo_cls_en"][0] > 0.85 and balanced["demo_reg_zh"][1] > 0.8
    assert free["demo_cls_en"][2] + free["demo_reg_zh"][2] < 1e-3  # unused: dead
    assert balanced["demo_cls_en"][2] + balanced["demo_reg_zh"][2] > 0.05  # unused, but kept in play


def test_usage_is_a_moving_average_per_dataset_that_ignores_non_finite_batches():
    model = gate_only(0.01)
    model.gate.usage_momentum = 0.75
    model.record_gate_usage("demo_reg_zh", torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(model.gate.usage[1], torch.tensor([0.5, 0.25, 0.25]))
    torch.testing.assert_close(model.gate.usage[0], torch.full((3,), 1 / 3))
    model.record_gate_usage("demo_reg_zh", torch.tensor([float("nan"), 1.0, 0.0]))
    torch.testing.assert_close(model.gate.usage[1], torch.tensor([0.5, 0.25, 0.25]))
    assert "gate.usage" in model.state_dict()  # checkpoints and exports keep it


@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_starts_uniform_learns_and_is_read_back_from_its_weights(router):
    model = gate_only(0.0, ["demo_cls_en"], router=router)
    torch.testing.assert_close(model.eval()(**inputs()).expert_weights, torch.full((2, 3), 1 / 3))
    assert saved_router(model.state_dict()) == router
    assert train_gate(model, {"demo_cls_en": 1}, 0.0, steps=100)["demo_cls_en"][1] > 0.9


def test_a_saved_gate_of_another_router_names_the_router_to_set():
    saved = gate_only(0.0, router="norm_mlp").state_dict()
    expected = gate_only(0.0).state_dict().keys()
    with pytest.raises(ConfigError, match="set fusion.gate_router = 'norm_mlp'"):
        check_fusion_weights("m/fusion.safetensors", saved, expected)
    check_fusion_weights("m/fusion.safetensors", saved, gate_only(0.0, router="norm_mlp").state_dict().keys())
    problems = FusionConfig(gate_router="deep").problems()
    assert any("fusion.gate_router 'deep' is not one of mlp, norm_mlp, linear" in p for p in problems)
