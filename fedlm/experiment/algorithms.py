"""``python -m fedlm.experiment.algorithms RUNS --out results/algorithms.md``: global versus personalized accuracy
per client, for each algorithm and partition, from federated runs' ``personalization.json``.

Runs are found as ``RUNS/<partition>/<algorithm>/.../personalization.json`` (``scripts/algorithms.sh`` lays them
out so); the run's ``config.yaml`` (beside it) names the algorithm's settings and its ``output.log`` the clients'
data, as the run logged them.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from fedlm.experiment import figures, markdown
from fedlm.experiment.runs import find, floats, log_lines, read_config, read_json, read_metrics
from fedlm.federation.personalize import MODELS as MODEL_NAMES

PROG = "python -m fedlm.experiment.algorithms"

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
        robust, poison = f.get("robust") or {}, f.get("poison") or {}
        if robust.get("rule", "mean") != "mean":
            trim = f" {robust['trim_fraction']}" if robust["rule"] == "trimmed_mean" else ""
            parts.append(robust["rule"].replace("_", " ") + trim)
        if robust.get("norm_bound"):
            parts.append(f"update norm bound {robust['norm_bound']}")
        if poison.get("clients"):
            hostile = ", ".join(map(str, poison["clients"]))
            parts.append(f"client {hostile} sends {poison['scale']:g} x its update")
        if f.get("personalize_steps"):
            parts.append(f"{f['personalize_steps']} fine-tuning steps")
        return ", ".join(parts)


def read_runs(root: Path) -> list[AlgorithmRun]:
    runs = []
    for file in find([root], "*/*/**/personalization.json", "make them with bash scripts/algorithms.sh"):
        partition, algorithm = file.relative_to(root).parts[:2]
        folder = file.parent
        metrics = read_json(folder / "test_metrics.json") if (folder / "test_metrics.json").is_file() else {}
        lines = log_lines(root / partition / algorithm / "output.log")
        runs.append(
            AlgorithmRun(
                partition,
                algorithm,
                folder,
                read_json(file),
                metrics.get("test/acc", float("nan")),
                read_config(folder).get("federation") or {},
                max(floats(read_metrics(folder / "metrics.csv"), "round/bytes_exchanged"), default=float("nan")),
                [line.removeprefix("[fedlm data] ") for line in lines if line.startswith("[fedlm data] client ")],
            )
        )
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(
        runs,
        key=lambda run: (
            run.partition != "dirichlet",
            run.partition,
            rank.get(run.algorithm, len(ORDER)),
            run.algorithm,
        ),
    )


def table(runs: list[AlgorithmRun]) -> str:
    """One partition: a row per (algorithm, model), held-out accuracy per client, pooled, and on the shared test."""
    clients = [f"client {row['client']} held-out (n={row['holdout_examples']})" for row in runs[0].clients]
    header = [
        "algorithm",
        "model",
        *clients,
        "held-out, all clients",
        "shared test, mean over clients",
        "MB sent per round",
    ]
    rows = []
    for run in runs:
        named = [name for name in MODELS if name in run.clients[0]]
        for name in named:
            accs = [row[name]["holdout_acc"] for row in run.clients]
            sizes = [row["holdout_examples"] for row in run.clients]
            pooled = sum(a * n for a, n in zip(accs, sizes)) / sum(sizes)
            test = sum(row[name]["test_acc"] for row in run.clients) / len(run.clients)
            cells = [
                f"**{a:.3f}**" if row["best_on_holdout"] == name else f"{a:.3f}" for a, row in zip(accs, run.clients)
            ]
            first = name == named[0]
            label = f"{run.algorithm} ({run.describe()})" if first else ""
            sent = f"{run.bytes_per_round / 1e6:.2f}" if first else ""
            rows.append([label, MODELS[name], *cells, f"{pooled:.3f}", f"{test:.3f}", sent])
    return markdown.table(header, rows)


def plot(runs: list[AlgorithmRun], path: Path) -> None:
    """One panel per algorithm: each client's held-out accuracy, global model against the personalized ones."""
    colors = dict(zip(MODELS, ("tab:blue", "tab:orange", "tab:green")))  # one color per model, in every panel
    fig, axes = figures.pyplot().subplots(1, len(runs), figsize=(3.2 * len(runs), 3.4), sharey=True, squeeze=False)
    for ax, run in zip(axes[0], runs):
        named = [name for name in MODELS if name in run.clients[0]]
        width = 0.8 / len(named)
        for i, name in enumerate(named):
            xs = [row["client"] + (i - (len(named) - 1) / 2) * width for row in run.clients]
            ax.bar(xs, [row[name]["holdout_acc"] for row in run.clients], width, color=colors[name], label=MODELS[name])
        ax.set_title(run.algorithm, fontsize=10)
        ax.set_xticks(
            [row["client"] for row in run.clients], [f"client {row['client']}" for row in run.clients], fontsize=8
        )
        ax.set_ylim(0.5, 1.0)
    axes[0][0].set_ylabel("accuracy on the client's held-out data")
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    ordered = [label for label in MODELS.values() if label in handles]
    fig.legend([handles[label] for label in ordered], ordered, loc="lower center", fontsize=8, ncol=len(ordered))
    fig.suptitle(f"{runs[0].partition}: global vs personalized, per client", fontsize=11)
    figures.save(fig, path, rect=(0, 0.07, 1, 1))


