"""Reading what finished runs left on disk, for the reports: one place knows where a run's logs lie and how a
CSVLogger's ``metrics.csv`` is laid out, so that every report reads them alike."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

import yaml

# Where CSVLogger(save_dir=<run folder>, name="logs", version=0) writes: the layout of fedlm experiment's runs and of
# scripts/privacy.sh's and scripts/recipe.sh's.
LOGS = Path("logs", "version_0")


def find(roots: Iterable[Path], pattern: str, hint: str) -> list[Path]:
    """The files matching ``pattern`` under ``roots``, sorted, each once; none is an error that says what makes them."""
    roots = [Path(root) for root in roots]
    found = sorted({path for root in roots for path in root.glob(pattern)})
    if not found:
        raise FileNotFoundError(f"no {pattern} under {', '.join(map(str, roots))}; {hint}")
    return found


def read_json(path: Path) -> dict:
    """A JSON file a run wrote (``test_metrics.json``, ``test_predictions.json``, ``personalization.json``)."""
    return json.loads(path.read_text())


def read_config(folder: Path) -> dict:
    """The resolved config LightningCLI saved in ``folder`` (``config.yaml``); empty when it saved none."""
    path = folder / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv``, none when the run logged nothing. A row holds what was logged at one step
    (training, validation, a round's end), its other columns blank: see ``logged``."""
    if not path.is_file():
        return []
    with path.open() as file:
        return list(csv.DictReader(file))


def logged(rows: list[dict[str, str]], column: str) -> list[dict[str, str]]:
    """The rows in which ``column`` was logged."""
    return [row for row in rows if row.get(column)]


def floats(rows: list[dict[str, str]], column: str) -> list[float]:
    """``column``'s values, in the order logged, from the rows that logged it."""
    return [float(row[column]) for row in logged(rows, column)]


def log_lines(path: Path) -> list[str]:
    """The lines a run printed (its ``output.log``), none when it has no log; undecodable bytes do not stop a report."""
    return path.read_text(errors="replace").splitlines() if path.is_file() else []
