"""``fedlm experiment --config configs/fpb_triad.yaml``: centralized, federated and every client alone, over seeds.

Each run is a ``fedlm fit`` in a subprocess of its own (a crash or an out-of-memory kill loses one run, not the
experiment) writing into ``output/seed<S>/<run>/``. A run whose ``test_metrics.json`` exists is done and is not
redone, so the same command resumes an interrupted experiment; a run folder without it is cleared and rerun.
``jobs`` runs that many at once; every run's thread count is fixed by ``threads``, not by what runs beside it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from fedlm.errors import ConfigError
from fedlm.experiment.report import write_report
from fedlm.experiment.runs import LOGS

ARMS = ("centralized", "federated", "local")


@dataclass
class TriadConfig:
    """What ``fedlm experiment`` runs.

    Args:
        centralized, federated, local: the three ``fedlm fit`` configs, each a path or a list of paths composed
            in order (a base config, then an overlay that changes its schedule, say); ``local`` is run once per
            client of the federated config (``data.init_args.local_client`` = 0 .. clients - 1).
        seeds: one full triad per seed. A seed sets the encoder's initialization, the batch order, the IID
            partition into clients and the federation's RNG streams; the train/validation/test split stays fixed.
        output: folder of the runs and of the report (``output/report``).
        zero_shot: also test the untrained encoder per seed (the row every trained run must beat).
        overrides: extra command-line arguments for every run (e.g. ``["--trainer.max_epochs", "1"]``).
        wandb_project: also log every run to this W&B project (offline without credentials; runs grouped by kind,
            tagged by seed, so W&B's bands are over seeds), and the report's table and plots to one more run.
        jobs: runs at once, each in a process of its own. On a CPU, give each run a share of the cores with
            ``threads`` (2 runs of 1 thread did 1.28x the work of 1 run of 2 threads here).
        threads: each run's CPU threads (``OMP_NUM_THREADS``, written into its ``command.json``); null: torch's
            default, all cores. A CPU kernel may split a sum differently over another thread count, so a result
            holds still for a given ``threads``, whatever ``jobs`` is.
        arms: which of centralized, federated and local to run (all three by default); ``[federated]`` compares
            federation settings over seeds without retraining the others.
    """

    centralized: str | list[str] = "configs/fpb_centralized.yaml"
    federated: str | list[str] = "configs/fpb_federated.yaml"
    local: str | list[str] = "configs/fpb_local.yaml"
    seeds: list[int] = field(default_factory=lambda: [1234, 1235, 1236])
    output: str = "runs/fpb_triad"
    zero_shot: bool = True
    overrides: list[str] = field(default_factory=list)
    wandb_project: str | None = None
    jobs: int = 1
    threads: int | None = None
    arms: list[str] = field(default_factory=lambda: list(ARMS))


@dataclass(frozen=True)
class PlannedRun:
    name: str
    seed: int
    args: list[str]  # the fedlm subcommand and its arguments


def config_paths(configs: str | list[str]) -> list[str]:
    return [configs] if isinstance(configs, str) else list(configs)


def config_args(name: str, configs: str | list[str]) -> list[str]:
    """``--config`` once per file, in order; a missing file is refused before any run starts."""
    paths = config_paths(configs)
    if not paths:
        raise ConfigError(f"{name}: give the path of a fedlm fit config (or a list of them).")
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name}: {path} does not exist; give the path of a fedlm fit config.")
    return [arg for path in paths for arg in ("--config", path)]


def clients_of(configs: str | list[str]) -> int:
    """The federated config's ``federation.clients``, the last file that sets it winning (as in the fit)."""
    clients = None
    for path in config_paths(configs):
        config = yaml.safe_load(Path(path).read_text()) or {}
        clients = (config.get("federation") or {}).get("clients", clients)
    if not isinstance(clients, int) or clients < 1:
        raise ConfigError(f"{configs}: federation.clients must be a positive integer for the local-only runs.")
    return clients


def plan(config: TriadConfig) -> list[PlannedRun]:
    centralized, federated, local = (config_args(n, getattr(config, n)) for n in ("centralized", "federated", "local"))
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"seeds={config.seeds}: give one or more distinct seeds.")
    if not config.arms or set(config.arms) - set(ARMS):
        raise ConfigError(f"arms={config.arms}: give one or more of {list(ARMS)}.")
    clients = clients_of(config.federated)
    runs = []
    for seed in config.seeds:
        seeded = ["--seed_everything", str(seed), "--data.init_args.shuffle_seed", str(seed),
                  "--data.init_args.partition_seed", str(seed)]  # fmt: skip
        if config.zero_shot:
            runs.append(PlannedRun("zero-shot", seed, ["test", *centralized, *seeded]))
        if "centralized" in config.arms:
            runs.append(PlannedRun("centralized", seed, ["fit", *centralized, *seeded]))
        if "federated" in config.arms:
            runs.append(PlannedRun("federated", seed, ["fit", *federated, *seeded, "--federation.seed", str(seed)]))
        for client in range(clients if "local" in config.arms else 0):
            local_args = ["--data.init_args.local_client", str(client), "--data.init_args.local_clients", str(clients)]
            runs.append(PlannedRun(f"local{client}", seed, ["fit", *local, *seeded, *local_args]))
    return runs


