"""Who is which client: mapping torch.distributed ranks to federated clients.

Worked out once per run, from the launch (``Topology.from_launch``: torchrun's environment), and handed to the
strategy, the ``FederatedLoop`` and, through it, the data module. Two layouts, both from the same config:
- ``W >= C``: each client is a group of ``W // C`` consecutive ranks that train data-parallel; gradients are
  all-reduced only inside that group, never across clients.
- ``W < C`` (down to a single process): each rank hosts ``C // W`` clients and runs them one after another
  within a round, with one copy of the frozen LM.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch.distributed as dist

from fedlm.errors import FedlmError


class TopologyError(FedlmError, ValueError):
    """A world size and client count that cannot be mapped onto each other."""


@dataclass(frozen=True)
class Topology:
    num_clients: int
    world_size: int
    rank: int
    ranks_per_node: int = 0  # processes on each node (torchrun's LOCAL_WORLD_SIZE); 0: all on one node

    @classmethod
    def from_launch(cls, num_clients: int, env: Mapping[str, str] = os.environ) -> Topology:
        """From torchrun's environment (one process without it)."""
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(num_clients, world, int(env.get("RANK", "0")), int(env.get("LOCAL_WORLD_SIZE", world)))

    def __post_init__(self) -> None:
        C, W = self.num_clients, self.world_size
        if C < 1:
            raise TopologyError(f"federation.clients={C} must be at least 1.")
        if (W >= C and W % C) or (W < C and C % W):
            raise TopologyError(
                f"world size {W} does not fit federation.clients={C}: the number of processes must be a multiple of "
                f"the number of clients (each client gets W/C ranks) or divide it (each rank simulates C/W clients). "
                f"Use e.g. torchrun --nproc_per_node={C} or {max(1, C // 2) if C % 2 == 0 else 1}, "
                "or change federation.clients."
            )

    @property
    def nodes(self) -> int:
        return self.world_size // (self.ranks_per_node or self.world_size)

    def check_process_group(self) -> None:
        """The process group Lightning started must be the launch this topology was worked out from."""
        started = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
        if started != (self.world_size, self.rank):
            raise TopologyError(
                f"the process group has world size {started[0]} and this process rank {started[1]}, but the launch "
                f"said {self.world_size} and {self.rank} (WORLD_SIZE, RANK): start multi-process runs with torchrun "
                "and leave trainer.devices / trainer.num_nodes to fedlm."
            )

    @property
    def ranks_per_client(self) -> int:
        return max(1, self.world_size // self.num_clients)

    @property
    def hosted_clients(self) -> list[int]:
        """The clients this rank trains, in the order it runs them within a round."""
        if self.world_size >= self.num_clients:
            return [self.rank // self.ranks_per_client]
        per_rank = self.num_clients // self.world_size
        return list(range(self.rank * per_rank, (self.rank + 1) * per_rank))

    @property
    def rank_in_client(self) -> int:
        return self.rank % self.ranks_per_client if self.world_size >= self.num_clients else 0

    @property
    def is_client_lead(self) -> bool:
        """One rank per client contributes that client's parameters to the average."""
        return self.rank_in_client == 0

    def client_ranks(self, client: int) -> list[int]:
        if self.world_size >= self.num_clients:
            return list(range(client * self.ranks_per_client, (client + 1) * self.ranks_per_client))
        return [client // (self.num_clients // self.world_size)]

    def client_groups(self) -> dict[int, dist.ProcessGroup]:
        """One process group per multi-rank client, created on every rank in the same order (as new_group needs)."""
        if self.ranks_per_client == 1:
            return {}
        return {client: dist.new_group(self.client_ranks(client)) for client in range(self.num_clients)}
