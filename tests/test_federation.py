"""Federated rounds: topology, data streams, and real multi-process torchrun runs on gloo."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import synthetic_sentences
from helpers import FEDERATION, REPO, run_ranks, write_config

from fedlm.data import FinancialPhraseBank
from fedlm.data.partition import iid_partition
from fedlm.data.sampler import ClientBlock, RoundBatchSampler
from fedlm.data.sources import DataError
from fedlm.federation import FederationConfig, Topology, TopologyError
from fedlm.federation.secure import SecureAggregationConfig

# -- topology, partition, sampler ------------------------------------------------------------------------


def test_topology_maps_ranks_to_clients_both_ways() -> None:
    groups = [Topology(2, 4, r) for r in range(4)]
    assert [t.hosted_clients for t in groups] == [[0], [0], [1], [1]]
    assert [t.rank_in_client for t in groups] == [0, 1, 0, 1]
    assert groups[3].client_ranks(1) == [2, 3]
    simulated = [Topology(4, 2, r) for r in range(2)]
    assert [t.hosted_clients for t in simulated] == [[0, 1], [2, 3]]
    assert Topology(3, 1, 0).hosted_clients == [0, 1, 2]


@pytest.mark.parametrize(("clients", "world"), [(2, 3), (3, 2), (4, 6)])
def test_world_size_that_does_not_fit_the_clients_is_refused(clients: int, world: int) -> None:
    with pytest.raises(TopologyError, match=f"world size {world} does not fit federation.clients={clients}"):
        Topology(clients, world, 0)


def test_iid_partition_is_disjoint_complete_near_equal_and_seeded() -> None:
    parts = iid_partition(1811, 3, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(1811))
    assert [len(p) for p in parts] == [603, 604, 604]
    assert parts == iid_partition(1811, 3, seed=1) and parts != iid_partition(1811, 3, seed=2)
    with pytest.raises(ValueError, match="federation.clients=5 is more than the 4 training examples"):
        iid_partition(4, 5, seed=0)


def test_round_sampler_streams_do_not_depend_on_the_hosting_rank() -> None:
    a, b = ClientBlock(0, tuple(range(0, 10)), 3), ClientBlock(1, tuple(range(10, 17)), 2)
    together = RoundBatchSampler([a, b], batch_size=4, seed=3)
    alone_b = RoundBatchSampler([ClientBlock(1, tuple(range(0, 7)), 2)], batch_size=4, seed=3)
    for round_index in range(3):
        together.set_epoch(round_index)
        alone_b.set_epoch(round_index)
        batches = list(together)
        assert len(batches) == 5 and all(len(x) == 4 for x in batches)
        assert all(i < 10 for x in batches[:3] for i in x) and all(i >= 10 for x in batches[3:] for i in x)
        assert [[i - 10 for i in x] for x in batches[3:]] == list(alone_b)


def test_round_sampler_covers_each_client_once_per_pass_and_splits_batches_over_client_ranks() -> None:
    block = ClientBlock(0, tuple(range(12)), 3)
    single = RoundBatchSampler([block], batch_size=4, seed=0)
    assert sorted(i for x in single for i in x) == list(range(12))  # one round = one pass here
    ranks = [RoundBatchSampler([block], 2, 0, rank_in_client=r, ranks_per_client=2) for r in range(2)]
    for step, (x0, x1) in enumerate(zip(*ranks)):
        assert x0 + x1 == list(single)[step]  # rank 0 and rank 1 take the two halves of each global batch


def test_length_buckets_keep_each_rounds_examples_pad_less_and_split_over_client_ranks(synthetic_fpb: Path) -> None:
    lengths = torch.randint(5, 60, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    block = ClientBlock(0, tuple(range(40)), 5)
    plain = RoundBatchSampler([block], 8, seed=1)
    bucketed = RoundBatchSampler([block], 8, seed=1, lengths=lengths, bucket_batches=5)
    ranks = [RoundBatchSampler([block], 4, 1, r, 2, lengths=lengths, bucket_batches=5) for r in range(2)]

    def padding(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    for round_index in range(3):
        for sampler in [plain, bucketed, *ranks]:
            sampler.set_epoch(round_index)
        p, b = list(plain), list(bucketed)
        assert sorted(i for x in p for i in x) == sorted(i for x in b for i in x)  # the same examples this round
        assert padding(b) < padding(p) / 2
        assert b == list(bucketed)  # seeded
        assert [x0 + x1 for x0, x1 in zip(*ranks)] == b
    with pytest.raises(DataError, match="data.bucket_batches=0"):
        FinancialPhraseBank(path=str(synthetic_fpb), bucket_batches=0)


def test_federation_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="exactly one of federation.local_steps and federation.local_epochs"):
        FederationConfig(clients=3, rounds=2).validate()
    with pytest.raises(ValueError, match="federation.rounds=0"):
        FederationConfig(clients=3, rounds=0, local_steps=1).validate()
    masked = SecureAggregationConfig(enabled=True)
    with pytest.raises(ValueError, match="federation.payload='bfloat16': secure aggregation masks the sum as 64-bit"):
        FederationConfig(clients=3, rounds=2, local_steps=1, payload="bfloat16", secure_aggregation=masked).validate()


def test_client_files_give_each_client_only_its_own_file(synthetic_fpb: Path, tmp_path: Path) -> None:
    files = []
    for k, n in enumerate([5, 9]):
        path = tmp_path / f"site{k}.txt"
        path.write_text("\n".join(f"{s}@{label}" for s, label in synthetic_sentences(n, seed=k)))
        files.append(str(path))
    data = FinancialPhraseBank(path=str(synthetic_fpb), client_files=files + [str(tmp_path / "missing.txt")])
    data.setup("fit")
    blocks = data.federate(Topology(3, 3, 1), local_steps=None, local_epochs=1.0)
    assert [(b.client, len(b.indices)) for b in blocks] == [(1, 9)]  # rank 1 never opens the other files
    assert [e.origin.split(":")[0] for e in data.train_examples] == [files[1]] * 9
    with pytest.raises(Exception, match="data.client_files: .*missing.txt does not exist"):
        data.federate(Topology(3, 3, 2), local_steps=1, local_epochs=None)
    with pytest.raises(Exception, match="data.client_files has 3 entries for 2 clients"):
        data.federate(Topology(2, 1, 0), local_steps=1, local_epochs=None)


def test_local_only_run_trains_on_exactly_the_shard_its_client_has_when_federated(synthetic_fpb: Path) -> None:
    federated = FinancialPhraseBank(path=str(synthetic_fpb))
    federated.setup("fit")
    federated.federate(Topology(3, 1, 0), local_steps=1, local_epochs=None)
    for client in range(3):
        alone = FinancialPhraseBank(path=str(synthetic_fpb), local_client=client, local_clients=3)
        alone.setup("fit")
        shard = federated.train_examples[federated.blocks[client].indices[0] : federated.blocks[client].indices[-1] + 1]
        assert alone.train_examples == shard and len(shard) == 32
    with pytest.raises(Exception, match="data.local_client=3 and data.local_clients=3"):
        FinancialPhraseBank(path=str(synthetic_fpb), local_client=3, local_clients=3)


# -- real runs -------------------------------------------------------------------------------------------


def check_rounds(records: list[dict], clients_of_rank: list[int]) -> None:
    for round_index in range(3):
        rounds = [r["rounds"][round_index] for r in records]
        # after averaging, every rank holds bitwise the same global encoder
        for other in rounds[1:]:
            assert torch.equal(other["global"], rounds[0]["global"])
        # before averaging, ranks of one client agree and different clients differ
        local = {}
        for rank, client in enumerate(clients_of_rank):
            params = rounds[rank]["client_params"][client]
            if client in local:
                assert torch.equal(params, local[client])
            local[client] = params
        values = list(local.values())
        assert all(not torch.equal(values[0], v) for v in values[1:])
        # the global encoder is the sample-weighted average of the clients' encoders
        weights = {k: w for r in rounds for k, w in r["weights"].items()}
        expected = sum(weights[k] * local[k].double() for k in local) / sum(weights.values())
        torch.testing.assert_close(rounds[0]["global"], expected.float(), rtol=0, atol=1e-6)
        # the frozen LM never changes
        assert len({r["backbone"] for r in rounds}) == 1
    first_backbone = records[0]["rounds"][0]["backbone"]
    assert all(r["rounds"][-1]["backbone"] == first_backbone for r in records)


@pytest.mark.multiprocess
def test_two_clients_of_two_ranks(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, FEDERATION)
    result, records = run_ranks(tmp_path, config, 4, "--test_after_fit", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    check_rounds(records, clients_of_rank=[0, 0, 1, 1])
    assert "2 clients, 2 rank(s) per client" in result.stdout
    # the global model is tested once, on the whole test split (12 sentences), by ranks that hold the same encoder
    written = json.loads((tmp_path / "test_metrics.json").read_text())
    assert written["checkpoint"] == "final model" and written["epochs_completed"] == 3
    assert sum(v for k, v in written.items() if k.startswith("test/confusion/")) == 12
    assert result.stdout.count("test metrics written") == 1


@pytest.mark.multiprocess
def test_four_clients_of_one_rank(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, {**FEDERATION, "clients": 4})
    result, records = run_ranks(tmp_path, config, 4)
    assert result.returncode == 0, result.stderr[-3000:]
    check_rounds(records, clients_of_rank=[0, 1, 2, 3])


@pytest.mark.multiprocess
def test_single_process_simulation_equals_the_multi_process_run(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, FEDERATION)
    result, (simulated,) = run_ranks(tmp_path, config, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 clients, 1 rank(s) per client, hosting client 0" in result.stdout
    result, records = run_ranks(tmp_path, config, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    for round_index in range(3):
        torch.testing.assert_close(
            simulated["rounds"][round_index]["global"], records[0]["rounds"][round_index]["global"]
        )
        for client in (0, 1):
            torch.testing.assert_close(
                simulated["rounds"][round_index]["client_params"][client],
                records[client]["rounds"][round_index]["client_params"][client],
            )


@pytest.mark.multiprocess
@pytest.mark.parametrize(("payload", "nproc"), [("float32", 1), ("bfloat16", 2)])
def test_a_narrow_payload_averages_within_its_stated_bound_of_float64(
    payload: str, nproc: int, tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """One round: the global encoder is the float64 average of the clients' vectors within
    ``2 * R * u * sum_i |w_i (v_i - g)| / sum_i w_i`` (and its float32 rounding); the summands travel in the
    payload's dtype, the weights and counts in float64."""
    federation = {**FEDERATION, "rounds": 1, "payload": payload}
    result, records = run_ranks(tmp_path, write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation), nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    start = records[0]["initial"].double()
    vectors = {c: v.double() for r in records for c, v in r["rounds"][0]["client_params"].items()}
    weights = {c: w for r in records for c, w in r["rounds"][0]["weights"].items()}
    total = sum(weights.values())
    exact = sum(weights[c] * vectors[c] for c in vectors) / total
    unit = {"float32": 2.0**-24, "bfloat16": 2.0**-8}[payload]
    bound = 2 * nproc * unit * sum(weights[c] * (vectors[c] - start).abs() for c in vectors) / total
    got = records[0]["rounds"][0]["global"].double()
    float32_step = exact.float().double().abs() * 2.0**-24
    assert ((got - exact).abs() <= bound + float32_step).all()
    assert (got != start).any() and not torch.equal(got, exact.float().double())  # it moved, and not exactly
    wire = {str(t.dtype) for c in records[0]["collectives"] if c["name"] == "all_reduce" and c["round"] == 0
            for t in c["tensors"] if t.numel() > 100}  # fmt: skip
    assert wire == ({f"torch.{payload}"} if nproc > 1 else set())  # one process sums without a collective


