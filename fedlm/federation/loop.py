"""FederatedLoop: federated p-tuning rounds on top of Lightning's fit loop.

One Lightning epoch is one round. Within it every rank runs, for each client it hosts, that client's local
steps (the ``RoundBatchSampler`` lays the batches out client after client). At a client's first batch the
encoder is reset to the global one and the client's own optimizer state and RNG stream are swapped in; at its
last batch the client's encoder is set aside. After the rank's last client, one all-reduce over the world sums
the weighted encoders of all clients (FedAvg) and the encoder becomes the new global one, before Lightning's
end-of-epoch validation and checkpointing see it. The frozen LM never travels.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from fedlm.federation.topology import Topology
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
        seed: seeds each client's RNG stream (dropout) per round. The data partition has its own seed,
            ``data.partition_seed``, shared with local-only runs.
    """

    clients: int
    rounds: int
    local_steps: int | None = None
    local_epochs: float | None = None
    weighting: Literal["samples", "uniform"] = "samples"
    seed: int = 1234

    def validate(self) -> None:
        if self.clients < 1:
            raise ValueError(f"federation.clients={self.clients} must be at least 1.")
        if self.rounds < 1:
            raise ValueError(f"federation.rounds={self.rounds} must be at least 1.")
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("give exactly one of federation.local_steps and federation.local_epochs.")
        if (self.local_steps is not None and self.local_steps < 1) or (self.local_epochs is not None and self.local_epochs <= 0):
            raise ValueError("federation.local_steps / federation.local_epochs must be positive.")
        if self.weighting not in ("samples", "uniform"):
            raise ValueError(f"federation.weighting={self.weighting!r} is unknown; use 'samples' or 'uniform'.")


class CollapsedClientsError(RuntimeError):
    """Clients ended a round with identical encoders: gradients were synchronized across clients."""


