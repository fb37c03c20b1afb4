"""Sweep files: W&B's own command builder turns parameter sets into command lines whose overrides reach the config.

No W&B server: the command line is built from the sweep file the way ``wandb agent`` builds it for a run the
server hands out (wandb's ``create_sweep_command`` and ``create_sweep_command_args``, then the agent's macro
expansion), and the runs log to an offline W&B run.
"""

import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO, printed_config
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args
from wandb_records import read_offline_run

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
BIN = str(Path(sys.executable).parent)  # fedlm and torchrun, as `wandb agent` would find them on PATH


def parameter_sets(sweep: dict) -> list[dict[str, Any]]:
    """The grid's first and last points: every parameter differs between the two."""
    names = list(sweep["parameters"])
    grid = list(product(*(sweep["parameters"][name]["values"] for name in names)))
    return [dict(zip(names, grid[0])), dict(zip(names, grid[-1]))]


def agent_command(sweep: dict, params: dict[str, Any], folder: Path) -> list[str]:
    """The command line ``wandb agent`` runs for ``params`` (wandb_agent.Agent._command_run, minus the server)."""
    variables = create_sweep_command_args({"args": {name: {"value": value} for name, value in params.items()}})
    folder.mkdir(parents=True, exist_ok=True)
    args_json = folder / "config-run.json"
    args_json.write_text(variables["args_json"][0])
    variables.update(
        env=["/usr/bin/env"], interpreter=["python"], program=[sweep["program"]], args_json_file=[str(args_json)]
    )
    line: list[str] = []
    for chunk in map(str, create_sweep_command(list(sweep["command"]))):
        line += variables.get(chunk[2:-1]) or [] if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return line


def value_at(config: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        config = config[key]
    return config


def assert_reached(config: dict, params: dict[str, Any]) -> None:
    for name, value in params.items():
        if isinstance(value, dict):  # a partial section: each of its leaves must be set
            for key, leaf in value.items():
                assert_reached(config, {f"{name}.{key}": leaf})
        else:
            assert value_at(config, name) == value, name


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_builds_commands_whose_parameters_reach_the_config(
    sweep_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # the sweep files name configs relative to the repository root, where agents run
    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["metric"]["name"] == "val/acc"
    for index, params in enumerate(parameter_sets(sweep)):
        line = agent_command(sweep, params, tmp_path / str(index))
        assert line[0] == "/usr/bin/env"
        fedlm_args = line[line.index("fedlm") + 1 :]  # the program's arguments, whatever launches it
        assert_reached(printed_config(capsys, *fedlm_args), params)


def test_the_json_form_keeps_nulls_that_the_flag_form_turns_into_strings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    params = {"model.encoder.init_text": None}

    def init_text(*tail: str) -> Any:
        sweep = {
            "program": "fedlm",
            "command": ["${env}", "fedlm", "fit", "--config", "configs/fpb_federated.yaml", *tail],
        }
        line = agent_command(sweep, params, tmp_path)
        return value_at(printed_config(capsys, *line[line.index("fedlm") + 1 :]), "model.encoder.init_text")

    assert init_text("${args}") == "None"  # --model.encoder.init_text=None: the text "None" would seed the prompt
    assert init_text("--config", "${args_json_file}") is None


@pytest.mark.multiprocess
def test_the_torchrun_sweep_runs_two_parameter_sets_into_offline_wandb_runs(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    sweep = yaml.safe_load((REPO / "sweeps" / "dirichlet_alpha_x_algorithm.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env['PATH']}", HOME=str(tmp_path / "home"), WANDB_SILENT="true", OMP_NUM_THREADS="1"
    )
    for index, params in enumerate(parameter_sets(sweep)):
        folder = tmp_path / f"run{index}"
        logger = {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(folder), "name": "logs", "version": 0},
        }
        tiny = ["--model.backbone", tiny_gpt2_dir, "--model.encoder.hidden_size", "8",
                "--data.init_args.path", str(synthetic_fpb),
                "--data.init_args.batch_size", "4", "--federation.rounds", "1", "--federation.local_steps", "1",
                "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                # the tiny tokenizer splits the label words the shipped loss needs whole
                "--model.task.loss", "answer_tokens",
                "--trainer.default_root_dir", str(folder), "--trainer.logger", json.dumps(logger)]  # fmt: skip
        line = agent_command(sweep, params, folder)
        assert "torchrun" in line
        result = subprocess.run([*line, *tiny], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        saved = yaml.safe_load((folder / "logs" / "version_0" / "config.yaml").read_text())
        assert_reached(saved, params)
        stored = read_offline_run(folder / "wandb")  # rank 0's run; the other ranks log nothing
        assert_reached(stored.config, params)
        assert stored.config["federation"]["clients"] == 3 and stored.logged("round") == [1]
