"""Atomic checkpoint writes, and safe checkpoint reads.

Writes: a crash mid-save never replaces the last good checkpoint with a partial one.

Lightning's default goes through an fsspec transaction that writes to the system temp directory and then
moves the file, which degrades to a non-atomic copy when checkpoints live on another filesystem (a shared
disk, say). Here the temporary file sits beside the target, is fsynced, and replaces it with one rename.

``atomic_write`` does the same for any file (fedlm export's files, fedlm predict's results).

Reads: always ``weights_only=True``, whatever the caller asks. A fedlm checkpoint holds tensors and plain data
only, so a file that needs more (a tampered or foreign pickle) is refused instead of run.
"""

from __future__ import annotations

import os
import pickle
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class UnsafeCheckpointError(ValueError):
    """A checkpoint that could only be loaded by running code from inside it."""


def load_checkpoint(path: str | Path, map_location: Any = None) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``, and an error that says what a refusal means."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"ckpt_path: checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"ckpt_path={path} was refused: it holds objects other than tensors and plain data, so loading it "
            f"would run code from the file ({reason}). fedlm checkpoints never do; use a checkpoint fedlm wrote."
        ) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        atomic_write(path, lambda file: torch.save(checkpoint, file))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Let ``write`` fill a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The file is created with the umask's permissions, as ``open`` would (``tempfile.mkstemp`` would make it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_name(path)
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def partial_name(path: Path) -> Path:
    """A hidden name beside ``path`` that no other writer uses, for what is renamed to ``path`` once complete."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
