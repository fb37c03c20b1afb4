"""``python -m fedlm.experiment.privacy RUNS --out results/privacy.md``: test accuracy against the client-level
privacy budget, with and without secure aggregation, and the time per round, from ``scripts/privacy.sh``'s runs.

Runs are found as ``RUNS/<plain|secure>/epsilon_<none|E>/logs/version_0/`` (``test_metrics.json``, ``metrics.csv``)
with the launcher's ``output.log`` two levels up; the noise multiplier and the epsilon spent are read from what the
run printed and logged, not recomputed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from fedlm.experiment import figures, markdown
from fedlm.experiment.runs import LOGS, find, floats, log_lines, logged, read_json, read_metrics

PROG = "python -m fedlm.experiment.privacy"
RUN_LOGS = (
    f"*/epsilon_*/{LOGS.as_posix()}"  # under RUNS: <plain|secure>/epsilon_<E>/, as scripts/privacy.sh writes them
)
NOISE_LINE = re.compile(r"\[fedlm dp\] noise multiplier ([0-9.]+), clip norm ([0-9.e-]+)")


@dataclass
class PrivacyRun:
    aggregation: str  # plain or secure
    target_epsilon: float | None  # None: no DP, or clipping only
    clip_only: bool  # clipped to the DP bound, no noise (epsilon infinite): what clipping alone costs
    noise_multiplier: float | None
    clip_norm: float | None
    epsilon_spent: float | None  # dp/epsilon after the last round: against a party that sees the global models
    peer_epsilon: float | None  # dp/epsilon_peer after the last round: against one curious peer
    rounds: int
    test_acc: float
    test_macro_f1: float
    compute_seconds: float  # mean per round, rank 0
    comm_seconds: float  # mean per round, rank 0: the all-reduces (masked ones included), waits for peers too
    fit_seconds: float

    @property
    def budget(self) -> str:
        if self.clip_only:
            return "clipping only, no noise"
        return "no DP" if self.target_epsilon is None else f"epsilon {self.target_epsilon:g}"


def read_run(folder: Path) -> PrivacyRun:
    aggregation, name = folder.parts[-2:]
    metrics = read_json(folder / LOGS / "test_metrics.json")
    rows = logged(read_metrics(folder / LOGS / "metrics.csv"), "round/compute_seconds")
    epsilons, peers = floats(rows, "dp/epsilon"), floats(rows, "dp/epsilon_peer")
    printed = next(filter(None, map(NOISE_LINE.search, log_lines(folder / "output.log"))), None)
    target = name.removeprefix("epsilon_")
    return PrivacyRun(
        aggregation=aggregation,
        target_epsilon=None if target in ("none", "clip") else float(target),
        clip_only=target == "clip",
        noise_multiplier=float(printed.group(1)) if printed else None,
        clip_norm=float(printed.group(2)) if printed else None,
        epsilon_spent=epsilons[-1] if epsilons else None,
        peer_epsilon=peers[-1] if peers else None,
        rounds=len(rows),
        test_acc=metrics["test/acc"],
        test_macro_f1=metrics["test/macro_f1"],
        compute_seconds=mean(floats(rows, "round/compute_seconds")),
        comm_seconds=mean(floats(rows, "round/comm_seconds")),
        fit_seconds=metrics["fit_seconds"],
    )


def majority_share(root: Path) -> float | None:
    """The accuracy of always answering the test set's most frequent class (every run tests the same sentences)."""
    for path in sorted(root.glob(f"{RUN_LOGS}/test_predictions.json")):
        labels = read_json(path)["label"]
        return max(labels.count(label) for label in set(labels)) / len(labels)
    return None


def read_runs(root: Path) -> list[PrivacyRun]:
    found = find([root], f"{RUN_LOGS}/test_metrics.json", "make them with bash scripts/privacy.sh")
    folders = sorted(path.parents[2] for path in found)
    runs = [read_run(folder) for folder in folders]
    # no DP, clipping only, then from the loosest budget to the tightest; plain before secure
    return sorted(
        runs, key=lambda r: (r.target_epsilon is not None, r.clip_only, -(r.target_epsilon or 0), r.aggregation)
    )


