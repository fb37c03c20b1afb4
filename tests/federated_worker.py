"""Run ``fedlm fit`` in one rank (under torchrun or alone) and save what each round left behind.

Usage: python federated_worker.py OUT_DIR fedlm-cli-args...  Writes OUT_DIR/rank{R}.pt with, per round, each
hosted client's exchange vector before averaging, the global one after it, the weights and a backbone checksum;
the encoder the run started from; the mask of what is shared; the hosted clients' training examples as the
datamodule encoded them; and everything this rank handed to every ``torch.distributed`` collective, whole, as it
was before the collective ran (the real collective still runs), tagged with the round it ran in.
"""

import inspect
import os
import pickle
import signal
import sys
import time

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.utils import parameters_to_vector

from fedlm.cli import cli
from fedlm.cli.main import release_process_group
from fedlm.federation import FederatedLoop

SENT: list[torch.Tensor] = []  # what this rank handed to all_reduce
# What it handed to every collective: {"name", "round", and "tensors" or, for objects, "pickled" (the bytes torch
# sends for each object) and "repr"}. "round" is the round index, -1 before the first round (key exchange, resume
# check), the number of rounds after the last.
COLLECTIVES: list[dict] = []
ROUND = [-1]  # the round running now; RoundRecorder moves it
# the argument that holds what this rank contributes (on a non-source rank of a broadcast or scatter: the buffer
# it receives into, so counting it overstates what is sent, never understates it)
TENSOR_COLLECTIVES = {"all_reduce": "tensor", "all_gather": "tensor", "all_gather_into_tensor": "input_tensor",
                      "broadcast": "tensor", "reduce": "tensor", "gather": "tensor", "scatter": "scatter_list",
                      "reduce_scatter": "input_list", "reduce_scatter_tensor": "input",
                      "all_to_all": "input_tensor_list", "all_to_all_single": "input", "send": "tensor",
                      "isend": "tensor"}  # fmt: skip
OBJECT_COLLECTIVES = {"all_gather_object": "obj", "broadcast_object_list": "object_list", "gather_object": "obj",
                      "scatter_object_list": "scatter_object_input_list",
                      "send_object_list": "object_list"}  # fmt: skip


