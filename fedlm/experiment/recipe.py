"""``python -m fedlm.experiment.recipe RUNS --out results/recipe.md``: the recipe search, on validation only.

Runs are found as ``RUNS/<setting>/seed<S>/logs/version_0/metrics.csv`` (``scripts/recipe.sh``). Each run is scored
by the mean of its last ``--last`` validations (accuracy and macro-F1: the end of training, not one lucky
validation), then each setting by the mean and range of that score over its seeds. With ``model.task.calibrate`` the
last validation also says what calibration is worth on the half of the validation set its biases were not fitted
on. Nothing here opens a test file: the table cannot be used to pick by test accuracy.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from fedlm.errors import ConfigError
from fedlm.experiment import markdown
from fedlm.experiment.runs import LOGS, floats, logged, read_metrics

PROG = "python -m fedlm.experiment.recipe"
RUN_METRICS = f"*/seed*/{LOGS.as_posix()}/metrics.csv"  # under RUNS, as scripts/recipe.sh writes them


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
    rows = logged(read_metrics(path), "val/acc")
    if not rows:
        raise ConfigError(f"{path} has no validation rows (val/acc); did the run reach its first validation?")
    tail = rows[-last:]
    halves = {key: rows[-1].get(f"val/calibration/halves_{key}_macro_f1") for key in ("raw", "calibrated")}
    setting, seed = path.parents[3].name, int(path.parents[2].name.removeprefix("seed"))
    return SearchRun(
        setting,
        seed,
        mean(floats(tail, "val/acc")),
        mean(floats(tail, "val/macro_f1")),
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
    header = ["setting", "seeds", f"val accuracy, mean of the last {last} validations (range over seeds)",
              "val macro-F1, same", "split-half macro-F1, raw -> calibrated (last validation)"]  # fmt: skip
    rows = []
    for setting, group in sorted(settings.items(), key=lambda item: -mean(r.val_acc for r in item[1])):
        halves = [(r.halves_raw, r.halves_calibrated) for r in group if r.halves_raw is not None]
        calibration = f"{mean(h[0] for h in halves):.3f} -> {mean(h[1] for h in halves):.3f}" if halves else "-"
        seeds = " ".join(str(r.seed) for r in sorted(group, key=lambda r: r.seed))
        rows.append(
            [setting, seeds, spread([r.val_acc for r in group]), spread([r.val_macro_f1 for r in group]), calibration]
        )
    return markdown.table(header, rows)


def merge(table: str, earlier: str) -> str:
    """``table`` with the rows of ``earlier``'s table whose setting it lacks (runs of another session, gone now, kept
    as they were written), ranked together by mean validation accuracy."""
    header, rows = markdown.table_rows(table)
    earlier_header, earlier_rows = markdown.table_rows(earlier)
    if earlier_header != header:
        raise ConfigError(f"--merge: the table to merge into has the columns {earlier_header}, not {header}")
    have = {row[0] for row in rows}
    rows += [row for row in earlier_rows if row[0] not in have]
    return markdown.table(header, sorted(rows, key=lambda row: -float(row[2].split()[0])))


def main(argv: list[str] | None = None) -> None:
    parser = markdown.parser(PROG, __doc__, runs="the folder scripts/recipe.sh wrote (runs/recipe)")
    parser.add_argument("--out", type=Path, default=None, help="write the table (and --notes) here, else print it")
    parser.add_argument("--last", type=int, default=3, help="validations averaged at the end of each run")
    parser.add_argument("--merge", action="store_true", help="keep --out's rows of settings that RUNS lacks")
    args = markdown.parse(parser, argv)
    if args.merge and (args.out is None or not args.out.is_file()):
        parser.error("--merge keeps the rows of an existing --out; give one")
    paths, unfinished = finished_runs(args.runs)
    for path in unfinished:
        print(f"[recipe] {path.parents[2]}: not finished, left out", file=sys.stderr)
    if not paths:
        raise SystemExit(
            f"no runs under {args.runs} ({RUN_METRICS}); make them with bash scripts/recipe.sh {args.runs}"
        )
    table = search_table([read_search_run(path, args.last) for path in paths], args.last)
    if args.merge:
        table = merge(table, args.out.read_text())
    if args.out is None:
        print(table)
        return
    command = markdown.command_line(PROG, args.runs, args.out, args.notes)
    made = f"Runs: `bash scripts/recipe.sh {args.runs}`; table: `{command}`."
    markdown.write(args.out, ["# Recipe search (validation only)", "", made, "", table, *markdown.appendix(args.notes)])


if __name__ == "__main__":
    main()
