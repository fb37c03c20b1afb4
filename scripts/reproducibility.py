"""Run one fedlm command twice in separate processes and say whether the two runs agree bitwise.

The second run gets another PYTHONHASHSEED and competes for the cores with a process that multiplies matrices
(``--load-threads`` threads, 1 by default: with more threads than cores a round ran about ten times slower here),
so neither hash order nor thread timing can hide. Compared: every row of metrics.csv except the
wall-clock columns, every tensor of the last checkpoint's encoder and optimizer state, and the test predictions.

    FEDLM_FPB_DIR=../shared/data/FinancialPhraseBank-v1.0 python scripts/reproducibility.py runs/repro \\
        -- fit --config configs/fpb_federated.yaml --federation.rounds 4

Prints a markdown table (one line per compared item) and exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

TIMINGS = {"round/compute_seconds", "round/comm_seconds"}
LOAD = "import sys, torch\ntorch.set_num_threads(int(sys.argv[1]))\na = torch.randn(1024, 1024)\nwhile True: a @ a"


def run(folder: Path, fedlm_args: list[str], hash_seed: str, load_threads: int) -> tuple[Path, float]:
    folder.mkdir(parents=True, exist_ok=True)
    args = [*fedlm_args, "--trainer.default_root_dir", str(folder), "--trainer.logger.init_args.save_dir", str(folder),
            "--trainer.logger.init_args.version", "0", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    burner = subprocess.Popen([sys.executable, "-c", LOAD, str(load_threads)]) if load_threads else None
    started = time.perf_counter()
    try:
        with (folder / "output.log").open("w") as log:
            env = {**os.environ, "PYTHONHASHSEED": hash_seed}
            result = subprocess.run(
                [sys.executable, "-m", "fedlm", *args], stdout=log, stderr=subprocess.STDOUT, env=env
            )
    finally:
        if burner is not None:
            burner.kill()
    if result.returncode != 0:
        sys.exit(f"{folder}: fedlm exited {result.returncode}; see {folder / 'output.log'}")
    seconds = time.perf_counter() - started
    (folder / "wall_seconds").write_text(f"{seconds:.0f}\n")
    return folder / "logs" / "version_0", seconds


def finished(folder: Path) -> tuple[Path, float]:
    """A run made before (``--compare-only``)."""
    return folder / "logs" / "version_0", float((folder / "wall_seconds").read_text())


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as file:
        return [{k: v for k, v in row.items() if k not in TIMINGS and v != ""} for row in csv.DictReader(file)]


def checkpoint_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """The encoder, the federation's state (global encoder, per-client optimizer moments) and the optimizer's, by name;
    the run's own folder, which ModelCheckpoint's state names, is written <run>."""
    root = str(run_dir.parents[1])
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    found: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            found[prefix.replace(root, "<run>")] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{prefix}/{index}", item)

    walk("state_dict", state["state_dict"])
    walk("optimizer_states", state.get("optimizer_states", []))
    walk("callbacks", state.get("callbacks", {}))
    return found


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument(
        "--load-threads", type=int, default=1, help="threads of the competing process in the second run"
    )
    parser.add_argument("--compare-only", action="store_true", help="compare the two runs already in OUTPUT")
    parser.add_argument(
        "fedlm_args", nargs=argparse.REMAINDER, help="after --: the fedlm command, e.g. fit --config ..."
    )
    options = parser.parse_args()
    fedlm_args = options.fedlm_args[1:] if options.fedlm_args[:1] == ["--"] else options.fedlm_args
    if options.compare_only:
        (a, seconds_a), (b, seconds_b) = finished(options.output / "first"), finished(options.output / "second")
    else:
        (a, seconds_a), (b, seconds_b) = (
            run(options.output / "first", fedlm_args, hash_seed="1", load_threads=0),
            run(options.output / "second", fedlm_args, hash_seed="2", load_threads=options.load_threads),
        )
    rows_a, rows_b = metrics(a), metrics(b)
    tensors_a, tensors_b = checkpoint_tensors(a), checkpoint_tensors(b)
    same_tensors = tensors_a.keys() == tensors_b.keys() and all(
        torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a
    )
    checks = [
        ("metrics.csv rows (all but wall-clock columns)", f"{len(rows_a)} / {len(rows_b)}", rows_a == rows_b),
        (
            "checkpoint tensors (encoder, optimizer, federation state)",
            f"{digest(tensors_a)} / {digest(tensors_b)}",
            same_tensors,
        ),
    ]
    predictions = [run_dir / "test_predictions.json" for run_dir in (a, b)]
    if all(p.is_file() for p in predictions):
        texts = [p.read_text() for p in predictions]
        checks.append(
            (
                "test predictions",
                " / ".join(hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts),
                texts[0] == texts[1],
            )
        )
    losses = [
        [row[k] for row in rows_a if k in row]
        for k in sorted({k for row in rows_a for k in row if k.endswith("/train_loss")})
    ]
    print(f"command: fedlm {' '.join(fedlm_args)}")
    print(
        f"first run: PYTHONHASHSEED=1, no other job, {seconds_a:.0f} s; second run: PYTHONHASHSEED=2, beside a "
        f"{options.load_threads}-thread matrix-product process, {seconds_b:.0f} s\n"
    )
    print("| compared | first / second | bitwise equal |\n|---|---|---|")
    for name, values, equal in checks:
        print(f"| {name} | {values} | {'yes' if equal else 'NO'} |")
    if losses:
        print(
            "\nper-round client training losses (first run): "
            + "; ".join(" ".join(f"{float(v):.6f}" for v in round_losses) for round_losses in losses)
        )
    sys.exit(0 if all(equal for _, _, equal in checks) else 1)


if __name__ == "__main__":
    main()
