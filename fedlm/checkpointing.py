"""Atomic checkpoint writes, and safe checkpoint reads.

Writes: a crash mid-save never replaces the last good checkpoint with a partial one.

Lightning's default goes through an fsspec transaction that writes to the system temp directory and then
moves the file, which degrades to a non-atomic copy when checkpoints live on another filesystem (a shared
disk, say). Here the temporary file sits beside the target, is fsynced, and replaces it with one rename.

``atomic_write`` does the same for any file (fedlm export's files, fedlm predict's results).

Reads: always ``weights_only=True``, whatever the caller asks. A fedlm checkpoint holds tensors and plain data
only, so a file that needs more (a tampered or foreign pickle) is refused instead of run; a file that is no
checkpoint at all (damaged, truncated, another format) is called that, not dangerous.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import secrets
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fedlm.errors import FedlmError


class CheckpointError(FedlmError, ValueError):
    """A checkpoint file that cannot be used; the message names the file and what to pass instead."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file where a checkpoint was named."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that could only be loaded by running code from inside it."""


class CorruptCheckpointError(CheckpointError):
    """A file that torch.load cannot read as a checkpoint at all: damaged, truncated, or another kind of file."""


def load_checkpoint(path: str | Path, map_location: Any = None) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``, and an error that says what a refusal or failure means."""
    if not Path(path).is_file():
        raise CheckpointNotFoundError(f"ckpt_path: checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as err:  # on a damaged file, torch's unpickler fails in any way (IndexError, KeyError, ...)
        opcodes = pickle_opcodes(Path(path))
        if opcodes is not None and isinstance(err, pickle.UnpicklingError) and opcodes & IMPORTS:
            reason = str(err).strip().splitlines()[0]
            raise UnsafeCheckpointError(
                f"ckpt_path={path} was refused: it holds objects other than tensors and plain data, so loading it "
                f"would run code from the file ({reason}). fedlm checkpoints never do; use a checkpoint fedlm wrote."
            ) from None
        if opcodes is None or not zipfile.is_zipfile(path):  # fedlm (Lightning) writes torch.save's zip format
            raise CorruptCheckpointError(  # torch's message would blame weights_only, or its unpickler's internals
                f"{path} is not a readable checkpoint: it is damaged, truncated, or not a file that torch.save "
                "wrote. Pass a .ckpt written by fedlm fit."
            ) from err
        raise  # an intact checkpoint archive that failed for another reason


IMPORTS = {"GLOBAL", "STACK_GLOBAL", "INST"}  # the opcodes that import a class or function, to call it
# torch.save's legacy format is a magic number, a protocol version and system information, then the object.
LEGACY_PICKLES = 4


def pickle_opcodes(path: Path) -> set[str] | None:
    """The opcodes of the pickles that torch.load reads, or None when the file is not intact: a zip archive that
    fails its checksums or holds no ``data.pkl``, or pickles that are not well-formed. Only in an intact file can a
    weights-only refusal be about code (a class or function that the pickle imports to call)."""
    try:
        with pickle_stream(path) as stream:
            opcodes: set[str] = set()
            for _ in range(LEGACY_PICKLES):
                opcodes |= {op.name for op, _, _ in pickletools.genops(stream)}
                if not stream.peek(1):
                    break
        return opcodes
    except (ValueError, OSError, zipfile.BadZipFile):  # genops: an unknown opcode, or data ending early
        return None


@contextmanager
def pickle_stream(path: Path) -> Iterator[BinaryIO]:
    """What torch.load unpickles: ``data.pkl`` in torch.save's zip format (checked first), else the file itself
    (torch.save's legacy format, a plain pickle)."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as file:
            yield file
        return
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if name.endswith("data.pkl")]
        if archive.testzip() is not None or not names:
            raise zipfile.BadZipFile(f"{path}: a damaged zip archive, or no data.pkl in it")
        with archive.open(names[0]) as stream:
            yield stream


class AtomicCheckpointIO(TorchCheckpointIO):
    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        atomic_write(path, lambda file: torch.save(checkpoint, file))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any], mode: int = 0o666) -> None:
    """Let ``write`` fill a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The file is created with ``mode`` less the umask, as ``open`` would: 0o600 for a secret, readable by no one else
    at any moment.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_name(path)
    try:
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as file:
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