def command(
    run: PlannedRun, folder: Path, overrides: list[str], wandb_project: str | None = None, threads: int | None = None
) -> list[str]:
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(folder), "name": "logs", "version": 0},
    }
    extra = ["--test_after_fit", "true"] if run.args[0] == "fit" else []
    if wandb_project is not None:
        extra += ["--wandb.project", wandb_project]
    environment = ["env", f"OMP_NUM_THREADS={threads}"] if threads is not None else []
    return [*environment, sys.executable, "-m", "fedlm", *run.args, *extra, "--trainer.default_root_dir", str(folder),
            "--trainer.logger", json.dumps(logger), "--trainer.enable_progress_bar", "false", *overrides]  # fmt: skip


def run_experiment(config: TriadConfig) -> Path:
    """Run what is not done yet, ``config.jobs`` at a time, then write the report; returns the report's README."""
    if config.jobs < 1 or (config.threads is not None and config.threads < 1):
        raise ConfigError(f"jobs={config.jobs}, threads={config.threads}: give positive numbers (threads may be null).")
    output = Path(config.output)
    runs = plan(config)
    labelled = [
        (f"[fedlm experiment] {i}/{len(runs)} seed {run.seed} {run.name}", run) for i, run in enumerate(runs, 1)
    ]
    with ThreadPoolExecutor(max_workers=config.jobs) as pool:
        failures = [error for error in pool.map(lambda job: execute(*job, output, config), labelled) if error]
    if failures:  # after the other runs ended: what finished is kept for the rerun
        raise RuntimeError("\n\n".join(failures))
    readme = write_report([output], output / "report")
    print(f"[fedlm experiment] report: {readme}", flush=True)
    if config.wandb_project is not None:
        log_report_to_wandb(readme, config.wandb_project)
    return readme


def execute(label: str, run: PlannedRun, output: Path, config: TriadConfig) -> str | None:
    """One run, unless it is done; what went wrong, or None."""
    folder = output / f"seed{run.seed}" / run.name
    if (folder / LOGS / "test_metrics.json").is_file():
        print(f"{label}: done before, kept", flush=True)
        return None
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    argv = command(run, folder, config.overrides, config.wandb_project, config.threads)
    (folder / "command.json").write_text(json.dumps(argv) + "\n")
    started = time.perf_counter()
    print(f"{label}: running, log {folder / 'output.log'}", flush=True)
    with (folder / "output.log").open("w") as log:
        result = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = (folder / "output.log").read_text()[-3000:]
        return f"{label} failed (exit {result.returncode}); see {folder / 'output.log'}:\n{tail}"
    print(f"{label}: finished in {time.perf_counter() - started:.0f}s", flush=True)
    return None


def log_report_to_wandb(readme: Path, project: str) -> None:
    """The report's plots (as images) and its README (as a file) in one W&B run of job type ``report``."""
    import wandb

    from fedlm.wandb_mode import default_wandb_mode

    run = wandb.init(project=project, dir=str(readme.parent), job_type="report", group="report",
                     name=f"report-{readme.parent.parent.name}", mode=default_wandb_mode())  # fmt: skip
    run.log({f"report/{png.stem}": wandb.Image(str(png)) for png in sorted(readme.parent.glob("*.png"))})
    run.save(str(readme), base_path=str(readme.parent), policy="now")
    run.finish()


def experiment_main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="fedlm experiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(TriadConfig, nested_key=None)
    config = TriadConfig(
        **{k: v for k, v in vars(parser.parse_args(argv)).items() if k != "config" and not k.startswith("__")}
    )
    run_experiment(config)
