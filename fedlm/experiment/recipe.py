"""``python -m fedlm.experiment.recipe RUNS --out results/recipe.md``: the recipe search, on validation only.

Runs are found as ``RUNS/<setting>/seed<S>/logs/version_0/metrics.csv`` (``scripts/recipe.sh``). Each run is scored
by the mean of its last ``--last`` validations (accuracy and macro-F1: the end of training, not one lucky
validation), then each setting by the mean and range of that score over its seeds. With ``model.calibrate`` the
last validation also says what calibration is worth on the half of the validation set its biases were not fitted
on. Nothing here opens a test file: the table cannot be used to pick by test accuracy.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

RUN_METRICS = "*/seed*/logs/version_0/metrics.csv"  # under RUNS, as scripts/recipe.sh writes them


@dataclass(frozen=True)
class SearchRun:
    setting: str
    seed: int
    val_acc: float  # mean of the last validations
    val_macro_f1: float
    halves_raw: float | None  # the last validation's split-half macro-F1, uncalibrated and calibrated
    halves_calibrated: float | None
    validations: int


def read_search_run(path: Path, last: int) -> SearchRun:
    """One run's validation scores from its metrics.csv."""
    with path.open() as file:
        rows = [row for row in csv.DictReader(file) if row.get("val/acc")]
    if not rows:
        raise ValueError(f"{path} has no validation rows (val/acc); did the run reach its first validation?")
    tail = rows[-last:]
    halves = {key: rows[-1].get(f"val/calibration/halves_{key}_macro_f1") for key in ("raw", "calibrated")}
    setting, seed = path.parents[3].name, int(path.parents[2].name.removeprefix("seed"))
    return SearchRun(
        setting,
        seed,
        mean(float(row["val/acc"]) for row in tail),
        mean(float(row["val/macro_f1"]) for row in tail),
        float(halves["raw"]) if halves["raw"] else None,
        float(halves["calibrated"]) if halves["calibrated"] else None,
        len(rows),
    )


def finished_runs(root: Path) -> tuple[list[Path], list[Path]]:
    """The metrics.csv of the finished runs under ``root``, and of the others.

    recipe.sh marks a finished run with a file ``done`` beside its logs; a run still going (or killed) would be
    scored by its early validations.
    """
    paths = sorted(root.glob(RUN_METRICS))
    finished = [path for path in paths if (path.parents[2] / "done").is_file()]
    return finished, [path for path in paths if path not in finished]


def spread(values: list[float]) -> str:
    return f"{mean(values):.3f} ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else f"{values[0]:.3f}"


def search_table(runs: list[SearchRun], last: int) -> str:
    """One row per setting, best mean validation accuracy first."""
    settings: dict[str, list[SearchRun]] = {}
    for run in runs:
        settings.setdefault(run.setting, []).append(run)
    lines = [
        f"| setting | seeds | val accuracy, mean of the last {last} validations (range over seeds) | val macro-F1, same "
        "| split-half macro-F1, raw -> calibrated (last validation) |",
        "|---|---|---|---|---|",
    ]
    for setting, group in sorted(settings.items(), key=lambda item: -mean(r.val_acc for r in item[1])):
        halves = [(r.halves_raw, r.halves_calibrated) for r in group if r.halves_raw is not None]
        calibration = f"{mean(h[0] for h in halves):.3f} -> {mean(h[1] for h in halves):.3f}" if halves else "-"
        seeds = " ".join(str(r.seed) for r in sorted(group, key=lambda r: r.seed))
        lines.append(
            f"| {setting} | {seeds} | {spread([r.val_acc for r in group])} | {spread([r.val_macro_f1 for r in group])} "
            f"| {calibration} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write the table (and --notes) here, else print it")
    parser.add_argument("--last", type=int, default=3, help="validations averaged at the end of each run")
    parser.add_argument("--notes", type=Path, default=None, help="a hand-written reading to put under the table")
    args = parser.parse_args()
    paths, unfinished = finished_runs(args.runs)
    for path in unfinished:
        print(f"[recipe] {path.parents[2]}: not finished, left out", file=sys.stderr)
    if not paths:
        raise SystemExit(f"no runs under {args.runs} ({RUN_METRICS}); make them with bash scripts/recipe.sh {args.runs}")
    table = search_table([read_search_run(path, args.last) for path in paths], args.last)
    if args.out is None:
        print(table)
        return
    notes = ["", args.notes.read_text().strip()] if args.notes else []
    command = f"python -m fedlm.experiment.recipe {args.runs} --out {args.out}" + (f" --notes {args.notes}" if args.notes else "")
    text = ["# Recipe search (validation only)", "", f"Runs: `bash scripts/recipe.sh {args.runs}`; table: `{command}`.", "", table, *notes]
    args.out.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
