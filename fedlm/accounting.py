"""Privacy accounting with Google's ``dp-accounting`` (its RDP accountant): the library's figures, not our math.

fedlm draws fixed-size samples: a round's clients are a uniformly random subset of ``m`` of the ``N`` clients, a
DP-SGD step's batch a uniformly random subset of ``B`` of a client's ``n`` examples, drawn afresh every step.
dp-accounting models exactly that (sampling without replacement; Wang, Balle and Kasiviswanathan, AISTATS 2019)
under the *replace-one* relation: neighbouring datasets have the same size and differ in one element (a client,
or an example). That is the relation fixed-size draws call for, since the size is public; it is not the
add-or-remove relation of Poisson sampling, and its epsilons are larger (replacing is removing plus adding).
Replacing one element moves a sum of contributions clipped to ``C`` by up to ``2C``, so noise of std ``z * C``
is, to the library, a Gaussian mechanism of noise multiplier ``z / 2``.
"""

from __future__ import annotations

import math

from dp_accounting import (
    DpEvent,
    GaussianDpEvent,
    LowerEndpointAndGuess,
    NeighboringRelation,
    SampledWithoutReplacementDpEvent,
    SelfComposedDpEvent,
    calibrate_dp_mechanism,
)
from dp_accounting.rdp import RdpAccountant

RELATION = NeighboringRelation.REPLACE_ONE


def sampled_gaussian(noise_multiplier: float, sample_size: int, population: int) -> DpEvent:
    """One step: ``sample_size`` of ``population`` drawn without replacement, their clipped sum noised with std
    ``noise_multiplier * C`` (sensitivity ``2C`` under replace-one)."""
    if not 0 < sample_size <= population:
        raise ValueError(f"a sample of {sample_size} out of {population} is not a fixed-size draw.")
    event = GaussianDpEvent(noise_multiplier / 2)
    return event if sample_size == population else SampledWithoutReplacementDpEvent(population, sample_size, event)


def _accountant() -> RdpAccountant:
    return RdpAccountant(neighboring_relation=RELATION)


def epsilon_after(steps: int, noise_multiplier: float, sample_size: int, population: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``steps`` such steps: the accountant's own figure."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    accountant = _accountant()
    accountant.compose(SelfComposedDpEvent(sampled_gaussian(noise_multiplier, sample_size, population), steps))
    return float(accountant.get_epsilon(delta))


def calibrate_noise(epsilon: float, steps: int, sample_size: int, population: int, delta: float) -> float:
    """The smallest noise multiplier with which ``steps`` such steps spend ``epsilon`` (dp-accounting's search)."""
    return float(
        calibrate_dp_mechanism(
            _accountant,
            lambda z: SelfComposedDpEvent(sampled_gaussian(z, sample_size, population), steps),
            epsilon,
            delta,
            # from a multiplier that spends far more than any budget: at 0 the library's formulas divide by zero
            bracket_interval=LowerEndpointAndGuess(0.01, 1.0),
        )
    )
