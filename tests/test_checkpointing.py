from pathlib import Path

import pytest
import torch

from fedlm.checkpointing import AtomicCheckpointIO


def test_failed_save_keeps_the_last_good_checkpoint_and_leaves_no_partial_file(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"round": 1, "w": torch.ones(3)}, path)
    with pytest.raises(Exception):
        # A lambda cannot be pickled: torch.save fails after it has started writing.
        io.save_checkpoint({"round": 2, "w": torch.zeros(1000), "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True)["round"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_save_replaces_the_previous_checkpoint(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    for round_index in range(3):
        io.save_checkpoint({"round": round_index}, path)
    assert io.load_checkpoint(path)["round"] == 2
