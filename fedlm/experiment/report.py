"""``fedlm report RUN_DIR...``: the triad's table and plots, rebuilt from saved run logs without retraining.

A run is any folder holding ``test_metrics.json`` and ``test_predictions.json`` (written by ``fit`` with
``test_after_fit: true``, or by ``test``) and, for the curves, the CSVLogger's ``metrics.csv``. A run trained with
``model.task.calibrate`` also has calibrated predictions: they make a row of their own beside the raw one ("federated,
calibrated"), and the verdict is given for each.

A generative run (``model.task.kind: generation``) has, instead of classes, each test example's scores
(``test_predictions.json``'s ``examples``): the table gives every per-example metric the runs scored (ROUGE-L, token
F1, exact match, in that order), with the same bootstrap over seeds and examples, and the first of them leads the
comparisons; confusion matrices, macro-F1, calibration and the majority-class row are classification's alone.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedlm.experiment import figures, markdown
from fedlm.experiment.runs import find, floats, logged, read_config, read_json, read_metrics
from fedlm.experiment.stats import (
    BootstrapResult,
    Interval,
    example_bootstrap,
    hierarchical_bootstrap,
    mean_interval,
)
from fedlm.model.prompt_encoder import PromptEncoderConfig
from fedlm.ptuning.config import CacheConfig, OptimizerConfig
from fedlm.tasks.config import TaskConfig

KIND_ORDER = ("centralized", "federated", "local", "zero-shot")
# A generative run's per-example scores, in the table's order: the first a triad has leads its comparisons.
GENERATIVE_METRICS = ("rougeL", "f1", "exact_match")
CORPUS_METRICS = ("bleu", "chrf")  # a generative run's corpus-level scores: no value per example to resample
NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "rougeL": "ROUGE-L", "f1": "token F1",
         "exact_match": "exact match", "bleu": "BLEU", "chrf": "chrF"}  # fmt: skip


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
    curve: list[tuple[float, float, float | None]] = field(default_factory=list)  # (budget fraction, val loss, acc)
    bytes_exchanged: float = 0.0
    config: dict = field(default_factory=dict)  # the resolved fedlm config LightningCLI saved (config.yaml)
    calibrated: list[int] | None = None  # predictions with the label biases fitted on validation, if any
    variant: str = ""  # "" for the raw predictions, "calibrated" for the calibrated view of the same run
    task: str = "classification"  # or "generation": no classes, labels or predictions, but scores
    indices: list[int] = field(default_factory=list)  # generation: the test examples' indices, ascending
    scores: dict[str, list[float]] = field(default_factory=dict)  # generation: metric -> score per example (indices)
    generated_curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # val/generated/<metric>

    @property
    def name(self) -> str:
        base = f"client {self.client} alone" if self.kind == "local" else self.kind
        return f"{base}, {self.variant}" if self.variant else base


def calibrated_view(run: Run) -> Run:
    """The same run scored by its calibrated predictions (the test/calibrated/* metrics)."""
    metrics = {
        **run.metrics,
        "test/acc": run.metrics["test/calibrated/acc"],
        "test/macro_f1": run.metrics["test/calibrated/macro_f1"],
    }
    return replace(run, metrics=metrics, predicted=run.calibrated, calibrated=None, variant="calibrated")


def read_run(folder: Path) -> Run:
    metrics = read_json(folder / "test_metrics.json")
    predictions = read_json(folder / "test_predictions.json")
    curve, exchanged = read_curve(folder / "metrics.csv")  # none without a metrics.csv (a zero-shot test, say)
    head = (folder, metrics["kind"], metrics.get("seed"), metrics.get("client"), metrics)
    common = {"curve": curve, "bytes_exchanged": exchanged, "config": read_config(folder)}
    if metrics.get("task") == "generation" or "examples" in predictions:
        examples = sorted(predictions["examples"], key=lambda example: example["index"])
        present = [name for name in GENERATIVE_METRICS if examples and all(name in e for e in examples)]
        return Run(
            *head,
            [],
            [],
            [],
            **common,
            task="generation",
            indices=[int(e["index"]) for e in examples],
            scores={name: [float(e[name]) for e in examples] for name in present},
            generated_curves=read_generated(folder / "metrics.csv"),
        )
    return Run(
        *head,
        predictions["classes"],
        predictions["label"],
        predictions["predicted"],
        **common,
        calibrated=predictions.get("predicted_calibrated"),
    )


def model_section(model: dict[str, Any], name: str, kind: type) -> dict[str, Any]:
    """A section of a saved ``model:`` config with the defaults the run had filled in: a section left out is saved
    as null, and the module then runs with the section's defaults. Runs from before the sections saved the task's,
    cache's (``cache_`` + field) and optimizer's fields flat in ``model:``; they are read from there."""
    defaults = vars(kind())
    flat_name = {"task": "{}", "cache": "cache_{}", "optimizer": "{}"}.get(name)
    flat = {f: model[flat_name.format(f)] for f in defaults if flat_name and flat_name.format(f) in model}
    return {**defaults, **flat, **(model.get(name) or {})}


def setup_table(rows: dict[str, list[Run]]) -> str:
    """The settings that make the runs comparable, from the first seed's saved config of each row."""
    cells = []
    for name, runs in rows.items():
        config = runs[0].config
        if not config or runs[0].kind == "zero-shot" or runs[0].variant:
            continue
        model, data = config.get("model") or {}, config.get("data", {}).get("init_args", {})
        federation = config.get("federation")
        encoder, task, cache, optimizer = (
            model_section(model, section, kind)
            for section, kind in (
                ("encoder", PromptEncoderConfig),
                ("task", TaskConfig),
                ("cache", CacheConfig),
                ("optimizer", OptimizerConfig),
            )
        )
        if federation:
            steps = federation.get("local_steps") or f"{federation.get('local_epochs')} epochs"
            schedule = (
                f"{federation['clients']} clients, {federation['rounds']} rounds x {steps} local steps, "
                f"FedAvg by {federation.get('weighting')}"
            )
        else:
            schedule = f"{config.get('trainer', {}).get('max_epochs')} epochs"
        cells.append([name, f"{model.get('backbone')}",
                      f"`{task.get('template')}` (cache.prefix: {cache.get('prefix')})",
                      f"{encoder.get('type')}, {encoder.get('virtual_tokens')} virtual tokens",
                      f"{optimizer.get('lr')}", f"{optimizer.get('warmup_steps')}", f"{data.get('batch_size')}",
                      schedule])  # fmt: skip
    return markdown.table(("run", "backbone", "template", "encoder", "lr", "warm-up", "batch", "schedule"), cells)


def read_curve(path: Path) -> tuple[list[tuple[float, float, float | None]], float]:
    """Validation loss and accuracy (none where the run logged no ``val/acc``: a generative run) against the
    fraction of the run's optimizer steps done, and bytes exchanged."""
    rows = read_metrics(path)
    points = [(int(row["step"]) + 1, float(row["val/loss"]), float(row["val/acc"]) if row.get("val/acc") else None)
              for row in logged(rows, "val/loss")]  # fmt: skip
    total = max((steps for steps, _, _ in points), default=1)
    return [(steps / total, loss, acc) for steps, loss, acc in points], sum(floats(rows, "round/bytes_exchanged"), 0.0)


def read_generated(path: Path) -> dict[str, list[tuple[float, float]]]:
    """A generative run's scores of its generated validation answers (``val/generated/<metric>``, logged every
    ``generate_every`` rounds) against the fraction of the run's optimizer steps done (that of its last ``val/loss``
    being 1)."""
    rows = read_metrics(path)
    total = max((int(row["step"]) + 1 for row in logged(rows, "val/loss")), default=None)
    prefix, found = "val/generated/", {}
    for column in (name for name in (rows[0] if rows else {}) if name.startswith(prefix)):
        points = [(int(row["step"]) + 1, float(row[column])) for row in logged(rows, column)]
        last = total or max(steps for steps, _ in points)
        found[column.removeprefix(prefix)] = [(steps / last, value) for steps, value in points]
    return found


def find_runs(folders: list[Path]) -> list[Run]:
    found = sorted({path.parent for path in find(folders, "**/test_metrics.json", "run fit with test_after_fit: true")})
    runs = [read_run(folder) for folder in found]
    return runs + [calibrated_view(run) for run in runs if run.calibrated is not None]


def task_of(runs: list[Run]) -> str:
    """The task the runs share (classification or generation); runs of both do not make one table."""
    tasks = sorted({run.task for run in runs})
    if len(tasks) > 1:
        folders = {task: next(str(r.folder) for r in runs if r.task == task) for task in tasks}
        raise ValueError(f"the runs mix classification and generation ({folders}); report each task on its own")
    return tasks[0] if tasks else "classification"


def metrics_of(runs: list[Run]) -> list[str]:
    """The test metrics a report tables, the first leading its comparisons: accuracy and macro-F1 for
    classification; for generation the per-example scores every run has, in ``GENERATIVE_METRICS``' order."""
    if task_of(runs) == "classification":
        return ["accuracy", "macro_f1"]
    found = [name for name in GENERATIVE_METRICS if all(name in run.scores for run in runs)]
    if not found:
        raise ValueError(
            f"no per-example score ({', '.join(GENERATIVE_METRICS)}) that every generative run has; "
            "give the runs model.task.metrics with squad or rouge"
        )
    return found


def unit(runs: list[Run]) -> str:
    """What the bootstrap resamples, in the report's words."""
    return "examples" if task_of(runs) == "generation" else "sentences"


def all_runs(rows: dict[str, list[Run]]) -> list[Run]:
    return [run for runs in rows.values() for run in runs]


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


def same_examples(runs: list[Run], b: list[Run] | None = None) -> None:
    """Refuse runs (paired with ``b``'s, seed by seed, when given) tested on different examples: a bootstrap
    resamples one draw of examples for all of them."""
    pairs = zip(runs, b) if b is not None else ((run, runs[0]) for run in runs)
    for x, y in pairs:
        if x.task == "generation" and x.indices != y.indices:
            raise ValueError(f"{x.folder} and {y.folder} were tested on different examples")
        if x.labels != y.labels:
            raise ValueError(f"{x.folder} and {y.folder} were tested on different sentences")


def paired_runs(a: list[Run], b: list[Run], metric: str | None = None) -> BootstrapResult | None:
    """Bootstrap of runs a's ``metric`` (default: the lead of ``metrics_of``, accuracy for classification) minus
    runs b's over the seeds both have (paired by seed), seeds and test examples (resampled by index) together;
    none without a common seed."""
    b_by_seed = {run.seed: run for run in b}
    pairs = [(run, b_by_seed[run.seed]) for run in a if run.seed in b_by_seed]
    if not pairs:
        return None
    here, there = [x for x, _ in pairs], [y for _, y in pairs]
    metric = metric or metrics_of(here + there)[0]
    same_examples(here, there)
    if here[0].task == "generation":
        return example_bootstrap([x.scores[metric] for x in here], [y.scores[metric] for y in there])
    return hierarchical_bootstrap(
        [x.predicted for x in here], here[0].labels, [y.predicted for y in there], metric=metric
    )


def paired(rows: dict[str, list[Run]], a: str, b: str, metric: str = "accuracy") -> BootstrapResult | None:
    """``paired_runs`` of two rows by name; none when either is missing."""
    return paired_runs(rows[a], rows[b], metric) if a in rows and b in rows else None


def validation_score(run: Run, metric: str) -> float | None:
    """The run's last validation accuracy (classification) or score of its generated validation answers by
    ``metric`` (generation); none where it logged none."""
    if run.task == "generation":
        points = run.generated_curves.get(metric)
        return points[-1][1] if points else None
    return run.curve[-1][2] if run.curve else None


def best_local_by_validation(rows: dict[str, list[Run]], metric: str = "accuracy") -> tuple[str, str] | None:
    """The local-only client with the highest mean final validation accuracy (generation: score of the generated
    validation answers by ``metric``; lowest final validation loss where a run generated none), chosen without the
    test set, and what chose it."""
    local = {name: runs for name, runs in rows.items() if runs[0].kind == "local" and all(r.curve for r in runs)}
    if not local:
        return None
    if all(validation_score(r, metric) is not None for runs in local.values() for r in runs):
        score = lambda name: mean_interval([validation_score(r, metric) for r in local[name]]).mean  # noqa: E731
        return max(local, key=score), f"validation {NAMES[metric]}"
    return min(local, key=lambda name: mean_interval([r.curve[-1][1] for r in local[name]]).mean), "validation loss"


def seed_value(run: Run, metric: str) -> float:
    """One run's test ``metric``: what its test logged (classification), the mean of its examples' scores
    (generation)."""
    if run.task == "generation":
        return statistics.fmean(run.scores[metric])
    return run.metrics[{"accuracy": "test/acc", "macro_f1": "test/macro_f1"}.get(metric, metric)]


def accuracy(runs: list[Run], metric: str = "accuracy") -> Interval:
    """Mean and 95 % t-interval over seeds of a test metric (accuracy, or a generative run's per-example metric):
    seed-to-seed variance only, the test set held fixed."""
    return mean_interval([seed_value(r, metric) for r in runs], bounds=(0.0, 1.0))


def bootstrap_interval(runs: list[Run], metric: str = "accuracy") -> Interval:
    """Mean and 95 % interval over seeds and test examples resampled together (``hierarchical_bootstrap``, or
    ``example_bootstrap`` over a generative run's per-example scores)."""
    same_examples(runs)
    if runs[0].task == "generation":
        boot = example_bootstrap([r.scores[metric] for r in runs])
        return Interval(boot.difference, boot.low, boot.high, len(runs) * len(runs[0].indices))
    boot = hierarchical_bootstrap([r.predicted for r in runs], runs[0].labels, metric=metric)
    return Interval(boot.difference, boot.low, boot.high, len(runs) * len(runs[0].labels))


HEADER = ("run", "seeds", "test accuracy, mean [95% CI over seeds and sentences]",
          "test macro-F1, mean [95% CI over seeds and sentences]", "accuracy, 95% t-interval over seeds only",
          "per seed (accuracy)", "trainable params", "MB exchanged", "fit time (s)")  # fmt: skip


def cost(runs: list[Run]) -> list[str]:
    """The table's last cells: trainable parameters, megabytes exchanged, fit time."""
    params = runs[0].metrics.get("trainable_parameters", 0) if runs[0].kind != "zero-shot" else 0
    megabytes = mean_interval([r.bytes_exchanged / 1e6 for r in runs]).mean
    times = [r.metrics["fit_seconds"] for r in runs if r.metrics.get("fit_seconds")]
    fit_time = f"{mean_interval(times).mean:.0f}" if times else "-"
    return [f"{params:,}", f"{megabytes:.3g}", fit_time]


def table(rows: dict[str, list[Run]]) -> str:
    if task_of(all_runs(rows)) == "generation":
        return generation_table(rows)
    majority_class, majority_acc = majority(next(iter(rows.values()))[0])
    cells = [[f"majority class ({majority_class})", "-", f"{majority_acc:.3f}", "-", "-", "-", "0", "-", "-"]]
    for name, runs in rows.items():
        acc, f1, over_seeds = bootstrap_interval(runs), bootstrap_interval(runs, "macro_f1"), accuracy(runs)
        seeds = " ".join(f"{r.metrics['test/acc']:.3f}" for r in runs)
        cells.append([name, f"{len(runs)}", f"{acc}", f"{f1}", f"{over_seeds}", seeds, *cost(runs)])
    return markdown.table(HEADER, cells)


def generation_table(rows: dict[str, list[Run]]) -> str:
    """A generative triad's table: every per-example metric the runs scored, mean [95% CI over seeds and
    examples]; the leading one's t-interval over seeds and per-seed values; BLEU and chrF (corpus-level: no
    example to resample) with their t-interval over seeds, where every run scored them."""
    pool = all_runs(rows)
    metrics = metrics_of(pool)
    lead = NAMES[metrics[0]]
    corpus = [name for name in CORPUS_METRICS if all(f"test/{name}" in r.metrics for r in pool)]
    header = ("run", "seeds", *(f"test {NAMES[m]}, mean [95% CI over seeds and examples]" for m in metrics),
              f"{lead}, 95% t-interval over seeds only", f"per seed ({lead})",
              *(f"test {NAMES[m]} (corpus), 95% t-interval over seeds" for m in corpus),
              "trainable params", "MB exchanged", "fit time (s)")  # fmt: skip
    cells = []
    for name, runs in rows.items():
        intervals = [f"{bootstrap_interval(runs, metric)}" for metric in metrics]
        seeds = " ".join(f"{seed_value(r, metrics[0]):.3f}" for r in runs)
        corpus_cells = [f"{mean_interval([r.metrics[f'test/{m}'] for r in runs], bounds=(0.0, 1.0))}" for m in corpus]
        cells.append([name, f"{len(runs)}", *intervals, f"{accuracy(runs, metrics[0])}", seeds, *corpus_cells,
                      *cost(runs)])  # fmt: skip
    return markdown.table(header, cells)


def against_header(metric: str, unit: str) -> tuple[str, ...]:
    return ("run", "seeds paired", f"test {NAMES[metric]} here", f"test {NAMES[metric]} there",
            f"here minus there, points [95% CI over seeds and {unit}]", "p", "within 1 point or above")  # fmt: skip


AGAINST_HEADER = against_header("accuracy", "sentences")


def against_table(rows: dict[str, list[Run]], other: dict[str, list[Run]]) -> str:
    """Each row against the row of the same name in another experiment (another layout, say), paired by seed on
    the same test sentences. "Within 1 point or above" is non-inferiority: the whole interval above -1 point. No
    time column: the two experiments ran at different times, so their seconds do not compare (benchmarks do).
    Generative runs are compared by their leading metric (``metrics_of``)."""
    pool = all_runs(rows) + all_runs(other)
    metric = metrics_of(pool)[0]
    cells = []
    for name, runs in rows.items():
        seeds = {r.seed for r in runs} & {r.seed for r in other.get(name, [])}
        if not seeds:
            continue
        here, there = ([r for r in group if r.seed in seeds] for group in (runs, other[name]))
        boot = paired_runs(here, there, metric)
        cells.append(
            [
                name,
                f"{len(seeds)}",
                f"{accuracy(here, metric).mean:.3f}",
                f"{accuracy(there, metric).mean:.3f}",
                f"{100 * boot.difference:+.1f} [{100 * boot.low:+.1f}, {100 * boot.high:+.1f}]",
                f"{boot.p_value:.3f}",
                "yes" if boot.low > -0.01 else "not shown",
            ]
        )
    return markdown.table(against_header(metric, unit(pool)), cells)


def bootstrap_words(boot: BootstrapResult, unit: str = "sentences") -> str:
    """A bootstrap (seeds and ``unit``, the test examples) of federated minus another run, in words."""
    if boot.low > 0 or boot.high < 0:
        side = f"excludes 0: federated significantly {'higher' if boot.low > 0 else 'lower'}"
    else:
        side = "includes 0: no significant difference"
    return (f"bootstrap over seeds and {unit} {100 * boot.difference:+.1f} points, "
            f"95% CI [{100 * boot.low:+.1f}, {100 * boot.high:+.1f}] ({side}), p = {boot.p_value:.3f}")  # fmt: skip


def higher(a: float, b: float) -> bool:
    """``a`` above ``b`` by more than float32 rounding: equal counts of correct examples are a tie, not a win."""
    return a - b > 1e-6


def verdict(rows: dict[str, list[Run]]) -> list[str]:
    """The experiment's two questions, answered yes or no from the means, with the intervals that qualify them:
    on test accuracy, or on a generative triad's leading metric (``metrics_of``)."""
    if "federated" not in rows:
        return ["No federated run found."]
    metric, words = metrics_of(all_runs(rows))[0], unit(all_runs(rows))
    federated = bootstrap_interval(rows["federated"], metric)
    lines = []
    if "centralized" in rows:
        centralized = bootstrap_interval(rows["centralized"], metric)
        boot = paired(rows, "federated", "centralized", metric)
        # Non-inferiority: the whole interval of federated minus centralized must lie above -1 point.
        answer = "yes" if boot.low > -0.01 else f"not shown: the interval reaches {100 * boot.low:+.1f} points"
        lines.append(
            f"- **Federated within 1 point of centralized or above it: {answer}.** Test {NAMES[metric]} {federated} "
            f"vs {centralized} (mean [95% CI over seeds and {words}]); {bootstrap_words(boot, words)}."
        )
    local = {name: runs for name, runs in rows.items() if runs[0].kind == "local"}
    if local:
        # like with like: the same per-seed values on both sides (logged metrics are float32; the bootstrap's float64)
        federated_mean = accuracy(rows["federated"], metric).mean
        means = {name: accuracy(runs, metric).mean for name, runs in local.items()}
        not_beaten = [name for name, mean in means.items() if not higher(federated_mean, mean)]
        answer = f"no, {', '.join(not_beaten)} as high or higher" if not_beaten else "yes"
        lines.append(
            f"- **Federated above every local-only client: {answer}** on the mean over seeds (federated "
            f"{federated_mean:.3f}; {', '.join(f'{name} {mean:.3f}' for name, mean in means.items())})."
        )
        federated_by_seed = {r.seed: seed_value(r, metric) for r in rows["federated"]}
        for seed, fed in federated_by_seed.items():
            above = {
                name: seed_value(r, metric)
                for name, runs in local.items()
                for r in runs
                if r.seed == seed and not higher(fed, seed_value(r, metric))
            }
            if above:
                lines.append(
                    f"  - seed {seed}: federated {fed:.3f} is not above "
                    f"{', '.join(f'{n} ({a:.3f})' for n, a in above.items())}."
                )
        best = best_local_by_validation(rows, metric)
        if best is not None:
            best, chosen_by = best
            lines.append(
                f"- Federated vs the best local-only client chosen by {chosen_by} ({best}): "
                f"{bootstrap_words(paired(rows, 'federated', best, metric), words)}."
            )
    return lines


def verdict_calibrated(rows: dict[str, list[Run]]) -> list[str]:
    """The verdict again on the calibrated rows, when the federated runs have them."""
    calibrated = view(rows, "calibrated")
    if "federated" not in calibrated:
        return []
    return ["With calibrated predictions (label biases fitted on the validation set):", "", *verdict(calibrated), ""]


def curve_points(run: Run, column: int | str) -> list[tuple[float, float]]:
    """A run's validation curve: loss (``column`` 1), accuracy (2), or a generative metric's score of the
    generated validation answers (its name)."""
    if isinstance(column, str):
        return run.generated_curves.get(column, [])
    return [(p[0], p[column]) for p in run.curve if p[column] is not None]


def curves(ax, rows: dict[str, list[Run]], names: list[str], column: int | str, colors: dict[str, tuple]) -> None:  # noqa: ANN001
    """The validation curves of the rows ``names``, one line per seed: loss (``column`` 1, log scale),
    accuracy (2), or the score of generated answers by a metric (its name)."""
    from matplotlib.ticker import FuncFormatter

    for name in names:
        runs = [r for r in rows.get(name, []) if curve_points(r, column)]
        for index, run in enumerate(runs):
            points = curve_points(run, column)
            x, y = [p[0] for p in points], [p[1] for p in points]
            ax.plot(x, y, marker="o", markersize=3, linewidth=1.5, alpha=0.8, color=colors[name],
                    label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})" if index == 0
                    else None)  # fmt: skip
    ax.set_xlabel("fraction of the training budget (same optimizer steps per example for every run)")
    labels = {1: "validation loss", 2: "validation accuracy"}
    ax.set_ylabel(labels.get(column) or f"validation {NAMES.get(column, column)} (generated answers)")
    if column == 1:
        ax.set_yscale("log")  # early losses are 10x the final ones; the differences that matter are late
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def confusion_matrices(rows: dict[str, list[Run]], path: Path) -> Path:
    """One test confusion matrix per trained row, summed over its seeds."""
    shown = [n for n in rows if rows[n][0].kind != "zero-shot"]
    fig, axes = figures.pyplot().subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False)
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
    return figures.save(fig, path)


