"""Same seed, same result in any process: two separate runs of one command agree bitwise, in the one-process
simulation and under torchrun, whatever PYTHONHASHSEED is and while another process competes for the cores."""

import csv
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from helpers import REPO, launcher_for, write_yaml

# Wall-clock columns: the only ones allowed to differ between two runs.
TIMINGS = {"round/compute_seconds", "round/comm_seconds"}


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama wide enough (384) that a batch's virtual-token gradient (8 x 15 x 384 values) is split over
    threads: the scatter-add that summed in thread order did so only above 32,768 values."""
    return str(build_tiny("llama", tmp_path_factory.mktemp("wide-llama"), width=384))


def write_repeated_config(folder: Path, backbone: str, fpb: Path) -> Path:
    """The one command both runs repeat: a federated fit with dropout, CSV logs, its last checkpoint and a test."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "seed_everything": 11,
        "test_after_fit": True,
        "trainer": {
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(folder),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(folder), "name": "logs"},
            },
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"filename": "last"}}
            ],
        },
        "model": {
            "backbone": backbone,
            "task": {"template": "{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"},
            "cache": {"prefix": True},
            "encoder": {"type": "mlp", "virtual_tokens": 10, "hidden_size": 64, "dropout": 0.1},
            "optimizer": {"lr": 0.01},
        },
        "data": {"class_path": "fedlm.data.FinancialPhraseBank", "init_args": {"path": str(fpb), "batch_size": 8}},
        "federation": {"clients": 2, "rounds": 4, "local_steps": 3, "seed": 3},
    }
    return write_yaml(folder / "run.yaml", config)


@contextmanager
def competing_load():
    """Another process keeping both cores busy with multi-threaded matrix products."""
    burner = subprocess.Popen(
        [sys.executable, "-c", "import torch\ntorch.set_num_threads(2)\na = torch.randn(384, 384)\nwhile True: a @ a"]
    )
    try:
        yield
    finally:
        burner.kill()
        burner.wait()


def run(folder: Path, backbone: str, fpb: Path, hash_seed: str, nproc: int) -> Path:
    config = write_repeated_config(folder, backbone, fpb)
    launcher = launcher_for(nproc)
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)  # a plain fit uses every core, which is where thread order could matter
    result = subprocess.run(
        [*launcher, "-m", "fedlm", "fit", "--config", str(config)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "logs" / "version_0"


def metrics_without_timings(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as file:
        rows = [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(file)]
    assert any(row.get("val/acc") for row in rows) and any(row.get("client0/train_loss") for row in rows)
    return rows


def final_encoder(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("encoder.")}


@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [1, 2], ids=["simulation", "torchrun"])
def test_two_processes_of_one_command_agree_bitwise(
    nproc: int, wide_llama: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    first = run(tmp_path / "first", wide_llama, synthetic_fpb, hash_seed="1", nproc=nproc)
    with competing_load():
        second = run(tmp_path / "second", wide_llama, synthetic_fpb, hash_seed="2", nproc=nproc)
    assert metrics_without_timings(first) == metrics_without_timings(second)
    a, b = final_encoder(first), final_encoder(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (first / "test_predictions.json").read_text() == (second / "test_predictions.json").read_text()
    # the encoder did train: the last round's global model is not the initial one
    losses = [row["client0/train_loss"] for row in metrics_without_timings(first) if row.get("client0/train_loss")]
    assert len(losses) == 4 and len(set(losses)) == 4
