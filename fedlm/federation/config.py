"""The ``federation:`` section and who takes part in a round: typed, validated once (``FederationConfig.validate``,
which the ``FederatedLoop`` calls), and free of Lightning and torch.distributed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from fedlm.errors import ConfigError
from fedlm.federation.enrollment import EnrollmentConfig
from fedlm.federation.exchange import Averaged
from fedlm.federation.privacy import DPConfig
from fedlm.federation.robust import PoisonConfig, RobustConfig
from fedlm.federation.secure import SecureAggregationConfig
from fedlm.federation.server import ServerConfig
from fedlm.seeding import derive_seed


@dataclass
class FederationConfig:
    """The ``federation:`` section of a config.

    Args:
        clients: number of clients (sites).
        rounds: number of rounds; each round ends with one average of the clients' encoders.
        local_steps: optimizer steps per client per round. Give this or ``local_epochs``.
        local_epochs: passes over each client's data per round (may be fractional), converted to steps per client.
        weighting: FedAvg weights: ``samples`` (by client training set size) or ``uniform``.
        seed: seeds each client's RNG stream (dropout) and the client sampling, per round. The data partition
            has its own seed, ``data.partition_seed``, shared with local-only runs.
        server: how the global encoder moves given the clients' average (``ServerConfig``; default FedAvg).
        prox_mu: FedProx (Li et al. 2020): adds ``prox_mu / 2 * ||w - w_global||^2`` to each client's local
            objective, pulling clients towards the round's global encoder. 0: plain local steps.
        client_fraction: the fraction of clients that take part in each round, ``max(1, round(fraction * clients))``
            of them, drawn from ``seed`` and the round index.
        skip_unsampled: in a simulation from one dataset on fewer processes than clients, a round runs only its
            sampled clients, spread evenly over the processes, so it costs what they cost. false, or pinned
            clients (``data.client_files``, a process group per client): every client runs its steps and an
            unsampled one rolls back. Both give the same result (``fedlm.federation.plan``).
        client_state_budget_mb: how much memory each process may spend on its clients' optimizer states (Adam's
            moments, per client); past it the least recently used are kept on disk until their client runs again.
            null: no limit.
        average: what is averaged: the encoder's ``parameters``, or its output ``table`` (the virtual-token
            embeddings; see ``fedlm.federation.exchange``).
        payload: the precision the round's sum travels in. ``float64``: each client's weighted vector, summed
            exactly (the same bits on any layout of clients over processes). ``float32`` or ``bfloat16``: each
            client's weighted update from the global vector, so that small values keep their precision, summed
            in that precision: within ``2 * R * u * sum_i |w_i (v_i - g)| / sum_i w_i`` per value of the float64
            average over ``R`` processes (``u``: 2^-24 or 2^-8); the counts and weights stay float64.
        private_tokens: split prompts: the last this many virtual tokens are private to each client, trained
            locally and never sent; the global model keeps their initial values.
        personalize_steps: local fine-tuning: after the last round, each client trains its model (the global one,
            with its private tokens if any) this many more steps on its own data, with fresh AdamW moments at the
            constant ``model.optimizer.lr`` (no schedule). Needs ``data.client_holdout``, which the personalized and
            global models are evaluated on.
        dp: client-level differential privacy of the round average (``DPConfig``; null: none).
        secure_aggregation: send the round's sums as pairwise-masked fixed-point integers whose masks cancel in
            the all-reduce (``fedlm.federation.secure``), so that no rank's update travels in the clear.
        robust: how the round's vectors are combined (``RobustConfig``: the mean by default, or the coordinate-wise
            median or trimmed mean, and an optional bound on each client's update norm).
        poison: a simulated attack, for measuring robust rules (``PoisonConfig``; by default no client).
        shard_backbone: FSDP2-shard the frozen LM's decoder layers over each client's ranks (a process group per
            client, ``torchrun`` with a multiple of ``clients`` processes), so a client holds one copy of the LM
            spread over its devices while its encoder still trains data-parallel (``fedlm.federation.sharding``).
        collective_timeout_s: under torchrun, how long a collective waits for a silent peer before failing (a dead
            peer fails it at once); the error, not a hang, lets torchrun restart the group.
        enrollment: only the sites of a roster take part: each rank proves with its site's key, before any data
            moves, that it is an enrolled site hosting the clients it trains (``EnrollmentConfig``; null: any
            process that joins the launch takes part).
    """

    clients: int
    rounds: int
    local_steps: int | None = None
    local_epochs: float | None = None
    weighting: Literal["samples", "uniform"] = "samples"
    seed: int = 1234
    server: ServerConfig = field(default_factory=ServerConfig)
    prox_mu: float = 0.0
    client_fraction: float = 1.0
    skip_unsampled: bool = True
    client_state_budget_mb: float | None = None
    average: Averaged = "parameters"
    payload: Literal["float64", "float32", "bfloat16"] = "float64"
    private_tokens: int = 0
    personalize_steps: int = 0
    dp: DPConfig | None = None
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    poison: PoisonConfig = field(default_factory=PoisonConfig)
    shard_backbone: bool = False
    collective_timeout_s: float = 600.0
    enrollment: EnrollmentConfig | None = None

    def validate(self) -> None:
        if self.clients < 1:
            raise ConfigError(f"federation.clients={self.clients} must be at least 1.")
        if self.rounds < 1:
            raise ConfigError(f"federation.rounds={self.rounds} must be at least 1.")
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ConfigError("give exactly one of federation.local_steps and federation.local_epochs.")
        if (self.local_steps is not None and self.local_steps < 1) or (
            self.local_epochs is not None and self.local_epochs <= 0
        ):
            raise ConfigError("federation.local_steps / federation.local_epochs must be positive.")
        if self.weighting not in ("samples", "uniform"):
            raise ConfigError(f"federation.weighting={self.weighting!r} is unknown; use 'samples' or 'uniform'.")
        if self.prox_mu < 0:
            raise ConfigError(f"federation.prox_mu={self.prox_mu} must be >= 0 (0 turns FedProx off).")
        if self.collective_timeout_s <= 0:
            raise ConfigError(
                f"federation.collective_timeout_s={self.collective_timeout_s} must be positive (seconds)."
            )
        if not 0 < self.client_fraction <= 1:
            raise ConfigError(f"federation.client_fraction={self.client_fraction} must be in (0, 1].")
        if self.client_state_budget_mb is not None and self.client_state_budget_mb < 0:
            raise ConfigError(
                f"federation.client_state_budget_mb={self.client_state_budget_mb} must be >= 0 (null: no limit)."
            )
        if self.average not in ("parameters", "table"):
            raise ConfigError(f"federation.average={self.average!r} is unknown; use 'parameters' or 'table'.")
        if self.private_tokens < 0 or self.personalize_steps < 0:
            raise ConfigError("federation.private_tokens and federation.personalize_steps must be >= 0 (0: off).")
        if self.shard_backbone and self.personalize_steps > 0:
            raise ConfigError(
                "federation.personalize_steps evaluates each client on its lead rank alone, but "
                "federation.shard_backbone spreads the LM over all of the client's ranks; set one of them off."
            )
        self.server.validate()
        self.secure_aggregation.validate()
        self.robust.validate()
        self.poison.validate(self.clients)
        self._validate_robust()
        self._validate_payload()
        if self.enrollment is not None:
            self.enrollment.validate()
        if self.dp is not None:
            self.dp.validate()
            if self.weighting != "uniform":
                raise ConfigError(
                    "federation.dp bounds what one client adds to the round's sum, so every client must count once: "
                    "set federation.weighting: uniform."
                )

    def _validate_payload(self) -> None:
        if self.payload != "float64" and self.secure_aggregation.enabled:
            raise ConfigError(
                f"federation.payload={self.payload!r}: secure aggregation masks the sum as 64-bit fixed-point "
                "integers, so a narrower payload would save nothing; set federation.payload: float64."
            )

    def _validate_robust(self) -> None:
        """The combinations a robust rule cannot serve, refused rather than quietly changed."""
        rule = self.robust.rule
        if self.robust.order_statistic and self.secure_aggregation.enabled:
            raise ConfigError(
                f"federation.robust.rule={rule!r} needs each client's vector in the clear, and secure aggregation "
                "sends only their masked sum. Use robust.rule: mean with robust.norm_bound (each client bounds its "
                "own update before masking), or turn secure_aggregation off."
            )
        if self.robust.order_statistic and self.weighting != "uniform":
            raise ConfigError(
                f"federation.robust.rule={rule!r} counts every client once, so the weights of "
                f"federation.weighting={self.weighting!r} would be ignored: set federation.weighting: uniform."
            )
        if self.dp is not None and (self.robust.order_statistic or self.robust.norm_bound is not None):
            raise ConfigError(
                "federation.dp already bounds each client's update at dp.clip_norm, and its guarantee is for the "
                "noised mean: set federation.robust.rule: mean and federation.robust.norm_bound: null."
            )

    @property
    def sampled_per_round(self) -> int:
        return clients_per_round(self.clients, self.client_fraction)


def clients_per_round(clients: int, fraction: float) -> int:
    return max(1, round(fraction * clients))


def sample_clients(clients: int, fraction: float, seed: int, round_index: int) -> list[int]:
    """The clients that take part in a round: the same on every rank, from the seed and round alone."""
    count = clients_per_round(clients, fraction)
    if count == clients:
        return list(range(clients))
    generator = torch.Generator().manual_seed(derive_seed("client-sampling", seed, round_index))
    return sorted(torch.randperm(clients, generator=generator)[:count].tolist())
