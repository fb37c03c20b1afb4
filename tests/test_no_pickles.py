"""No rank unpickles what another sent: the wire's declared tensors and their checks, and a federated run with
everything on (secure aggregation, DP, personalization, sampled clients whose states move) with unpickling made to
raise, in one process and over two ranks."""

import json
import pickle
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import yaml
from federated_worker import RoundRecorder
from helpers import TESTS, Payload, torchrun, worker_env, write_config
from nopickle_worker import OBJECT_COLLECTIVES, forbid

from fedlm.cli import cli
from fedlm.federation import wire
from fedlm.federation.clients import ClientState, StateCodec, load_optimizer_state, optimizer_state
from fedlm.federation.personalize import from_row, gather_results, to_row
from fedlm.federation.wire import Field, WireError

SCHEMA = (Field("table", (2, 3), torch.float32), Field("flag", (), torch.bool))


# -- what arrives is checked against what the receiver declared ---------------------------------------------------


def test_fields_round_trip_and_a_row_of_another_length_or_dtype_is_refused_naming_both() -> None:
    table = torch.randn(2, 3)
    row = wire.encode([table, torch.tensor(True)], SCHEMA, "message")
    decoded = wire.decode(row, SCHEMA, "message")
    assert torch.equal(decoded[0], table) and bool(decoded[1])
    with pytest.raises(WireError, match=r"^message from rank 1: expected a torch.uint8 tensor of shape \(25,\), got "
                       r"torch.uint8 of shape \(24,\)\. Every rank must run the same fedlm version"):  # fmt: skip
        wire.decode(row[:-1], SCHEMA, "message from rank 1")
    with pytest.raises(WireError, match=r"got torch.int64 of shape \(25,\)"):
        wire.decode(row.long(), SCHEMA, "message")


def test_a_tensor_of_another_dtype_or_shape_is_refused_naming_its_field() -> None:
    with pytest.raises(WireError, match=r"^message, table: expected a torch.float32 tensor of shape \(2, 3\), got "
                       r"torch.float64 of shape \(2, 3\)"):  # fmt: skip
        wire.encode([torch.zeros(2, 3, dtype=torch.float64), torch.tensor(True)], SCHEMA, "message")
    with pytest.raises(WireError, match=r"got torch.float32 of shape \(3, 2\)"):
        wire.encode([torch.zeros(3, 2), torch.tensor(True)], SCHEMA, "message")


def arriving(monkeypatch: pytest.MonkeyPatch, rank: int, *messages: list[torch.Tensor]) -> None:
    """This process plays ``rank`` of two, and its next collectives receive ``messages`` (one list each)."""
    queue = list(messages)

    def receive(out: torch.Tensor | list[torch.Tensor], *args: object, **kwargs: object) -> None:
        for buffer, sent in zip(out if isinstance(out, list) else [out], queue.pop(0)):
            buffer.copy_(sent)

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(dist, "all_gather", receive)
    monkeypatch.setattr(dist, "broadcast", receive)


def test_a_rank_that_announces_another_length_stops_every_rank_before_its_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arriving(monkeypatch, 0, [torch.tensor([32]), torch.tensor([31])])
    with pytest.raises(WireError, match=r"^X25519 public keys: every rank sends 32 bytes, but rank\(s\) \[1\] "
                       r"announced \[31\]"):  # fmt: skip
        wire.gather_uint8(torch.zeros(32, dtype=torch.uint8), 32, "X25519 public keys")