def section(title: str, runs: list[AlgorithmRun], out: Path, made: str | None = None) -> list[str]:
    """One partition's section: its clients' data, the table, and its plot (written beside ``out``)."""
    lines = [f"## {title}", ""] + ([made, ""] if made else [])
    lines += ["Clients (training / held-out split of each, as the run logged them):", ""]
    lines += [f"- {line}" for line in runs[0].data_lines] + ["", table(runs)]
    figure = out.parent / f"{out.stem}_{re.sub(r'[^a-z0-9]+', '_', title.lower()).strip('_')}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, figure)
    return lines + ["", f"![{title}: held-out accuracy per client]({figure.name})"]


def write(root: Path, out: Path, command: str, notes: Path | None = None) -> str:
    runs = read_runs(root)
    text = [
        "# Federated algorithms on heterogeneous clients: global vs personalized accuracy",
        "",
        f"Built from `{root}` by `{markdown.command_line(PROG, root, out, notes)}`; runs made by `{command}`.",
        "Accuracy on each client's own held-out examples (`data.client_holdout`), pooled over the clients, and on",
        "the shared test set; bold: the better model for that client on its held-out data (ties go to the simpler).",
    ]
    for partition in dict.fromkeys(run.partition for run in runs):
        text += ["", *section(partition, [run for run in runs if run.partition == partition], out)]
    text += markdown.appendix(notes)
    markdown.write(out, text)
    return "\n".join(text)


def write_section(root: Path, out: Path, command: str, title: str, notes: Path | None = None) -> str:
    """The runs under ``root`` as one section ``title`` of the report ``out``, replacing it or added after the
    others, which stay as they were written (their runs may be gone); the notes' sections are written anew last."""
    runs = read_runs(root)
    if len({run.partition for run in runs}) != 1:
        raise SystemExit(f"--section {title!r}: the runs under {root} span partitions; give one partition's runs")
    rebuild = f"{markdown.command_line(PROG, root, out, notes)} --section {shlex.quote(title)}"
    made = f"Built from `{root}` by `{rebuild}`; runs made by `{command}`."
    old = out.read_text() if out.is_file() else ""
    appended = {heading for heading, _ in markdown.sections(notes.read_text())} - {""} if notes else set()
    body = "\n".join(line for heading, part in markdown.sections(old) if heading not in appended for line in part)
    kept = markdown.put_section(body, title, section(title, runs, out, made)) + markdown.appendix(notes)
    markdown.write(out, kept)
    return "\n".join(kept)


def main(argv: list[str] | None = None) -> None:
    parser = markdown.parser(PROG, __doc__, runs="the folder scripts/algorithms.sh wrote (runs/algorithms)")
    parser.add_argument("--out", type=Path, required=True, help="the markdown file to write")
    parser.add_argument(
        "--command", default="bash scripts/algorithms.sh", help="how the runs were made, for the record"
    )
    parser.add_argument(
        "--section", default=None, help="write the runs as this one section of --out, keeping its other sections"
    )
    args = markdown.parse(parser, argv)
    if args.section is None:
        print(write(args.runs, args.out, args.command, args.notes))
    else:
        print(write_section(args.runs, args.out, args.command, args.section, args.notes))


if __name__ == "__main__":
    main()
