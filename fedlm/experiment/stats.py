"""Intervals over seeds, and a bootstrap over seeds and test sentences together: what a table of a few seeds can
honestly say."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

# Two-sided 95 % quantiles of Student's t, t_{0.975, df}, for df = 1..30 (beyond: the normal 1.96 is within 4 %).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042)  # fmt: skip


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
    difference: float  # the statistic of a minus that of b, averaged over seeds (b absent: a's own statistic)
    low: float
    high: float
    p_value: float  # two-sided: how often the resampled difference falls on the other side of zero, doubled
    resamples: int


Metric = Literal["accuracy", "macro_f1"]


def resampled_metric(preds: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, metric: Metric) -> torch.Tensor:
    """``metric`` of each seed's predictions (seeds, examples) under each resample's example counts (resamples,
    examples): (seeds, resamples). A count of k weighs an example as k copies of it."""
    n = labels.numel()
    if metric == "accuracy":
        return (preds == labels).double() @ weights.T / n
    classes = int(max(labels.max(), preds.max())) + 1
    f1 = torch.zeros(preds.shape[0], weights.shape[0], dtype=torch.float64)
    for c in range(classes):
        actual = weights @ (labels == c).double()  # (resamples,)
        predicted = (preds == c).double() @ weights.T  # (seeds, resamples)
        hits = ((preds == c) & (labels == c)).double() @ weights.T
        total = predicted + actual
        f1 += torch.where(total > 0, 2 * hits / total.clamp(min=1e-12), 0.0)
    return f1 / classes


def resample(
    statistic: Callable[[torch.Tensor], torch.Tensor], seeds: int, examples: int, resamples: int, seed: int
) -> BootstrapResult:
    """The bootstrap shared by every test metric: ``statistic(weights)`` gives each seed's metric (or difference of
    metrics) under each resample's example counts, (seeds, resamples); ``weights`` of ones (1, examples) give the
    point estimate. Each resample draws the examples, then the seeds, with replacement; the result is the mean over
    the drawn seeds."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, examples, (resamples, examples), generator=generator)
    weights = torch.zeros(resamples, examples, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones_like(draws, dtype=torch.float64)
    )
    seed_draws = torch.randint(0, seeds, (resamples, seeds), generator=generator)
    value = statistic(weights)
    point = statistic(torch.ones(1, examples, dtype=torch.float64))[:, 0]
    result = value.T.gather(1, seed_draws).mean(dim=1)  # (resamples,): mean over the drawn seeds
    low, high = torch.quantile(result, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    below, above = (result <= 0).double().mean().item(), (result >= 0).double().mean().item()
    return BootstrapResult(point.mean().item(), low, high, min(1.0, 2 * min(below, above)), resamples)


def hierarchical_bootstrap(
    a_preds: list[list[int]],
    labels: list[int],
    b_preds: list[list[int]] | None = None,
    metric: Metric = "accuracy",
    resamples: int = 10_000,
    seed: int = 0,
) -> BootstrapResult:
    """95 % interval of a test metric (or of a - b, paired by seed) over both sources of chance: the seeds and the
    test sentences.

    ``a_preds[s][i]`` is system a's predicted class for test example i in seed s (``b_preds`` likewise, same seeds
    and examples). Each resample draws the seeds with replacement and, independently, the test examples with
    replacement (one draw of examples for a, b and every seed, so that a and b stay paired); the statistic is the
    mean over the drawn seeds of each seed's metric on the drawn examples. With one seed this is the plain
    bootstrap over sentences. With few seeds it cannot see seed variance larger than the seeds it has: 3 seeds give
    a rough interval, which the report says.
    """
    a = torch.tensor(a_preds, dtype=torch.long)
    y = torch.tensor(labels, dtype=torch.long)
    b = torch.tensor(b_preds, dtype=torch.long) if b_preds is not None else None
    if a.dim() != 2 or a.shape[1] == 0 or a.shape[1] != y.numel() or (b is not None and b.shape != a.shape):
        shapes = f"{tuple(a.shape)}{'' if b is None else f' and {tuple(b.shape)}'} for {y.numel()} labels"
        raise ValueError(
            f"predictions must be (seeds, examples) of the same shape, with one label per example; got {shapes}"
        )

    def statistic(weights: torch.Tensor) -> torch.Tensor:
        value = resampled_metric(a, y, weights, metric)
        return value if b is None else value - resampled_metric(b, y, weights, metric)

    return resample(statistic, a.shape[0], y.numel(), resamples, seed)


def example_bootstrap(
    a_scores: list[list[float]],
    b_scores: list[list[float]] | None = None,
    resamples: int = 10_000,
    seed: int = 0,
) -> BootstrapResult:
    """``hierarchical_bootstrap`` of a metric that is the mean of a score per test example (a generated answer's
    exact match, token F1 or ROUGE-L against its references): ``a_scores[s][i]`` is system a's score on example i
    in seed s (``b_scores`` likewise, the same examples in the same order: the difference a - b is paired). The
    same draws as ``hierarchical_bootstrap``'s for the same ``seed``: accuracy is the mean of a 0/1 score."""
    a = torch.tensor(a_scores, dtype=torch.float64)
    b = torch.tensor(b_scores, dtype=torch.float64) if b_scores is not None else None
    if a.dim() != 2 or a.shape[1] == 0 or (b is not None and b.shape != a.shape):
        shapes = f"{tuple(a.shape)}{'' if b is None else f' and {tuple(b.shape)}'}"
        raise ValueError(f"scores must be (seeds, examples) of the same shape; got {shapes}")
    examples = a.shape[1]

    def statistic(weights: torch.Tensor) -> torch.Tensor:
        value = a @ weights.T / examples
        return value if b is None else value - b @ weights.T / examples

    return resample(statistic, a.shape[0], examples, resamples, seed)
