"""Run ``fedlm fit`` in one rank (under torchrun or alone) and save what each round left behind.

Usage: python federated_worker.py OUT_DIR fedlm-cli-args...  Writes OUT_DIR/rank{R}.pt with, per round, each
hosted client's encoder before averaging, the global encoder after it, the weights and a backbone checksum; and
the encoder the run started from.
"""

import sys

import lightning as L
import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector

from fedlm.cli import cli
from fedlm.federation import FederatedLoop


class RoundRecorder(L.Callback):
    def __init__(self) -> None:
        self.rounds: list[dict] = []
        self.losses: list[float] = []
        self.initial: torch.Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = parameters_to_vector(pl_module.encoder.parameters()).detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = next((c for c in trainer.callbacks if isinstance(c, FederatedLoop)), None)
        self.rounds.append(
            {
                "client_params": {k: v.clone() for k, v in loop.client_params.items()} if loop else {},
                "weights": dict(loop.weights) if loop else {},
                "global": parameters_to_vector(pl_module.encoder.parameters()).detach().clone(),
                "backbone": torch.stack([p.double().sum() for p in pl_module.backbone.parameters()]).sum().item(),
            }
        )


if __name__ == "__main__":
    out, args = sys.argv[1], sys.argv[2:]
    run = cli(args + ["--trainer.callbacks+=federated_worker.RoundRecorder"])
    import federated_worker  # the class the CLI instantiated, not this script's __main__ copy

    recorder = next(c for c in run.trainer.callbacks if isinstance(c, federated_worker.RoundRecorder))
    rank = dist.get_rank() if dist.is_initialized() else 0
    record = {"rounds": recorder.rounds, "losses": recorder.losses, "initial": recorder.initial}
    torch.save(record, f"{out}/rank{rank}.pt")
