"""Where a client's state lives, by lifetime.

- ``HostedClient`` (the run): which batches of a round are the client's, and its weight in the average.
- ``ClientState`` (across rounds, in the hosting rank's checkpoint): its optimizer and scheduler state and its
  private virtual tokens. A rank that simulates several clients has one optimizer; each client's state is swapped
  in at its first batch and out at its last, so simulated clients never share Adam moments. The client's RNG
  needs no state: it is re-seeded from ``federation.seed``, the round and the client at each swap-in, so a
  resumed run draws the same dropout masks.
- ``RoundState`` (one round, made fresh at its start): who takes part, the clients' losses and vectors, failures
  and timings.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

from fedlm.errors import ConfigError


@dataclass(frozen=True)
class HostedClient:
    client: int
    first: int  # the client's first and last batch index within a round
    last: int
    examples: int  # training set size
    weight: float  # FedAvg weight


@dataclass
class ClientState:
    optimizer: dict[str, Any]  # {"optimizers": [state_dict...], "schedulers": [state_dict...]}
    private: torch.Tensor  # the client's private virtual tokens (empty without split prompts)


@dataclass
class RoundState:
    index: int
    sampled: list[int]
    started: float = field(default_factory=time.perf_counter)
    comm_seconds: float = 0.0
    losses: dict[int, list[float]] = field(default_factory=dict)  # per hosted client, one per local step
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)  # each sampled client's vector at its last batch
    failed: set[int] = field(default_factory=set)
    anchor: torch.Tensor | None = None  # the current client's parameters at its round start (FedProx)


def optimizer_state(trainer: L.Trainer) -> dict[str, Any]:
    return {
        "optimizers": [opt.state_dict() for opt in trainer.optimizers],
        "schedulers": [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs],
    }


def load_optimizer_state(trainer: L.Trainer, state: dict[str, Any]) -> None:
    for opt, saved in zip(trainer.optimizers, state["optimizers"]):
        opt.load_state_dict(copy.deepcopy(saved))
    for cfg, saved in zip(trainer.lr_scheduler_configs, state["schedulers"]):
        cfg.scheduler.load_state_dict(saved)


class ClientStates:
    """The ``ClientState`` of each client this rank hosts, and its checkpoint part."""

    def __init__(self) -> None:
        self.states: dict[int, ClientState] = {}
        self._restored: dict[str, dict[int, Any]] = {"private": {}, "client_states": {}}

    def start(self, clients: list[int], trainer: L.Trainer, initial_private: torch.Tensor, resumed: bool) -> None:
        """At the start of training: each client's restored state, or fresh (the trainer's optimizer as it is now,
        after Lightning restored it on resume, and the global model's private tokens)."""
        private, optimizers = self._restored["private"], self._restored["client_states"]
        missing = [client for client in clients if client not in private]
        if missing and resumed and initial_private.numel() > 0:
            raise ConfigError(
                f"the checkpoint holds no private tokens for client(s) {missing}: it was written by a process that "
                "did not host them. Resume with the same number of processes, from the checkpoint folder of each."
            )
        fresh = optimizer_state(trainer)
        for client in clients:
            self.states[client] = ClientState(
                optimizer=optimizers[client] if client in optimizers else copy.deepcopy(fresh),
                private=private[client] if client in private else initial_private.clone(),
            )

    def model(self, client: int, global_params: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """The global exchange vector with this client's private tokens in place."""
        vector = global_params.clone()
        vector[~shared] = self.states[client].private
        return vector

    def swap_in(self, client: int, trainer: L.Trainer, sampled: bool) -> None:
        """Load the client's optimizer state. A rank with one client keeps its state in place (nothing to swap),
        but an unsampled one keeps a copy to roll back to at ``swap_out``."""
        if len(self.states) > 1:
            load_optimizer_state(trainer, self.states[client].optimizer)
        elif not sampled:
            self.states[client].optimizer = copy.deepcopy(optimizer_state(trainer))

    def swap_out(self, client: int, trainer: L.Trainer, sampled: bool, private: torch.Tensor | None) -> None:
        """Keep what the client's steps changed; an unsampled client rolls back, as if it had not trained. A failed
        client (``private`` None) keeps nothing: the round stops."""
        if not sampled:
            if len(self.states) == 1:
                load_optimizer_state(trainer, self.states[client].optimizer)
            return
        if private is None:
            return
        self.states[client].private = private
        if len(self.states) > 1:
            self.states[client].optimizer = copy.deepcopy(optimizer_state(trainer))

    def state_dict(self) -> dict[str, Any]:
        """This process's clients only (their moments, for exact resume, and private tokens)."""
        return {
            "private": {client: state.private for client, state in self.states.items()},
            "client_states": {client: state.optimizer for client, state in self.states.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = {
            "private": dict(state.get("private", {})),
            "client_states": dict(state.get("client_states", {})),
        }
