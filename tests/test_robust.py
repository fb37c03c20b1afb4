"""Robust aggregation against one hostile client of five: FedAvg is dragged far, the robust rules are not."""

import functools
from pathlib import Path

import pytest
import torch
from helpers import FEDERATION, run_ranks, write_config

from fedlm.errors import ConfigError
from fedlm.federation import FederationConfig, sample_clients
from fedlm.federation.aggregate import Contribution, pack, unpack
from fedlm.federation.privacy import DPConfig
from fedlm.federation.robust import PoisonConfig, RobustConfig, poisoned, robust_rule
from fedlm.federation.secure import SecureAggregationConfig

CLIENTS, SIZE, HOSTILE, SCALE = 5, 40, 4, -100.0


def round_vectors() -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """A global vector and what each client trained to: small honest updates around it."""
    generator = torch.Generator().manual_seed(0)
    global_shared = torch.randn(SIZE, generator=generator)
    return global_shared, {k: global_shared + 0.1 * torch.randn(SIZE, generator=generator) for k in range(CLIENTS)}


def aggregate(config: RobustConfig, sent: dict[int, torch.Tensor], global_shared: torch.Tensor) -> torch.Tensor:
    """The loop's path for one round in one process per client: summand, pack, the all-reduce's sum, average."""
    rule = robust_rule(config, CLIENTS, functools.partial(sample_clients, CLIENTS, 1.0, 0))
    width, payloads = rule.width(SIZE), []
    for client, vector in sent.items():
        summand, weight, count = rule.summand(client, vector, 1.0, global_shared, 0)
        payloads.append(pack([Contribution(client, 1, 0.0, summand, weight, count)], {}, width, CLIENTS))
    return rule.average(unpack(sum(payloads), width, CLIENTS), global_shared)


def attacked() -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor]:
    global_shared, trained = round_vectors()
    sent = {**trained, HOSTILE: poisoned(trained[HOSTILE], global_shared, SCALE)}
    honest = torch.stack([trained[k].double() for k in range(CLIENTS) if k != HOSTILE])
    return global_shared, sent, honest


def test_fedavg_moves_a_fifth_of_the_hostile_update_and_the_order_statistics_stay_in_the_honest_range() -> None:
    global_shared, sent, honest = attacked()
    honest_mean, spread = honest.mean(0), float((honest - honest.mean(0)).norm(dim=1).max())
    mean = aggregate(RobustConfig(), sent, global_shared)
    # FedAvg: moved by exactly (hostile - honest mean) / 5, some 100 / 5 = 20 times the honest clients' spread
    pull = (sent[HOSTILE].double() - honest_mean) / CLIENTS
    torch.testing.assert_close(mean - honest_mean, pull, rtol=0, atol=1e-9)
    assert float(pull.norm()) > 15 * spread
    for config in (RobustConfig(rule="median"), RobustConfig(rule="trimmed_mean", trim_fraction=0.2)):
        robust = aggregate(config, sent, global_shared)
        # every coordinate within the honest clients' values: the hostile one is trimmed away wherever it lies
        assert bool(((robust >= honest.min(0).values) & (robust <= honest.max(0).values)).all()), config
        assert float((robust - honest_mean).norm()) < spread


def test_a_norm_bound_caps_the_pull_at_two_bounds_over_the_client_count() -> None:
    global_shared, sent, honest = attacked()
    bound = max(float((v - global_shared).norm()) for k, v in sent.items() if k != HOSTILE)  # honest ones pass whole
    bounded = aggregate(RobustConfig(norm_bound=bound), sent, global_shared)
    # (bounded hostile - honest mean) / 5, and both lie within the bound of the global vector
    assert float((bounded - honest.mean(0)).norm()) <= 2 * bound / CLIENTS
    unbounded = aggregate(RobustConfig(norm_bound=1e9), sent, global_shared)
    assert torch.equal(unbounded, aggregate(RobustConfig(), sent, global_shared))  # a loose bound is FedAvg, bitwise


