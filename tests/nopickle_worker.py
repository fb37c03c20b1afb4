"""tests/federated_worker.py (one rank of ``fedlm fit``, recording each round) with unpickling made to raise.

Usage: as federated_worker.py: python nopickle_worker.py OUT_DIR fedlm-cli-args...  Besides what that worker
writes, OUT_DIR/unpickled-rank{R}.json lists the forbidden calls that were made (each of which also raised), so
that a call whose error something caught is still seen.

Forbidden (``forbid``): pickle's ``loads``, ``load`` and ``Unpickler`` (what ``torch.load(weights_only=False)``
unpickles with), torch.distributed's object collectives, and its internal object/tensor conversions and unpickler.
``torch.load(weights_only=True)``, with which a site reads its own checkpoints and spilled client states, has its
own restricted unpickler and stays allowed: only what could unpickle another rank's bytes, or run code from a file,
is forbidden.
"""

import functools
import json
import os
import pickle
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from torch.distributed import distributed_c10d

OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                      "send_object_list", "recv_object_list")  # fmt: skip
FORBIDDEN = {
    pickle: ("loads", "load", "Unpickler"),
    dist: OBJECT_COLLECTIVES,
    distributed_c10d: (*OBJECT_COLLECTIVES, "_object_to_tensor", "_tensor_to_object", "_unpickler"),
}


class UnpicklingForbidden(RuntimeError):
    """Raised by every forbidden function."""


def refusing(name: str, original: object, calls: list[str]) -> object:
    """``original`` (a function, or a class to instantiate or subclass) made to record ``name`` and raise."""

    def refuse() -> None:
        calls.append(name)
        raise UnpicklingForbidden(f"{name} was called: a rank must never unpickle what another sent")

    if isinstance(original, type):

        class Refused(original):  # torch.load subclasses pickle.Unpickler before it instantiates it
            def __init__(self, *args: object, **kwargs: object) -> None:
                refuse()

        return Refused

    @functools.wraps(original)
    def refused(*args: object, **kwargs: object) -> None:
        refuse()

    return refused


def forbid(patch: Callable[[object, str, object], None], calls: list[str]) -> None:
    """Make every forbidden function raise, through ``patch`` (``setattr``, or pytest's ``monkeypatch.setattr``)."""
    for module, names in FORBIDDEN.items():
        for name in names:
            if hasattr(module, name):
                patch(module, name, refusing(f"{module.__name__}.{name}", getattr(module, name), calls))


if __name__ == "__main__":
    made: list[str] = []
    forbid(setattr, made)
    try:
        runpy.run_path(str(Path(__file__).with_name("federated_worker.py")), run_name="__main__")
    finally:
        Path(sys.argv[1], f"unpickled-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(made))
