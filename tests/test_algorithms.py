"""Federated algorithms: server optimizers, FedProx and client sampling."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FEDERATION, REPO, printed_config, replay, run_ranks, write_config

from fedlm.federation import FederatedLoop, FederationConfig, ServerConfig, ServerOptimizer, Topology, sample_clients
from fedlm.federation.robust import PoisonConfig, RobustConfig
from fedlm.federation.secure import SecureAggregationConfig

# -- server optimizers against the paper's update rules, by hand --------------------------------------------

X0 = [1.0, 2.0]
DELTAS = [[0.5, -0.5], [0.25, 0.5]]  # pseudo-gradients: global - average, round 1 and round 2


def reference(
    optimizer: str, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
) -> list[list[float]]:
    """Reddi et al. 2021, Algorithm 2, per coordinate in plain floats (Delta = x - average, so x -= ...)."""
    out = []
    for i, x in enumerate(X0):
        m, v, path = 0.0, tau**2, []
        for delta in (d[i] for d in DELTAS):
            m = beta1 * m + (1 - beta1) * delta
            if optimizer == "fedadagrad":
                v = v + delta**2
            elif optimizer == "fedadam":
                v = beta2 * v + (1 - beta2) * delta**2
            else:
                v = v - (1 - beta2) * delta**2 * math.copysign(1.0, v - delta**2)
            x = x - lr * m / (math.sqrt(v) + tau)
            path.append(x)
        out.append(path)
    return [[out[i][r] for i in range(len(X0))] for r in range(len(DELTAS))]


def two_rounds(optimizer: ServerOptimizer) -> list[torch.Tensor]:
    x, path = torch.tensor(X0), []
    for delta in DELTAS:
        x = optimizer.step(x, x.double() - torch.tensor(delta, dtype=torch.float64))
        path.append(x)
    return path


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_optimizers_follow_the_paper_for_two_rounds(name: str) -> None:
    path = two_rounds(ServerOptimizer(ServerConfig(optimizer=name, lr=0.1)))
    for got, expected in zip(path, reference(name, lr=0.1)):
        torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)
    if name == "fedadagrad":  # round 1 by hand: m = 0.05, v = 1e-6 + 0.25, x = 1 - 0.1 * 0.05 / (0.500001 + 0.001)
        assert path[0][0].item() == pytest.approx(1 - 0.005 / 0.501001, abs=1e-7)


def test_server_momentum_by_hand() -> None:
    path = two_rounds(ServerOptimizer(ServerConfig(optimizer="fedavgm", lr=1.0, momentum=0.9)))
    # m1 = d1 = [.5, -.5], x1 = [.5, 2.5]; m2 = .9 m1 + d2 = [.7, .05], x2 = [-.2, 2.45]
    torch.testing.assert_close(path[0], torch.tensor([0.5, 2.5]))
    torch.testing.assert_close(path[1], torch.tensor([-0.2, 2.45]))


def test_fedavg_takes_the_average_as_is() -> None:
    average = torch.tensor([0.1, 0.2], dtype=torch.float64)
    assert torch.equal(ServerOptimizer(ServerConfig()).step(torch.tensor(X0), average), average.float())


def test_server_state_survives_a_state_dict_round_trip() -> None:
    config = ServerConfig(optimizer="fedyogi", lr=0.1)
    continuous = two_rounds(ServerOptimizer(config))
    first = ServerOptimizer(config)
    x = torch.tensor(X0)
    x = first.step(x, x.double() - torch.tensor(DELTAS[0], dtype=torch.float64))
    resumed = ServerOptimizer(config)
    resumed.load_state_dict(first.state_dict())
    x = resumed.step(x, x.double() - torch.tensor(DELTAS[1], dtype=torch.float64))
    assert torch.equal(x, continuous[1])
    with pytest.raises(ValueError, match="server state is 'fedyogi' but federation.server.optimizer is 'fedadam'"):
        ServerOptimizer(ServerConfig(optimizer="fedadam")).load_state_dict(first.state_dict())


ONE_PROCESS = Topology(num_clients=2, world_size=1, rank=0)


def test_the_loop_checkpoints_the_server_state() -> None:
    config = FederationConfig(clients=2, rounds=2, local_steps=1, server=ServerConfig(optimizer="fedadam", lr=0.1))
    loop = FederatedLoop(config, ONE_PROCESS)
    loop.global_params = loop.server.step(torch.tensor(X0), torch.tensor([0.5, 2.5], dtype=torch.float64))
    resumed = FederatedLoop(config, ONE_PROCESS)
    resumed.load_state_dict(loop.state_dict())
    assert torch.equal(resumed.server.m, loop.server.m) and torch.equal(resumed.server.v, loop.server.v)
    # a checkpoint from before server optimizers holds no server state: FedAvg resumes, FedAdam refuses
    old = {"completed_rounds": 1, "global_params": loop.global_params}
    FederatedLoop(FederationConfig(clients=2, rounds=2, local_steps=1), ONE_PROCESS).load_state_dict(old)
    with pytest.raises(ValueError, match="server state is 'fedavg' but federation.server.optimizer is 'fedadam'"):
        FederatedLoop(config, ONE_PROCESS).load_state_dict(old)


def test_algorithm_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="federation.server.optimizer='sgd' is unknown"):
        ServerConfig(optimizer="sgd").validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="federation.prox_mu=-1"):
        FederationConfig(clients=2, rounds=1, local_steps=1, prox_mu=-1).validate()
    with pytest.raises(ValueError, match="federation.client_fraction=0"):
        FederationConfig(clients=2, rounds=1, local_steps=1, client_fraction=0).validate()


# -- client sampling ------------------------------------------------------------------------------------------


def test_client_sampling_is_seeded_per_round_and_never_empty() -> None:
    rounds = [sample_clients(10, 0.3, seed=1, round_index=r) for r in range(6)]
    assert all(len(s) == 3 and s == sorted(set(s)) for s in rounds)
    assert rounds == [sample_clients(10, 0.3, seed=1, round_index=r) for r in range(6)]
    assert len({tuple(s) for s in rounds}) > 1 and rounds != [sample_clients(10, 0.3, 2, r) for r in range(6)]
    assert len(sample_clients(10, 0.01, 1, 0)) == 1 and sample_clients(4, 1.0, 1, 0) == [0, 1, 2, 3]


@pytest.mark.multiprocess
def test_fedadam_with_client_sampling_on_two_ranks_matches_one_process(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """Two clients, one sampled per round: on two ranks the unsampled rank rolls its optimizer state back in
    place; simulated in one process it never loads it. Both must give the same run."""
    server = {"optimizer": "fedadam", "lr": 0.01}
    federation = {**FEDERATION, "client_fraction": 0.5, "server": server}
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation)
    result, records = run_ranks(tmp_path, config, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    replay(records, ServerConfig(**server), sampled_each_round=1)
    result, (simulated,) = run_ranks(tmp_path, config, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    for round_index in range(3):
        expected = records[0]["rounds"][round_index]["global"]
        torch.testing.assert_close(simulated["rounds"][round_index]["global"], expected)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["fedprox", "fedavgm", "fedyogi", "fedadagrad", "split_prompts"])
def test_each_shipped_algorithm_on_two_ranks(
    name: str, tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """The shipped config's federation section on two gloo ranks: every rank ends each round with the server
    step on the average of the clients' shared parts."""
    shipped = yaml.safe_load((REPO / "configs" / "algorithms" / f"{name}.yaml").read_text())
    federation = {**FEDERATION, **shipped["federation"]}
    if "private_tokens" in federation:
        federation["private_tokens"] = 1  # of the tiny model's 3
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation)
    result, records = run_ranks(tmp_path, config, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    replay(records, ServerConfig(**federation.get("server", {})), sampled_each_round=2, shared=records[0]["shared"])


# -- FedProx ----------------------------------------------------------------------------------------------------


def fit_rounds(tmp_path: Path, tiny_gpt2_dir: str, synthetic_fpb: Path, federation: dict) -> list[dict]:
    from fedlm.cli import cli

    tmp_path.mkdir()
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation, limit_val_batches=0)
    run = cli(["fit", "--config", str(config), "--trainer.callbacks+=federated_worker.RoundRecorder"])
    (recorder,) = [c for c in run.trainer.callbacks if type(c).__name__ == "RoundRecorder"]
    return recorder.rounds


