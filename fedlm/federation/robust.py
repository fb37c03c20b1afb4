"""Robust aggregation: rules that one faulty or hostile client cannot drag far, and the attack they are measured by.

FedAvg moves as far as one client likes: a client that sends ``global + s * update`` shifts the mean by ``s / n``
of its update. The coordinate-wise median and trimmed mean (Yin et al. 2018) keep every coordinate of the average
within the range of the honest clients' values while fewer clients than they trim are hostile; a norm bound on
each client's update (Sun et al. 2019) caps how far any one client can pull the mean.

Order statistics need each client's vector, not their sum, so those rules' summand is a *stack*: the client's
vector in its own row (its position among the round's sampled clients), zeros elsewhere. The all-reduce's sum then
holds every row exactly (each row has one nonzero addend) and the rule reads the rows back. A norm bound is
applied by each client to its own update, so under it the round still travels as one sum, and secure aggregation
still works.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from fedlm.errors import ConfigError
from fedlm.federation.aggregate import Aggregation, FedAvg, Totals

RobustRule = Literal["mean", "median", "trimmed_mean"]


@dataclass
class RobustConfig:
    """The ``federation.robust:`` section.

    Args:
        rule: ``mean`` (FedAvg's weighted mean), ``median`` (per coordinate, over the round's sampled clients) or
            ``trimmed_mean`` (per coordinate, the mean after dropping the ``trim_fraction`` largest and smallest
            values). The order statistics count each client once (``federation.weighting: uniform``) and need
            the clients' vectors in the clear (no secure aggregation).
        trim_fraction: the fraction of the sampled clients dropped at each end by ``trimmed_mean``, rounded down;
            it tolerates that many hostile clients. Below 0.5.
        norm_bound: each client clips its update (its vector minus the round's global one) to this L2 norm before
            it is aggregated, by any rule; null: no bound.
    """

    rule: RobustRule = "mean"
    trim_fraction: float = 0.2
    norm_bound: float | None = None

    def validate(self) -> None:
        if self.rule not in ("mean", "median", "trimmed_mean"):
            raise ConfigError(
                f"federation.robust.rule={self.rule!r} is unknown; use 'mean', 'median' or 'trimmed_mean'."
            )
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"federation.robust.trim_fraction={self.trim_fraction} must be in [0, 0.5).")
        if self.norm_bound is not None and not (math.isfinite(self.norm_bound) and self.norm_bound > 0):
            raise ConfigError(f"federation.robust.norm_bound={self.norm_bound} must be positive (null: no bound).")

    @property
    def order_statistic(self) -> bool:
        """Whether the rule needs every client's vector, not only their sum."""
        return self.rule != "mean"


@dataclass
class PoisonConfig:
    """The ``federation.poison:`` section: a simulated attack, for measuring robust rules. Each listed client trains
    as usual, then sends ``global + scale * (its vector - global)``; the default sends its update sign-flipped and
    scaled 100 times.

    Args:
        clients: the hostile clients; empty: none.
        scale: what their update is multiplied by before it is sent.
    """

    clients: list[int] = field(default_factory=list)
    scale: float = -100.0

    def validate(self, clients: int) -> None:
        outside = [c for c in self.clients if not 0 <= c < clients]
        if outside:
            raise ConfigError(f"federation.poison.clients has {outside}, outside 0 .. {clients - 1}.")
        if not math.isfinite(self.scale):
            raise ConfigError(f"federation.poison.scale={self.scale} must be finite.")


def poisoned(vector: torch.Tensor, global_shared: torch.Tensor, scale: float) -> torch.Tensor:
    """What a hostile client sends: its update from the global vector, times ``scale``."""
    return global_shared + scale * (vector - global_shared)


class NormBounded:
    """A rule on norm-bounded updates: a client whose update is longer than ``bound`` scales it down to ``bound``
    before the inner rule sees it; shorter updates pass unchanged, bit for bit."""

    def __init__(self, inner: Aggregation, bound: float) -> None:
        self.inner, self.bound = inner, bound
        self.shares_client_figures = inner.shares_client_figures

    def width(self, size: int) -> int:
        return self.inner.width(size)

    def summand(
        self, client: int, vector: torch.Tensor, weight: float, global_shared: torch.Tensor, round_index: int
    ) -> tuple[torch.Tensor, float, float]:
        update = vector.double() - global_shared.double()
        norm = float(update.norm())
        if norm > self.bound:
            vector = global_shared.double() + update * (self.bound / norm)
        return self.inner.summand(client, vector, weight, global_shared, round_index)

    def average(self, totals: Totals, global_shared: torch.Tensor) -> torch.Tensor:
        return self.inner.average(totals, global_shared)


class TrimmedMean:
    """Per coordinate, the mean of the round's sampled clients' values after dropping the ``trim`` largest and the
    ``trim`` smallest; the median is the widest trim, ``(rows - 1) // 2``. Each client counts once."""

    shares_client_figures = True

    def __init__(self, rows: int, trim: int, sampled: Callable[[int], list[int]]) -> None:
        self.rows, self.trim, self.sampled = rows, trim, sampled  # RobustConfig's trim_fraction < 0.5 leaves a row

    def width(self, size: int) -> int:
        return self.rows * size

    def summand(
        self, client: int, vector: torch.Tensor, weight: float, global_shared: torch.Tensor, round_index: int
    ) -> tuple[torch.Tensor, float, float]:
        stack = torch.zeros(self.rows, vector.numel(), dtype=torch.float64, device=vector.device)
        stack[self.sampled(round_index).index(client)] = vector.double()
        return stack.flatten(), 1.0, 0.0

    def average(self, totals: Totals, global_shared: torch.Tensor) -> torch.Tensor:
        ordered = totals.sum.view(self.rows, -1).sort(dim=0).values
        return ordered[self.trim : self.rows - self.trim].mean(dim=0)


def robust_rule(config: RobustConfig, rows: int, sampled: Callable[[int], list[int]]) -> Aggregation:
    """The round's rule from ``federation.robust``: over ``rows`` sampled clients, ``sampled(round)`` of them."""
    if config.rule == "median":
        rule: Aggregation = TrimmedMean(rows, (rows - 1) // 2, sampled)
    elif config.rule == "trimmed_mean":
        rule = TrimmedMean(rows, math.floor(config.trim_fraction * rows), sampled)
    else:
        rule = FedAvg()
    return rule if config.norm_bound is None else NormBounded(rule, config.norm_bound)
