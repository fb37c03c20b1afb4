"""Who is which client: mapping torch.distributed ranks to federated clients.

Two layouts, both from the same config:
- ``W >= C``: each client is a group of ``W // C`` consecutive ranks that train data-parallel; gradients are
  all-reduced only inside that group, never across clients.
- ``W < C`` (down to a single process): each rank hosts ``C // W`` clients and runs them one after another
  within a round, with one copy of the frozen LM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


class TopologyError(ValueError):
    """A world size and client count that cannot be mapped onto each other."""


@dataclass(frozen=True)
class Topology:
    num_clients: int
    world_size: int
    rank: int

    def __post_init__(self) -> None:
        C, W = self.num_clients, self.world_size
        if C < 1:
            raise TopologyError(f"federation.clients={C} must be at least 1.")
        if (W >= C and W % C) or (W < C and C % W):
            raise TopologyError(
                f"world size {W} does not fit federation.clients={C}: the number of processes must be a multiple of "
                f"the number of clients (each client gets W/C ranks) or divide it (each rank simulates C/W clients). "
                f"Use e.g. torchrun --nproc_per_node={C} or {max(1, C // 2) if C % 2 == 0 else 1}, or change federation.clients."
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