def plot(rows: dict[str, list[Run]], out: Path) -> list[Path]:
    """The report's figures in ``out``: three of validation curves, then the confusion matrices (classification);
    their paths. A generative triad's third figure is its leading metric on the generated validation answers,
    or, where no run generated during validation, its validation loss."""
    plt = figures.pyplot()
    palette = plt.get_cmap("tab10").colors
    colors = {name: palette[i % 10] for i, name in enumerate(rows)}  # one color per row, in every figure
    local = [n for n in rows if rows[n][0].kind == "local" and not rows[n][0].variant]
    trained = [n for n in rows if rows[n][0].curve and not rows[n][0].variant]
    panels = (  # the rows shown, the curve's column (1 loss, 2 accuracy), the title, the file
        (
            ["centralized", "federated"],
            1,
            "Validation loss: centralized vs federated",
            "val_loss_centralized_vs_federated.png",
        ),
        (
            ["federated", *local],
            1,
            "Validation loss: each client alone vs federated",
            "val_loss_local_vs_federated.png",
        ),
        (trained, 2, "Validation accuracy during training", "val_accuracy.png"),
    )
    generative = task_of(all_runs(rows)) == "generation"
    if generative:
        lead = metrics_of(all_runs(rows))[0]
        if any(rows[name][0].generated_curves.get(lead) for name in trained):
            third = (trained, lead, f"Validation {NAMES[lead]} of the generated answers during training",
                     f"val_generated_{lead}.png")  # fmt: skip
        else:
            third = (trained, 1, "Validation loss during training", "val_loss.png")
        panels = (*panels[:2], third)
    written = []
    for names, column, title, filename in panels:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        curves(ax, rows, names, column, colors)
        ax.set_title(title)
        written.append(figures.save(fig, out / filename))
    return written if generative else [*written, confusion_matrices(rows, out / "confusion_matrices.png")]


