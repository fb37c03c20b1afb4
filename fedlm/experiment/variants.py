"""``python -m fedlm.experiment.variants RUNS --baseline NAME --out results/x.md``: federation settings compared on
validation over seeds, with the traffic each costs.

Runs are found as ``RUNS/<variant>/seed<S>/federated/`` (``fedlm experiment`` with ``arms: [federated]`` and
``output: RUNS/<variant>`` lays them out so). Validation only: settings are chosen on it, so no test figure is read.
A run still going is read as far as it got, and the table says how many rounds each seed has.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from fedlm.experiment import figures, markdown
from fedlm.experiment.runs import LOGS, find, floats, read_config, read_metrics
from fedlm.experiment.stats import mean_interval

PROG = "python -m fedlm.experiment.variants"
SETTLED_AFTER = 3  # rounds of warm-up before a drop below the running best counts as a collapse


@dataclass
class VariantRun:
    variant: str
    seed: int
    accuracy: list[float]  # val/acc after each round
    exchanged: list[float]  # round/bytes_exchanged: every client's sent plus received bytes, per round
    clients: int
    config: dict

    @property
    def settled(self) -> float:
        """The mean of the last 3 validations: one round's luck weighs less than in the last alone."""
        return statistics.fmean(self.accuracy[-3:])

    @property
    def worst_drop(self) -> float:
        """The largest fall below the best validation so far, after the first ``SETTLED_AFTER`` rounds."""
        best, drops = 0.0, [0.0]
        for index, accuracy in enumerate(self.accuracy):
            if index >= SETTLED_AFTER:
                drops.append(best - accuracy)
            best = max(best, accuracy)
        return max(drops)

    @property
    def client_bytes(self) -> float:
        """What one client sends and receives in a round."""
        return self.exchanged[0] / self.clients if self.exchanged else 0.0

    def describe(self) -> str:
        federation = self.config.get("federation") or {}
        optimizer = (self.config.get("model") or {}).get("optimizer") or {}
        parts = [
            "slot table" if federation.get("average") == "table" else "MLP parameters",
            str(federation.get("payload", "float64")),
            f"lr {optimizer.get('lr')}",
        ]
        bound = (federation.get("robust") or {}).get("norm_bound")
        if bound:
            parts.append(f"update norm bound {bound:g}")
        return ", ".join(parts)


def read_runs(root: Path) -> dict[str, list[VariantRun]]:
    """Each variant's runs by seed, in folder order."""
    runs: dict[str, list[VariantRun]] = {}
    hint = "run fedlm experiment with arms: [federated] and output: <RUNS>/<variant>"
    for metrics in find([root], f"*/seed*/federated/{LOGS}/metrics.csv", hint):
        folder = metrics.parents[2]
        rows, config = read_metrics(metrics), read_config(metrics.parent)
        variant, seed = folder.parents[1].name, int(folder.parent.name.removeprefix("seed"))
        clients = int((config.get("federation") or {}).get("clients", 1))
        run = VariantRun(variant, seed, floats(rows, "val/acc"), floats(rows, "round/bytes_exchanged"), clients, config)
        if run.accuracy:
            runs.setdefault(variant, []).append(run)
    return runs


def interval(values: list[float]) -> str:
    """An accuracy's mean over seeds [95 % t-interval, clipped to [0, 1]]."""
    i = mean_interval(values, bounds=(0.0, 1.0))
    return f"{i.mean:.3f}" if i.n < 2 else f"{i.mean:.3f} [{i.low:.3f}, {i.high:.3f}]"


def paired(runs: list[VariantRun], baseline: list[VariantRun]) -> str:
    """The difference from the baseline in points, over the seeds both have: mean [95 % t-interval]."""
    base = {run.seed: run.settled for run in baseline}
    differences = [100 * (run.settled - base[run.seed]) for run in runs if run.seed in base]
    if not differences:
        return "-"
    i = mean_interval(differences)
    return f"{i.mean:+.1f}" if i.n < 2 else f"{i.mean:+.1f} [{i.low:+.1f}, {i.high:+.1f}] ({i.n} seeds)"


def table(runs: dict[str, list[VariantRun]], baseline: str) -> str:
    header = ["variant", "what travels", "seeds (rounds)", "KB per client per round", "MB per run",
              "val acc, last 3, mean [95% t over seeds]", f"minus {baseline}, points, paired",
              "worst drop below running best after round 3, per seed", "val acc, last 3, per seed"]  # fmt: skip
    rows = []
    for variant, seeds in runs.items():
        rows.append([
            variant,
            seeds[0].describe(),
            ", ".join(f"{run.seed} ({len(run.accuracy)})" for run in seeds),
            f"{seeds[0].client_bytes / 1e3:,.0f}",
            f"{statistics.fmean(sum(run.exchanged) for run in seeds) / 1e6:,.1f}",
            interval([run.settled for run in seeds]),
            "-" if variant == baseline else paired(seeds, runs.get(baseline, [])),
            ", ".join(f"{run.worst_drop:.3f}" for run in seeds),
            ", ".join(f"{run.settled:.3f}" for run in seeds),
        ])  # fmt: skip
    return markdown.table(header, rows)


def plot(runs: dict[str, list[VariantRun]], path: Path) -> Path:
    """Validation accuracy per round: one colour per variant, one line per seed."""
    pyplot = figures.pyplot()
    fig, axis = pyplot.subplots(figsize=(9, 4.5))
    for colour, (variant, seeds) in zip(pyplot.rcParams["axes.prop_cycle"].by_key()["color"], runs.items()):
        for number, run in enumerate(seeds):
            rounds = range(1, len(run.accuracy) + 1)
            axis.plot(rounds, run.accuracy, color=colour, alpha=0.8, label=variant if number == 0 else None)
    axis.set(xlabel="round", ylabel="validation accuracy", ylim=(0, 1))
    axis.legend(loc="lower right", fontsize=8)
    return figures.save(fig, path)


def write(root: Path, out: Path, baseline: str, notes: Path | None = None) -> str:
    runs = read_runs(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = plot(runs, out.with_suffix(".png"))
    text = [
        "# Federation settings: validation accuracy against traffic",
        "",
        f"Built from `{root}` by `{markdown.command_line(PROG, root, out, notes)} --baseline {baseline}`.",
        "Validation only (nothing here reads the test set). A client's bytes are what it sends and",
        "receives in a round; a run's are every client's over all its rounds.",
        "",
        table(runs, baseline),
        "",
        f"![validation accuracy per round, one line per seed]({figure.name})",
        *markdown.appendix(notes),
    ]
    markdown.write(out, text)
    return "\n".join(text)


def main(argv: list[str] | None = None) -> None:
    parser = markdown.parser(PROG, __doc__, runs="the folder holding one fedlm experiment output per variant")
    parser.add_argument("--out", type=Path, required=True, help="the markdown file to write (its figure beside it)")
    parser.add_argument("--baseline", required=True, help="the variant the others are paired against")
    args = markdown.parse(parser, argv)
    print(write(args.runs, args.out, args.baseline, args.notes))


if __name__ == "__main__":
    main()
