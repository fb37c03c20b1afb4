"""Sweep files: every parameter must reach the resolved config through the command W&B runs."""

import json
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.name)
def test_sweep_parameters_reach_the_config(sweep_file: Path, tmp_path: Path) -> None:
    sweep = yaml.safe_load(sweep_file.read_text())
    names = list(sweep["parameters"])
    for values in list(product(*(sweep["parameters"][n]["values"] for n in names)))[:2]:
        args_file = tmp_path / "args.json"
        args_file.write_text(json.dumps(dict(zip(names, values))))  # what W&B's ${args_json_file} holds
        command = [arg.replace("${args_json_file}", str(args_file)) for arg in sweep["command"] if arg != "${env}"]
        assert command[0] == sweep["program"] == "fedlm"
        result = subprocess.run(
            [sys.executable, "-m", "fedlm", *command[1:], "--print_config"],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        )
        resolved = yaml.safe_load(result.stdout)
        for name, value in zip(names, values):
            node = resolved
            for key in name.split("."):
                node = node[key]
            assert node == value, name