def relative(path: Path, base: Path) -> Path:
    try:
        return path.resolve().relative_to(base.resolve())
    except ValueError:
        return path


CLASSIFICATION_INTRODUCTION = (
    "Test accuracy and macro-F1: mean over seeds, with a 95% bootstrap interval that resamples the seeds and the",
    "test sentences together (10,000 draws: seeds with replacement, sentences with replacement), so it covers both",
    "the training run's luck and the test set's; with 3 seeds it sees no more seed-to-seed spread than those 3 show.",
    "The t-interval over seeds alone (clipped to [0, 1]) is given beside it. Every trained run tests its final model.",
)


def introduction(runs: list[Run]) -> list[str]:
    """What the table's numbers are, before it."""
    if task_of(runs) == "classification":
        return list(CLASSIFICATION_INTRODUCTION)
    metrics = metrics_of(runs)
    order, lead = ", ".join(NAMES[name] for name in GENERATIVE_METRICS), NAMES[metrics[0]]
    return [
        f"A generative task: each test example's generated answer is scored against its references (the best over "
        f"them) by {', '.join(NAMES[name] for name in metrics)}.",
        "Each: mean over seeds, with a 95% bootstrap interval that resamples the seeds and the test examples together",
        "(10,000 draws: seeds with replacement, examples with replacement, the same draw of examples for every run "
        "and metric),",
        "so it covers both the training run's luck and the test set's; with 3 seeds it sees no more seed-to-seed "
        "spread than those 3 show.",
        f"**{lead[0].upper()}{lead[1:]} leads** (the first of {order} that the runs scored): the t-interval over "
        "seeds alone (clipped to [0, 1]), the per-seed values and the verdict's comparisons (paired by seed and "
        "example) are given for it.",
        "Every trained run tests its final model.",
    ]


