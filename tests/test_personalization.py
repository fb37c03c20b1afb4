"""Split prompts, table averaging, per-client held-out data and the global-versus-personalized evaluation."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FEDERATION, replay, run_ranks, write_config

from fedlm.data import FinancialPhraseBank
from fedlm.data.sources import DataError
from fedlm.federation import FederationConfig, ServerConfig, Topology
from fedlm.federation.aggregate import payload_layout
from fedlm.federation.exchange import EncoderExchange
from fedlm.model.prompt_encoder import PromptEncoder, PromptEncoderConfig, eval_table


def encoder(kind: str = "mlp", tokens: int = 4) -> PromptEncoder:
    torch.manual_seed(0)
    return PromptEncoder(
        PromptEncoderConfig(type=kind, virtual_tokens=tokens, hidden_size=8), 6, torch.randn(tokens, 6)
    )


# -- what is exchanged --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "lstm", "embedding"])
def test_parameter_exchange_keeps_the_last_input_rows_private(kind: str) -> None:
    enc = encoder(kind)
    exchange = EncoderExchange(enc, "parameters", private_tokens=1)
    total = sum(p.numel() for p in enc.parameters())
    assert exchange.shared.numel() == total and int((~exchange.shared).sum()) == 6  # one row of the input table
    vector = exchange.read()
    vector[~exchange.shared] = 42.0
    exchange.write(vector)
    assert torch.equal(enc.input_table[-1], torch.full((6,), 42.0)) and not (enc.input_table[:-1] == 42).any()


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_table_exchange_puts_the_encoder_output_on_any_table_from_its_initial_parameters(kind: str) -> None:
    enc = encoder(kind)
    exchange = EncoderExchange(enc, "table", private_tokens=2)
    assert exchange.read().numel() == exchange.shared.numel() == 4 * 6 and int((~exchange.shared).sum()) == 12
    start = exchange.parameters()
    with torch.no_grad():  # a client trains...
        for p in enc.parameters():
            p.add_(0.1)
    target = torch.randn(24)
    exchange.write(target)  # ...and the next round starts it from the initial parameters, on the target table
    assert torch.equal(exchange.parameters(), start)
    torch.testing.assert_close(exchange.read(), target)
    enc.train()
    torch.testing.assert_close(enc().reshape(-1), target)  # the training path sees the same table
    # the state round-trips through a state dict, offset included
    copy = encoder(kind)
    copy.load_state_dict(enc.state_dict())
    torch.testing.assert_close(eval_table(copy).reshape(-1), target)


def test_private_tokens_must_leave_a_shared_one() -> None:
    with pytest.raises(ValueError, match=r"federation.private_tokens=4 must be between 0 .* \(3\)"):
        EncoderExchange(encoder(), "parameters", private_tokens=4)
    with pytest.raises(ValueError, match="federation.average='outputs' is unknown"):
        FederationConfig(clients=2, rounds=1, local_steps=1, average="outputs").validate()  # type: ignore[arg-type]


# -- per-client held-out data --------------------------------------------------------------------------------


def test_client_holdout_is_disjoint_seeded_and_shared_by_local_runs(synthetic_fpb: Path) -> None:
    data = FinancialPhraseBank(path=str(synthetic_fpb), client_holdout=0.25)
    data.setup("fit")
    data.federate(Topology(2, 1, 0), local_steps=1, local_epochs=None)
    for client in (0, 1):
        train, held = data.client_examples(client, 2), data.holdouts[client]
        assert len(held) == 12 and len(train) == 36
        part = [data.splits["train"][i] for i in data.client_partition(2)[client]]
        assert sorted(map(id, train + held)) == sorted(map(id, part))  # disjoint and complete (texts repeat here)
        local = FinancialPhraseBank(path=str(synthetic_fpb), client_holdout=0.25, local_client=client, local_clients=2)
        local.setup("fit")
        assert local.train_examples == train  # a local-only run trains on what its client trains on
    again = FinancialPhraseBank(path=str(synthetic_fpb), client_holdout=0.25)
    again.setup("fit")
    again.federate(Topology(2, 1, 0), local_steps=1, local_epochs=None)
    assert again.holdouts == data.holdouts
    other = FinancialPhraseBank(path=str(synthetic_fpb), client_holdout=0.25, partition_seed=9)
    other.setup("fit")
    other.federate(Topology(2, 1, 0), local_steps=1, local_epochs=None)
    assert other.holdouts != data.holdouts
    with pytest.raises(DataError, match=r"data.client_holdout=1.0 must be in \[0, 1\)"):
        FinancialPhraseBank(path=str(synthetic_fpb), client_holdout=1.0)


@pytest.mark.multiprocess
def test_personalization_without_held_out_data_is_refused_before_training(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, {**FEDERATION, "personalize_steps": 2})
    result, _ = run_ranks(tmp_path, config, 1)
    assert result.returncode != 0
    assert "federation.personalize_steps needs each client's own held-out data" in result.stderr
    assert "round 1/3" not in result.stdout


# -- multi-process: private tokens never travel; tables average like parameters -------------------------------


def personalized_config(tmp_path: Path, tiny_gpt2_dir: str, synthetic_fpb: Path, federation: dict) -> Path:
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["init_args"]["client_holdout"] = 0.25
    raw["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(tmp_path), "name": "logs"},
    }
    config.write_text(yaml.safe_dump(raw))
    return config


@pytest.mark.multiprocess
@pytest.mark.parametrize("average", ["parameters", "table"])
def test_private_tokens_never_leave_their_client(
    average: str, tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    federation = {**FEDERATION, "private_tokens": 1, "average": average, "personalize_steps": 2}
    config = personalized_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation)
    result, records = run_ranks(tmp_path, config, 2, "--test_after_fit", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    shared = records[0]["shared"]
    assert int((~shared).sum()) == 32  # one of the 3 virtual tokens (an input row, or a table row), 32 wide
    for rank, record in enumerate(records):
        # Each round this rank handed the all-reduce exactly: its weighted shared part, its weight, then
        # bookkeeping (payload_layout), then the divergence per client.
        size = int(shared.sum())
        layout = payload_layout(size, 2)
        sent = [t for t in record["sent"] if t.dtype == torch.float64 and t.numel() in (layout["failed"].stop, 2)]
        others = [t.numel() for t in record["sent"] if t.dtype != torch.float64]
        assert len(sent) == 2 * 3 and len(others) == len(record["sent"]) - 6
        assert max(others) < 32  # what else was reduced (Lightning's logged scalars) has no room for a token
        for round_index in range(3):
            payload, divergence = sent[2 * round_index], sent[2 * round_index + 1]
            params = record["rounds"][round_index]["client_params"][rank]
            weight = record["rounds"][round_index]["weights"][rank]
            assert payload.numel() == layout["failed"].stop and divergence.numel() == 2
            torch.testing.assert_close(payload[:size], weight * params[shared].double(), rtol=0, atol=0)
            assert payload[layout["weight"]] == weight and payload[layout["steps"]][rank] == 3  # 3 local steps
        # the global model keeps the initial private tokens; each client's own moved away from them
        final = record["rounds"][-1]
        assert torch.equal(final["global"][~shared], record["initial"][~shared])
        assert not torch.equal(final["client_params"][rank][~shared], record["initial"][~shared])
    replay(records, ServerConfig(), sampled_each_round=2, shared=shared)
    (folder,) = {p.parent for p in tmp_path.glob("logs/*/personalization.json")}
    rows = json.loads((folder / "personalization.json").read_text())
    assert [row["client"] for row in rows] == [0, 1]
    assert all({"global", "private", "finetuned"} <= set(row) and row["holdout_examples"] == 12 for row in rows)
    # the global model evaluated here is the one test_after_fit tested
    test_acc = json.loads((folder / "test_metrics.json").read_text())["test/acc"]
    assert all(row["global"]["test_acc"] == pytest.approx(test_acc) for row in rows)
    assert "global vs personalized accuracy per client" in result.stderr


@pytest.mark.multiprocess
def test_table_averaging_sends_the_table_and_matches_one_process(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    federation = {**FEDERATION, "average": "table", "server": {"optimizer": "fedavgm", "lr": 1.0, "momentum": 0.5}}
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation)
    result, records = run_ranks(tmp_path, config, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert records[0]["rounds"][0]["global"].numel() == 3 * 32  # 3 virtual tokens of the tiny model's width 32
    assert "0.00 MB exchanged" in result.stderr + result.stdout
    replay(records, ServerConfig(**federation["server"]), sampled_each_round=2)
    result, (simulated,) = run_ranks(tmp_path, config, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    for round_index in range(3):
        torch.testing.assert_close(
            simulated["rounds"][round_index]["global"], records[0]["rounds"][round_index]["global"]
        )


def test_algorithms_report_tables_each_run_per_client(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    from fedlm.cli import cli
    from fedlm.experiment.algorithms import write, write_section

    for algorithm, extra in (("fedavg", {}), ("split_prompts", {"private_tokens": 1})):
        folder = tmp_path / "runs" / "iid" / algorithm
        folder.mkdir(parents=True)
        config = personalized_config(
            folder, tiny_gpt2_dir, synthetic_fpb, {**FEDERATION, "personalize_steps": 2, **extra}
        )
        logger = {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(folder), "name": "logs", "version": 0},
        }
        cli(["fit", "--config", str(config), "--test_after_fit", "true", "--trainer.logger", json.dumps(logger)])
    text = write(tmp_path / "runs", tmp_path / "algorithms.md", "the test")
    assert (tmp_path / "algorithms.md").read_text() == text + "\n"
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert "client 0 held-out (n=12) | client 1 held-out (n=12)" in rows[0]
    assert [row.split(" | ")[1] for row in rows[1:]] == [
        "global", "fine-tuned locally", "global", "own private tokens", "fine-tuned locally"
    ]  # fmt: skip
    assert "split_prompts (fedavg, 1 private tokens, 2 fine-tuning steps)" in rows[3]
    results = json.loads(next((tmp_path / "runs" / "iid" / "fedavg").rglob("personalization.json")).read_text())
    assert rows[1].split(" | ")[2].strip("*") == f"{results[0]['global']['holdout_acc']:.3f}"  # client 0, global
    # a later session's runs as one more section: the other sections stay as written, the notes come last
    notes = tmp_path / "notes.md"
    notes.write_text("## Setup\n\nhow the runs were made\n")
    before = write(tmp_path / "runs", tmp_path / "algorithms.md", "the test", notes)
    merged = write_section(tmp_path / "runs", tmp_path / "algorithms.md", "again", "iid, again", notes)
    assert merged == write_section(tmp_path / "runs", tmp_path / "algorithms.md", "again", "iid, again", notes)
    assert merged.startswith(before.split("\n## Setup")[0].rstrip() + "\n\n## iid, again\n")
    assert merged.endswith("\n## Setup\n\nhow the runs were made") and merged.count("## Setup") == 1
    assert "runs made by `again`" in merged and (tmp_path / "algorithms_iid_again.png").is_file()
