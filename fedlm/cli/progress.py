"""A progress bar for federated fits: one bar over all rounds, so that its ETA is the time to the end of the run."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.types import STEP_OUTPUT


class RoundProgressBar(TQDMProgressBar):
    """``round 3/19 |####    | 41/228 [01:30<06:50] client=1, step=2/4, train/loss=2.9``.

    Lightning's bar restarts at every epoch, which here is a round of a few steps, so its ETA would only cover
    the round. This one spans the whole fit (resumed runs start at their round) and names the client whose
    local step just ran: in a one-process simulation the clients of a round take their turns; under torchrun
    it is this rank's client. The one-line summary of each round is printed by the FederatedLoop.
    """

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._spans_fit = False

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        per_round = int(self.total_train_batches)
        bar = self.train_progress_bar
        if not self._spans_fit:  # the first round of this process (also after a resume): set the bar's span
            done = trainer.current_epoch * per_round
            bar.reset(total=trainer.max_epochs * per_round)
            bar.initial = bar.n = done
            self._spans_fit = True
        bar.set_description(f"round {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        n = trainer.current_epoch * int(self.total_train_batches) + batch_idx + 1
        if bar is None or not self._should_update(n, bar.total):
            return
        bar.n = n
        bar.set_postfix({**client_step(trainer, batch_idx), **self.get_metrics(trainer, pl_module)})

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # the bar goes on into the next round


def client_step(trainer: L.Trainer, batch_idx: int) -> dict[str, Any]:
    """Which client the round's ``batch_idx``-th batch belongs to, and its local step, from the round's blocks."""
    start = 0
    for block in getattr(trainer.datamodule, "blocks", None) or []:
        if batch_idx < start + block.steps:
            return {"client": block.client, "step": f"{batch_idx - start + 1}/{block.steps}"}
        start += block.steps
    return {}