class FederatedLoop(L.Callback):
    def __init__(self, config: FederationConfig) -> None:
        config.validate()
        self.config = config
        self.topology: Topology | None = None
        self.client_group: dist.ProcessGroup | None = None
        self.blocks: list[tuple[int, int, int]] = []  # (client, first batch, last batch) within a round
        self.weights: dict[int, float] = {}
        self.sizes: dict[int, int] = {}
        self.global_params: torch.Tensor | None = None
        self.client_params: dict[int, torch.Tensor] = {}  # each hosted client's encoder at the end of its block
        self.client_states: dict[int, dict[str, Any]] = {}  # optimizer and scheduler state per hosted client
        self.client_loss: dict[int, list[float]] = {}
        self.completed_rounds = 0

    # -- setup ---------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        self.topology = Topology(self.config.clients, world, rank)
        datamodule = trainer.datamodule
        if stage != "fit":
            datamodule.eval_shard = (rank, world) if world > 1 else None
            return
        groups = self.topology.client_groups() if distributed else {}
        self.client_group = groups.get(self.topology.hosted_clients[0])
        if trainer.limit_train_batches not in (1.0, None):
            raise ValueError("trainer.limit_train_batches cannot be used with federation; set federation.local_steps.")
        trainer.fit_loop.max_epochs = self.config.rounds
        blocks = datamodule.federate(self.topology, self.config.local_steps, self.config.local_epochs)
        first = 0
        self.blocks = []
        for block in blocks:
            self.blocks.append((block.client, first, first + block.steps - 1))
            first += block.steps
            self.sizes[block.client] = len(block.indices)
            self.weights[block.client] = float(len(block.indices)) if self.config.weighting == "samples" else 1.0
        described = ", ".join(f"client {b.client}: {len(b.indices)} examples, {b.steps} steps/round" for b in blocks)
        print(
            f"[fedlm] rank {rank}/{world}: {self.config.clients} clients, {self.topology.ranks_per_client} rank(s) per "
            f"client, hosting {described}",
            flush=True,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        encoder_params = list(pl_module.encoder.parameters())
        self.global_params = parameters_to_vector(encoder_params).detach().clone()
        fresh = self._optimizer_state(trainer)
        self.client_states = {client: copy.deepcopy(fresh) for client, _, _ in self.blocks}

    # -- within a round ------------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.round_start = time.perf_counter()
        self.comm_seconds = 0.0
        self.client_loss = {client: [] for client, _, _ in self.blocks}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        for client, first, _ in self.blocks:
            if batch_idx == first:
                self._begin_client(trainer, pl_module, client)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        """Data parallelism inside a client: average gradients over the client's ranks only."""
        if self.client_group is None:
            return
        grads = [p.grad for p in pl_module.encoder.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        start = time.perf_counter()
        dist.all_reduce(flat, group=self.client_group)
        self.comm_seconds += time.perf_counter() - start
        flat /= self.topology.ranks_per_client
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for client, _, last in self.blocks:
            if batch_idx <= last:
                self.client_loss[client].append(float(outputs["loss"]))
                if batch_idx == last:
                    self._end_client(trainer, pl_module, client)
                break
        if batch_idx == self.blocks[-1][2]:
            self._aggregate(trainer, pl_module)

    def _begin_client(self, trainer: L.Trainer, pl_module: L.LightningModule, client: int) -> None:
        vector_to_parameters(self.global_params.clone(), list(pl_module.encoder.parameters()))
        if len(self.blocks) > 1:  # a rank with one client keeps its optimizer state in place
            self._load_optimizer_state(trainer, self.client_states[client])
        round_index = trainer.current_epoch
        torch.manual_seed(derive_seed("client-rng", self.config.seed, round_index, client, self.topology.rank_in_client))

    def _end_client(self, trainer: L.Trainer, pl_module: L.LightningModule, client: int) -> None:
        self.client_params[client] = parameters_to_vector(pl_module.encoder.parameters()).detach().clone()
        if len(self.blocks) > 1:
            self.client_states[client] = copy.deepcopy(self._optimizer_state(trainer))

    # -- the round boundary: FedAvg of the encoder only ----------------------------------------------------

    def _aggregate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        topology, C = self.topology, self.config.clients
        size = self.global_params.numel()
        # [sum_k w_k * theta_k | sum_k w_k | per-client loss sums | per-client step counts | per-client samples]
        payload = torch.zeros(size + 1 + 3 * C, dtype=torch.float64)
        for client, params in self.client_params.items():
            if topology.is_client_lead:
                payload[:size] += self.weights[client] * params.double()
                payload[size] += self.weights[client]
                payload[size + 1 + 2 * C + client] = self.sizes[client]
            payload[size + 1 + client] = sum(self.client_loss[client])
            payload[size + 1 + C + client] = len(self.client_loss[client])
        payload = self._all_reduce(payload)
        self.global_params = (payload[:size] / payload[size]).float()
        vector_to_parameters(self.global_params.clone(), list(pl_module.encoder.parameters()))

        # How far each client moved from the new global encoder; exactly 0 for all would mean collapse.
        divergence = torch.zeros(C, dtype=torch.float64)
        for client, params in self.client_params.items():
            if topology.is_client_lead:
                divergence[client] = (params - self.global_params).double().norm()
        divergence = self._all_reduce(divergence)
        self.completed_rounds = trainer.current_epoch + 1
        losses = payload[size + 1 : size + 1 + C] / payload[size + 1 + C : size + 1 + 2 * C].clamp(min=1)
        bytes_per_client = size * self.global_params.element_size()
        summary = {
            "round": self.completed_rounds,
            "client_train_loss": losses.tolist(),
            "client_divergence": divergence.tolist(),
            "client_samples": payload[size + 1 + 2 * C :].tolist(),
            "bytes_exchanged": 2 * C * bytes_per_client,  # each client uploads and downloads its encoder once
            "compute_seconds": time.perf_counter() - self.round_start - self.comm_seconds,
            "comm_seconds": self.comm_seconds,
        }
        self._log(pl_module, summary)
        if C > 1 and float(divergence.max()) == 0.0 and payload[size + 1 + C : size + 1 + 2 * C].sum() > 0:
            raise CollapsedClientsError(
                "all clients ended the round with identical encoders: gradients were synchronized across clients "
                "(plain `strategy: ddp` all-reduces over the whole world). Use fedlm's ClientStrategy (the default "
                "when a federation section is given) so that each client trains on its own data."
            )

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.topology.world_size > 1:
            start = time.perf_counter()
            dist.all_reduce(tensor)
            self.comm_seconds += time.perf_counter() - start
        return tensor

    def _log(self, pl_module: L.LightningModule, summary: dict[str, Any]) -> None:
        metrics = {
            "round/bytes_exchanged": float(summary["bytes_exchanged"]),
            "round/compute_seconds": summary["compute_seconds"],
            "round/comm_seconds": summary["comm_seconds"],
        }
        for client in range(self.config.clients):
            metrics[f"client{client}/train_loss"] = summary["client_train_loss"][client]
            metrics[f"client{client}/divergence"] = summary["client_divergence"][client]
            metrics[f"client{client}/samples"] = summary["client_samples"][client]
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, batch_size=1)
        losses = " ".join(f"{loss:.3f}" for loss in summary["client_train_loss"])
        rank_zero_info(
            f"[fedlm] round {summary['round']}/{self.config.rounds}: client train loss {losses} | "
            f"compute {summary['compute_seconds']:.1f}s comm {summary['comm_seconds']:.3f}s | "
            f"{summary['bytes_exchanged'] / 1e6:.2f} MB exchanged"
        )

    # -- optimizer state per client, so that simulated clients do not share Adam moments -------------------

    @staticmethod
    def _optimizer_state(trainer: L.Trainer) -> dict[str, Any]:
        return {
            "optimizers": [opt.state_dict() for opt in trainer.optimizers],
            "schedulers": [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs],
        }

    @staticmethod
    def _load_optimizer_state(trainer: L.Trainer, state: dict[str, Any]) -> None:
        for opt, saved in zip(trainer.optimizers, state["optimizers"]):
            opt.load_state_dict(copy.deepcopy(saved))
        for cfg, saved in zip(trainer.lr_scheduler_configs, state["schedulers"]):
            cfg.scheduler.load_state_dict(saved)

    # -- checkpoints hold the round index and the global encoder --------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"completed_rounds": self.completed_rounds, "global_params": self.global_params}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.completed_rounds = state_dict["completed_rounds"]
        self.global_params = state_dict["global_params"]