def write_report(
    folders: list[Path],
    out: Path,
    command: str | None = None,
    notes: Path | None = None,
    against: list[Path] | None = None,
) -> Path:
    """Read every run under ``folders``; write ``out``/README.md (table, verdict) and the PNGs beside it.

    ``command`` is printed as the line that rebuilds the report; ``notes`` (Markdown written by a person: why the
    result is what it is) is copied in under "Interpretation", since a verdict computed from a table cannot say why.
    ``against``: another experiment's folders (the same triad in another layout, say), each row compared with its
    namesake there.
    """
    rows = group(find_runs(folders))
    task_of(all_runs(rows))  # one task
    comparison = []
    if against:
        where = " ".join(str(relative(f, Path.cwd())) for f in against)
        comparison = [f"## Against {where}", "", against_table(view(rows, ""), view(group(find_runs(against)), "")), ""]
    interpretation = ["## Interpretation", *markdown.appendix(notes), ""] if notes is not None else []
    command = (
        command
        or f"fedlm report {' '.join(str(relative(f, Path.cwd())) for f in folders)} --out {relative(out, Path.cwd())}"
    )
    out.mkdir(parents=True, exist_ok=True)
    pngs = plot(rows, out)
    lines = [
        "# Centralized vs federated vs local-only",
        "",
        *introduction(all_runs(rows)),
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
        *comparison,
        *interpretation,
        "## Plots",
        "",
        *[f"![{png.stem}]({png.name})" for png in pngs],
        "",
        f"Runs read ({sum(len(runs) for runs in rows.values())}): "
        + ", ".join(sorted(str(relative(r.folder, Path.cwd())) for runs in rows.values() for r in runs)),
    ]
    return markdown.write(out / "README.md", lines)


def report_main(argv: list[str] | None = None) -> None:
    parser = markdown.parser(
        "fedlm report", __doc__, runs="run folders, or folders that contain run folders", nargs="+"
    )
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: RUNS[0]/report)")
    parser.add_argument(
        "--against", type=Path, nargs="+", default=None, help="another experiment's run folders, compared row by row"
    )
    args = markdown.parse(parser, argv)
    command = "fedlm report " + " ".join(argv if argv is not None else sys.argv[2:])
    readme = write_report(args.runs, args.out or args.runs[0] / "report", command, args.notes, args.against)
    print(readme.read_text())
    print(f"[fedlm report] written to {readme.parent}")
