"""What crosses between ranks: tensors of a declared dtype and shape, never pickled objects.

torch.distributed's object collectives (``all_gather_object``, ``broadcast_object_list``, ...) pickle on the sender
and unpickle on every receiver, and unpickling runs whatever code the bytes name: any site that can send on the
process group could run code in every other site's process. fedlm's messages go through these helpers instead.
Each is a uint8 tensor whose length the receiver knows beforehand, from the config or from its own copy of the
state; every rank first announces its length, so that ranks running different code all stop with an error that
names the message, what was expected and what arrived, instead of hanging or misreading. The bytes are then
viewed as tensors of the declared fields (``Field``), or parsed as JSON (``broadcast_json``): data, never code.

Each function that sends is a collective over ``group`` (default: the world): every rank of it calls it, in the
same order. Messages travel through the CPU, on the gloo backend that every fedlm process group has.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fedlm.errors import FedlmError

MAX_JSON_BYTES = 2**20  # Lightning broadcasts folder names and flags: a few hundred bytes
UNSENDABLE = -1  # the length a broadcast's source announces when its value is not JSON: every rank then raises


class WireError(FedlmError, ValueError):
    """What a rank sent is not what the receivers declared: the ranks run different code or configs."""


@dataclass(frozen=True)
class Field:
    """One tensor of a message: its name (for errors), shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def nbytes(schema: Sequence[Field]) -> int:
    return sum(field.nbytes for field in schema)


def check(tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> None:
    """Refuse ``tensor`` unless it has the declared dtype and shape."""
    if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
        raise WireError(
            f"{what}: expected a {dtype} tensor of shape {tuple(shape)}, got {tensor.dtype} of shape "
            f"{tuple(tensor.shape)}. Every rank must run the same fedlm version with the same config."
        )


def encode(tensors: Sequence[torch.Tensor], schema: Sequence[Field], what: str) -> torch.Tensor:
    """The tensors' bytes one after another, as one uint8 row; each tensor is checked against its field first."""
    if len(tensors) != len(schema):
        raise WireError(f"{what}: {len(tensors)} tensors for the {len(schema)} fields {[f.name for f in schema]}.")
    parts = []
    for tensor, field in zip(tensors, schema):
        check(tensor, field.shape, field.dtype, f"{what}, {field.name}")
        parts.append(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def decode(row: torch.Tensor, schema: Sequence[Field], what: str) -> list[torch.Tensor]:
    """The tensors of ``schema`` from a received row, once the row's dtype and length are checked."""
    check(row, (nbytes(schema),), torch.uint8, what)
    tensors, offset = [], 0
    for field in schema:
        piece = row[offset : offset + field.nbytes].clone()  # its own storage, aligned for the wider dtype
        tensors.append(piece.view(field.dtype).reshape(field.shape))
        offset += field.nbytes
    return tensors


def gather_uint8(
    row: torch.Tensor, length: int, what: str, group: dist.ProcessGroup | None = None
) -> list[torch.Tensor]:
    """Every rank's ``row`` (1-D uint8 of ``length`` bytes), in rank order.

    Each rank announces its row's length first and every rank checks all of them, so a rank that sends another
    length makes every rank raise the same error before any payload travels (gloo would fail or hang on it).
    """
    world = dist.get_world_size(group)
    announced = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(announced, torch.tensor([row.numel()], dtype=torch.int64), group=group)
    wrong = {rank: int(size) for rank, size in enumerate(announced) if int(size) != length}
    if wrong:
        raise WireError(
            f"{what}: every rank sends {length} bytes, but rank(s) {sorted(wrong)} announced {list(wrong.values())}. "
            "Every rank must run the same fedlm version with the same config."
        )
    received = [torch.zeros(length, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(received, row.to("cpu", torch.uint8), group=group)
    return received


def gather_flat(
    tensors: Sequence[torch.Tensor], schema: Sequence[Field], what: str, group: dist.ProcessGroup | None = None
) -> list[list[torch.Tensor]]:
    """Every rank's ``tensors``, laid out by ``schema`` (which every rank derives for itself), in rank order."""
    rows = gather_uint8(encode(tensors, schema, what), nbytes(schema), what, group)
    return [decode(row, schema, f"{what} from rank {rank}") for rank, row in enumerate(rows)]


# -- JSON, for Lightning's broadcasts ------------------------------------------------------------------------------


def is_json(value: Any) -> bool:
    """Whether ``value`` survives a JSON round trip unchanged: str, int, float, bool, None, lists of them and dicts
    of them with str keys (no tuples, which would come back as lists)."""
    if value is None or isinstance(value, str | int | float):  # bool is an int
        return True
    if isinstance(value, list):
        return all(map(is_json, value))
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_json(item) for key, item in value.items())
    return False


def json_payload(value: Any) -> bytes | None:
    """``value`` as UTF-8 JSON, or None if it is not JSON (``is_json``) or longer than ``MAX_JSON_BYTES``."""
    payload = json.dumps(value).encode() if is_json(value) else None
    return payload if payload is not None and len(payload) <= MAX_JSON_BYTES else None


def broadcast_json(value: Any, src: int, what: str, group: dist.ProcessGroup | None = None) -> Any:
    """Rank ``src``'s ``value`` on every rank, sent as UTF-8 JSON in a uint8 tensor (its length first), parsed
    with ``json.loads``: data only, whatever the bytes. A value that is not JSON (``is_json``) makes every rank
    raise, not the source alone, which would leave the others waiting for its bytes."""
    source = dist.get_rank() == src  # src is a global rank, as in torch.distributed.broadcast
    payload = json_payload(value) if source else b""
    length = torch.tensor([UNSENDABLE if payload is None else len(payload)], dtype=torch.int64)
    dist.broadcast(length, src, group=group)
    size = int(length)
    if size == UNSENDABLE:
        given = f"a {type(value).__name__}: {value!r:.200}" if source else "see its error"
        raise WireError(
            f"{what}: rank {src} can broadcast only JSON values of at most {MAX_JSON_BYTES} bytes (str, int, float, "
            f"bool, None, and lists and str-keyed dicts of them), never pickled objects; it was given {given}."
        )
    if not 0 <= size <= MAX_JSON_BYTES:
        raise WireError(f"{what}: rank {src} announced {size} bytes of JSON; at most {MAX_JSON_BYTES} are accepted.")
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if source else torch.zeros(size, dtype=torch.uint8)
    dist.broadcast(data, src, group=group)
    return parse_json(data, size, what)


def parse_json(data: torch.Tensor, size: int, what: str) -> Any:
    """The value in a received JSON message, once its dtype and length are checked."""
    check(data, (size,), torch.uint8, what)
    try:
        return json.loads(data.numpy().tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WireError(f"{what}: the {size} bytes received are not UTF-8 JSON ({error}).") from None
