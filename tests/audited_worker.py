"""Run tests/federated_worker.py, unchanged, under an audit hook that records every path this process opens.

Usage: python audited_worker.py OUT_DIR fedlm-cli-args...  (federated_worker.py's arguments; it writes what it
writes). Besides, OUT_DIR/opened-rank{R}.json lists, once each in first-seen order, the absolute path of every
``open`` audit event (built-in ``open``, ``io.open``, ``os.open``, ``Path.read_*``, imports) and of every folder
listed (``os.listdir``, ``os.scandir``: ``glob``, ``os.walk``). Files opened by native code without Python's
``open`` (the tokenizer's Rust reader, safetensors, torch's C++ loader) raise no event; fedlm reads data files in
Python, so those are all seen.
"""

import json
import os
import runpy
import sys
from pathlib import Path

EVENTS = ("open", "os.listdir", "os.scandir")
OPENED: dict[str, None] = {}  # an ordered set


def record(event: str, args: tuple) -> None:
    if event in EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.setdefault(os.path.abspath(os.fsdecode(args[0])))


if __name__ == "__main__":
    sys.addaudithook(record)  # from here on, for the rest of the process: no way to remove it
    try:
        runpy.run_path(str(Path(__file__).with_name("federated_worker.py")), run_name="__main__")
    finally:
        opened = list(OPENED)
        Path(sys.argv[1], f"opened-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(opened) + "\n")