def test_a_broadcast_is_parsed_as_json_and_never_unpickled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sent = json.dumps({"dirpath": "/runs/x", "flags": [True, None, 2.5]}).encode()
    arriving(monkeypatch, 1, [torch.tensor([len(sent)])], [torch.tensor(list(sent), dtype=torch.uint8)])
    assert wire.broadcast_json(None, 0, "m") == {"dirpath": "/runs/x", "flags": [True, None, 2.5]}
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Payload(marker))  # what DDPStrategy.broadcast would have unpickled, and so run
    arriving(monkeypatch, 1, [torch.tensor([len(evil)])], [torch.tensor(list(evil), dtype=torch.uint8)])
    with pytest.raises(WireError, match=rf"^m: the {len(evil)} bytes received are not UTF-8 JSON"):
        wire.broadcast_json(None, 0, "m")
    assert not marker.exists()
    arriving(monkeypatch, 1, [torch.tensor([2**30])])
    with pytest.raises(WireError, match=r"^m: rank 0 announced 1073741824 bytes of JSON; at most 1048576"):
        wire.broadcast_json(None, 0, "m")


@pytest.mark.parametrize("value", [Path("/runs/x"), ("a", 1), {1: "a"}, torch.zeros(1)])
def test_a_value_that_is_not_json_is_refused_on_every_rank(value: object, monkeypatch: pytest.MonkeyPatch) -> None:
    arriving(monkeypatch, 0, [torch.tensor([wire.UNSENDABLE])])  # what the source announces, and every rank reads
    with pytest.raises(
        WireError, match=rf"^m: rank 0 can broadcast only JSON values .* given a {type(value).__name__}"
    ):
        wire.broadcast_json(value, 0, "m")
    arriving(monkeypatch, 1, [torch.tensor([wire.UNSENDABLE])])
    with pytest.raises(WireError, match="never pickled objects; it was given see its error"):
        wire.broadcast_json(None, 0, "m")


# -- a client's state as tensors: Adam's moments, lr and schedule position, private tokens ------------------------


def adam(seed: int) -> tuple[SimpleNamespace, list[torch.nn.Parameter]]:
    """A stand-in trainer holding an AdamW and a LambdaLR over two parameters, as a fedlm module has."""
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    return SimpleNamespace(optimizers=[optimizer], lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)]), params


def trained_state(trainer: SimpleNamespace, params: list[torch.nn.Parameter]) -> ClientState:
    for _ in range(2):
        sum((p**2).sum() for p in params).backward()
        trainer.optimizers[0].step()
        trainer.lr_scheduler_configs[0].scheduler.step()
    return ClientState(torch.randn(5), optimizer_state(trainer))


def test_a_client_state_crosses_as_tensors_whole(tmp_path: Path) -> None:
    sender, params = adam(0)
    receiver, _ = adam(1)
    codec = StateCodec(receiver, torch.zeros(5))  # the receiver's own layout, before it has taken any step
    state = trained_state(sender, params)
    row = wire.encode(StateCodec(sender, torch.zeros(5)).encode(state), codec.schema, "client states")
    arrived = codec.decode(wire.decode(row, codec.schema, "client states"))
    assert torch.equal(arrived.private, state.private)
    torch.save(arrived.optimizer, tmp_path / "spilled.pt")  # what a budget spills, and reads back weights-only
    assert repr(torch.load(tmp_path / "spilled.pt", weights_only=True)) == repr(state.optimizer)
    load_optimizer_state(receiver, arrived.optimizer)
    assert repr(optimizer_state(receiver)) == repr(state.optimizer)  # moments, step, lr, the schedule's position
    untrained = codec.decode(wire.decode(wire.encode(codec.blank(), codec.schema, "c"), codec.schema, "c"))
    assert untrained.optimizer is None


def test_a_number_of_the_wrong_kind_is_refused_naming_where() -> None:
    trainer, params = adam(0)
    codec = StateCodec(trainer, torch.zeros(5))
    tensors = codec.encode(trained_state(trainer, params))
    tensors[-1][codec.numbers.index(("schedulers", 0, "last_epoch"))] = 1.5
    with pytest.raises(WireError, match=r"^client states: schedulers/0/last_epoch must be a int, but 1.5 arrived"):
        codec.decode(tensors)


