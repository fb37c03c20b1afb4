"""Test accuracy of two sets of runs that differ in one setting (e.g. prefix vs cached layout), paired by seed.

Each argument is a folder searched for runs (``test_metrics.json`` + ``test_predictions.json``, as ``fedlm fit
--test_after_fit true`` writes them). Prints each seed's accuracy and macro-F1, the mean with a 95% t-interval, and
a paired bootstrap of the accuracy difference over seeds and test sentences, on the seeds both sets have:

    python benchmarks/layout_parity.py --a runs/parity/prefix --b runs/fpb_triad/seed1234/centralized ...

(A whole triad against another, row by row: ``fedlm report A --against B``.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedlm.experiment.report import find_runs, paired_runs
from fedlm.experiment.stats import mean_interval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", nargs="+", type=Path, required=True, help="folders holding the runs of setting a")
    parser.add_argument("--b", nargs="+", type=Path, required=True, help="folders holding the runs of setting b")
    parser.add_argument("--names", nargs=2, default=["a", "b"], help="what to call the two settings")
    args = parser.parse_args()
    sets = [{run.seed: run for run in find_runs(folders)} for folders in (args.a, args.b)]
    seeds = sorted(set(sets[0]) & set(sets[1]))
    if not seeds:
        parser.error(f"no seed in common: {sorted(sets[0])} vs {sorted(sets[1])}")
    print(
        f"| setting | {' | '.join(f'seed {s}' for s in seeds)} | accuracy, mean [95% CI] | macro-F1, mean [95% CI] "
        "| epochs | fit time, s |"
    )
    print(f"|---|{'---|' * len(seeds)}---|---|---|---|")
    for name, runs in zip(args.names, sets):
        accuracy = [runs[s].metrics["test/acc"] for s in seeds]
        f1 = [runs[s].metrics["test/macro_f1"] for s in seeds]
        cells = " | ".join(f"{a:.3f} / {f:.3f}" for a, f in zip(accuracy, f1))
        epochs = sorted({runs[s].metrics["epochs_completed"] for s in seeds})
        seconds = [runs[s].metrics["fit_seconds"] for s in seeds]
        print(
            f"| {name} (acc / F1) | {cells} | {mean_interval(accuracy, (0, 1))} | {mean_interval(f1, (0, 1))} "
            f"| {', '.join(map(str, epochs))} | {min(seconds):.0f}-{max(seconds):.0f} |"
        )
    boot = paired_runs(list(sets[0].values()), list(sets[1].values()))
    print(
        f"\n{args.names[0]} - {args.names[1]}: {100 * boot.difference:+.1f} points of test accuracy over {len(seeds)} "
        f"seed(s); paired bootstrap over seeds and sentences, 95% CI [{100 * boot.low:+.1f}, {100 * boot.high:+.1f}], "
        f"p = {boot.p_value:.3f}"
    )


if __name__ == "__main__":
    main()
