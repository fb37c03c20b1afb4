"""Intervals over seeds and a paired bootstrap over test examples: what a table of a few seeds can honestly say."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

# Two-sided 95 % quantiles of Student's t, t_{0.975, df}, for df = 1..30 (beyond: the normal 1.96 is within 4 %).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.3f}"
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def mean_interval(values: list[float], bounds: tuple[float, float] | None = None) -> Interval:
    """Mean and 95 % t-interval over seeds (one value: no interval, low = high = the value).

    ``bounds`` clips the interval to the quantity's range: with 3 seeds the t-interval of an accuracy can
    reach past 1, which no accuracy can.
    """
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, mean, mean, n)
    half = (T_975[n - 2] if n - 1 <= len(T_975) else 1.96) * statistics.stdev(values) / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(mean, low, high, n)


@dataclass(frozen=True)
class BootstrapResult:
    difference: float  # accuracy of a minus accuracy of b, averaged over seeds
    low: float
    high: float
    p_value: float  # two-sided: how often the resampled difference falls on the other side of zero, doubled
    resamples: int


def paired_bootstrap(a_correct: list[list[bool]], b_correct: list[list[bool]], resamples: int = 10_000, seed: int = 0) -> BootstrapResult:
    """Paired bootstrap of the accuracy difference a - b over test examples.

    ``a_correct[s][i]`` says whether system a got test example i right in seed s (b likewise, same seeds and
    examples). Each resample draws the test examples with replacement, the same draw for a, b and every seed,
    so the interval reflects how much the difference depends on which sentences happen to be in the test set.
    """
    a, b = torch.tensor(a_correct, dtype=torch.float64), torch.tensor(b_correct, dtype=torch.float64)
    if a.shape != b.shape or a.dim() != 2 or a.shape[1] == 0:
        raise ValueError(f"a and b must be (seeds, examples) of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    per_example = (a - b).mean(dim=0)  # the difference on each example, averaged over seeds
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, per_example.numel(), (resamples, per_example.numel()), generator=generator)
    differences = per_example[draws].mean(dim=1)
    low, high = torch.quantile(differences, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    below, above = (differences <= 0).double().mean().item(), (differences >= 0).double().mean().item()
    return BootstrapResult(per_example.mean().item(), low, high, min(1.0, 2 * min(below, above)), resamples)