def test_personalization_results_cross_as_float64_rows_one_per_client() -> None:
    row = {"client": 3, "holdout_examples": 6, "train_examples": 18, "global": {"holdout_acc": 0.5, "test_acc": 0.25},
           "finetuned": {"holdout_acc": 2 / 3, "test_acc": 0.5}}  # fmt: skip
    assert from_row(to_row(row)) == {**row, "best_on_holdout": "finetuned"}
    assert gather_results([row], 1) == [from_row(to_row(row))]  # one process: no collective
    with pytest.raises(WireError, match=r"^personalization results \(a row per client\): expected a torch.float64 "
                       r"tensor of shape \(2, 9\), got torch.float64 of shape \(1, 9\)"):  # fmt: skip
        gather_results([row], 2)


# -- a whole run, with unpickling made to raise ---------------------------------------------------------------------

# 4 clients, 2 sampled per round and spread over the processes; with seed 7, round 1 runs client 2 (trained in
# round 0 on rank 1) on rank 0, so over two ranks its Adam moments, lr schedule and private token move. Budget 0:
# every optimizer state is spilled to disk and read back.
EVERYTHING = {"clients": 4, "rounds": 2, "local_steps": 2, "weighting": "uniform", "seed": 7, "client_fraction": 0.5,
              "secure_aggregation": {"enabled": True}, "dp": {"noise_multiplier": 1.0, "clip_norm": 0.01,
              "noise_seed": 3}, "private_tokens": 1, "personalize_steps": 1, "client_state_budget_mb": 0}  # fmt: skip


def everything(folder: Path, backbone: str, fpb: Path) -> Path:
    """A run with all of ``EVERYTHING``, held-out data per client, a CSV logger and per-round checkpoints, so that
    Lightning's own broadcasts (log and checkpoint folders, flags) run too."""
    folder.mkdir()
    config = write_config(folder, backbone, fpb, EVERYTHING, enable_checkpointing=True)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["init_args"]["client_holdout"] = 0.25
    logger = {"save_dir": str(folder), "name": "logs"}
    raw["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": logger}
    config.write_text(yaml.safe_dump(raw))
    return config


def personalization(folder: Path) -> list[dict]:
    (path,) = folder.glob("logs/*/personalization.json")
    return json.loads(path.read_text())


@pytest.mark.multiprocess
def test_a_federated_run_with_everything_on_unpickles_nothing(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["--test_after_fit", "true"]
    calls: list[str] = []
    with monkeypatch.context() as patched:  # one process: the simulation, here
        forbid(patched.setattr, calls)
        config = everything(tmp_path / "one", tiny_gpt2_dir, synthetic_fpb)
        run = cli(["fit", "--config", str(config), *args, "--trainer.callbacks+=federated_worker.RoundRecorder"])
    assert calls == []
    simulated = next(c for c in run.trainer.callbacks if isinstance(c, RoundRecorder)).rounds

    out = tmp_path / "out"
    out.mkdir()
    config = everything(tmp_path / "two", tiny_gpt2_dir, synthetic_fpb)
    command = [*torchrun(2), str(TESTS / "nopickle_worker.py"), str(out), "fit", "--config", str(config), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=worker_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads((out / f"unpickled-rank{r}.json").read_text()) for r in range(2)] == [[], []]
    records = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    sent = {entry["name"] for record in records for entry in record["collectives"]}
    assert "all_gather" in sent and "broadcast" in sent and not sent & set(OBJECT_COLLECTIVES)
    # the rounds match the simulation's: the moved client state arrived whole
    for record in records:
        for round_index, expected in enumerate(simulated):
            torch.testing.assert_close(record["rounds"][round_index]["global"], expected["global"])
    layout = [[(row["client"], row["holdout_examples"], sorted(row)) for row in personalization(tmp_path / name)]
              for name in ("one", "two")]  # fmt: skip
    assert layout[0] == layout[1] and [row[0] for row in layout[1]] == [0, 1, 2, 3]
