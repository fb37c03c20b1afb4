"""``fedlm`` command line: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``, plus fedlm's own
subcommands in one table (``SUBCOMMANDS``: ``export``, ``predict SOURCE [INPUT]``, ``split-data``, ``experiment``,
``report``, ``keys``).

Configs compose (``--config base.yaml --config override.yaml``, later wins) and ``--print_config`` shows
the resolved result. fedlm's own errors (bad config, data, template, checkpoint, topology) print one line, no
traceback (``fedlm.cli.errors``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from lightning import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_module

from fedlm.checkpointing import AtomicCheckpointIO, load_checkpoint
from fedlm.cli.errors import reporting_errors
from fedlm.cli.progress import RoundProgressBar
from fedlm.cli.tracking import (
    LoggerSaveConfigCallback,
    TensorBoardLogger,
    WandbConfig,
    WandbLogger,
    log_confusion_matrix,
    log_figure,
    save_confusion_png,
)
from fedlm.data import FinancialPhraseBank, TaskData
from fedlm.errors import ConfigError
from fedlm.federation import ClientStrategy, FederatedLoop, FederationConfig, Topology
from fedlm.federation.enrollment import Enrollment
from fedlm.ptuning import PTuningModule
from fedlm.ptuning.module import check_sectioned


class WithoutAdvertising(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines: adverts for its cloud service."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


rank_zero_module.log.addFilter(WithoutAdvertising())  # the logger behind Lightning's rank_zero_info


class FedLMCLI(LightningCLI):
    """LightningCLI plus an optional top-level ``federation:`` section (absent or null: centralized)."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.set_defaults({"data": {"class_path": f"{FinancialPhraseBank.__module__}.FinancialPhraseBank"}})
        parser.add_argument("--federation", type=FederationConfig | None, default=None, help="federated rounds")
        parser.add_argument("--test_after_fit", type=bool, default=False, help="after fit, test (test_metrics.json)")
        parser.add_argument(
            "--test_checkpoint",
            type=Literal["last", "best"],
            default="last",
            help="what test_after_fit tests: the final model, or the first checkpoint callback's best",
        )
        parser.add_argument("--wandb", type=WandbConfig | None, default=None, help="also log to Weights & Biases")
        parser.add_argument("--tensorboard", type=bool, default=False, help="also log to TensorBoard")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads ``ckpt_path``'s hyperparameters before the trainer exists: check the file first."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file():
            check_sectioned(load_checkpoint(path).get("hyper_parameters"), str(path))
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        self._move_loggers_with_root()

    def _move_loggers_with_root(self) -> None:
        """``--trainer.default_root_dir DIR`` alone moves a run: a logger that the config files keep in the run's
        folder (``save_dir`` their ``default_root_dir``, as the shipped configs' CSV logger) moves with it, and with
        it the checkpoints, config.yaml and test metrics kept in its folder."""
        config = self.config.get(str(self.subcommand), self.config)
        root, configured = config.trainer.default_root_dir, configured_root(config.get("config") or [])
        if root is None or configured in (None, root):
            return
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        for logger in loggers:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and init_args.get("save_dir") == configured:
                init_args.save_dir = root

    def _tests_best(self) -> bool:
        return self._get(self.config, "test_after_fit") and self._get(self.config, "test_checkpoint") == "best"

    def _describe_run_to_loggers(self) -> None:
        """Name, group and tag W&B runs by run kind and seed (before the logger creates its run)."""
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                seed = self._get(self.config, "seed_everything")
                logger.describe(self._run_kind(), seed, getattr(self.datamodule, "local_client", None))

    def before_test(self) -> None:
        self._describe_run_to_loggers()

    def before_fit(self) -> None:
        self._describe_run_to_loggers()
        if self._tests_best() and getattr(self.trainer.checkpoint_callback, "monitor", None) is None:
            raise ConfigError(
                "test_checkpoint: best needs a ModelCheckpoint callback with a monitor (the first one under "
                "trainer.callbacks); add one, or set test_checkpoint: last to test the final model."
            )
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        if not self._get(self.config, "test_after_fit"):
            return
        fit_seconds = time.perf_counter() - self._fit_started
        checkpoint = self.trainer.checkpoint_callback.best_model_path if self._tests_best() else None
        # ckpt_path=None tests the weights in memory: after fit, the final (federated: global) model.
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=checkpoint)
        self._write_test_outputs(results[0], checkpoint or "final model", fit_seconds)

    def after_test(self) -> None:
        checkpoint = self._get(self.config, "ckpt_path")
        self._write_test_outputs(self.trainer.callback_metrics, checkpoint or "untrained encoder", None)

    def _run_kind(self) -> str:
        """What the run was, for ``fedlm report``: centralized, federated, local (one client alone) or zero-shot."""
        if self.subcommand == "test" and not self._get(self.config, "ckpt_path"):
            return "zero-shot"
        if self.subcommand == "test":
            return "checkpoint"
        if self._get(self.config, "federation") is not None:
            return "federated"
        return "local" if getattr(self.datamodule, "local_client", None) is not None else "centralized"

    def _write_test_outputs(self, metrics: dict[str, Any], checkpoint: str, fit_seconds: float | None) -> None:
        """test_metrics.json and test_predictions.json in the log folder (the inputs of ``fedlm report``), and for
        classification the test confusion matrix as a PNG."""
        predictions = self.model.task.predictions  # each test example's, gathered from every rank at the test's end
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective: every rank asks
        if not self.trainer.is_global_zero:
            return
        folder.mkdir(parents=True, exist_ok=True)
        task = self.model.task
        summary = {
            "kind": self._run_kind(),
            "task": task.config.kind,
            "seed": self._get(self.config, "seed_everything"),
            "client": getattr(self.datamodule, "local_client", None),
            "checkpoint": checkpoint,
            "epochs_completed": self.trainer.current_epoch,
            "fit_seconds": fit_seconds,
            "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            **{k: float(v) for k, v in metrics.items() if k.startswith("test/")},
        }
        if task.config.calibrate is not None:
            biases = dict(zip(task.label_names, task.label_bias.tolist()))
            summary["calibration"] = {"objective": task.config.calibrate, "label_bias": biases}
        (folder / "test_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        (folder / "test_predictions.json").write_text(json.dumps(predictions) + "\n")
        if task.config.kind == "classification":
            self._write_confusion(folder, metrics, checkpoint, predictions)
        print(f"[fedlm] test metrics written to {folder / 'test_metrics.json'}", flush=True)

    def _write_confusion(
        self, folder: Path, metrics: dict[str, Any], checkpoint: str, predictions: dict[str, Any]
    ) -> None:
        labels, preds, names = predictions["label"], predictions["predicted"], predictions["classes"]
        accuracy = metrics.get("test/acc")
        title = f"test, {checkpoint}" + (f": accuracy {float(accuracy):.3f}" if accuracy is not None else "")
        figure = save_confusion_png(labels, preds, names, folder / "test_confusion.png", title)
        log_figure(self.trainer.loggers, "test/confusion_png", figure, self.trainer.global_step)
        log_confusion_matrix(self.trainer.loggers, "test/confusion_matrix", labels, preds, names)

    def _loggers(self, configured: Any, root: str) -> list[Logger] | Any:
        """``trainer.logger``'s loggers, plus W&B and TensorBoard when the ``wandb:``/``tensorboard:`` options ask."""
        wandb, tensorboard = self._get(self.config_init, "wandb"), self._get(self.config_init, "tensorboard")
        if wandb is None and not tensorboard:
            return configured
        if configured is None or configured is True:  # Lightning's default logger, made explicit so others can join
            loggers = [CSVLogger(save_dir=root, name="lightning_logs")]
        else:
            loggers = [] if configured is False else list(configured) if isinstance(configured, list) else [configured]
        if wandb is not None:
            settings = {k: v for k, v in vars(wandb).items() if k != "save_dir"}
            loggers.append(WandbLogger(save_dir=wandb.save_dir or root, **settings))
        if tensorboard:
            loggers.append(TensorBoardLogger(save_dir=root, name="tensorboard"))
        return loggers

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if not trainer_config.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        kwargs["logger"] = self._loggers(trainer_config.get("logger"), trainer_config.get("default_root_dir") or ".")
        federation = self._get(self.config_init, "federation")
        if federation is None:
            return super().instantiate_trainer(**kwargs)
        topology = Topology.from_launch(federation.clients)
        loop = FederatedLoop(federation, topology)
        enrollment = Enrollment.load(federation.enrollment, federation.clients) if federation.enrollment else None
        callbacks = trainer_config.get("callbacks") or []
        callbacks = [*(callbacks if isinstance(callbacks, list) else [callbacks]), loop]
        if trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            callbacks.append(RoundProgressBar())
        kwargs["callbacks"] = callbacks
        kwargs["use_distributed_sampler"] = False  # each client samples its own shard
        kwargs["max_epochs"] = loop.rounds_to_train  # one epoch per round; under DP, the rounds the budget allows
        if topology.world_size > 1:
            # Under torchrun: one process per rank, clients as process groups, no world-wide DDP.
            if trainer_config.get("strategy", "auto") == "auto":
                timeout = timedelta(seconds=federation.collective_timeout_s)
                kwargs["strategy"] = ClientStrategy(topology, enrollment, timeout=timeout)
            elif enrollment is not None:
                raise ConfigError(
                    "federation.enrollment is proven by fedlm's own strategy, which trainer.strategy replaces: "
                    "leave trainer.strategy at auto, or set federation.enrollment: null."
                )
            kwargs["devices"], kwargs["num_nodes"] = topology.ranks_per_node, topology.nodes
            restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
            if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                rank_zero_warn(
                    "torchrun --max-restarts with its shared rendezvous store: restarted workers can hang while they "
                    "set up the process group (seen in 2 of 3 restarts here). Launch with "
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment."
                )
        elif enrollment is not None:
            enrollment.prove(topology)  # one process: its own key and clients, checked against the roster here
        return super().instantiate_trainer(**kwargs)


def configured_root(files: list[Any]) -> str | None:
    """``trainer.default_root_dir`` as the ``--config`` files set it, the last one winning (jsonargparse keeps their
    paths, None for a config given inline)."""
    root = None
    for file in filter(None, files):
        trainer = (yaml.safe_load(file.read_text()) or {}).get("trainer") or {}
        root = trainer.get("default_root_dir", root)
    return root


def cli(args: list[str] | None = None) -> FedLMCLI:
    """Parse ``args`` (default: the command line), run the subcommand, return the finished CLI."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return FedLMCLI(
        PTuningModule,
        TaskData,
        subclass_mode_data=True,
        save_config_callback=LoggerSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        # Same seed, same result: without it the backward of the virtual-token gather (a scatter-add) sums in
        # thread order on CPU (results/reproducibility.md). `--trainer.deterministic false` trades that for speed.
        trainer_defaults={"deterministic": True},
        args=args,
    )


# fedlm's own subcommands: name -> (module, function of the remaining arguments). Imported when used, so that
# `fedlm fit` does not load the reports' plotting or PEFT. Every other subcommand is LightningCLI's.
SUBCOMMANDS = {
    "export": ("fedlm.cli.export", "export_main"),
    "predict": ("fedlm.cli.predict", "predict_main"),
    "split-data": ("fedlm.cli.split_data", "split_data_main"),
    "experiment": ("fedlm.experiment", "experiment_main"),
    "report": ("fedlm.experiment", "report_main"),
    "keys": ("fedlm.cli.keys", "keys_main"),
}
# Options that only LightningCLI's ``predict`` takes: with one of them, ``fedlm predict`` is LightningCLI's.
LIGHTNING_PREDICT_OPTIONS = ("--config", "--ckpt_path", "--print_config", "--model", "--data", "--trainer")


def main() -> None:
    """The ``fedlm`` console script: LightningCLI's subcommands plus ``SUBCOMMANDS`` (``predict SOURCE [INPUT]``;
    LightningCLI's ``predict`` when given its ``--config``, ``--ckpt_path``, ...); fedlm's own errors end it with
    their message and exit code 2."""
    reporting_errors(run_command, release_process_group)


def run_command() -> None:
    """Run the subcommand that ``sys.argv`` names."""
    name, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else (None, [])
    lightning_predict = name == "predict" and any(arg.startswith(LIGHTNING_PREDICT_OPTIONS) for arg in args)
    if name in SUBCOMMANDS and not lightning_predict:
        module, function = SUBCOMMANDS[name]
        getattr(importlib.import_module(module), function)(args)
        return
    cli()
    release_process_group()


def release_process_group() -> None:
    """Destroy the process group before the interpreter exits: left to exit-time destructors, gloo's threads can
    abort a rank that has finished ("terminate called without an active exception", exit code -6), which torchrun
    then reports as a failed run (seen once in the 2-rank tests)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
