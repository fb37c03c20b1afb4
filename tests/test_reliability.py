"""Exact resume, a killed rank, a silent peer, a non-finite client, two nodes on loopback, bad input."""

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    FEDERATION,
    REPO,
    assert_opened_only_its_own,
    opened_by,
    run_ranks,
    site_layout,
    split_data,
    start_worker,
    tiny_module,
    torchrun,
    trainer,
    with_data,
    write_config,
)

from fedlm.federation.releases import ReleaseError, ReleaseJournal
from fedlm.federation.strategy import rank_file


def checkpointing(folder: Path) -> dict:
    """A round checkpoint kept per round (``round=N``) and ``last.ckpt``, as the shipped configs write them."""
    every_round = {"dirpath": str(folder), "filename": "round{epoch}", "save_top_k": -1, "save_last": True}
    return {
        "enable_checkpointing": True,
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": every_round}],
    }


HARD = {**FEDERATION, "clients": 3, "server": {"optimizer": "fedadam", "lr": 0.01}, "private_tokens": 1}


# seed 7 samples clients [1, 2], [0, 2], [0, 1]: client 0 has no state of its own at the first round's checkpoint
SAMPLED = {"client_fraction": 0.67, "seed": 7}


@pytest.mark.multiprocess
@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["every_client", "sampled"])
def test_resume_from_a_round_checkpoint_is_bitwise_the_uninterrupted_run(
    sampling: dict, tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """Three clients in one process (each with its own Adam moments and lr schedule), FedAdam (server state), split
    prompts (private tokens) and encoder dropout (RNG): everything a round checkpoint must carry. Sampled: a client
    that had not trained by the checkpoint starts its first round from a fresh optimizer, not the restored one."""
    federation = {**HARD, **sampling}
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation, **checkpointing(tmp_path / "ckpt"))
    schedule = (
        "--model.optimizer.lr_schedule",
        "cosine",
        "--model.optimizer.warmup_steps",
        "2",
        "--model.optimizer.final_lr_fraction",
        "0.1",
    )
    dropout = ("--model.encoder.dropout", "0.1", *schedule)
    result, (full,) = run_ranks(tmp_path, config, 1, *dropout)
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp_path / "resumed").mkdir()
    result, (resumed,) = run_ranks(
        tmp_path / "resumed", config, 1, *dropout, "--ckpt_path", str(tmp_path / "ckpt" / "roundepoch=0.ckpt")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(resumed["rounds"]) == 2  # rounds 2 and 3
    for a, b in zip(full["rounds"][1:], resumed["rounds"]):
        assert torch.equal(a["global"], b["global"])
        assert a["client_params"].keys() == b["client_params"].keys()
        assert all(torch.equal(a["client_params"][k], b["client_params"][k]) for k in a["client_params"])
    steps = 2 * (2 if sampling else 3) * 3  # 2 rounds x clients per round x 3 steps, step for step
    assert len(resumed["losses"]) == steps and full["losses"][-steps:] == resumed["losses"]


def test_a_release_journal_keeps_its_secret_and_refuses_other_bits_for_a_released_round(tmp_path: Path) -> None:
    journal = ReleaseJournal.open(tmp_path, 0, "run-a")
    assert stat.S_IMODE(journal.path.stat().st_mode) == 0o600  # whoever reads the secret can subtract the noise
    journal.record(0, torch.ones(3, dtype=torch.float64))
    again = ReleaseJournal.open(tmp_path, 0, "run-a")  # the restart of the same run
    assert again.secret == journal.secret and again.released == journal.released
    again.record(0, torch.ones(3, dtype=torch.float64))  # the same bits: fine
    with pytest.raises(ReleaseError, match="round 1 was released before"):
        again.record(0, torch.full((3,), 2.0, dtype=torch.float64))
    assert ReleaseJournal.open(tmp_path, 0, "run-b").secret != journal.secret  # another run: its own noise


@pytest.mark.multiprocess
def test_a_dp_round_run_again_after_a_restart_releases_the_same_bits(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """Client-level DP with secret noise (no noise_seed): resuming from round 1's checkpoint re-runs rounds 2 and 3,
    which the first attempt had released (as after a crash between a round's release and its checkpoint): the
    re-run sends the same bits, so the accountant's count stays true."""
    federation = {**FEDERATION, "weighting": "uniform", "dp": {"noise_multiplier": 0.5, "clip_norm": 0.1}}
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation, **checkpointing(tmp_path / "ckpt"))
    result, records = run_ranks(tmp_path, config, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    (full,) = records
    (tmp_path / "resumed").mkdir()
    result, records = run_ranks(
        tmp_path / "resumed", config, 1, "--ckpt_path", str(tmp_path / "ckpt" / "roundepoch=0.ckpt")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (resumed,) = records
    for a, b in zip(full["rounds"][1:], resumed["rounds"], strict=True):
        assert torch.equal(a["global"], b["global"])
    (journal,) = tmp_path.glob("dp-releases-*-rank0.json")
    assert sorted(json.loads(journal.read_text())["released"]) == ["0", "1", "2"]


@pytest.mark.multiprocess
def test_a_rank_killed_after_a_dp_release_is_restarted_and_releases_the_same_bits_again(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """Rank 1 dies after round 2's noised sum left it and before round 2's checkpoint; torchrun restarts the group
    from round 1's checkpoint, and round 2 is released again: the same bits as before (the journal that the killed
    attempt wrote holds their hash, and a different payload would have been refused)."""
    federation = {**FEDERATION, "weighting": "uniform", "dp": {"noise_multiplier": 0.5, "clip_norm": 0.1}}
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation, **checkpointing(tmp_path / "ckpt"))
    env = {"FEDLM_TEST_FAULT": "release:1:1:0", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    launcher, out = torchrun(2, "--max-restarts=1"), tmp_path / "out"
    process = start_worker("federated_worker.py", out, config, launcher, "--ckpt_path", "last", env=env)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert "SIGKILL" in stderr or "exitcode: -9" in stderr  # rank 1 died in round 2...
    for rank in range(2):
        record = torch.load(out / f"rank{rank}.pt")
        assert len(record["rounds"]) == 2  # ...and the restarted group ran rounds 2 and 3
        (journal,) = tmp_path.glob(f"dp-releases-*-rank{rank}.json")
        released = json.loads(journal.read_text())["released"]
        payloads = [c["tensors"][0] for c in record["collectives"] if c["name"] == "all_reduce" and c["round"] == 1]
        sent = [hashlib.sha256(p.numpy().tobytes()).hexdigest() for p in payloads if p.dtype == torch.float64]
        assert released["1"] in sent  # round 2's payload, sent again, is the one the killed attempt sent


def start_faulty(out: Path, config: Path, fault: str) -> subprocess.Popen:
    """Two ranks of tests/federated_worker.py, one of which misbehaves as ``FEDLM_TEST_FAULT=fault`` says."""
    return start_worker("federated_worker.py", out, config, torchrun(2), env={"FEDLM_TEST_FAULT": fault})


@pytest.mark.multiprocess
def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_ends_as_if_uninterrupted(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    for name in ("clean", "killed"):
        (tmp_path / name).mkdir()
    clean = write_config(
        tmp_path / "clean",
        tiny_gpt2_dir,
        synthetic_fpb,
        HARD | {"clients": 2},
        **checkpointing(tmp_path / "clean" / "ckpt"),
    )
    result, reference = run_ranks(tmp_path / "clean", clean, 2)
    assert result.returncode == 0, result.stderr[-3000:]

    config = write_config(
        tmp_path / "killed",
        tiny_gpt2_dir,
        synthetic_fpb,
        HARD | {"clients": 2},
        **checkpointing(tmp_path / "killed" / "ckpt"),
    )
    started = time.perf_counter()
    env = {"FEDLM_TEST_FAULT": "kill:1:1:1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # see README: restarts
    launcher, out = torchrun(2, "--max-restarts=1"), tmp_path / "killed" / "out"
    process = start_worker("federated_worker.py", out, config, launcher, "--ckpt_path", "last", env=env)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert (
        "SIGKILL" in stderr or "Signals.SIGKILL" in stderr or "exitcode: -9" in stderr
    )  # rank 1 was killed in round 2...
    assert (tmp_path / "killed" / "ckpt" / "last.ckpt.rank1").is_file()  # ...and resumed from its own part
    records = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    for rank in range(2):
        assert len(records[rank]["rounds"]) == 2  # the restarted group ran rounds 2 and 3 only
        assert torch.equal(records[rank]["rounds"][-1]["global"], reference[rank]["rounds"][-1]["global"])
    assert time.perf_counter() - started < 600

    # Guard: ranks that would resume from different rounds are stopped before training
    ckpt = tmp_path / "clean" / "ckpt"
    (ckpt / "last.ckpt.rank1").write_bytes((ckpt / "roundepoch=0.ckpt.rank1").read_bytes())
    (tmp_path / "mixed").mkdir()
    result, _ = run_ranks(tmp_path / "mixed", clean, 2, "--ckpt_path", str(ckpt / "last.ckpt"))
    assert (
        result.returncode != 0
        and "RanksDisagreeError: the ranks resumed from different rounds (1 to 3" in result.stderr
    )


@pytest.mark.multiprocess
def test_a_silent_peer_fails_the_collective_instead_of_hanging(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, {**FEDERATION, "collective_timeout_s": 5})
    started = time.perf_counter()
    process = start_faulty(tmp_path / "out", config, "hang:1:1:0")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert time.perf_counter() - started < 240  # the 1-hour hang was cut by the 5 s timeout
    assert "timed out" in stderr.lower() or "timeout" in stderr.lower()


@pytest.mark.multiprocess
def test_a_non_finite_client_stops_the_round_and_keeps_the_last_good_global(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, FEDERATION, **checkpointing(tmp_path / "ckpt"))
    process = start_faulty(tmp_path / "out", config, "nan:1:1:1")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "NonFiniteClientError: round 2: client(s) [1] produced a non-finite training loss or encoder" in stderr
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if "FederatedLoop" in k]
    assert state["completed_rounds"] == 1 and torch.isfinite(state["global_params"]).all()


@pytest.mark.multiprocess
def test_ranks_that_end_a_round_with_different_global_encoders_are_stopped(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, FEDERATION)
    process = start_faulty(tmp_path / "out", config, "skew:1:1:0")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "RanksDisagreeError: round 2: the ranks hold different global encoders after averaging" in stderr


@pytest.mark.multiprocess
def test_clients_whose_gradients_are_synchronized_are_stopped_under_dp_too(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """Each rank all-reduces the encoder's gradients over the world, as plain DDP would if it slipped past the
    strategy check: the two clients end round 1 with the same encoder, and the run stops although DP keeps each
    client's distance from the global encoder home."""
    federation = {**FEDERATION, "weighting": "uniform", "dp": {"noise_multiplier": 0.5, "clip_norm": 0.1}}
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation)
    process = start_faulty(tmp_path / "out", config, "sync:0:0:0")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0, stderr[-3000:]
    assert "CollapsedClientsError: all 2 clients that trained ended the round with identical encoders" in stderr, (
        stderr[-4000:]
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_nodes_on_loopback_each_with_only_its_own_data(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """The README's multi-node launch: `fedlm split-data` cuts the files, node k's folder holds only site{k}.txt,
    val.txt and test.txt, and every node runs the same data config on its own folder (naming the other site's file,
    absent there). Static rendezvous, so that node k is rank k and hosts client k (c10d would order the nodes by
    host and pid, not --node_rank). Each node opens only its own data, and the run is bitwise the partitioned run
    on the pooled file."""
    (tmp_path / "pooled").mkdir()
    result, reference = run_ranks(
        tmp_path / "pooled", write_config(tmp_path / "pooled", tiny_gpt2_dir, synthetic_fpb, FEDERATION), 2
    )
    assert result.returncode == 0, result.stderr[-3000:]

    split = split_data(synthetic_fpb, tmp_path / "split")
    folders = [site_layout(split, tmp_path / f"node{node}" / "data", node) for node in (0, 1)]
    port = free_port()
    nodes = []
    for node, folder in enumerate(folders):
        config = with_data(write_config(tmp_path / f"node{node}", tiny_gpt2_dir, synthetic_fpb, FEDERATION),
                           client_files=[str(folder / "site0.txt"), str(folder / "site1.txt")],
                           val_file=str(folder / "val.txt"), test_file=str(folder / "test.txt"))  # fmt: skip
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                    f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}"]  # fmt: skip
        out, env = tmp_path / f"node{node}" / "out", {"FEDLM_FPB_DIR": str(synthetic_fpb)}
        nodes.append(start_worker("audited_worker.py", out, config, launcher, env=env))
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-3000:]
    for node, folder in enumerate(folders):
        assert sorted(p.name for p in folder.iterdir()) == [f"site{node}.txt", "test.txt", "val.txt"]
        record = torch.load(tmp_path / f"node{node}" / "out" / f"rank{node}.pt")
        for ours, theirs in zip(record["rounds"], reference[node]["rounds"], strict=True):
            assert torch.equal(ours["global"], theirs["global"])
        opened = opened_by(tmp_path / f"node{node}" / "out", node)
        own = [folder / f"site{node}.txt", folder / "val.txt", folder / "test.txt"]
        assert_opened_only_its_own(opened, own, forbidden=[folders[1 - node], split, synthetic_fpb])


def test_rank_parts_sit_beside_the_checkpoint() -> None:
    assert rank_file("ckpt/last.ckpt", 0) == Path("ckpt/last.ckpt")
    assert rank_file("ckpt/last.ckpt", 3) == Path("ckpt/last.ckpt.rank3")


# -- bad input: refused before training, with the field and the fix ------------------------------------------------


def fit_error(tmp_path: Path, backbone: str, fpb: Path, *args: str, federation: dict | None = FEDERATION) -> str:
    """Run ``fedlm fit`` in-process; return the error it stopped with (SystemExit: the parser's message)."""
    from fedlm.cli import cli

    config = write_config(tmp_path, backbone, fpb, federation)
    with pytest.raises((Exception, SystemExit)) as err:
        cli(["fit", "--config", str(config), *args])
    return str(err.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model.encoder", '{"type": "transformer"}'],
            "Expected a typing.Literal['mlp', 'lstm', 'embedding']. Got value: transformer",
        ),
        (["--model.encoder", '{"virtual_tokens": 0}'], "model.encoder.virtual_tokens=0 must be positive"),
        (
            ["--data.init_args.client_files", '["/nowhere/site0.txt", "/nowhere/site1.txt"]'],
            "data.client_files: /nowhere/site0.txt does not exist",
        ),
    ],
    ids=["encoder-type", "virtual-tokens", "client-path"],
)
def test_bad_input_is_refused_with_the_field(
    args: list[str],
    message: str,
    tiny_gpt2_dir: str,
    synthetic_fpb: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    error = fit_error(tmp_path, tiny_gpt2_dir, synthetic_fpb, *args) + capsys.readouterr().err  # the parser's: stderr
    assert message in error and "round 1/" not in error


def test_a_client_with_no_data_is_refused(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    empty, full = tmp_path / "empty.txt", tmp_path / "full.txt"
    empty.write_text("\n")
    full.write_text((synthetic_fpb / "Sentences_AllAgree.txt").read_text(encoding="latin-1"), encoding="latin-1")
    error = fit_error(tmp_path, tiny_gpt2_dir, synthetic_fpb, "--data.init_args.client_files", f'["{empty}", "{full}"]')
    assert f"{empty}" in error and "holds no examples" in error


@pytest.mark.multiprocess
def test_a_world_size_that_does_not_fit_the_clients_is_refused(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, {**FEDERATION, "clients": 3})
    result, _ = run_ranks(tmp_path, config, 2)
    assert result.returncode != 0 and "world size 2 does not fit federation.clients=3" in result.stderr
    assert "round 1/" not in result.stderr


def test_a_checkpoint_of_another_model_is_refused(
    tiny_model_dir: str, tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """Same embedding width (32) but another architecture: the encoder's shapes fit, its meaning would not. (The CLI
    takes model.backbone from the checkpoint's hyperparameters; the Python API takes the module it is given.)"""
    from fedlm.data import FinancialPhraseBank
    from fedlm.ptuning import CheckpointMismatchError

    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    fit.fit(tiny_module(tiny_gpt2_dir), FinancialPhraseBank(path=str(synthetic_fpb), batch_size=8))
    fit.save_checkpoint(tmp_path / "gpt2.ckpt")
    other = tiny_module(tiny_model_dir)
    if "llama" not in tiny_model_dir:  # the same model loads
        trainer(tmp_path).test(other, FinancialPhraseBank(path=str(synthetic_fpb)), ckpt_path=tmp_path / "gpt2.ckpt")
        return
    with pytest.raises(
        CheckpointMismatchError, match="is another model .* Set model.backbone to the checkpoint's backbone"
    ):
        trainer(tmp_path).test(other, FinancialPhraseBank(path=str(synthetic_fpb)), ckpt_path=tmp_path / "gpt2.ckpt")


@pytest.mark.multiprocess
def test_a_kill_during_a_checkpoint_save_leaves_the_last_good_one(tmp_path: Path) -> None:
    """The child saves a good checkpoint, then starts overwriting it and is SIGKILLed while the new bytes are on disk
    but not yet renamed into place (its fsync is slowed down to hold it there)."""
    child = f"""
import os, sys, time, torch
from fedlm.checkpointing import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({{"round": 1, "w": torch.ones(3)}}, {str(tmp_path / "last.ckpt")!r})
os.fsync = lambda fd: (print("writing", flush=True), time.sleep(600))
io.save_checkpoint({{"round": 2, "w": torch.zeros(1_000_000)}}, {str(tmp_path / "last.ckpt")!r})
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().strip() == "writing"
    partial = list(tmp_path.glob(".last.ckpt.*.partial"))
    assert len(partial) == 1 and partial[0].stat().st_size > 4_000_000  # the new checkpoint, fully written...
    process.kill()
    process.wait(timeout=60)
    survivor = torch.load(tmp_path / "last.ckpt", weights_only=True)  # ...but the kill came before the rename
    assert survivor["round"] == 1 and torch.equal(survivor["w"], torch.ones(3))