def test_the_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    rule = robust_rule(RobustConfig(rule="median"), 4, lambda round_index: [0, 1, 2, 3])
    values = {0: 1.0, 1: 10.0, 2: 2.0, 3: 4.0}
    payload = sum(
        pack([Contribution(k, 1, None, rule.summand(k, torch.tensor([v]), 1.0, torch.zeros(1), 0)[0], 1.0)], {}, 4, 4)
        for k, v in values.items()
    )
    assert rule.average(unpack(payload, 4, 4), torch.zeros(1)).tolist() == [3.0]


def federation(**fields: object) -> FederationConfig:
    return FederationConfig(**{"clients": CLIENTS, "rounds": 1, "local_steps": 1, "weighting": "uniform", **fields})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"robust": RobustConfig(rule="median"), "secure_aggregation": SecureAggregationConfig(enabled=True)},
         "needs each client's vector in the clear"),
        ({"robust": RobustConfig(rule="trimmed_mean"), "weighting": "samples"}, "set federation.weighting: uniform"),
        ({"robust": RobustConfig(norm_bound=1.0), "dp": DPConfig(clip_norm=1.0, noise_multiplier=1.0)},
         "federation.robust.norm_bound: null"),
        ({"robust": RobustConfig(rule="mode")}, r"federation.robust.rule='mode' is unknown"),
        ({"robust": RobustConfig(rule="trimmed_mean", trim_fraction=0.5)}, r"trim_fraction=0.5 must be in \[0, 0.5\)"),
        ({"robust": RobustConfig(norm_bound=0.0)}, "norm_bound=0.0 must be positive"),
        ({"poison": PoisonConfig(clients=[5])}, r"poison.clients has \[5\], outside 0 .. 4"),
    ],
)  # fmt: skip
def test_combinations_a_robust_rule_cannot_serve_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        federation(**fields).validate()


def test_a_norm_bound_works_under_secure_aggregation() -> None:
    federation(robust=RobustConfig(norm_bound=1.0), secure_aggregation=SecureAggregationConfig(enabled=True)).validate()


@pytest.mark.multiprocess
@pytest.mark.parametrize("rule", ["mean", "median"])
def test_one_poisoned_client_of_five_in_a_real_round(
    rule: str, tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """The loop sends client 4's update sign-flipped and 100x; the worker records what each client trained to."""
    fields = {"clients": CLIENTS, "rounds": 1, "local_steps": 2, "weighting": "uniform", "seed": FEDERATION["seed"]}
    config = write_config(
        tmp_path, tiny_gpt2_dir, synthetic_fpb, {**fields, "robust": {"rule": rule}, "poison": {"clients": [HOSTILE]}}
    )
    result, (record,) = run_ranks(tmp_path, config, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    (first,) = record["rounds"]
    start, trained, reached = record["initial"].double(), first["client_params"], first["global"].double()
    honest = torch.stack([trained[k].double() for k in range(CLIENTS) if k != HOSTILE])
    honest_mean, spread = honest.mean(0), float((honest - honest.mean(0)).norm(dim=1).max())
    hostile = poisoned(trained[HOSTILE].double(), start, SCALE)
    if rule == "mean":
        torch.testing.assert_close(reached - honest_mean, (hostile - honest_mean) / CLIENTS, rtol=0, atol=1e-5)
        assert float((reached - honest_mean).norm()) > 10 * spread
    else:
        low, high = honest.min(0).values - 1e-6, honest.max(0).values + 1e-6  # float32 vectors, float64 median
        assert bool(((reached >= low) & (reached <= high)).all())
        assert float((reached - honest_mean).norm()) < spread


def test_the_algorithms_report_names_the_rule_and_the_attack() -> None:
    from fedlm.experiment.algorithms import AlgorithmRun

    federation = {"robust": {"rule": "trimmed_mean", "trim_fraction": 0.25, "norm_bound": 1.0},
                  "poison": {"clients": [0], "scale": -100.0}}  # fmt: skip
    run = AlgorithmRun("agreement", "trimmed_mean+poisoned", Path("."), [], 0.0, federation, 0.0, [])
    assert run.describe() == "fedavg, trimmed mean 0.25, update norm bound 1.0, client 0 sends -100 x its update"
