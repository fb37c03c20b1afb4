"""A Lightning strategy that starts torch.distributed like DDP but never syncs gradients over the world.

Plain ``strategy: ddp`` all-reduces gradients across every rank, so clients silently collapse into one
data-parallel job. Here the model stays unwrapped; ``FederatedLoop`` reduces gradients inside each client's
process group and averages the encoder across clients only at round boundaries.

Checkpoints: every rank holds state no other rank has (its clients' optimizer moments, private tokens), and
must never send it to another. So rank 0 writes the checkpoint as usual and every other rank writes its own
complete checkpoint beside it, ``<file>.rank<r>``, which is what that rank resumes from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.strategy import TBroadcast

from fedlm.federation.enrollment import Enrollment, Membership
from fedlm.federation.topology import Topology
from fedlm.federation.wire import broadcast_json


def rank_file(path: str | Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its own copy of checkpoint ``path`` (rank 0: the checkpoint itself)."""
    return Path(path) if rank == 0 else Path(f"{path}.rank{rank}")


class ClientStrategy(DDPStrategy):
    strategy_name = "fedlm_clients"

    def __init__(self, topology: Topology, enrollment: Enrollment | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.topology = topology
        self.enrollment = enrollment
        self.membership: Membership | None = None  # set by the proof; signs secure aggregation's keys

    def setup_distributed(self) -> None:
        """With ``federation.enrollment``, every rank proves its membership as soon as the process group forms,
        before any hook that could move a tensor derived from data runs."""
        super().setup_distributed()
        if self.enrollment is not None:
            self.membership = self.enrollment.prove(self.topology)

    def _get_process_group_backend(self) -> str:
        """On GPUs, NCCL for the device tensors and gloo beside it for the CPU ones (the wire's byte messages, client
        state kept off the device): the client groups inherit both, so no collective needs its tensors moved."""
        if self._process_group_backend is None and self.root_device.type == "cuda":
            return "cpu:gloo,cuda:nccl"
        return super()._get_process_group_backend()

    def configure_ddp(self) -> None:
        """No DistributedDataParallel wrapper: gradient reduction is FederatedLoop's job, per client."""

    def broadcast(self, obj: TBroadcast, src: int = 0) -> TBroadcast:
        """Lightning's broadcasts (log and checkpoint folders, stop flags) as JSON in a uint8 tensor: DDPStrategy's
        ``broadcast_object_list`` would unpickle, and so run, whatever rank ``src`` sent. Anything but JSON values
        (``fedlm.federation.wire.is_json``) is refused on every rank."""
        if not (dist.is_available() and dist.is_initialized()):
            return obj
        return broadcast_json(obj, src, "Lightning's strategy.broadcast")

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any = None) -> None:
        self.checkpoint_io.save_checkpoint(checkpoint, rank_file(filepath, self.topology.rank), storage_options)

    def remove_checkpoint(self, filepath: str | Path) -> None:
        self.checkpoint_io.remove_checkpoint(rank_file(filepath, self.topology.rank))

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        own = rank_file(checkpoint_path, self.topology.rank)
        if not own.is_file():
            raise FileNotFoundError(
                f"ckpt_path={checkpoint_path}: this rank ({self.topology.rank}) resumes from its own part {own}, which "
                "is missing. Each rank writes one beside the checkpoint; resume with the same number of processes "
                "(and, across nodes, each node's own checkpoint folder)."
            )
        return self.checkpoint_io.load_checkpoint(own, weights_only=weights_only)
