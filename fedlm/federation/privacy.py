"""Client-level differential privacy for the round average (DP-FedAvg, McMahan et al. 2018), with adaptive
clipping (Andrew et al. 2021) and an RDP accountant from Google's ``dp-accounting`` library.

Each round, each sampled client's update ``delta_k = theta_k - global`` (of the shared part only) is clipped to
L2 norm ``clip_norm``; the round average is ``global + (sum_k clipped delta_k + noise) / m`` over the ``m``
sampled clients, with ``noise ~ N(0, (noise_multiplier * clip_norm)^2)``. The clients are a fixed-size draw (``m``
of ``N``, without replacement), so the accountant composes one sampled-without-replacement Gaussian per round
under the replace-one relation (``fedlm.accounting``): ``epsilon`` is what anyone who sees only the global models
can learn about one client, provided they do not know which clients were drawn (the draw is seeded by
``federation.seed``).

The noise is distributed: each client adds its share ``N(0, sigma^2 / m)`` to its own clipped update before the
all-reduce, so the sum carries the full noise. A peer sees more than the global models. Without secure
aggregation the all-reduce hands it, at worst, one client's update with only that client's share of the noise
(noise multiplier ``z / sqrt(m)``); with it, the sum, from which it can subtract its own share, leaving the other
clients' ``z * sqrt((m - 1) / m)``. A peer also knows who took part, so its figure, ``peer_epsilon``, composes
those Gaussians over every round without sampling amplification. The shares come from the operating system's
randomness unless ``noise_seed`` is set, which makes runs reproducible and is then no privacy at all: anyone with
the config can subtract the noise.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from fedlm.accounting import calibrate_noise, epsilon_after
from fedlm.errors import ConfigError
from fedlm.federation.aggregate import Aggregation, FedAvg, Totals
from fedlm.seeding import derive_seed


@dataclass
class DPConfig:
    """The ``federation.dp:`` section (absent or null: no differential privacy).

    Args:
        clip_norm: L2 bound on each client's round update; with ``adaptive_clipping`` its starting value.
        noise_multiplier: the Gaussian noise's std on the sum, in units of ``clip_norm``. Give this or
            ``target_epsilon``.
        target_epsilon: calibrate ``noise_multiplier`` so that the configured rounds spend exactly this epsilon.
        delta: the delta of the (epsilon, delta) guarantee; well below 1 / number of clients.
        epsilon_budget: refuse to start when the planned rounds would spend more (the message says which noise
            multiplier or round count fits); default ``target_epsilon``.
        stop_at_budget: instead of refusing, train the rounds that fit the budget and stop there.
        adaptive_clipping: move ``clip_norm`` each round towards the ``target_quantile`` of the clients' update
            norms, from a noised count of the clients under the bound (its privacy cost is folded into the
            update's noise, as in Andrew et al. 2021, so the accountant's figure holds).
        target_quantile, clip_lr: the quantile aimed at, and the geometric step: ``C *= exp(-clip_lr * (b - q))``.
        count_noise: std of the noise on the count of clients under the bound (Andrew et al.: clients / 20).
        noise_seed: seed the noise shares (reproducible, NOT private); null: a secret each rank draws once per run
            and keeps beside the logs (``dp-releases-*.json``, mode 0600), so that a round re-run after a restart
            releases the same bits (``fedlm.federation.releases``).
    """

    clip_norm: float = 0.1
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    epsilon_budget: float | None = None
    stop_at_budget: bool = False
    adaptive_clipping: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise: float | None = None
    noise_seed: int | None = None

    def validate(self) -> None:
        if self.clip_norm <= 0:
            raise ConfigError(f"federation.dp.clip_norm={self.clip_norm} must be positive (e.g. 0.1).")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError("give exactly one of federation.dp.noise_multiplier and federation.dp.target_epsilon.")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ConfigError(f"federation.dp.noise_multiplier={self.noise_multiplier} must be >= 0.")
        for name in ("target_epsilon", "epsilon_budget"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"federation.dp.{name}={value} must be positive.")
        if not 0 < self.delta < 1:
            raise ConfigError(f"federation.dp.delta={self.delta} must be in (0, 1), e.g. 1e-5.")
        if not 0 < self.target_quantile < 1 or self.clip_lr <= 0:
            raise ConfigError("federation.dp.target_quantile must be in (0, 1) and federation.dp.clip_lr positive.")

    @property
    def budget(self) -> float | None:
        return self.epsilon_budget if self.epsilon_budget is not None else self.target_epsilon


class ClientPrivacy:
    """Clips and noises client updates, tracks the clip norm and the privacy spent. Takes a validated config
    (``DPConfig.validate``; ``FederationConfig.validate`` calls it)."""

    def __init__(self, config: DPConfig, rounds: int, clients: int, sampled_per_round: int, secure: bool) -> None:
        self.config, self.rounds, self.clients = config, rounds, clients
        self.sampled_per_round = sampled_per_round
        if config.noise_multiplier is None:
            self.noise_multiplier = calibrate_noise(
                config.target_epsilon, rounds, sampled_per_round, clients, config.delta
            )
        else:
            self.noise_multiplier = config.noise_multiplier
        self.count_noise = config.count_noise if config.count_noise is not None else clients / 20
        self.update_noise = self._update_noise_multiplier()
        self.clip_norm = config.clip_norm
        self.rounds_spent = 0
        self.noise_secret: int | None = None  # without noise_seed: the run's secret (fedlm.federation.releases)
        m = sampled_per_round
        # The smallest part of the noise a peer cannot subtract (class docstring): all of it when it is the only client.
        self.peer_noise_fraction = 1.0 if m == 1 else math.sqrt((m - 1) / m) if secure else math.sqrt(1 / m)

    def _update_noise_multiplier(self) -> float:
        """Adaptive clipping spends part of the budget on the count: Andrew et al. (2021), Theorem 1, gives the
        update's own multiplier so that update and count together are a Gaussian mechanism of ``noise_multiplier``."""
        if not self.config.adaptive_clipping or self.noise_multiplier == 0:  # 0: no noise, no privacy, nothing to split
            return self.noise_multiplier
        rest = self.noise_multiplier**-2 - (2 * self.count_noise) ** -2
        if rest <= 0:
            raise ConfigError(
                f"federation.dp.adaptive_clipping: count noise {self.count_noise} is too small for noise multiplier "
                f"{self.noise_multiplier:.3f} (needs count_noise > noise_multiplier / 2); "
                "raise federation.dp.count_noise."
            )
        return rest**-0.5

    def epsilon_for(self, rounds: int) -> float:
        """Against a party that sees only the global models and not the draw of clients."""
        return epsilon_after(rounds, self.noise_multiplier, self.sampled_per_round, self.clients, self.config.delta)

    def peer_epsilon_for(self, rounds: int) -> float:
        """Against one honest-but-curious peer: the noise it cannot subtract, every round, no amplification."""
        return epsilon_after(rounds, self.noise_multiplier * self.peer_noise_fraction, 1, 1, self.config.delta)

    def epsilon(self) -> float:
        """What the rounds so far have spent."""
        return self.epsilon_for(self.rounds_spent)

    def peer_epsilon(self) -> float:
        return self.peer_epsilon_for(self.rounds_spent)

    def planned_rounds(self) -> int:
        """How many rounds to train: all of them, or (``stop_at_budget``) those that fit; refuses otherwise."""
        c, budget = self.config, self.config.budget
        planned = self.epsilon_for(self.rounds)
        if budget is None or planned <= budget * (1 + 1e-6):  # calibrated noise spends the budget up to rounding
            return self.rounds
        fitting = max((r for r in range(self.rounds + 1) if self.epsilon_for(r) <= budget), default=0)
        if c.stop_at_budget and fitting > 0:
            return fitting
        needed = calibrate_noise(budget, self.rounds, self.sampled_per_round, self.clients, c.delta)
        raise ConfigError(
            f"federation.dp: {self.rounds} rounds at noise multiplier {self.noise_multiplier:.3f} spend epsilon "
            f"{planned:.2f} at delta {c.delta:g}, over federation.dp.epsilon_budget={budget:g}. Raise "
            f"federation.dp.noise_multiplier to {needed:.3f} or more, lower federation.rounds to {fitting}, or set "
            "federation.dp.stop_at_budget: true to stop when the budget is spent."
        )

    def privatize(self, delta: torch.Tensor, client: int, round_index: int) -> tuple[torch.Tensor, float]:
        """A client's clipped update plus its share of the noise, and (adaptive clipping) its noised, centred
        clipped-count term: +1/2 under the bound, -1/2 over it."""
        norm = float(delta.norm())
        clipped = delta * min(1.0, self.clip_norm / norm) if norm > 0 else delta.clone()
        seed = self.config.noise_seed if self.config.noise_seed is not None else self.noise_secret
        generator = torch.Generator().manual_seed(
            secrets.randbits(63) if seed is None else derive_seed("dp-noise", seed, client, round_index)
        )
        share = self.update_noise * self.clip_norm / math.sqrt(self.sampled_per_round)
        # drawn on the CPU (the generator's device) and moved: the same noise whatever device the update is on
        noise = torch.randn(delta.shape, generator=generator, dtype=torch.float64).to(clipped.device)
        noised = clipped.double() + noise * share
        if not self.config.adaptive_clipping:
            return noised, 0.0  # the count is not needed, so it is not sent
        under = (1.0 if norm <= self.clip_norm else 0.0) - 0.5  # centred, so one client moves the count by 1/2
        count_share = self.count_noise / math.sqrt(self.sampled_per_round)
        return noised, under + float(torch.randn((), generator=generator, dtype=torch.float64)) * count_share

    def end_round(self, count_sum: float, sampled: int) -> None:
        """Spend one round; with adaptive clipping, move the bound towards the target quantile."""
        self.rounds_spent += 1
        if self.config.adaptive_clipping:
            below = count_sum / sampled + 0.5  # the noised fraction of clients whose update was within the bound
            self.clip_norm *= math.exp(-self.config.clip_lr * (below - self.config.target_quantile))

    def state_dict(self) -> dict[str, float | int]:
        return {
            "rounds_spent": self.rounds_spent,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
        }

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        if not math.isclose(state["noise_multiplier"], self.noise_multiplier, rel_tol=1e-9):
            raise ConfigError(
                f"the checkpoint was trained at noise multiplier {state['noise_multiplier']:.4f}, this config gives "
                f"{self.noise_multiplier:.4f}; resume with the checkpoint's federation.dp settings."
            )
        self.rounds_spent, self.clip_norm = int(state["rounds_spent"]), float(state["clip_norm"])


class PrivateAggregation:
    """Client-level DP as a wrapper around a rule (the rule averages updates instead of encoders): each client's
    update from the global vector is clipped and noised before it is packed and counts once (weight 1); the round's
    average is the global vector plus the rule's average of those updates, and spends one round of the budget.
    Per-client losses and distances stay home: the guarantee does not cover them."""

    shares_client_figures = False

    def __init__(self, privacy: ClientPrivacy, inner: Aggregation | None = None) -> None:
        self.privacy, self.inner = privacy, inner or FedAvg()

    def width(self, size: int) -> int:
        return self.inner.width(size)

    def summand(
        self, client: int, vector: torch.Tensor, weight: float, global_shared: torch.Tensor, round_index: int
    ) -> tuple[torch.Tensor, float, float]:
        update, count = self.privacy.privatize(vector - global_shared, client, round_index)
        summand, weight, _ = self.inner.summand(client, update, 1.0, global_shared, round_index)
        return summand, weight, count

    def average(self, totals: Totals, global_shared: torch.Tensor) -> torch.Tensor:
        self.privacy.end_round(totals.count, self.privacy.sampled_per_round)
        return global_shared.double() + self.inner.average(totals, global_shared)
