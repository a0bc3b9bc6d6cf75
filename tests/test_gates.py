"""Gating against collapse: the schedule (noise, warm-up), the balance loss and router z-loss, level-1 gating off;
and that the balance loss holds a gate that, without it, collapses onto one expert."""

from __future__ import annotations

import pytest
import torch
from test_fusion import build, inputs, trained_gates

from egmf.model.config import FusionConfig
from egmf.model.gates import ExpertGate, GateSchedule


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


def train_towards_expert_0(balance_coef: float, steps: int = 200) -> float:
    """Train only the gate on a loss that rewards expert 0 (as a task that one expert serves best early on would);
    returns expert 0's final mean weight."""
    model = build(balance_coef=balance_coef, gate_noise=0.0, gate_warmup_ratio=0.0).train()
    optimizer = torch.optim.Adam(model.gate.parameters(), lr=0.01)
    for _ in range(steps):
        out = model(**inputs())
        loss = -out.expert_weights[:, 0].mean() + balance_coef * out.aux_losses["balance"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model(**inputs()).expert_weights[:, 0].mean().item()


def test_the_balance_loss_holds_a_gate_that_would_collapse():
    assert train_towards_expert_0(balance_coef=0.0) > 0.99  # nothing stops the drift onto one expert
    # -P_0 + c·3·Σ P_i² is minimal at P_0 = 1/3 + 1/(9c), the others equal: 0.44 for c = 1
    assert train_towards_expert_0(balance_coef=1.0) == pytest.approx(1 / 3 + 1 / 9, abs=0.05)
