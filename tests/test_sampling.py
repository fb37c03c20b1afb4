"""Client sampling that costs only the sampled clients: the spread plan, and the same run as rolling back."""

import json
from pathlib import Path

import pytest
import torch
from helpers import FEDERATION, LrRecorder, replay, run_ranks, with_data, write_config

from fedlm.cli import cli
from fedlm.federation import ServerConfig, sample_clients
from fedlm.federation.plan import spread
from fedlm.ptuning.schedule import lr_factor


def test_spread_evens_out_the_steps_and_keeps_every_client_once() -> None:
    equal = spread(list(range(10)), dict.fromkeys(range(10), 2), 4)
    assert [len(clients) for clients in equal] == [3, 3, 2, 2] and sorted(sum(equal, [])) == list(range(10))
    steps = {0: 5, 1: 1, 2: 3, 3: 3, 4: 1, 5: 1}
    uneven = spread(list(steps), steps, 2)
    assert [sum(steps[k] for k in clients) for clients in uneven] == [7, 7]
    assert uneven == spread(list(steps), steps, 2) and all(clients == sorted(clients) for clients in uneven)


@pytest.mark.multiprocess
def test_a_round_runs_only_its_sampled_clients_and_gives_the_rolled_back_result(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """6 clients, half sampled per round, 3 rounds, Adam moments kept per client. Rolling back (every client runs,
    the unsampled ones undo it) is the reference; spreading only the sampled ones, with every optimizer state
    pushed to disk (budget 0), must give it bit for bit in one process, and to float tolerance over 2 ranks,
    where clients' states move to whichever rank runs them."""
    federation = {**FEDERATION, "clients": 6, "client_fraction": 0.5, "local_steps": 2}
    settings = {"rolled": {"skip_unsampled": False}, "spread": {"client_state_budget_mb": 0}}
    runs = {}
    for name, processes in (("rolled", 1), ("spread", 1), ("ranks", 2)):
        folder = tmp_path / name
        folder.mkdir()
        config = write_config(
            folder, tiny_gpt2_dir, synthetic_fpb, {**federation, **settings.get(name, settings["spread"])}
        )
        result, runs[name] = run_ranks(folder, config, processes)
        assert result.returncode == 0, result.stderr[-3000:]
    sampled = [sample_clients(6, 0.5, FEDERATION["seed"], r) for r in range(3)]
    assert [sorted(r["client_params"]) for r in runs["spread"][0]["rounds"]] == sampled
    replay(runs["rolled"], ServerConfig(), sampled_each_round=3)  # the sampled clients alone make the average
    # 6 clients x 2 steps run each round when rolling back; only the 3 sampled ones otherwise
    assert len(runs["rolled"][0]["losses"]) == 36 and len(runs["spread"][0]["losses"]) == 18
    # over 2 ranks, 2 + 1 clients of 2 steps: the rank with one client idles through the other's extra steps
    # (Lightning needs every rank to run as many steps); an idle step's loss is 0, trained losses are not
    assert [len(rank["losses"]) for rank in runs["ranks"]] == [12, 12]
    assert sum(loss > 0 for rank in runs["ranks"] for loss in rank["losses"]) == 18
    for round_index in range(3):
        expected = runs["rolled"][0]["rounds"][round_index]
        assert torch.equal(runs["spread"][0]["rounds"][round_index]["global"], expected["global"])
        for rank in runs["ranks"]:
            torch.testing.assert_close(rank["rounds"][round_index]["global"], expected["global"])


@pytest.mark.multiprocess
def test_pinned_clients_of_unequal_size_each_on_its_ranks_idle_to_the_longest(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """A quarter epoch per round over clients of 2:1 size: client 0 runs twice the steps of client 1, whose rank idles
    through the difference (Lightning's per-batch broadcast needs every rank at every step), and the round is
    still each client's vector, averaged."""
    federation = {**FEDERATION, "rounds": 2, "local_steps": None, "local_epochs": 0.25}
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation)
    with_data(config, path=str(synthetic_fpb), partition={"kind": "quantity", "exponent": 1.0})
    result, records = run_ranks(tmp_path, config, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "client 0: 64 examples, 4 steps/round" in result.stdout
    assert "client 1: 32 examples, 2 steps/round" in result.stdout
    assert [len(r["losses"]) for r in records] == [8, 8]
    idle = [i for i, loss in enumerate(records[1]["losses"]) if loss == 0.0]
    assert idle == [2, 3, 6, 7] and 0.0 not in records[0]["losses"]
    replay(records, ServerConfig(), sampled_each_round=2)


def test_a_clients_lr_follows_the_rounds_also_after_rounds_it_sat_out(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """One of 2 clients per round, 2 local steps, a cosine schedule over 4 rounds: round r's steps are steps 2r and
    2r + 1 of the schedule whichever client runs them (not the client's own count of steps so far)."""
    federation = {"clients": 2, "rounds": 4, "local_steps": 2, "seed": 3, "client_fraction": 0.5}
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation, limit_val_batches=0)
    schedule = {"warmup_steps": 1, "lr_schedule": "cosine", "final_lr_fraction": 0.1, "lr": 0.05}
    run = cli(["fit", "--config", str(config), "--model.optimizer", json.dumps(schedule),
               "--trainer.callbacks+=helpers.LrRecorder"])  # fmt: skip
    (recorder,) = [c for c in run.trainer.callbacks if isinstance(c, LrRecorder)]
    sampled = [sample_clients(2, 0.5, 3, r)[0] for r in range(4)]
    assert len(set(sampled)) == 2, "the seed should make a client sit a round out"
    expected = [0.05 * lr_factor(step, 1, 8, "cosine", 0.1) for step in range(8)]
    assert recorder.lrs == pytest.approx(expected, rel=1e-12)