def test_fedprox_with_mu_zero_is_fedavg_and_mu_pulls_clients_to_the_global(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    fedavg = fit_rounds(tmp_path / "avg", tiny_gpt2_dir, synthetic_fpb, FEDERATION)
    zero = fit_rounds(tmp_path / "zero", tiny_gpt2_dir, synthetic_fpb, {**FEDERATION, "prox_mu": 0.0})
    prox = fit_rounds(tmp_path / "prox", tiny_gpt2_dir, synthetic_fpb, {**FEDERATION, "prox_mu": 10.0})
    for a, b in zip(fedavg, zero):
        assert torch.equal(a["global"], b["global"])
        assert all(torch.equal(a["client_params"][k], b["client_params"][k]) for k in (0, 1))

    def drift(rounds: list[dict]) -> float:
        """How far the clients moved in rounds 2 and 3 from the global encoder they started from."""
        pairs = zip(rounds, rounds[1:])
        return sum(float((r["client_params"][k] - before["global"]).norm()) for before, r in pairs for k in (0, 1))

    assert drift(prox) < 0.8 * drift(fedavg)


# -- shipped configs --------------------------------------------------------------------------------------------


def test_algorithm_configs_change_only_their_keys_of_the_federated_config(capsys: pytest.CaptureFixture[str]) -> None:
    base = yaml.safe_load((REPO / "configs" / "fpb_federated.yaml").read_text())["federation"]
    files = sorted((REPO / "configs" / "algorithms").glob("*.yaml"))
    assert {f.stem for f in files} == {
        "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "client_sampling", "finetune", "split_prompts",
        "table_average", "median", "trimmed_mean", "norm_bound", "poisoned"
    }  # fmt: skip
    for file in files:
        federation = printed_config(
            capsys, "fit", "--config", str(REPO / "configs/fpb_federated.yaml"), "--config", str(file)
        )["federation"]
        override = yaml.safe_load(file.read_text())["federation"]
        assert {k: federation[k] for k in base} == {**base, **{k: v for k, v in override.items() if k in base}}
        for key, value in override.items():  # the override applied, nested server keys included
            assert federation[key] == ({**federation[key], **value} if isinstance(value, dict) else value)
        nested = {
            "server": ServerConfig(**federation["server"]),
            "secure_aggregation": SecureAggregationConfig(**federation["secure_aggregation"]),
            "robust": RobustConfig(**federation["robust"]),
            "poison": PoisonConfig(**federation["poison"]),
        }
        FederationConfig(**{**federation, **nested}).validate()


@pytest.mark.parametrize(("robust", "rows"), [({"rule": "mean"}, 1), ({"rule": "median"}, 2)])
def test_bytes_exchanged_are_the_float64_payload_each_sampled_client_sends_and_receives(
    robust: dict, rows: int, tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    from fedlm.cli import cli
    from fedlm.federation.aggregate import payload_layout

    federation = {**FEDERATION, "rounds": 1, "weighting": "uniform", "robust": robust}
    run = cli(["fit", "--config", str(write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation))])
    params = sum(p.numel() for p in run.model.encoder.parameters())
    payload = payload_layout(rows * params, 2)["failed"].stop  # the median's payload holds a row per client
    assert float(run.trainer.callback_metrics["round/bytes_exchanged"]) == 2 * 2 * 8 * payload
