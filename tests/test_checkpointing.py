import pickle
import random
from pathlib import Path

import pytest
import torch
from helpers import Payload

from fedlm.checkpointing import (
    AtomicCheckpointIO,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
)


def test_failed_save_keeps_the_last_good_checkpoint_and_leaves_no_partial_file(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"round": 1, "w": torch.ones(3)}, path)
    # A lambda cannot be pickled: torch.save fails after it has started writing (AttributeError "Can't pickle local
    # object" up to Python 3.13, pickle.PicklingError from 3.14).
    with pytest.raises((AttributeError, pickle.PicklingError)):
        io.save_checkpoint({"round": 2, "w": torch.zeros(1000), "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True)["round"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_save_replaces_the_previous_checkpoint(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    for round_index in range(3):
        io.save_checkpoint({"round": round_index}, path)
    assert io.load_checkpoint(path)["round"] == 2


def test_a_file_that_is_no_checkpoint_is_called_unreadable_not_dangerous(tmp_path: Path) -> None:
    real = tmp_path / "real.ckpt"
    torch.save({"w": torch.ones(1000)}, real)
    files = {
        "random.ckpt": random.Random(0).randbytes(4096),
        "notes.ckpt": b"epoch 3, val/acc 0.91\n",
        "truncated.ckpt": real.read_bytes()[:2000],
        "empty.ckpt": b"",
        "plain.ckpt": pickle.dumps({"epoch": 3}, protocol=2),  # a pickle, but not of torch.save
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(
            CorruptCheckpointError, match=f"{name} is not a readable checkpoint: it is damaged, truncated"
        ):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointNotFoundError, match="missing.ckpt"):
        load_checkpoint(tmp_path / "missing.ckpt")
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "evil": Payload(marker)}, tmp_path / "zip.ckpt")
    torch.save({"evil": Payload(marker)}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    (tmp_path / "plain.ckpt").write_bytes(pickle.dumps({"evil": Payload(marker)}, protocol=2))
    for name in ("zip.ckpt", "legacy.ckpt", "plain.ckpt"):
        with pytest.raises(UnsafeCheckpointError, match=f"{name} was refused: .* would run code from the file"):
            load_checkpoint(tmp_path / name)
    assert not marker.exists()
