"""The recipe search table: validation only, the end of each run, settings ranked by their mean over seeds."""

import csv
from pathlib import Path

import pytest

from fedlm.experiment.recipe import finished_runs, main, read_search_run, search_table


def fake_run(
    root: Path, setting: str, seed: int, accuracies: list[float], halves: tuple[float, float] | None = None
) -> Path:
    folder = root / setting / f"seed{seed}" / "logs" / "version_0"
    folder.mkdir(parents=True)
    fields = [
        "step",
        "train/loss",
        "val/acc",
        "val/macro_f1",
        "val/calibration/halves_raw_macro_f1",
        "val/calibration/halves_calibrated_macro_f1",
    ]
    with (folder / "metrics.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        for step, acc in enumerate(accuracies):
            writer.writerow({"step": step, "train/loss": 1.0})  # a training row: no validation in it
            row = {"step": step, "val/acc": acc, "val/macro_f1": acc - 0.1}
            if halves is not None:
                row.update(
                    {
                        "val/calibration/halves_raw_macro_f1": halves[0],
                        "val/calibration/halves_calibrated_macro_f1": halves[1],
                    }
                )
            writer.writerow(row)
    (folder.parents[1] / "done").touch()  # as recipe.sh marks a finished run
    return folder / "metrics.csv"


def test_runs_score_their_last_validations_and_settings_rank_by_the_mean_over_seeds(tmp_path: Path) -> None:
    fake_run(tmp_path, "base", 1, [0.5, 0.80, 0.82, 0.84])
    fake_run(tmp_path, "base", 2, [0.5, 0.70, 0.72, 0.74])
    fake_run(tmp_path, "better", 1, [0.6, 0.90, 0.90, 0.90], halves=(0.80, 0.84))
    run = read_search_run(tmp_path / "base" / "seed1" / "logs" / "version_0" / "metrics.csv", last=3)
    assert (run.setting, run.seed, run.validations) == ("base", 1, 4) and run.val_acc == pytest.approx(0.82)
    assert run.val_macro_f1 == pytest.approx(0.72) and run.halves_raw is None
    (fake_run(tmp_path, "running", 1, [0.99]).parents[2] / "done").unlink()  # still going: left out
    finished, unfinished = finished_runs(tmp_path)
    assert [path.parents[3].name for path in unfinished] == ["running"] and len(finished) == 3
    runs = [read_search_run(path, 3) for path in finished]
    lines = search_table(runs, 3).splitlines()
    assert lines[2].startswith("| better | 1 | 0.900 | 0.800 | 0.800 -> 0.840 |")
    assert lines[3].startswith("| base | 1 2 | 0.770 (0.720-0.820) |")


def test_merge_keeps_the_rows_of_settings_whose_runs_are_gone(tmp_path: Path) -> None:
    fake_run(tmp_path / "earlier", "base", 1, [0.80])
    fake_run(tmp_path / "earlier", "gone", 1, [0.85])
    out = tmp_path / "recipe.md"
    main([str(tmp_path / "earlier"), "--out", str(out)])
    fake_run(tmp_path / "now", "base", 1, [0.70])  # rerun: its row replaces the earlier one
    fake_run(tmp_path / "now", "new", 1, [0.90])
    main([str(tmp_path / "now"), "--out", str(out), "--merge"])
    rows = [line.split(" | ")[0:3] for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    assert rows == [["| new", "1", "0.900"], ["| gone", "1", "0.850"], ["| base", "1", "0.700"]]
    with pytest.raises(SystemExit):
        main([str(tmp_path / "now"), "--out", str(tmp_path / "none.md"), "--merge"])
