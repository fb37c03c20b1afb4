"""A round's aggregation as pure functions on plain tensors: no Lightning, no process group.

A round boundary is pack -> sum over ranks -> unpack -> average:
- each rank turns what its clients did into ``Contribution``s (a rule's ``summand``: FedAvg's is the weighted
  vector; the order statistics of ``fedlm.federation.robust`` stack the vectors instead) and ``pack``s them into
  one float64 vector laid out by ``payload_layout``;
- the loop sums those vectors over the world, in one all-reduce (plain, or secure aggregation's masked one);
- ``unpack`` reads the sums back as ``Totals`` and the rule turns them into the round's average.
Sums compose: packing each client alone and adding the vectors gives the same totals as packing them together,
so where a client is hosted never changes the result. Client-level DP is a wrapper around a rule
(``fedlm.federation.privacy.PrivateAggregation``), as in Flower's ``dp_fixed_clipping``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Contribution:
    """What one rank adds to the round for one client it hosts. Every rank of a client sends its step count and
    loss sum (the logged loss is then the mean over the client's ranks); only the client's lead rank sends
    ``summand`` (the rule's share of the sum) and ``weight``, or ``failed``."""

    client: int
    steps: int
    loss: float | None = None  # None: the loss may not travel (under DP it is not covered by the guarantee)
    summand: torch.Tensor | None = None
    weight: float = 0.0
    count: float = 0.0  # DP's noised clipped-count term (adaptive clipping), else 0
    failed: bool = False  # the client's loss or encoder went non-finite: it sends nothing of its encoder


@dataclass(frozen=True)
class Totals:
    """The round's sums over every rank, read back from the payload."""

    sum: torch.Tensor
    weight: float
    loss: torch.Tensor  # per client
    steps: torch.Tensor  # per client
    samples: torch.Tensor  # per client
    count: float
    failed: list[int]


def payload_layout(size: int, clients: int) -> dict[str, slice]:
    """Where each sum sits in the all-reduced vector: the clients' summands (``size`` values), the sum of weights,
    per-client loss sums, step and sample counts, DP's noised clipped-count, and per-client failure flags."""
    sizes = {
        "sum": size,
        "weight": 1,
        "loss": clients,
        "steps": clients,
        "samples": clients,
        "count": 1,
        "failed": clients,
    }
    layout, start = {}, 0
    for name, length in sizes.items():
        layout[name] = slice(start, start + length)
        start += length
    return layout


def pack(
    contributions: Iterable[Contribution],
    samples: dict[int, int],
    size: int,
    clients: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One rank's payload: its contributions summed in order (float64), and ``samples`` (its clients' training set
    sizes, sent by their lead ranks). On ``device``, the summands' (every rank passes the same: it is all-reduced)."""
    layout = payload_layout(size, clients)
    payload = torch.zeros(layout["failed"].stop, dtype=torch.float64, device=device)
    part = {name: payload[where] for name, where in layout.items()}
    for c in contributions:
        if c.failed:
            part["failed"][c.client] = 1
        elif c.summand is not None:
            part["sum"] += c.summand
            part["weight"] += c.weight
            part["count"] += c.count
        if c.loss is not None:
            part["loss"][c.client] = c.loss
        part["steps"][c.client] = c.steps
    for client, count in samples.items():
        part["samples"][client] = count
    return payload


def unpack(payload: torch.Tensor, size: int, clients: int) -> Totals:
    part = {name: payload[where] for name, where in payload_layout(size, clients).items()}
    return Totals(
        sum=part["sum"],
        weight=float(part["weight"]),
        loss=part["loss"],
        steps=part["steps"],
        samples=part["samples"],
        count=float(part["count"]),
        failed=part["failed"].nonzero().flatten().tolist(),
    )


WIRE_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def wire_parts(payload: torch.Tensor, width: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The payload as it travels, each part summed over the world on its own: the summands (the first ``width``
    values) in ``dtype``, the weights and counts in float64, which must stay exact; one part in float64."""
    if dtype == torch.float64:
        return [payload]
    return [payload[:width].to(dtype), payload[width:]]


def from_wire(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([part.double() for part in parts])


class Aggregation(Protocol):
    """A rule: what each client adds to the sum, and what the sums make of the global vector."""

    shares_client_figures: bool  # whether per-client losses and distances may travel

    def width(self, size: int) -> int:
        """The length of a summand, for a shared vector of ``size`` values (FedAvg: ``size``)."""
        ...

    def summand(
        self, client: int, vector: torch.Tensor, weight: float, global_shared: torch.Tensor, round_index: int
    ) -> tuple[torch.Tensor, float, float]:
        """(the client's share of the sum, its weight, its count term)."""
        ...

    def average(self, totals: Totals, global_shared: torch.Tensor) -> torch.Tensor:
        """The round's float64 average, which the server optimizer turns into the new global vector."""
        ...


class FedAvg:
    """FedAvg (McMahan et al. 2017): the weighted mean of the clients' vectors (weights: ``federation.weighting``)."""

    shares_client_figures = True

    def width(self, size: int) -> int:
        return size

    def summand(
        self, client: int, vector: torch.Tensor, weight: float, global_shared: torch.Tensor, round_index: int
    ) -> tuple[torch.Tensor, float, float]:
        return weight * vector.double(), weight, 0.0

    def average(self, totals: Totals, global_shared: torch.Tensor) -> torch.Tensor:
        return fedavg(totals)


def fedavg(totals: Totals) -> torch.Tensor:
    return totals.sum / totals.weight


def divergence(vectors: dict[int, torch.Tensor], global_shared: torch.Tensor, clients: int) -> torch.Tensor:
    """How far each client's vector ended from the new global one (0 for clients not in ``vectors``); all 0 after
    local training means the clients' gradients were synchronized."""
    distances = torch.zeros(clients, dtype=torch.float64, device=global_shared.device)
    for client, vector in vectors.items():
        distances[client] = (vector - global_shared).double().norm()
    return distances
