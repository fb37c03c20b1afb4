"""Run ``fedlm fit`` in one rank (under torchrun or alone) and save what each round left behind.

Usage: python federated_worker.py OUT_DIR fedlm-cli-args...  Writes OUT_DIR/rank{R}.pt with, per round, each
hosted client's exchange vector before averaging, the global one after it, the weights and a backbone checksum;
the encoder the run started from; the mask of what is shared; and what this rank handed to every
``torch.distributed`` collective, as it was before the collective ran (the real collective still runs).
"""

import os
import signal
import sys
import time

import lightning as L
import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector

from fedlm.cli import cli
from fedlm.cli.main import release_process_group
from fedlm.federation import FederatedLoop

SENT: list[torch.Tensor] = []  # what this rank handed to all_reduce
COLLECTIVES: list[tuple[str, object]] = []  # what it handed to every collective: (name, tensor or object)
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")
TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "gather",
                      "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
                      "send", "isend")  # fmt: skip


def recording(name: str, collective):  # noqa: ANN001, ANN201
    """The real collective, after keeping a copy of what this rank contributes to it."""

    def record(first, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if name in OBJECT_COLLECTIVES:
            COLLECTIVES.append((name, [repr(o)[:200] for o in (first if name != "all_gather_object" else args[:1])]))
        elif isinstance(first, torch.Tensor):
            contributed = first if name not in ("all_gather", "all_gather_into_tensor") else args[0]
            COLLECTIVES.append((name, contributed.detach().clone()))
            if name == "all_reduce":
                SENT.append(first.detach().clone())
        else:
            COLLECTIVES.append((name, repr(first)[:200]))
        return collective(first, *args, **kwargs)

    return record


class RoundRecorder(L.Callback):
    def __init__(self) -> None:
        self.rounds: list[dict] = []
        self.losses: list[float] = []
        self.initial: torch.Tensor | None = None
        self.shared: torch.Tensor | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.initial is not None:
            return
        loop = next((c for c in trainer.callbacks if isinstance(c, FederatedLoop)), None)
        vector = loop.global_params if loop else parameters_to_vector(pl_module.encoder.parameters())
        self.initial = vector.detach().clone()
        self.shared = loop.exchange.shared.clone() if loop else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = next((c for c in trainer.callbacks if isinstance(c, FederatedLoop)), None)
        self.rounds.append(
            {
                "client_params": {k: v.clone() for k, v in loop.client_params.items()} if loop else {},
                "weights": dict(loop.weights) if loop else {},
                "global": (loop.global_params if loop else parameters_to_vector(pl_module.encoder.parameters())).clone(),
                "backbone": torch.stack([p.double().sum() for p in pl_module.backbone.parameters()]).sum().item(),
            }
        )


class FaultInjector(L.Callback):
    """Faults for the reliability tests, from ``FEDLM_TEST_FAULT=kind:rank:round:batch`` (kind: kill, hang, nan,
    skew: this rank's server step drifts by 1e-3 at that round), injected on the first attempt only (torchrun's
    restarts run clean)."""

    def __init__(self) -> None:
        spec = os.environ.get("FEDLM_TEST_FAULT")
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.fault = spec.split(":") if spec and first_attempt else None

    def _due(self, trainer: L.Trainer, batch_idx: int) -> bool:
        if self.fault is None:
            return False
        _, rank, round_index, batch = self.fault
        return trainer.global_rank == int(rank) and trainer.current_epoch == int(round_index) and batch_idx == int(batch)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.fault is None or self.fault[0] != "skew" or trainer.global_rank != int(self.fault[1]):
            return
        loop = next(c for c in trainer.callbacks if isinstance(c, FederatedLoop))
        step, due = loop.server.step, int(self.fault[2])

        def drifting_step(global_params, average):  # noqa: ANN001, ANN202
            new = step(global_params, average)
            return new + 1e-3 if trainer.current_epoch == due else new

        loop.server.step = drifting_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if self._due(trainer, batch_idx) and self.fault[0] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self._due(trainer, batch_idx) and self.fault[0] == "hang":
            time.sleep(3600)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        if self._due(trainer, trainer.fit_loop.epoch_loop.batch_idx) and self.fault[0] == "nan":
            for p in pl_module.encoder.parameters():
                p.grad.fill_(float("nan"))


if __name__ == "__main__":
    out, args = sys.argv[1], sys.argv[2:]
    for name in (*TENSOR_COLLECTIVES, *OBJECT_COLLECTIVES):
        setattr(dist, name, recording(name, getattr(dist, name)))
    run = cli(args + ["--trainer.callbacks+=federated_worker.RoundRecorder", "--trainer.callbacks+=federated_worker.FaultInjector"])
    import federated_worker  # the class the CLI instantiated, not this script's __main__ copy

    recorder = next(c for c in run.trainer.callbacks if isinstance(c, federated_worker.RoundRecorder))
    rank = dist.get_rank() if dist.is_initialized() else 0
    record = {"rounds": recorder.rounds, "losses": recorder.losses, "initial": recorder.initial,
              "shared": recorder.shared, "sent": SENT, "collectives": COLLECTIVES}  # fmt: skip
    torch.save(record, f"{out}/rank{rank}.pt")
    release_process_group()  # as the fedlm console script does
