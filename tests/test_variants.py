"""The report that compares federation settings on validation over seeds (fedlm.experiment.variants)."""

from pathlib import Path

import yaml

from fedlm.experiment.runs import LOGS
from fedlm.experiment.variants import read_runs, write


def write_run(root: Path, variant: str, seed: int, accuracy: list[float], payload: str, sent: float) -> None:
    logs = root / variant / f"seed{seed}" / "federated" / LOGS
    logs.mkdir(parents=True)
    rows = ["epoch,val/acc,round/bytes_exchanged"]
    rows += [f"{epoch},{value},{sent * 3}" for epoch, value in enumerate(accuracy)]
    (logs / "metrics.csv").write_text("\n".join(rows) + "\n")
    federation = {"clients": 3, "payload": payload, "average": "table"}
    config = {"federation": federation, "model": {"optimizer": {"lr": 0.01}}}
    (logs / "config.yaml").write_text(yaml.safe_dump(config))


def test_variants_are_paired_by_seed_and_a_collapse_after_round_3_is_measured(tmp_path: Path) -> None:
    write_run(tmp_path, "base", 1, [0.5, 0.6, 0.7, 0.8, 0.8, 0.8], "float64", 1000.0)
    write_run(tmp_path, "base", 2, [0.5, 0.6, 0.7, 0.7, 0.7, 0.7], "float64", 1000.0)
    write_run(tmp_path, "lean", 1, [0.9, 0.2, 0.7, 0.9, 0.3, 0.9], "bfloat16", 250.0)  # round 2's fall: warm-up
    write_run(tmp_path, "lean", 2, [0.5, 0.6, 0.7, 0.75, 0.75, 0.75], "bfloat16", 250.0)
    runs = read_runs(tmp_path)
    lean = {run.seed: run for run in runs["lean"]}
    assert round(lean[1].worst_drop, 3) == 0.6 and lean[2].worst_drop == 0.0
    assert lean[1].client_bytes == 250.0 and lean[1].describe() == "slot table, bfloat16, lr 0.01"
    report = write(tmp_path, tmp_path / "out" / "report.md", baseline="base")
    row = next(line for line in report.splitlines() if line.startswith("| lean "))
    # seed 1: 0.7 - 0.8; seed 2: 0.75 - 0.7, in points: -10 and +5, mean -2.5
    assert "| -2.5 [" in row and "(2 seeds)" in row and "| 0.600, 0.000 |" in row
    assert (tmp_path / "out" / "report.png").is_file()
