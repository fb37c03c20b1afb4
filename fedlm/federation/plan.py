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

from collections.abc import Callable
from dataclasses import dataclass, field


def spread(clients: list[int], steps: dict[int, int], processes: int) -> list[list[int]]:
    """``clients`` over ``processes``: the longest first onto the least loaded (ties: the lower client onto the
    lower process), so equal steps give every process the same count, give or take one; each list ascending."""
    loads, lists = [0] * processes, [[] for _ in range(processes)]
    for client in sorted(clients, key=lambda c: (-steps[c], c)):
        target = min(range(processes), key=lambda p: (loads[p], p))
        loads[target] += steps[client]
        lists[target].append(client)
    return [sorted(chosen) for chosen in lists]


@dataclass
class RoundPlan:
    """The round's sampled clients, which process runs each, and how many batches every process runs."""

    sampled: Callable[[int], list[int]]  # round -> its sampled clients, the same on every rank
    processes: int
    steps: dict[int, int]  # local steps per round of every client this process may run, in its pinned order
    skips: bool  # spread: unsampled clients do not run at all
    pinned_batches: int = 0  # pinned: every process's batches per round (the longest process's steps)
    _last: tuple[int, list[list[int]]] | None = field(default=None, repr=False)  # the latest round's runners

    def runners(self, round_index: int) -> list[list[int]]:
        """The clients each process runs in the round (spread only); asked for by the loop and the data module
        alike, so the latest round's answer is kept."""
        if self._last is None or self._last[0] != round_index:
            self._last = (round_index, spread(self.sampled(round_index), self.steps, self.processes))
        return self._last[1]

    def layout(self, round_index: int, rank: int) -> tuple[list[int], int]:
        """``rank``'s clients in the round, in order, and how many batches every process runs in it (the longest
        process's steps; the data module fills the rest with idle steps)."""
        if not self.skips:
            return list(self.steps), self.pinned_batches
        runners = self.runners(round_index)
        return runners[rank], max(sum(self.steps[client] for client in clients) for clients in runners)