def recording(name: str, collective):  # noqa: ANN001, ANN201
    """The real collective, after keeping a whole copy of what this rank contributes to it."""
    signature = inspect.signature(collective)

    def record(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        entry = {"name": name, "round": ROUND[0]}
        bound = signature.bind(*args, **kwargs).arguments
        if name in OBJECT_COLLECTIVES:
            given = bound.get(OBJECT_COLLECTIVES[name])
            objects = [given] if name in ("all_gather_object", "gather_object") else list(given or [])
            entry["pickled"] = [pickle.dumps(o) for o in objects]  # as torch's _object_to_tensor pickles them
            entry["repr"] = [repr(o) for o in objects]
        else:
            given = bound.get(TENSOR_COLLECTIVES[name])
            tensors = [given] if isinstance(given, torch.Tensor) else list(given or [])
            entry["tensors"] = [t.detach().clone() for t in tensors]
            if name == "all_reduce":
                SENT.append(given.detach().clone())
        COLLECTIVES.append(entry)
        return collective(*args, **kwargs)

    return record


def sent_bytes(entry: dict) -> int:
    """The bytes a recorded collective carried from this rank: its tensors' data, or each object's pickle plus the
    8-byte length torch sends ahead of it."""
    if "tensors" in entry:
        return sum(t.numel() * t.element_size() for t in entry["tensors"])
    return sum(len(p) + 8 for p in entry["pickled"])


def local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


class RoundRecorder(L.Callback):
    def __init__(self) -> None:
        self.rounds: list[dict] = []
        self.losses: list[float] = []
        self.initial: torch.Tensor | None = None
        self.shared: torch.Tensor | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ROUND[0] = trainer.current_epoch
        if self.initial is not None:
            return
        loop = next((c for c in trainer.callbacks if isinstance(c, FederatedLoop)), None)
        vector = loop.global_params if loop else parameters_to_vector(pl_module.encoder.parameters())
        self.initial = vector.detach().clone()
        self.shared = loop.exchange.shared.clone() if loop else None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ROUND[0] = trainer.current_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = next((c for c in trainer.callbacks if isinstance(c, FederatedLoop)), None)
        self.rounds.append(
            {
                "client_params": {k: v.clone() for k, v in loop.round.vectors.items()} if loop else {},
                "weights": {hosted.client: hosted.weight for hosted in loop.hosted} if loop else {},
                "global": (
                    loop.global_params if loop else parameters_to_vector(pl_module.encoder.parameters())
                ).clone(),
                # what this rank holds of the frozen LM: its shard of each sharded weight (shard_backbone)
                "backbone": sum(local(p).double().sum().item() for p in pl_module.backbone.parameters()),
                "backbone_bytes": sum(local(p).numel() * p.element_size() for p in pl_module.backbone.parameters()),
            }
        )


class FaultInjector(L.Callback):
    """Faults for the reliability tests, from ``FEDLM_TEST_FAULT=kind:rank:round:batch`` (kind: kill, hang, nan,
    skew: this rank's server step drifts by 1e-3 at that round; release: killed after the round's average was sent,
    before its checkpoint; sync: every rank averages the encoder's gradients over the world, as plain DDP would),
    injected on the first attempt only (torchrun's restarts run clean)."""

    def __init__(self) -> None:
        spec = os.environ.get("FEDLM_TEST_FAULT")
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.fault = spec.split(":") if spec and first_attempt else None

    def _due(self, trainer: L.Trainer, batch_idx: int) -> bool:
        if self.fault is None:
            return False
        _, rank, round_index, batch = self.fault
        return (
            trainer.global_rank == int(rank) and trainer.current_epoch == int(round_index) and batch_idx == int(batch)
        )

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

    def on_validation_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self._due(trainer, 0) and self.fault[0] == "release" and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_after_backward(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self.fault is not None and self.fault[0] == "sync":
            for p in pl_module.encoder.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(dist.get_world_size())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        if self._due(trainer, trainer.fit_loop.epoch_loop.batch_idx) and self.fault[0] == "nan":
            for p in pl_module.encoder.parameters():
                p.grad.fill_(float("nan"))


def training_examples(datamodule: L.LightningDataModule) -> dict[int, dict]:
    """Each hosted client's training examples as the datamodule encoded them: per example its runs of real
    (non-virtual) token ids, prompt and answer, and its text; and the client's labels in its data order."""
    encoded = datamodule.encoded("train").examples
    clients = {}
    for block in datamodule.blocks:
        examples = [encoded[i] for i in block.indices]
        runs = []
        for e in examples:
            ids, real = torch.tensor(e.input_ids), torch.tensor(e.virtual_index) < 0
            cuts = (real[1:] != real[:-1]).nonzero().flatten().add(1).tolist()
            pieces = zip(torch.tensor_split(ids, cuts), torch.tensor_split(real, cuts))
            runs.append([piece for piece, is_real in pieces if is_real[0]])
        clients[block.client] = {
            "token_runs": runs,
            "texts": [datamodule.train_examples[i].fields["sentence"] for i in block.indices],
            "labels": torch.tensor([e.label for e in examples]),
        }
    return clients


if __name__ == "__main__":
    import federated_worker as worker  # one copy of the recorder's state: the module the CLI's callbacks come from

    out, args = sys.argv[1], sys.argv[2:]
    for name in (*worker.TENSOR_COLLECTIVES, *worker.OBJECT_COLLECTIVES):
        setattr(dist, name, worker.recording(name, getattr(dist, name)))
    run = cli(
        args
        + ["--trainer.callbacks+=federated_worker.RoundRecorder", "--trainer.callbacks+=federated_worker.FaultInjector"]
    )
    recorder = next(c for c in run.trainer.callbacks if isinstance(c, worker.RoundRecorder))
    rank = dist.get_rank() if dist.is_initialized() else 0
    federated = any(isinstance(c, FederatedLoop) for c in run.trainer.callbacks)
    record = {"rounds": recorder.rounds, "losses": recorder.losses, "initial": recorder.initial,
              "shared": recorder.shared, "sent": worker.SENT, "collectives": worker.COLLECTIVES,
              "examples": training_examples(run.datamodule) if federated else {}}  # fmt: skip
    torch.save(record, f"{out}/rank{rank}.pt")
    release_process_group()  # as the fedlm console script does
