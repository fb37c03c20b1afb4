"""Read back what an offline W&B run stored: its ``run-*.wandb`` file, without a W&B server.

The file is a LevelDB-style log (after a 7-byte W&B header: 32 KiB blocks of chunks, each with a 7-byte header
of CRC, length and type: full, first, middle, last) of ``wandb_internal_pb2.Record`` protobufs. wandb 0.31 no
longer ships a Python reader (its core is in Go), so tests read the file themselves.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    group: str = ""
    job_type: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per wandb.log call

    def logged(self, key: str) -> list[Any]:
        return [row[key] for row in self.history if key in row]


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[1:4] == b"W&B", f"{path} is not a W&B run file"
    position, payloads, pending = HEADER, [], b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        chunk = data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind == FULL:
            payloads.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            payloads.append(pending + chunk)
    parsed = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        parsed.append(record)
    return parsed


def read_offline_run(folder: Path) -> OfflineRun:
    """The one offline run under ``folder`` (searched recursively)."""
    (path,) = list(folder.rglob("offline-run-*/run-*.wandb"))
    run = OfflineRun()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.group, run.job_type, run.name = record.run.run_group, record.run.job_type, record.run.display_name
            run.tags = list(record.run.tags)
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "history":
            run.history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
            continue
        else:
            continue
        for item in updates:
            if item.key:
                run.config[item.key] = json.loads(item.value_json)
    return run
