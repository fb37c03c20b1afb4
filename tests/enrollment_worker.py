"""Run ``fedlm`` as its console script does, in one rank, and list the torch.distributed collectives it called.

Usage: python enrollment_worker.py OUT_DIR fedlm-args...  When the process ends, whether the run passed or was
refused, it writes OUT_DIR/collectives-rank{R}.json: every collective in call order, with the dtype and shape of
each tensor this rank handed it (objects: their repr), recorded by tests/federated_worker.py's wrappers.
"""

import json
import os
import sys
from pathlib import Path

import federated_worker as worker
import torch.distributed as dist

from fedlm.cli.main import main


def described(entry: dict) -> dict:
    tensors = [[str(t.dtype), list(t.shape)] for t in entry.get("tensors", [])]
    return {"name": entry["name"], "tensors": tensors, "objects": entry.get("repr", [])}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    sys.argv = ["fedlm", *sys.argv[2:]]
    for name in (*worker.TENSOR_COLLECTIVES, *worker.OBJECT_COLLECTIVES):
        setattr(dist, name, worker.recording(name, getattr(dist, name)))
    try:
        main()
    finally:
        calls = [described(entry) for entry in worker.COLLECTIVES]
        (out / f"collectives-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(calls) + "\n")
