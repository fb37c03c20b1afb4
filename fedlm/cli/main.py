"""``fedlm`` command line: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

Configs compose (``--config base.yaml --config override.yaml``, later wins) and ``--print_config`` shows
the resolved result.
"""

from __future__ import annotations

import logging

from lightning.pytorch.cli import LightningCLI

from fedlm.data import FinancialPhraseBank, TextClassificationData
from fedlm.model import PTuningModule


class FedLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.set_defaults({"data": {"class_path": f"{FinancialPhraseBank.__module__}.FinancialPhraseBank"}})


def cli(args: list[str] | None = None) -> FedLMCLI:
    """Parse ``args`` (default: the command line), run the subcommand, return the finished CLI."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return FedLMCLI(
        PTuningModule,
        TextClassificationData,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
    )


def main() -> None:
    """The ``fedlm`` console script."""
    cli()
