"""``python -m fedlm.experiment.algorithms RUNS --out results/algorithms.md``: global versus personalized accuracy
per client, for each algorithm and partition, from federated runs' ``personalization.json``.

Runs are found as ``RUNS/<partition>/<algorithm>/.../personalization.json`` (``scripts/algorithms.sh`` lays them
out so); the run's ``config.yaml`` (beside it) names the algorithm's settings and its ``output.log`` the clients'
data, as the run logged them.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedlm.federation.personalize import MODELS as MODEL_NAMES

MODELS = dict(zip(MODEL_NAMES, ("global", "own private tokens", "fine-tuned locally")))  # how the table names them
ORDER = ("fedavg", "fedprox", "fedadam", "split_prompts", "table_average")  # scripts/algorithms.sh's; others after


@dataclass
class AlgorithmRun:
    partition: str
    algorithm: str
    folder: Path
    clients: list[dict]  # personalization.json
    test_acc: float  # test_after_fit: the global model on the shared test set
    federation: dict
    bytes_per_round: float
    data_lines: list[str]

    def describe(self) -> str:
        f, server = self.federation, self.federation.get("server") or {}
        parts = [server.get("optimizer", "fedavg")]
        if server.get("optimizer", "fedavg") != "fedavg":
            parts.append(f"server lr {server['lr']}")
        if f.get("prox_mu"):
            parts.append(f"FedProx mu {f['prox_mu']}")
        if f.get("private_tokens"):
            parts.append(f"{f['private_tokens']} private tokens")
        if f.get("average") == "table":
            parts.append("table averaged")
        if f.get("personalize_steps"):
            parts.append(f"{f['personalize_steps']} fine-tuning steps")
        return ", ".join(parts)


def read_runs(root: Path) -> list[AlgorithmRun]:
    runs = []
    for file in sorted(root.glob("*/*/**/personalization.json")):
        partition, algorithm = file.relative_to(root).parts[:2]
        folder = file.parent
        config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else {}
        metrics = json.loads((folder / "test_metrics.json").read_text()) if (folder / "test_metrics.json").is_file() else {}
        sent = []
        if (folder / "metrics.csv").is_file():
            with (folder / "metrics.csv").open() as handle:
                sent = [float(row["round/bytes_exchanged"]) for row in csv.DictReader(handle) if row.get("round/bytes_exchanged")]
        log = root / partition / algorithm / "output.log"
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        runs.append(
            AlgorithmRun(
                partition,
                algorithm,
                folder,
                json.loads(file.read_text()),
                metrics.get("test/acc", float("nan")),
                config.get("federation") or {},
                max(sent, default=float("nan")),
                [line.removeprefix("[fedlm data] ") for line in lines if line.startswith("[fedlm data] client ")],
            )
        )
    if not runs:
        raise FileNotFoundError(f"no RUNS/<partition>/<algorithm>/.../personalization.json under {root}")
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(runs, key=lambda run: (run.partition != "dirichlet", run.partition, rank.get(run.algorithm, len(ORDER)), run.algorithm))


def table(runs: list[AlgorithmRun]) -> list[str]:
    """One partition: a row per (algorithm, model), held-out accuracy per client, pooled, and on the shared test."""
    clients = runs[0].clients
    header = " | ".join(f"client {row['client']} held-out (n={row['holdout_examples']})" for row in clients)
    lines = [
        f"| algorithm | model | {header} | held-out, all clients | shared test, mean over clients | MB sent per round |",
        "|---|---|" + "---|" * len(clients) + "---|---|---|",
    ]
    for run in runs:
        named = [name for name in MODELS if name in run.clients[0]]
        for name in named:
            accs = [row[name]["holdout_acc"] for row in run.clients]
            sizes = [row["holdout_examples"] for row in run.clients]
            pooled = sum(a * n for a, n in zip(accs, sizes)) / sum(sizes)
            test = sum(row[name]["test_acc"] for row in run.clients) / len(run.clients)
            cells = " | ".join(
                f"**{a:.3f}**" if row["best_on_holdout"] == name else f"{a:.3f}" for a, row in zip(accs, run.clients)
            )
            first = name == named[0]
            label = f"{run.algorithm} ({run.describe()})" if first else ""
            sent = f"{run.bytes_per_round / 1e6:.2f}" if first else ""
            lines.append(f"| {label} | {MODELS[name]} | {cells} | {pooled:.3f} | {test:.3f} | {sent} |")
    return lines


def plot(runs: list[AlgorithmRun], path: Path) -> None:
    """One panel per algorithm: each client's held-out accuracy, global model against the personalized ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(MODELS, ("tab:blue", "tab:orange", "tab:green")))  # one color per model, in every panel
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.4), sharey=True, squeeze=False)
    for ax, run in zip(axes[0], runs):
        named = [name for name in MODELS if name in run.clients[0]]
        width = 0.8 / len(named)
        for i, name in enumerate(named):
            xs = [row["client"] + (i - (len(named) - 1) / 2) * width for row in run.clients]
            ax.bar(xs, [row[name]["holdout_acc"] for row in run.clients], width, color=colors[name], label=MODELS[name])
        ax.set_title(run.algorithm, fontsize=10)
        ax.set_xticks([row["client"] for row in run.clients], [f"client {row['client']}" for row in run.clients], fontsize=8)
        ax.set_ylim(0.5, 1.0)
    axes[0][0].set_ylabel("accuracy on the client's held-out data")
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    ordered = [label for label in MODELS.values() if label in handles]
    fig.legend([handles[label] for label in ordered], ordered, loc="lower center", fontsize=8, ncol=len(ordered))
    fig.suptitle(f"{runs[0].partition}: global vs personalized, per client", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(root: Path, out: Path, command: str, notes: Path | None = None) -> str:
    runs = read_runs(root)
    text = [
        "# Federated algorithms on heterogeneous clients: global vs personalized accuracy",
        "",
        f"Built from `{root}` by `python -m fedlm.experiment.algorithms {root} --out {out}"
        + (f" --notes {notes}`" if notes else "`")
        + f"; runs made by `{command}`.",
        "Accuracy on each client's own held-out examples (`data.client_holdout`), pooled over the clients, and on",
        "the shared test set; bold: the better model for that client on its held-out data (ties go to the simpler).",
    ]
    for partition in dict.fromkeys(run.partition for run in runs):
        group = [run for run in runs if run.partition == partition]
        text += ["", f"## {partition}", "", "Clients (training / held-out split of each, as the run logged them):", ""]
        text += [f"- {line}" for line in group[0].data_lines] + [""]
        text += table(group)
        figure = out.parent / f"{out.stem}_{partition}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        plot(group, figure)
        text += ["", f"![{partition}: held-out accuracy per client]({figure.name})"]
    if notes is not None:
        text += ["", notes.read_text().strip()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="the folder scripts/algorithms.sh wrote (runs/algorithms)")
    parser.add_argument("--out", type=Path, required=True, help="the markdown file to write")
    parser.add_argument("--command", default="bash scripts/algorithms.sh", help="how the runs were made, for the record")
    parser.add_argument("--notes", type=Path, help="a markdown file appended as is (the interpretation, by hand)")
    args = parser.parse_args(argv)
    print(write(args.runs, args.out, args.command, args.notes))


if __name__ == "__main__":
    main()
