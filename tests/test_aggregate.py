"""The round's pure steps on plain tensors: pack, sum, unpack, average; DP as a wrapper; per-client state."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fedlm.federation.aggregate import Contribution, FedAvg, divergence, fedavg, pack, payload_layout, unpack
from fedlm.federation.checks import CollapsedClientsError, NonFiniteClientError, check_all_finite, check_not_collapsed
from fedlm.federation.clients import ClientStates
from fedlm.federation.privacy import ClientPrivacy, DPConfig, PrivateAggregation
from fedlm.federation.telemetry import RoundReport, client_losses, log_line, metrics

CLIENTS, SIZE = 3, 5


def vectors() -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {client: torch.randn(SIZE, generator=generator) for client in range(CLIENTS)}


def contribution(rule, client: int, vector: torch.Tensor, weight: float, global_shared: torch.Tensor) -> Contribution:
    summand, weight, count = rule.summand(client, vector, weight, global_shared, 0)
    return Contribution(client, steps=2, loss=0.5 * (client + 1), summand=summand, weight=weight, count=count)


def test_fedavg_over_packed_sums_is_the_weighted_mean_wherever_the_clients_are_hosted() -> None:
    weights, global_shared = {0: 10.0, 1: 30.0, 2: 60.0}, torch.zeros(SIZE)
    rule = FedAvg()
    each = [contribution(rule, k, v, weights[k], global_shared) for k, v in vectors().items()]
    together = pack(each, {k: int(w) for k, w in weights.items()}, SIZE, CLIENTS)
    # three "ranks", one client each: their payloads add up to the same totals (the all-reduce is a sum)
    apart = sum(pack([c], {c.client: int(weights[c.client])}, SIZE, CLIENTS) for c in each)
    torch.testing.assert_close(apart, together, rtol=0, atol=1e-12)
    totals = unpack(together, SIZE, CLIENTS)
    expected = sum(weights[k] * v.double() for k, v in vectors().items()) / sum(weights.values())
    torch.testing.assert_close(fedavg(totals), expected, rtol=0, atol=1e-12)
    assert totals.weight == 100.0 and totals.failed == [] and totals.count == 0.0
    assert totals.steps.tolist() == [2, 2, 2] and totals.samples.tolist() == [10, 30, 60]
    assert client_losses(totals.loss, totals.steps, None, CLIENTS).tolist() == [0.25, 0.5, 0.75]


def test_the_layout_holds_every_slot_once_and_a_failed_client_sends_no_vector() -> None:
    layout = payload_layout(SIZE, CLIENTS)
    covered = sorted(i for where in layout.values() for i in range(where.start, where.stop))
    assert covered == list(range(layout["failed"].stop))
    payload = pack([Contribution(1, steps=3, failed=True)], {}, SIZE, CLIENTS)
    totals = unpack(payload, SIZE, CLIENTS)
    assert totals.failed == [1] and not totals.sum.any() and totals.weight == 0 and not totals.loss.any()
    with pytest.raises(NonFiniteClientError, match=r"round 4: client\(s\) \[1\]"):
        check_all_finite(totals.failed, 3)


def test_private_aggregation_clips_each_update_and_keeps_the_losses_home() -> None:
    clip = 0.1
    privacy = ClientPrivacy(DPConfig(clip_norm=clip, noise_multiplier=0.0), 5, CLIENTS, CLIENTS, secure=False)
    rule, global_shared = PrivateAggregation(privacy), torch.ones(SIZE)
    assert not rule.shares_client_figures
    each = [contribution(rule, k, global_shared + v, 123.0, global_shared) for k, v in vectors().items()]
    assert all(c.weight == 1.0 and math.isclose(float(c.summand.norm()), clip, rel_tol=1e-6) for c in each)
    totals = unpack(pack(each, {}, SIZE, CLIENTS), SIZE, CLIENTS)
    average = rule.average(totals, global_shared)
    clipped = [v.double() * clip / v.double().norm() for v in vectors().values()]
    # float32 updates: (global + v) - global is v only to float32 rounding
    torch.testing.assert_close(average, global_shared.double() + sum(clipped) / CLIENTS, rtol=0, atol=1e-7)
    assert privacy.rounds_spent == 1


def test_distances_and_the_collapse_check() -> None:
    global_shared = torch.zeros(SIZE)
    distances = divergence({0: torch.full((SIZE,), 2.0), 2: global_shared}, global_shared, CLIENTS)
    torch.testing.assert_close(distances, torch.tensor([2.0 * math.sqrt(SIZE), 0.0, 0.0], dtype=torch.float64))
    same, other = torch.full((SIZE,), 2.0), torch.full((SIZE,), 2.0).nextafter(torch.tensor(3.0))
    check_not_collapsed({0: same, 2: other}, {0: 3, 2: 3}, world_size=1)  # one ulp apart: not collapsed
    check_not_collapsed({0: same, 1: same.clone()}, {0: 0, 1: 0}, world_size=1)  # nothing trained: nothing to compare
    check_not_collapsed({0: same, 1: same.clone()}, {0: 3, 1: 0}, world_size=1)
    with pytest.raises(CollapsedClientsError, match="all 2 clients that trained ended the round with identical"):
        check_not_collapsed({0: same, 1: same.clone(), 2: other}, {0: 3, 1: 3, 2: 0}, world_size=1)


def trainer_with_adam(parameter: torch.nn.Parameter) -> SimpleNamespace:
    """What ClientStates reads of a Lightning trainer: its optimizers and scheduler configs (real ones)."""
    optimizer = torch.optim.Adam([parameter], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return SimpleNamespace(optimizers=[optimizer], lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)])


def step(trainer: SimpleNamespace, parameter: torch.nn.Parameter) -> None:
    parameter.grad = torch.ones_like(parameter)
    trainer.optimizers[0].step()
    trainer.lr_scheduler_configs[0].scheduler.step()


def test_simulated_clients_keep_their_own_moments_and_an_unsampled_one_rolls_back() -> None:
    parameter = torch.nn.Parameter(torch.zeros(2))
    trainer = trainer_with_adam(parameter)
    states = ClientStates()
    states.start([0, 1], trainer, initial_private=torch.zeros(0), resumed=False)
    states.swap_in(0, trainer, sampled=True)
    step(trainer, parameter)
    states.swap_out(0, trainer, sampled=True, private=torch.zeros(0))
    states.swap_in(1, trainer, sampled=False)
    assert trainer.optimizers[0].state_dict()["state"] == {}  # client 1 starts from fresh moments, not client 0's
    step(trainer, parameter)
    states.swap_out(1, trainer, sampled=False, private=None)
    assert states.states[1].optimizer is None  # not sampled: as if it had not trained (still fresh)
    states.swap_in(0, trainer, sampled=True)
    assert int(trainer.optimizers[0].state_dict()["state"][0]["step"]) == 1
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == [0.05]
    restored = ClientStates()
    restored.load_state_dict(states.state_dict())
    restored.start([0, 1], trainer, initial_private=torch.zeros(0), resumed=True)
    assert int(restored.states[0].optimizer["optimizers"][0]["state"][0]["step"]) == 1


def test_a_resumed_rank_without_its_clients_private_tokens_is_refused() -> None:
    trainer = trainer_with_adam(torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(ValueError, match=r"no private tokens for client\(s\) \[1\]"):
        ClientStates().start([1], trainer, initial_private=torch.zeros(4), resumed=True)


def test_optimizer_states_past_the_budget_wait_on_disk_and_come_back_whole(tmp_path: Path) -> None:
    parameter = torch.nn.Parameter(torch.zeros(2))
    trainer = trainer_with_adam(parameter)
    states = ClientStates(budget_bytes=100)  # one Adam state here is 2 moments of 2 floats and a step: 20 bytes
    states.start([0, 1, 2, 3, 4, 5, 6, 7], trainer, torch.zeros(0), resumed=False, spill_dir=tmp_path / "spill")
    for client in range(8):
        states.swap_in(client, trainer, sampled=True)
        for _ in range(client + 1):
            step(trainer, parameter)
        states.swap_out(client, trainer, sampled=True, private=torch.zeros(0))
    assert states.memory_bytes() <= 100 and sorted(states.spilled) == [0, 1, 2]  # the least recently used
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == ["client0.pt", "client1.pt", "client2.pt"]
    saved = states.state_dict()["client_states"]
    assert [int(saved[k]["optimizers"][0]["state"][0]["step"]) for k in range(8)] == list(range(1, 9))
    moved = states.take([1, 6])  # to another rank: whole, from disk or memory
    assert [int(moved[k].optimizer["optimizers"][0]["state"][0]["step"]) for k in (1, 6)] == [2, 7]
    assert states.held == [0, 2, 3, 4, 5, 7] and not (tmp_path / "spill" / "client1.pt").exists()
    states.swap_in(0, trainer, sampled=True)  # read back from disk
    assert int(trainer.optimizers[0].state_dict()["state"][0]["step"]) == 1
    other = ClientStates()
    other.start([], trainer, torch.zeros(0), resumed=False)
    other.give(moved)
    assert other.held == [1, 6] and other.memory_bytes() > 0
    states.close()
    assert not (tmp_path / "spill").exists()


def test_past_32_clients_a_round_reports_its_sampled_clients_in_summary() -> None:
    nan = float("nan")
    losses, distances = [nan] * 40, [nan] * 40
    losses[3], losses[17], distances[3], distances[17] = 1.0, 2.0, 0.5, 0.25
    report = RoundReport(2, losses, distances, [10.0] * 40, [8 if k in (3, 17) else 0 for k in range(40)], 1.5, 0.01)
    logged = metrics(report)
    assert not [key for key in logged if key.startswith("client") and not key.startswith("clients/")]
    assert logged["clients/train_loss_mean"] == 1.5 and logged["clients/divergence_max"] == 0.5
    assert "sampled clients' train loss 1.000-2.000, mean 1.500 | compute 1.50s" in log_line(report, 5)
    assert "client3/train_loss" in metrics(RoundReport(2, losses[:32], distances[:32], [1.0] * 32, [0] * 32, 1.0, 0.0))