@pytest.mark.multiprocess
def test_world_wide_ddp_is_refused_before_clients_collapse(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """With gradients synced over the world, clients would stop being clients (under DP too, where the round's
    collapse check cannot see the clients' encoders): refused before training."""
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, FEDERATION, strategy="ddp")
    result, _ = run_ranks(tmp_path, config, 2)
    assert result.returncode != 0
    assert "trainer.strategy (DDPStrategy): it would synchronize gradients over every rank" in result.stderr


@pytest.mark.multiprocess
def test_one_client_with_all_data_trains_exactly_like_centralized(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    for name in ("c", "f"):
        (tmp_path / name).mkdir()
    central = write_config(tmp_path / "c", tiny_gpt2_dir, synthetic_fpb, None, max_epochs=3)
    result, (centralized,) = run_ranks(tmp_path / "c", central, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    one_client = {"clients": 1, "rounds": 3, "local_epochs": 1.0, "seed": 5}
    result, (federated,) = run_ranks(
        tmp_path / "f", write_config(tmp_path / "f", tiny_gpt2_dir, synthetic_fpb, one_client), 1
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(federated["losses"]) == len(centralized["losses"]) == 3 * 24  # 96 examples / batch 4, 3 epochs
    assert federated["losses"] == centralized["losses"]  # step for step
    assert torch.equal(federated["rounds"][-1]["global"], centralized["rounds"][-1]["global"])


class BatchRecorder(L.Callback):
    """The training sentences of every batch, per epoch (round)."""

    def __init__(self) -> None:
        self.epochs: list[list[tuple[int, ...]]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.epochs[-1].extend(tuple(row) for row in batch["input_ids"].tolist())


@pytest.mark.parametrize("federation", [FEDERATION, None], ids=["federated", "centralized"])
def test_every_round_draws_new_batches_from_the_stream(
    federation: dict | None, tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    from fedlm.cli import cli

    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation, max_epochs=3, limit_val_batches=0)
    run = cli(["fit", "--config", str(config), "--trainer.callbacks+=test_federation.BatchRecorder"])
    (recorder,) = [c for c in run.trainer.callbacks if isinstance(c, BatchRecorder)]
    assert len(recorder.epochs) == 3
    # 2 clients x 3 local steps x 4 sentences a round out of 48 per client: three rounds, three different sets;
    # centralized: each epoch is a pass over all 96 sentences, each in another order.
    assert recorder.epochs[0] != recorder.epochs[1] != recorder.epochs[2] != recorder.epochs[0]


def shipped_callbacks(folder: Path) -> list[dict]:
    """The checkpoint callbacks of configs/fpb_federated.yaml, writing into ``folder``."""
    callbacks = yaml.safe_load((REPO / "configs" / "fpb_federated.yaml").read_text())["trainer"]["callbacks"]
    return [{**c, "init_args": {**c["init_args"], "dirpath": str(folder)}} for c in callbacks]


def test_round_checkpoint_holds_the_round_index_and_the_global_encoder(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    from fedlm.cli import cli

    config = write_config(
        tmp_path,
        tiny_gpt2_dir,
        synthetic_fpb,
        FEDERATION,
        enable_checkpointing=True,
        callbacks=shipped_callbacks(tmp_path / "ckpt"),
    )
    run = cli(["fit", "--config", str(config)])
    # last.ckpt is the final round even when an earlier one had the best validation accuracy
    assert torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True)["epoch"] < 2
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if "FederatedLoop" in k]
    assert state["completed_rounds"] == checkpoint["epoch"] + 1 == 3
    encoder = torch.cat(
        [checkpoint["state_dict"][f"encoder.{n}"].reshape(-1) for n, _ in run.model.encoder.named_parameters()]
    )
    assert torch.equal(state["global_params"], encoder)
    assert not any(k.startswith("backbone.") for k in checkpoint["state_dict"])
    assert not list((tmp_path / "ckpt").glob("*.partial"))
