"""Who runs which client in a round: pure, from the config and the launch, the same on every rank.

Two ways to host clients (``RoundPlan.skips``):
- **Pinned** (a client's data lives with its processes: ``data.client_files``, or a process group per client):
  every hosted client runs its local steps each round, and an unsampled one rolls back (``ClientStates``). Its
  compute is spent; only its communication is saved.
- **Spread** (a simulation from one dataset, on fewer processes than clients, with ``client_fraction < 1``): any
  process can run any client, so only the round's sampled clients run, spread over the processes so their steps
  are as even as they can be, and a round costs what its sampled clients cost, however many clients there are.
  A client's state moves to the process that runs it (``fedlm.federation.loop``); the result is the pinned one's.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlm.federation.config import sample_clients


def spread(clients: list[int], steps: dict[int, int], processes: int) -> list[list[int]]:
    """``clients`` over ``processes``: the longest first onto the least loaded (ties: the lower client onto the
    lower process), so equal steps give every process the same count, give or take one; each list ascending."""
    loads, lists = [0] * processes, [[] for _ in range(processes)]
    for client in sorted(clients, key=lambda c: (-steps[c], c)):
        target = min(range(processes), key=lambda p: (loads[p], p))
        loads[target] += steps[client]
        lists[target].append(client)
    return [sorted(chosen) for chosen in lists]


@dataclass(frozen=True)
class RoundPlan:
    """The round's sampled clients and, when they are spread, which process runs each."""

    clients: int
    fraction: float
    seed: int
    processes: int
    steps: dict[int, int]  # local steps per round of every client this process may run
    skips: bool  # spread: unsampled clients do not run at all

    def sampled(self, round_index: int) -> list[int]:
        return sample_clients(self.clients, self.fraction, self.seed, round_index)

    def runners(self, round_index: int) -> list[list[int]]:
        """The clients each process runs in the round (spread only)."""
        return spread(self.sampled(round_index), self.steps, self.processes)