HEADER = ("budget (delta 1e-5)", "aggregation", "noise multiplier", "epsilon spent", "epsilon against a peer",
          "test accuracy", "test macro-F1", "compute s / round", "all-reduce s / round", "fit s")  # fmt: skip


def cells(r: PrivacyRun) -> list[str]:
    noise = "-" if r.noise_multiplier is None else f"{r.noise_multiplier:.3f}"
    spent, peer = (
        ("infinite", "infinite") if r.clip_only else
        tuple("-" if value is None else f"{value:.2f}" for value in (r.epsilon_spent, r.peer_epsilon))
    )  # fmt: skip
    return [r.budget, r.aggregation, noise, spent, peer, f"{r.test_acc:.3f}", f"{r.test_macro_f1:.3f}",
            f"{r.compute_seconds:.1f}", f"{r.comm_seconds:.3f}", f"{r.fit_seconds:.0f}"]  # fmt: skip


def table(runs: list[PrivacyRun]) -> str:
    return markdown.table(HEADER, map(cells, runs))


def plot(runs: list[PrivacyRun], out: Path, majority: float | None = None) -> Path:
    """Test accuracy against epsilon (no DP as a line), one marker per aggregation; seconds per round beside it."""
    fig, (acc_ax, time_ax) = figures.pyplot().subplots(1, 2, figsize=(11, 4.2))
    styles = {"plain": ("o", "tab:blue"), "secure": ("x", "tab:red")}
    for aggregation, (marker, color) in styles.items():
        private = sorted(
            (r for r in runs if r.aggregation == aggregation and r.target_epsilon), key=lambda r: r.target_epsilon
        )
        if private:
            acc_ax.plot([r.target_epsilon for r in private], [r.test_acc for r in private], marker=marker, color=color,
                        label=f"DP-FedAvg, {aggregation} all-reduce")  # fmt: skip
        for r in runs:
            if r.aggregation == aggregation and r.target_epsilon is None:
                acc_ax.axhline(r.test_acc, color=color, linestyle=":" if r.clip_only else "--", linewidth=1,
                               label=f"{r.budget}, {aggregation}")  # fmt: skip
    if majority is not None:
        acc_ax.axhline(majority, color="black", linestyle="-.", linewidth=1, label="majority class")
    acc_ax.set_xscale("log")
    acc_ax.set_xlabel("client-level epsilon (delta 1e-5)")
    acc_ax.set_ylabel("test accuracy")
    acc_ax.legend(fontsize=8)
    names = [f"{r.budget}, {r.aggregation}" for r in runs]
    time_ax.barh(names, [r.compute_seconds for r in runs], label="compute", color="tab:gray")
    time_ax.barh(
        names,
        [r.comm_seconds for r in runs],
        left=[r.compute_seconds for r in runs],
        label="all-reduce",
        color="tab:orange",
    )
    time_ax.invert_yaxis()  # the table's order, top to bottom
    time_ax.set_xlabel("seconds per round (rank 0)")
    time_ax.tick_params(axis="y", labelsize=7)
    time_ax.legend(fontsize=8)
    return figures.save(fig, out)


def write_report(root: Path, out: Path, command: str, notes: Path | None) -> Path:
    runs = read_runs(root)
    png = plot(runs, out.with_suffix(".png"), majority_share(root))
    lines = [
        "# Privacy: test accuracy against the client-level budget, with and without secure aggregation",
        "",
        "Made with:",
        "",
        f"    {command}",
        "",
        table(runs),
        "",
        f"![accuracy against epsilon, and time per round]({png.name})",
        *markdown.appendix(notes),
    ]
    return markdown.write(out, lines)


def main(argv: list[str] | None = None) -> None:
    parser = markdown.parser(PROG, __doc__, runs="the folder scripts/privacy.sh wrote (runs/privacy)")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown report (its PNG goes beside it)")
    parser.add_argument("--command", default="bash scripts/privacy.sh", help="the command that made the runs")
    args = markdown.parse(parser, argv)
    command = f"{args.command} && {markdown.command_line(PROG, args.runs, args.out, args.notes)}"
    print(write_report(args.runs, args.out, command, args.notes).read_text())


if __name__ == "__main__":
    main()
