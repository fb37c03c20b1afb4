"""Experiment tracking: a W&B logger that is offline unless credentials exist, the resolved config sent to every
logger, and figures logged where each logger can show them.

Offline by default because most runs here have no network: an offline W&B run keeps everything under
``save_dir/wandb`` and ``wandb sync`` uploads it later. With an API key (``WANDB_API_KEY`` or ``wandb login``'s
netrc entry) the run streams online; ``WANDB_MODE`` or ``offline:`` in the config decide explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning import Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

from fedlm.wandb_mode import default_wandb_mode


@dataclass
class WandbConfig:
    """The top-level ``wandb:`` section: also log the run to Weights & Biases, beside ``trainer.logger``'s loggers
    (which stay first, so the run's folder, CSV metrics and test_metrics.json are where they always are).

    Args:
        project: null: ``WANDB_PROJECT``, else ``fedlm``.
        entity: the W&B user or team (null: your default).
        offline: null: offline exactly when ``WANDB_MODE`` says so or no credentials are found.
        group, job_type, name, tags, notes: null: filled from the run (see ``WandbLogger``).
        save_dir: where W&B keeps its files (null: ``trainer.default_root_dir``).
    """

    project: str | None = None
    entity: str | None = None
    offline: bool | None = None
    group: str | None = None
    job_type: str | None = None
    name: str | None = None
    tags: list[str] | None = None
    notes: str | None = None
    save_dir: str | None = None


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, offline when there are no credentials, with fedlm's run naming.

    Args:
        project: the W&B project (default ``fedlm``, or ``WANDB_PROJECT``).
        save_dir: where W&B keeps the run's files (``save_dir/wandb/...``).
        offline: true, false, or null: offline exactly when ``WANDB_MODE`` says so or no credentials are found.
        group, job_type, name, tags: left null, fedlm fills them from the run: group and job type = the run kind
            (centralized, federated, local, zero-shot), name = kind, client and seed, tags = kind and seed; so W&B
            groups the seeds of one kind together (its error bands are over seeds).
        kwargs: anything else ``wandb.init`` takes (entity, notes, ...).
    """

    def __init__(
        self,
        project: str | None = None,
        save_dir: str = "runs",
        offline: bool | None = None,
        group: str | None = None,
        job_type: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if offline is None:
            offline = default_wandb_mode() in ("offline", "dryrun")
        Path(save_dir).mkdir(parents=True, exist_ok=True)  # wandb.init refuses a missing directory
        super().__init__(
            project=project or os.environ.get("WANDB_PROJECT", "fedlm"),
            save_dir=save_dir,
            offline=offline,
            group=group,
            job_type=job_type,
            name=name,
            tags=tags,
            **kwargs,
        )

    def describe(self, kind: str, seed: int | None, client: int | None) -> None:
        """Fill what the user left unset; must run before the first access to ``experiment`` creates the run."""
        if self._experiment is not None:
            return
        seed_tag = f"seed{seed}" if seed is not None else "unseeded"
        defaults = {
            "group": kind,
            "job_type": kind,
            "name": f"{kind}{'' if client is None else client}-{seed_tag}",
            "tags": [kind, seed_tag],
        }
        for key, value in defaults.items():
            if self._wandb_init.get(key) is None:
                self._wandb_init[key] = value
        self._name = self._wandb_init["name"]
        self._wandb_init.setdefault("config", {}).update({"run_kind": kind, "seed": seed, "client": client})


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger, with a new event file for whatever is logged after each finalize.

    A fit and the test after it each finalize (close) their loggers, and a closed tensorboardX writer reopens on the
    next log with a file named by the second: within the same second it replaces the earlier file, and the fit's
    scalars are lost (seen on a short run). Here each reopening gets its own file suffix instead; TensorBoard reads
    every event file of the folder. (Flushing without closing is no cure: tensorboardX writes asynchronously.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parts = 0

    def finalize(self, status: str) -> None:
        super().finalize(status)  # flush, close, save hparams.yaml
        if self._experiment is not None:
            self._experiment = None  # the next log makes a new writer...
            self._parts += 1
            self._kwargs["filename_suffix"] = f".{self._parts}"  # ...with a file of its own


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Also hand the whole resolved config (every section, not just the model's hyperparameters) to each logger."""

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        config = self.config.as_dict()
        config.pop("config", None)  # the paths of the config files: not a setting
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


def log_figure(loggers: list[Logger], key: str, path: Path, step: int | None = None) -> None:
    """Show a saved PNG in the loggers that display images (W&B, fedlm's TensorBoard); the file stays beside the run."""
    for logger in loggers:
        if isinstance(logger, LightningWandbLogger):
            import wandb

            logger.experiment.log({key: wandb.Image(str(path))})
        elif isinstance(logger, TensorBoardLogger):
            import matplotlib.image

            image = matplotlib.image.imread(str(path))[..., :3]
            logger.experiment.add_image(key, image, global_step=step or 0, dataformats="HWC")
            logger.finalize("success")  # written out now: this comes after the trainer finalized its loggers


def save_confusion_png(labels: list[int], preds: list[int], names: list[str], path: Path, title: str) -> Path:
    """The confusion matrix as a heatmap with counts: rows the true class, columns the predicted one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [[0] * len(names) for _ in names]
    for true, pred in zip(labels, preds):
        counts[true][pred] += 1
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 1.8, 1.1 * len(names) + 1.2))
    ax.imshow(counts, cmap="Blues")
    peak = max(max(row) for row in counts) or 1
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_confusion_matrix(
    loggers: list[Logger], key: str, labels: list[int], preds: list[int], names: list[str]
) -> None:
    """W&B's interactive confusion matrix (other loggers get the PNG through ``log_figure``)."""
    for logger in loggers:
        if isinstance(logger, LightningWandbLogger):
            import wandb

            plot = wandb.plot.confusion_matrix(y_true=labels, preds=preds, class_names=names, title=key)
            logger.experiment.log({key: plot})
