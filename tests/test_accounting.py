"""Epsilon for the sampling fedlm does: fixed-size draws without replacement, replace-one neighbours.

The library's figure for the event fedlm describes, an independent closed form for the unsampled case (so the
``2C`` sensitivity is checked, not assumed), the batches DP-SGD really draws, and what a peer can learn.
"""

import math
from collections import Counter

import pytest
from dp_accounting import GaussianDpEvent, NeighboringRelation, SampledWithoutReplacementDpEvent, SelfComposedDpEvent
from dp_accounting.rdp import RdpAccountant

from fedlm.accounting import calibrate_noise, epsilon_after
from fedlm.data.sampler import ClientBlock, RoundBatchSampler
from fedlm.federation import FederationConfig
from fedlm.federation.privacy import ClientPrivacy, DPConfig


def library_epsilon(
    event: GaussianDpEvent | SampledWithoutReplacementDpEvent, steps: int, delta: float = 1e-5
) -> float:
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    accountant.compose(SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The tight epsilon of a mu-GDP mechanism (Dong, Roth and Su 2019, Corollary 2.13), by bisection."""

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_of(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    low, high = 0.0, 500.0
    for _ in range(200):
        low, high = (low, (low + high) / 2) if delta_of((low + high) / 2) < delta else ((low + high) / 2, high)
    return high


def client_privacy(clients: int, fraction: float, secure: bool = False, **dp: float) -> ClientPrivacy:
    config = FederationConfig(clients=clients, rounds=19, client_fraction=fraction)
    dp_config = DPConfig(**{"noise_multiplier": 1.0, **dp})
    return ClientPrivacy(dp_config, config.rounds, clients, config.sampled_per_round, secure)


def test_client_level_epsilon_is_the_librarys_figure_for_a_fixed_size_draw() -> None:
    sampled = client_privacy(10, 0.3)  # 3 of 10 clients per round
    expected = library_epsilon(SampledWithoutReplacementDpEvent(10, 3, GaussianDpEvent(1.0 / 2)), 19)
    assert sampled.epsilon_for(19) == expected
    everyone = client_privacy(3, 1.0)
    assert everyone.epsilon_for(19) == library_epsilon(GaussianDpEvent(1.0 / 2), 19)
    assert sampled.epsilon_for(19) < everyone.epsilon_for(19)  # drawing 3 of 10 amplifies


def test_unsampled_epsilon_bounds_the_exact_one_for_sensitivity_2c() -> None:
    """19 rounds of std z*C noise on a sum whose replace-one sensitivity is 2C: mu = 2 sqrt(19) / z."""
    for z in (1.0, 2.78, 5.0):
        exact = exact_gaussian_epsilon(2 * math.sqrt(19) / z, 1e-5)
        assert exact <= epsilon_after(19, z, 3, 3, 1e-5) <= 1.3 * exact  # RDP is a little looser, never tighter
        assert epsilon_after(19, z, 3, 3, 1e-5) > 1.5 * exact_gaussian_epsilon(math.sqrt(19) / z, 1e-5)  # not C


def test_calibrated_noise_spends_the_target_and_a_budget_overrun_names_the_fix() -> None:
    for target in (1.0, 8.0):  # unsampled: the sampled search costs ~20 s, and takes the same path
        z = calibrate_noise(target, 19, 3, 3, 1e-5)
        assert epsilon_after(19, z, 3, 3, 1e-5) == pytest.approx(target, rel=1e-3)
    over = client_privacy(3, 1.0, noise_multiplier=3.0, epsilon_budget=8.0)
    with pytest.raises(
        ValueError, match=r"spend epsilon 17\.09 at delta 1e-05, over federation.dp.epsilon_budget=8"
    ) as err:
        over.planned_rounds()
    needed = float(str(err.value).split("noise_multiplier to ")[1].split(" ")[0])
    assert epsilon_after(19, needed, 3, 3, 1e-5) == pytest.approx(8.0, rel=1e-3)
    fitting = client_privacy(3, 1.0, noise_multiplier=3.0, epsilon_budget=8.0, stop_at_budget=True).planned_rounds()
    assert 0 < fitting < 19 and over.epsilon_for(fitting) <= 8.0 < over.epsilon_for(fitting + 1)


def test_a_peer_sees_only_the_noise_it_cannot_subtract_and_no_amplification() -> None:
    plain, secure = client_privacy(10, 0.3), client_privacy(10, 0.3, secure=True)
    # plain: one client's update with its own share, z / sqrt(3); secure: the others' shares, z * sqrt(2 / 3)
    assert plain.peer_epsilon_for(19) == pytest.approx(
        library_epsilon(GaussianDpEvent(math.sqrt(1 / 3) / 2), 19), rel=1e-12
    )
    assert secure.peer_epsilon_for(19) == pytest.approx(
        library_epsilon(GaussianDpEvent(math.sqrt(2 / 3) / 2), 19), rel=1e-12
    )
    assert plain.epsilon_for(19) < secure.peer_epsilon_for(19) < plain.peer_epsilon_for(19)
    two_plain, two_secure = client_privacy(2, 1.0), client_privacy(2, 1.0, secure=True)
    assert two_plain.peer_epsilon_for(19) == two_secure.peer_epsilon_for(19)  # the sum minus mine is yours
    alone = client_privacy(4, 0.25)  # one client per round: no peer shares its round
    assert alone.peer_epsilon_for(19) == library_epsilon(GaussianDpEvent(0.5), 19)


def test_dp_sgd_batches_are_fresh_uniform_draws_of_fixed_size() -> None:
    block = ClientBlock(0, tuple(range(100, 130)), steps=400)  # 30 examples, batch 6 over 2 ranks of 3
    ranks = [
        RoundBatchSampler([block], 3, seed=7, rank_in_client=r, ranks_per_client=2, draw="independent")
        for r in range(2)
    ]
    batches = [list(sampler) for sampler in ranks]
    global_batches = [a + b for a, b in zip(*batches)]
    assert all(len(set(batch)) == 6 and set(batch) <= set(block.indices) for batch in global_batches)
    counts = Counter(i for batch in global_batches for i in batch)
    # each example in 6/30 of 400 steps: 80, binomial std 8
    assert set(counts) == set(block.indices) and all(50 < n < 110 for n in counts.values())
    # not passes: within the first 5 steps (one pass's worth) some example is drawn twice
    assert len({i for batch in global_batches[:5] for i in batch}) < 30
    again = list(RoundBatchSampler([block], 3, seed=7, rank_in_client=0, ranks_per_client=2, draw="independent"))
    assert again == batches[0]  # seeded
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != batches[0]  # a new round, new draws
    with pytest.raises(ValueError, match="fewer examples than one batch of 40"):
        RoundBatchSampler([block], 20, seed=7, ranks_per_client=2, draw="independent")
    with pytest.raises(ValueError, match="data.bucket_batches: 1 with model.dp_sgd"):
        RoundBatchSampler([block], 3, seed=7, lengths=[1] * 130, bucket_batches=4, draw="independent")
