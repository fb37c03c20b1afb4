"""Server optimizers: how the global encoder moves given the clients' average (Reddi et al. 2021, "Adaptive
Federated Optimization").

The round's pseudo-gradient is ``delta = global - average``; FedAvg takes the average as the new global
(``global - 1 * delta``), the others feed ``delta`` to a momentum or adaptive update. Every rank computes the
update from the same all-reduced average, so the server state is identical everywhere without communication.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedlm.errors import ConfigError

ServerOptimizerName = Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")


@dataclass
class ServerConfig:
    """The ``federation.server:`` section.

    Args:
        optimizer: ``fedavg`` (the average becomes the global encoder), ``fedavgm`` (server momentum,
            Hsu et al. 2019), or the adaptive ``fedadam``, ``fedyogi``, ``fedadagrad``.
        lr: server learning rate (eta). Ignored by ``fedavg``; ``fedavgm`` with lr 1 and momentum 0 is FedAvg.
        momentum: ``fedavgm``'s momentum: ``m = momentum * m + delta``.
        beta1: first-moment decay of the adaptive optimizers (``fedadagrad`` included, as in the paper).
        beta2: second-moment decay of ``fedadam`` and ``fedyogi``.
        tau: adaptivity: the update is ``m / (sqrt(v) + tau)``; ``v`` starts at ``tau**2`` (the paper's v_-1).
    """

    optimizer: ServerOptimizerName = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def validate(self) -> None:
        if self.optimizer not in ("fedavg", "fedavgm", *ADAPTIVE):
            raise ConfigError(
                f"federation.server.optimizer={self.optimizer!r} is unknown; use fedavg, fedavgm, fedadam, fedyogi "
                "or fedadagrad."
            )
        if self.lr <= 0:
            raise ConfigError(f"federation.server.lr={self.lr} must be positive.")
        for name in ("momentum", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"federation.server.{name}={getattr(self, name)} must be in [0, 1).")
        if self.tau <= 0:
            raise ConfigError(
                f"federation.server.tau={self.tau} must be positive: it keeps m / (sqrt(v) + tau) finite."
            )


class ServerOptimizer:
    """Applies one server step per round; holds the moments (float64) that checkpoints save. Takes a validated
    config: ``FederationConfig.validate`` checks the whole section, once."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def step(self, global_params: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
        """The new global encoder from the old one and the clients' (float64) weighted average."""
        c = self.config
        if c.optimizer == "fedavg":
            return average.float()  # exactly what FedAvg always did: no arithmetic on the average
        x = global_params.double()
        delta = x - average.double()
        if self.m is None:
            self.m = torch.zeros_like(delta)
            self.v = torch.full_like(delta, c.tau**2)
        # restored from a checkpoint, which is loaded on the CPU (fedlm.checkpointing): to the encoder's device
        self.m, self.v = self.m.to(delta.device), self.v.to(delta.device)
        if c.optimizer == "fedavgm":
            self.m.mul_(c.momentum).add_(delta)
            return (x - c.lr * self.m).float()
        self.m.mul_(c.beta1).add_(delta, alpha=1 - c.beta1)
        square = delta.square()
        if c.optimizer == "fedadagrad":
            self.v.add_(square)
        elif c.optimizer == "fedadam":
            self.v.mul_(c.beta2).add_(square, alpha=1 - c.beta2)
        else:  # fedyogi: v moves towards delta**2 by at most (1 - beta2) * delta**2, never collapses
            self.v.sub_((1 - c.beta2) * square * torch.sign(self.v - square))
        return (x - c.lr * self.m / (self.v.sqrt() + c.tau)).float()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.config.optimizer, "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["optimizer"] != self.config.optimizer:
            raise ConfigError(
                f"the checkpoint's server state is {state['optimizer']!r} but federation.server.optimizer is "
                f"{self.config.optimizer!r}; resume with the checkpoint's optimizer, or start a new run."
            )
        self.m, self.v = state["m"], state["v"]
