"""Privacy accounting with Google's ``dp-accounting`` (its RDP accountant): the library's figures, not our math.

Both mechanisms fedlm offers are compositions of a subsampled Gaussian: client-level DP composes one per round
(sampling rate: the client fraction), DP-SGD one per step (sampling rate: batch size over the client's examples).
"""

from __future__ import annotations

import math

from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent, calibrate_dp_mechanism
from dp_accounting.rdp import RdpAccountant


def gaussian_event(noise_multiplier: float, sampling_rate: float) -> GaussianDpEvent | PoissonSampledDpEvent:
    event = GaussianDpEvent(noise_multiplier)
    return event if sampling_rate >= 1 else PoissonSampledDpEvent(sampling_rate, event)


def epsilon_after(steps: int, noise_multiplier: float, sampling_rate: float, delta: float) -> float:
    """Epsilon at ``delta`` after ``steps`` subsampled Gaussian mechanisms: the accountant's own figure."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    accountant = RdpAccountant()
    accountant.compose(SelfComposedDpEvent(gaussian_event(noise_multiplier, sampling_rate), steps))
    return float(accountant.get_epsilon(delta))


def calibrate_noise(epsilon: float, steps: int, sampling_rate: float, delta: float) -> float:
    """The smallest noise multiplier with which ``steps`` mechanisms spend ``epsilon`` (dp-accounting's search)."""
    return float(
        calibrate_dp_mechanism(
            RdpAccountant, lambda z: SelfComposedDpEvent(gaussian_event(z, sampling_rate), steps), epsilon, delta
        )
    )
