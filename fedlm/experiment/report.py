"""``fedlm report RUN_DIR...``: the triad's table and plots, rebuilt from saved run logs without retraining.

A run is any folder holding ``test_metrics.json`` and ``test_predictions.json`` (written by ``fit`` with
``test_after_fit: true``, or by ``test``) and, for the curves, the CSVLogger's ``metrics.csv``. A run trained with
``model.calibrate`` also has calibrated predictions: they make a row of their own beside the raw one ("federated,
calibrated"), and the verdict is given for each.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from fedlm.experiment.stats import BootstrapResult, Interval, Metric, hierarchical_bootstrap, mean_interval

KIND_ORDER = ("centralized", "federated", "local", "zero-shot")


@dataclass
class Run:
    folder: Path
    kind: str  # centralized | federated | local | zero-shot
    seed: int | None
    client: int | None
    metrics: dict[str, float]
    classes: list[str]
    labels: list[int]
    predicted: list[int]
    curve: list[tuple[float, float, float]] = field(default_factory=list)  # (fraction of budget, val loss, val acc)
    bytes_exchanged: float = 0.0
    config: dict = field(default_factory=dict)  # the resolved fedlm config LightningCLI saved (config.yaml)
    calibrated: list[int] | None = None  # predictions with the label biases fitted on validation, if any
    variant: str = ""  # "" for the raw predictions, "calibrated" for the calibrated view of the same run

    @property
    def name(self) -> str:
        base = f"client {self.client} alone" if self.kind == "local" else self.kind
        return f"{base}, {self.variant}" if self.variant else base


def calibrated_view(run: Run) -> Run:
    """The same run scored by its calibrated predictions (the test/calibrated/* metrics)."""
    metrics = {**run.metrics, "test/acc": run.metrics["test/calibrated/acc"], "test/macro_f1": run.metrics["test/calibrated/macro_f1"]}
    return replace(run, metrics=metrics, predicted=run.calibrated, calibrated=None, variant="calibrated")


def read_run(folder: Path) -> Run:
    metrics = json.loads((folder / "test_metrics.json").read_text())
    predictions = json.loads((folder / "test_predictions.json").read_text())
    run = Run(
        folder,
        metrics["kind"],
        metrics.get("seed"),
        metrics.get("client"),
        metrics,
        predictions["classes"],
        predictions["label"],
        predictions["predicted"],
        calibrated=predictions.get("predicted_calibrated"),
    )
    if (folder / "metrics.csv").is_file():
        run.curve, run.bytes_exchanged = read_curve(folder / "metrics.csv")
    if (folder / "config.yaml").is_file():
        run.config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    return run


def setup_table(rows: dict[str, list[Run]]) -> str:
    """The settings that make the runs comparable, from the first seed's saved config of each row."""
    lines = ["| run | backbone | template | encoder | lr | warm-up | batch | schedule |", "|---|---|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        config = runs[0].config
        if not config or runs[0].kind == "zero-shot" or runs[0].variant:
            continue
        model, data = config.get("model", {}), config.get("data", {}).get("init_args", {})
        encoder, federation = model.get("encoder", {}), config.get("federation")
        if federation:
            steps = federation.get("local_steps") or f"{federation.get('local_epochs')} epochs"
            schedule = f"{federation['clients']} clients, {federation['rounds']} rounds x {steps} local steps, FedAvg by {federation.get('weighting')}"
        else:
            schedule = f"{config.get('trainer', {}).get('max_epochs')} epochs"
        lines.append(
            f"| {name} | {model.get('backbone')} | `{model.get('template')}` (cache_prefix: {model.get('cache_prefix')}) | "
            f"{encoder.get('type')}, {encoder.get('virtual_tokens')} virtual tokens | {model.get('lr')} | "
            f"{model.get('warmup_steps')} | {data.get('batch_size')} | {schedule} |"
        )
    return "\n".join(lines)


def read_curve(path: Path) -> tuple[list[tuple[float, float, float]], float]:
    """Validation loss and accuracy against the fraction of the run's optimizer steps done, and bytes exchanged."""
    points, exchanged = [], 0.0
    with path.open() as file:
        for row in csv.DictReader(file):
            if row.get("val/loss"):
                points.append((int(row["step"]) + 1, float(row["val/loss"]), float(row["val/acc"])))
            if row.get("round/bytes_exchanged"):
                exchanged += float(row["round/bytes_exchanged"])
    total = max((steps for steps, _, _ in points), default=1)
    return [(steps / total, loss, acc) for steps, loss, acc in points], exchanged


def find_runs(folders: list[Path]) -> list[Run]:
    found = sorted({p.parent for folder in folders for p in Path(folder).rglob("test_metrics.json")})
    if not found:
        raise FileNotFoundError(f"no test_metrics.json under {', '.join(map(str, folders))}; run fit with test_after_fit: true")
    runs = [read_run(folder) for folder in found]
    return runs + [calibrated_view(run) for run in runs if run.calibrated is not None]


def group(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by row name (centralized, federated, client k alone, zero-shot), each list ordered by seed."""
    rows: dict[str, list[Run]] = defaultdict(list)
    order = lambda r: (KIND_ORDER.index(r.kind) if r.kind in KIND_ORDER else 9, r.client or 0, r.variant, r.seed or 0)  # noqa: E731
    for run in sorted(runs, key=order):
        rows[run.name].append(run)
    return dict(rows)


def view(rows: dict[str, list[Run]], variant: str) -> dict[str, list[Run]]:
    """The rows of one variant under their plain names (so that "federated" means its calibrated row, say)."""
    return {runs[0].name.removesuffix(f", {variant}"): runs for runs in rows.values() if runs[0].variant == variant}


def majority(run: Run) -> tuple[str, float]:
    """The most frequent test class and the accuracy of always answering it (a floor any trained model must clear)."""
    counts = [run.labels.count(k) for k in range(len(run.classes))]
    top = max(range(len(counts)), key=counts.__getitem__)
    return run.classes[top], counts[top] / len(run.labels)


def paired(rows: dict[str, list[Run]], a: str, b: str) -> BootstrapResult | None:
    """Bootstrap of row a's accuracy minus row b's over the seeds both have (paired by seed), seeds and test
    sentences resampled together."""
    if a not in rows or b not in rows:
        return None
    b_by_seed = {run.seed: run for run in rows[b]}
    pairs = [(run, b_by_seed[run.seed]) for run in rows[a] if run.seed in b_by_seed]
    if not pairs:
        return None
    return hierarchical_bootstrap([x.predicted for x, _ in pairs], pairs[0][0].labels, [y.predicted for _, y in pairs])


def best_local_by_validation(rows: dict[str, list[Run]]) -> str | None:
    """The local-only client with the highest mean final validation accuracy (chosen without the test set)."""
    local = {name: runs for name, runs in rows.items() if runs[0].kind == "local" and all(r.curve for r in runs)}
    if not local:
        return None
    return max(local, key=lambda name: mean_interval([r.curve[-1][2] for r in local[name]]).mean)


def accuracy(runs: list[Run], metric: str = "test/acc") -> Interval:
    """Mean and 95 % t-interval over seeds: seed-to-seed variance only, the test set held fixed."""
    return mean_interval([r.metrics[metric] for r in runs], bounds=(0.0, 1.0))


def bootstrap_interval(runs: list[Run], metric: Metric = "accuracy") -> Interval:
    """Mean and 95 % interval over seeds and test sentences resampled together (``hierarchical_bootstrap``)."""
    boot = hierarchical_bootstrap([r.predicted for r in runs], runs[0].labels, metric=metric)
    return Interval(boot.difference, boot.low, boot.high, len(runs) * len(runs[0].labels))


def table(rows: dict[str, list[Run]]) -> str:
    lines = [
        "| run | seeds | test accuracy, mean [95% CI over seeds and sentences] | test macro-F1, mean [95% CI over seeds and sentences] "
        "| accuracy, 95% t-interval over seeds only | per seed (accuracy) | trainable params | MB exchanged | fit time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    majority_class, majority_acc = majority(next(iter(rows.values()))[0])
    lines.append(f"| majority class ({majority_class}) | - | {majority_acc:.3f} | - | - | - | 0 | - | - |")
    for name, runs in rows.items():
        acc, f1, over_seeds = bootstrap_interval(runs), bootstrap_interval(runs, "macro_f1"), accuracy(runs)
        seeds = " ".join(f"{r.metrics['test/acc']:.3f}" for r in runs)
        params = runs[0].metrics.get("trainable_parameters", 0) if runs[0].kind != "zero-shot" else 0
        megabytes = mean_interval([r.bytes_exchanged / 1e6 for r in runs]).mean
        times = [r.metrics["fit_seconds"] for r in runs if r.metrics.get("fit_seconds")]
        fit_time = f"{mean_interval(times).mean:.0f}" if times else "-"
        lines.append(f"| {name} | {len(runs)} | {acc} | {f1} | {over_seeds} | {seeds} | {params:,} | {megabytes:.3g} | {fit_time} |")
    return "\n".join(lines)


def bootstrap_words(boot: BootstrapResult) -> str:
    """A bootstrap (seeds and sentences) of federated minus another run, in words."""
    if boot.low > 0 or boot.high < 0:
        side = f"excludes 0: federated significantly {'higher' if boot.low > 0 else 'lower'}"
    else:
        side = "includes 0: no significant difference"
    return (f"bootstrap over seeds and sentences {100 * boot.difference:+.1f} points, 95% CI [{100 * boot.low:+.1f}, {100 * boot.high:+.1f}] "
            f"({side}), p = {boot.p_value:.3f}")  # fmt: skip


def verdict(rows: dict[str, list[Run]]) -> list[str]:
    """The experiment's two questions, answered yes or no from the means, with the intervals that qualify them."""
    if "federated" not in rows:
        return ["No federated run found."]
    federated = bootstrap_interval(rows["federated"])
    lines = []
    if "centralized" in rows:
        centralized = bootstrap_interval(rows["centralized"])
        boot = paired(rows, "federated", "centralized")
        # Non-inferiority: the whole interval of federated minus centralized must lie above -1 point.
        answer = "yes" if boot.low > -0.01 else f"not shown: the interval reaches {100 * boot.low:+.1f} points"
        lines.append(
            f"- **Federated within 1 point of centralized or above it: {answer}.** Test accuracy {federated} vs "
            f"{centralized} (mean [95% CI over seeds and sentences]); {bootstrap_words(boot)}."
        )
    local = {name: runs for name, runs in rows.items() if runs[0].kind == "local"}
    if local:
        means = {name: accuracy(runs).mean for name, runs in local.items()}
        beaten = [name for name, mean in means.items() if federated.mean > mean]
        answer = "yes" if len(beaten) == len(local) else f"no, {', '.join(n for n in local if n not in beaten)} scores higher"
        lines.append(
            f"- **Federated above every local-only client: {answer}** on the mean over seeds (federated "
            f"{federated.mean:.3f}; {', '.join(f'{name} {mean:.3f}' for name, mean in means.items())})."
        )
        federated_by_seed = {r.seed: r.metrics["test/acc"] for r in rows["federated"]}
        for seed, fed in federated_by_seed.items():
            above = {name: r.metrics["test/acc"] for name, runs in local.items() for r in runs if r.seed == seed and r.metrics["test/acc"] >= fed}
            if above:
                lines.append(f"  - seed {seed}: federated {fed:.3f} is not above {', '.join(f'{n} ({a:.3f})' for n, a in above.items())}.")
        best = best_local_by_validation(rows)
        if best is not None:
            lines.append(
                f"- Federated vs the best local-only client chosen by validation accuracy ({best}): "
                f"{bootstrap_words(paired(rows, 'federated', best))}."
            )
    return lines


def verdict_calibrated(rows: dict[str, list[Run]]) -> list[str]:
    """The verdict again on the calibrated rows, when the federated runs have them."""
    calibrated = view(rows, "calibrated")
    if "federated" not in calibrated:
        return []
    return ["With calibrated predictions (label biases fitted on the validation set):", "", *verdict(calibrated), ""]


def plot(rows: dict[str, list[Run]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    def curves(ax, names: list[str], column: int, ylabel: str) -> None:  # noqa: ANN001
        for name in names:
            runs = [r for r in rows.get(name, []) if r.curve]
            if not runs:
                continue
            for index, run in enumerate(runs):
                x, y = [p[0] for p in run.curve], [p[column] for p in run.curve]
                ax.plot(x, y, marker="o", markersize=3, linewidth=1.5, alpha=0.8, color=colors[name],
                        label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})" if index == 0 else None)  # fmt: skip
        ax.set_xlabel("fraction of the training budget (same optimizer steps per example for every run)")
        ax.set_ylabel(ylabel)
        if column == 1:
            ax.set_yscale("log")  # early losses are 10x the final ones; the differences that matter are late
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()

    names = list(rows)
    palette = plt.get_cmap("tab10").colors
    colors = {name: palette[i % 10] for i, name in enumerate(names)}
    local = [n for n in names if rows[n][0].kind == "local" and not rows[n][0].variant]
    written = []

    def save(fig, filename: str) -> None:  # noqa: ANN001
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
        written.append(out / filename)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    curves(ax, ["centralized", "federated"], 1, "validation loss")
    ax.set_title("Validation loss: centralized vs federated")
    save(fig, "val_loss_centralized_vs_federated.png")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    curves(ax, ["federated", *local], 1, "validation loss")
    ax.set_title("Validation loss: each client alone vs federated")
    save(fig, "val_loss_local_vs_federated.png")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    curves(ax, [n for n in names if rows[n][0].curve and not rows[n][0].variant], 2, "validation accuracy")
    ax.set_title("Validation accuracy during training")
    save(fig, "val_accuracy.png")

    shown = [n for n in names if rows[n][0].kind != "zero-shot"]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False)
    for ax, name in zip(axes[0], shown):
        classes = rows[name][0].classes
        matrix = [[0] * len(classes) for _ in classes]
        for run in rows[name]:
            for label, pred in zip(run.labels, run.predicted):
                matrix[label][pred] += 1
        ax.imshow(matrix, cmap="Blues")
        darkest = max(max(row) for row in matrix)
        for i in range(len(classes)):
            for j in range(len(classes)):
                color = "white" if matrix[i][j] > darkest / 2 else "black"
                ax.text(j, i, matrix[i][j], ha="center", va="center", fontsize=9, color=color)
        ax.set_xticks(range(len(classes)), classes, rotation=30)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        seeds = len(rows[name])
        ax.set_title(f"{name}\n(test, {f'{seeds} seeds summed' if seeds > 1 else '1 seed'})", fontsize=9)
    axes[0][0].set_ylabel("true")
    save(fig, "confusion_matrices.png")
    return written


def relative(path: Path, base: Path) -> Path:
    try:
        return path.resolve().relative_to(base.resolve())
    except ValueError:
        return path


def write_report(folders: list[Path], out: Path, command: str | None = None, notes: Path | None = None) -> Path:
    """Read every run under ``folders``; write ``out``/README.md (table, verdict) and the PNGs beside it.

    ``command`` is printed as the line that rebuilds the report; ``notes`` (Markdown written by a person: why the
    result is what it is) is copied in under "Interpretation", since a verdict computed from a table cannot say why.
    """
    rows = group(find_runs(folders))
    interpretation = ["## Interpretation", "", notes.read_text().strip(), ""] if notes is not None else []
    command = command or f"fedlm report {' '.join(str(relative(f, Path.cwd())) for f in folders)} --out {relative(out, Path.cwd())}"
    out.mkdir(parents=True, exist_ok=True)
    pngs = plot(rows, out)
    lines = [
        "# Centralized vs federated vs local-only",
        "",
        "Test accuracy and macro-F1: mean over seeds, with a 95% bootstrap interval that resamples the seeds and the",
        "test sentences together (10,000 draws: seeds with replacement, sentences with replacement), so it covers both",
        "the training run's luck and the test set's; with 3 seeds it sees no more seed-to-seed spread than those 3 show.",
        "The t-interval over seeds alone (clipped to [0, 1]) is given beside it. Every trained run tests its final model.",
        "Rebuild this report from the saved runs with:",
        "",
        f"    {command}",
        "",
        table(rows),
        "",
        "## Setup",
        "",
        setup_table(rows),
        "",
        "## Verdict",
        "",
        *verdict(view(rows, "")),
        "",
        *verdict_calibrated(rows),
        *interpretation,
        "## Plots",
        "",
        *[f"![{png.stem}]({png.name})" for png in pngs],
        "",
        f"Runs read ({sum(len(runs) for runs in rows.values())}): "
        + ", ".join(sorted(str(relative(r.folder, Path.cwd())) for runs in rows.values() for r in runs)),
        "",
    ]
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    return readme


def report_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedlm report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, or folders that contain run folders")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: RUNS[0]/report)")
    parser.add_argument("--notes", type=Path, default=None, help="Markdown file copied into the report under Interpretation")
    args = parser.parse_args(argv)
    if args.notes is not None and not args.notes.is_file():
        parser.error(f"--notes {args.notes}: no such file")
    command = "fedlm report " + " ".join(argv if argv is not None else sys.argv[2:])
    readme = write_report(args.runs, args.out or args.runs[0] / "report", command, args.notes)
    print(readme.read_text())
    print(f"[fedlm report] written to {readme.parent}")
