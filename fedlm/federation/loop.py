"""FederatedLoop: federated p-tuning rounds on top of Lightning's fit loop.

One Lightning epoch is one round. Within it every rank runs, for each client it hosts, that client's local
steps (the ``RoundBatchSampler`` lays the batches out client after client). At a client's first batch the
encoder is reset to the global one and the client's own optimizer state and RNG stream are swapped in; at its
last batch the client's encoder is set aside. After the rank's last client, one all-reduce over the world sums
the weighted encoders of the round's clients (FedAvg) and the server optimizer turns that average into the new
global encoder, before Lightning's end-of-epoch validation and checkpointing see it. The frozen LM never travels.

Client sampling (``client_fraction < 1``) leaves the batch layout alone: Lightning fixes an epoch's length and
its end-of-epoch validation at setup, and every rank must reach the round's all-reduce and validation together,
so a rank cannot simply run fewer batches in some rounds. An unsampled client therefore still runs its local
steps, but then rolls back: its encoder is left out of the average (whose weights are renormalized over the
sampled clients) and its optimizer and scheduler state are restored, so the result is as if it had not trained.
The price is the compute of the unsampled clients' steps; what sampling saves here is their communication.

What travels is an ``EncoderExchange`` vector (the encoder's parameters, or its virtual-token table) minus the
client's private virtual tokens, which each client keeps from round to round and never sends. With
``data.client_holdout``, the end of fit evaluates the global and personalized models per client (``personalize``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.utils import parameters_to_vector

from fedlm.federation.exchange import Averaged, EncoderExchange
from fedlm.federation.personalize import MODELS, personalize, write_personalization
from fedlm.federation.privacy import ClientPrivacy, DPConfig
from fedlm.federation.secure import SecureAggregationConfig, SecureAggregator
from fedlm.federation.server import ServerConfig, ServerOptimizer
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
        seed: seeds each client's RNG stream (dropout) and the client sampling, per round. The data partition
            has its own seed, ``data.partition_seed``, shared with local-only runs.
        server: how the global encoder moves given the clients' average (``ServerConfig``; default FedAvg).
        prox_mu: FedProx (Li et al. 2020): adds ``prox_mu / 2 * ||w - w_global||^2`` to each client's local
            objective, pulling clients towards the round's global encoder. 0: plain local steps.
        client_fraction: the fraction of clients that take part in each round, ``max(1, round(fraction * clients))``
            of them, drawn from ``seed`` and the round index.
        average: what is averaged: the encoder's ``parameters``, or its output ``table`` (the virtual-token
            embeddings; see ``fedlm.federation.exchange``).
        private_tokens: split prompts: the last this many virtual tokens are private to each client, trained
            locally and never sent; the global model keeps their initial values.
        personalize_steps: local fine-tuning: after the last round, each client trains its model (the global one,
            with its private tokens if any) this many more steps on its own data. Needs ``data.client_holdout``,
            which the personalized and global models are evaluated on.
        dp: client-level differential privacy of the round average (``DPConfig``; null: none).
        secure_aggregation: send the round's sums as pairwise-masked fixed-point integers whose masks cancel in
            the all-reduce (``fedlm.federation.secure``), so that no rank's update travels in the clear.
        collective_timeout_s: under torchrun, how long a collective waits for a silent peer before failing (a dead
            peer fails it at once); the error, not a hang, lets torchrun restart the group.
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
    average: Averaged = "parameters"
    private_tokens: int = 0
    personalize_steps: int = 0
    dp: DPConfig | None = None
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    collective_timeout_s: float = 600.0

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
        if self.prox_mu < 0:
            raise ValueError(f"federation.prox_mu={self.prox_mu} must be >= 0 (0 turns FedProx off).")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"federation.collective_timeout_s={self.collective_timeout_s} must be positive (seconds).")
        if not 0 < self.client_fraction <= 1:
            raise ValueError(f"federation.client_fraction={self.client_fraction} must be in (0, 1].")
        if self.average not in ("parameters", "table"):
            raise ValueError(f"federation.average={self.average!r} is unknown; use 'parameters' or 'table'.")
        if self.private_tokens < 0 or self.personalize_steps < 0:
            raise ValueError("federation.private_tokens and federation.personalize_steps must be >= 0 (0: off).")
        self.server.validate()
        self.secure_aggregation.validate()
        if self.dp is not None:
            self.dp.validate()
            if self.weighting != "uniform":
                raise ValueError(
                    "federation.dp bounds what one client adds to the round's sum, so every client must count once: "
                    "set federation.weighting: uniform."
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


def payload_layout(size: int, clients: int) -> dict[str, slice]:
    """The round's all-reduced vector: the weighted sum of the clients' shared vectors (under DP: of their clipped,
    noised updates), the sum of weights, per-client loss sums (not under DP: they are not covered), step and sample
    counts, DP's noised clipped-count, and per-client failure flags."""
    sizes = {"sum": size, "weight": 1, "loss": clients, "steps": clients, "samples": clients, "count": 1, "failed": clients}
    layout, start = {}, 0
    for name, length in sizes.items():
        layout[name] = slice(start, start + length)
        start += length
    return layout


def extremes_over_ranks(value: int) -> tuple[int, int]:
    """The smallest and largest ``value`` over the world's ranks, in one 16-byte all-reduce."""
    extremes = torch.tensor([value, -value], dtype=torch.int64)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    return -int(extremes[1]), int(extremes[0])


class CollapsedClientsError(RuntimeError):
    """Clients ended a round with identical encoders: gradients were synchronized across clients."""


class NonFiniteClientError(FloatingPointError):
    """A client's training produced nan or inf; the round is not averaged."""


class RanksDisagreeError(RuntimeError):
    """Ranks hold different global encoders (or resumed from different rounds)."""


class FederatedLoop(L.Callback):
    def __init__(self, config: FederationConfig) -> None:
        config.validate()
        self.config = config
        self.topology: Topology | None = None
        self.client_group: dist.ProcessGroup | None = None
        self.blocks: list[tuple[int, int, int]] = []  # (client, first batch, last batch) within a round
        self.weights: dict[int, float] = {}
        self.sizes: dict[int, int] = {}
        self.exchange: EncoderExchange | None = None
        self.global_params: torch.Tensor | None = None  # the global exchange vector, private part at its start
        self.client_params: dict[int, torch.Tensor] = {}  # each hosted client's exchange vector at its block's end
        self.private: dict[int, torch.Tensor] = {}  # each hosted client's private tokens, kept across rounds
        self.anchor: torch.Tensor | None = None  # the current client's parameters at its round start (FedProx)
        self.failed: set[int] = set()  # hosted clients whose loss or encoder went non-finite this round
        self.client_states: dict[int, dict[str, Any]] = {}  # optimizer and scheduler state per hosted client
        self.client_loss: dict[int, list[float]] = {}
        self.sampled: list[int] = list(range(config.clients))  # the clients taking part in the current round
        self.server = ServerOptimizer(config.server)
        self.secure: SecureAggregator | None = None
        dp = config.dp
        self.privacy = (
            ClientPrivacy(dp, config.rounds, config.clients, config.sampled_per_round, config.secure_aggregation.enabled)
            if dp
            else None
        )
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
        if self.config.secure_aggregation.enabled and self.secure is None:
            self.secure = SecureAggregator(self.config.secure_aggregation)
            self.secure.setup()  # a collective: key agreement, once per run
        if trainer.limit_train_batches not in (1.0, None):
            raise ValueError("trainer.limit_train_batches cannot be used with federation; set federation.local_steps.")
        if self.config.personalize_steps > 0 and not getattr(datamodule, "client_holdout", 0):
            raise ValueError(
                "federation.personalize_steps needs each client's own held-out data to evaluate on: set "
                "data.init_args.client_holdout (e.g. 0.2), or federation.personalize_steps: 0."
            )
        trainer.fit_loop.max_epochs = self.config.rounds
        if self.privacy is not None:  # refuse a run that would overspend, before any work
            fitting = self.privacy.planned_rounds()
            trainer.fit_loop.max_epochs = fitting
            p = self.privacy
            rank_zero_info(
                f"[fedlm dp] noise multiplier {p.noise_multiplier:.3f}, clip norm {p.clip_norm:g}"
                f"{' (adaptive)' if p.config.adaptive_clipping else ''}: {fitting} rounds spend epsilon "
                f"{p.epsilon_for(fitting):.2f} at delta {p.config.delta:g} (replace-one; {p.peer_epsilon_for(fitting):.2f} "
                "against a peer)"
                + (f"; stopping there, before the {self.config.rounds} configured" if fitting < self.config.rounds else "")
            )
        blocks = datamodule.federate(self.topology, self.config.local_steps, self.config.local_epochs)
        first = 0
        self.blocks = []
        for block in blocks:
            self.blocks.append((block.client, first, first + block.steps - 1))
            first += block.steps
            self.sizes[block.client] = len(block.indices)
            self.weights[block.client] = float(len(block.indices)) if self.config.weighting == "samples" else 1.0
        held = getattr(datamodule, "holdouts", {})
        described = ", ".join(
            f"client {b.client}: {len(b.indices)} examples"
            + (f" (+{len(held[b.client])} held out)" if held.get(b.client) else "")
            + f", {b.steps} steps/round"
            for b in blocks
        )
        print(
            f"[fedlm] rank {rank}/{world}: {self.config.clients} clients, {self.topology.ranks_per_client} rank(s) per "
            f"client, hosting {described}",
            flush=True,
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a checkpoint is restored and before any training (a rank whose rounds are all done skips training
        altogether): every rank must resume from the same round."""
        if self.topology.world_size > 1:
            low, high = extremes_over_ranks(self.completed_rounds)
            if low != high:
                raise RanksDisagreeError(
                    f"the ranks resumed from different rounds ({low} to {high} completed): a rank did not find its "
                    "part of the checkpoint. Give every rank the same --ckpt_path, with its <checkpoint>.rank<r> beside it."
                )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        c = self.config
        self.exchange = EncoderExchange(pl_module.encoder, c.average, c.private_tokens)
        self.global_params = self.exchange.read()  # on resume: the checkpoint's global model
        start = self.global_params[~self.exchange.shared]
        missing = [client for client, _, _ in self.blocks if client not in self.private]
        if missing and self.completed_rounds > 0 and c.private_tokens > 0:
            raise ValueError(
                f"the checkpoint holds no private tokens for client(s) {missing}: it was written by a process that "
                "did not host them. Resume with the same number of processes, from the checkpoint folder of each."
            )
        for client in missing:
            self.private[client] = start.clone()
        fresh = self._optimizer_state(trainer)  # on resume, Lightning has restored this rank's optimizer
        for client, _, _ in self.blocks:
            self.client_states.setdefault(client, copy.deepcopy(fresh))

    # -- within a round ------------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.round_start = time.perf_counter()
        self.comm_seconds = 0.0
        self.client_loss = {client: [] for client, _, _ in self.blocks}
        self.client_params = {}
        self.failed = set()
        c = self.config
        self.sampled = sample_clients(c.clients, c.client_fraction, c.seed, trainer.current_epoch)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        for client, first, _ in self.blocks:
            if batch_idx == first:
                self._begin_client(trainer, pl_module, client)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.client_group is not None:
            self._reduce_client_gradients(pl_module)
        if self.config.prox_mu > 0:
            self._add_proximal_gradient(pl_module)

    def _reduce_client_gradients(self, pl_module: L.LightningModule) -> None:
        """Data parallelism inside a client: average gradients over the client's ranks only."""
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

    def _add_proximal_gradient(self, pl_module: L.LightningModule) -> None:
        """FedProx: add ``prox_mu * (w - w_start)``, the gradient of ``prox_mu / 2 * ||w - w_start||^2``, where
        ``w_start`` is where the client began the round (the global encoder, with its own private tokens).

        Added to the gradients rather than to the loss, so the model's training step (and its logged loss) stay
        the same and ``prox_mu: 0`` leaves the run bit for bit FedAvg. It comes after the reduction over the
        client's ranks, which hold the same ``w``, and before Lightning's gradient clipping, as a loss term would.
        """
        params = list(pl_module.encoder.parameters())
        pull = (parameters_to_vector(params).detach() - self.anchor) * self.config.prox_mu
        for p, term in zip(params, pull.split([p.numel() for p in params])):
            term = term.view_as(p)
            if p.grad is None:
                p.grad = term.clone()
            else:
                p.grad.add_(term)

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
        self.exchange.write(self.client_model(client))
        self.anchor = self.exchange.parameters()
        if len(self.blocks) > 1:  # a rank with one client keeps its optimizer state in place...
            self._load_optimizer_state(trainer, self.client_states[client])
        elif client not in self.sampled:  # ...but keeps a copy to roll back to when it is not sampled
            self.client_states[client] = copy.deepcopy(self._optimizer_state(trainer))
        round_index = trainer.current_epoch
        torch.manual_seed(derive_seed("client-rng", self.config.seed, round_index, client, self.topology.rank_in_client))

    def _end_client(self, trainer: L.Trainer, pl_module: L.LightningModule, client: int) -> None:
        if client not in self.sampled:
            if len(self.blocks) == 1:
                self._load_optimizer_state(trainer, self.client_states[client])
            return
        self.client_params[client] = self.exchange.read()
        if not (torch.isfinite(self.client_params[client]).all() and all(map(math.isfinite, self.client_loss[client]))):
            self.failed.add(client)
            return
        self.private[client] = self.client_params[client][~self.exchange.shared]
        if len(self.blocks) > 1:
            self.client_states[client] = copy.deepcopy(self._optimizer_state(trainer))

    def client_model(self, client: int) -> torch.Tensor:
        """The global exchange vector with this client's private tokens in place."""
        vector = self.global_params.clone()
        vector[~self.exchange.shared] = self.private[client]
        return vector

    # -- the round boundary: FedAvg of the encoder's shared part only --------------------------------------

    def _aggregate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        topology, C, shared = self.topology, self.config.clients, self.exchange.shared
        size, dp, round_index = int(shared.sum()), self.privacy, trainer.current_epoch
        layout = payload_layout(size, C)
        payload = torch.zeros(layout["failed"].stop, dtype=torch.float64)
        part = {name: payload[where] for name, where in layout.items()}
        for client, params in self.client_params.items():
            if topology.is_client_lead:
                if client in self.failed:  # sends nothing of its encoder; every rank stops below
                    part["failed"][client] = 1
                elif dp is None:
                    part["sum"] += self.weights[client] * params[shared].double()
                    part["weight"] += self.weights[client]
                else:
                    update, count_term = dp.privatize(params[shared] - self.global_params[shared], client, round_index)
                    part["sum"] += update
                    part["weight"] += 1
                    part["count"] += count_term
            if dp is None:
                part["loss"][client] = sum(self.client_loss[client])
            part["steps"][client] = len(self.client_loss[client])
        if topology.is_client_lead:
            for client, size_k in self.sizes.items():
                part["samples"][client] = size_k
        payload = self._all_reduce(payload, round_index)
        part = {name: payload[where] for name, where in layout.items()}
        failed = part["failed"].nonzero().flatten().tolist()
        if failed:
            raise NonFiniteClientError(
                f"round {round_index + 1}: client(s) {failed} produced a non-finite training loss or encoder (nan/inf); "
                f"the round was not averaged, so the last good global encoder is round {round_index}'s, in the last "
                "round checkpoint. Lower model.lr, or set trainer.gradient_clip_val, and resume from it."
            )
        if dp is None:
            average = part["sum"] / part["weight"]
        else:
            average = self.global_params[shared].double() + part["sum"] / part["weight"]
            dp.end_round(float(part["count"]), len(self.sampled))
        self.global_params[shared] = self.server.step(self.global_params[shared], average)
        self.exchange.write(self.global_params)
        self._check_ranks_agree(round_index)

        # How far each client moved from the new global encoder; exactly 0 for all would mean collapse. Under DP
        # these norms stay home (each rank logs its own clients'), and the check, which would need them, is off.
        divergence = torch.full((C,), float("nan") if dp else 0.0, dtype=torch.float64)
        for client, params in self.client_params.items():
            if topology.is_client_lead:
                divergence[client] = (params[shared] - self.global_params[shared]).double().norm()
        if dp is None:
            divergence = self._all_reduce(divergence, round_index)
        self.completed_rounds = trainer.current_epoch + 1
        steps = part["steps"]
        losses = part["loss"] / steps.clamp(min=1)
        if dp is not None:  # only this rank's own clients' losses are known here
            losses.fill_(float("nan"))
            for client in self.client_params:
                losses[client] = sum(self.client_loss[client]) / max(1, len(self.client_loss[client]))
        skipped = [client for client in range(C) if client not in self.sampled]
        losses[skipped] = divergence[skipped] = float("nan")  # no update this round, nothing to report
        bytes_per_client = size * self.global_params.element_size()
        # each sampled client uploads and downloads its encoder once
        client_bytes = [2 * bytes_per_client if client in self.sampled else 0 for client in range(C)]
        summary = {
            "round": self.completed_rounds,
            "client_train_loss": losses.tolist(),
            "client_divergence": divergence.tolist(),
            "client_samples": part["samples"].tolist(),
            "client_bytes": client_bytes,
            "bytes_exchanged": sum(client_bytes),
            "compute_seconds": time.perf_counter() - self.round_start - self.comm_seconds,
            "comm_seconds": self.comm_seconds,
        }
        if dp is not None:
            summary["epsilon"], summary["peer_epsilon"], summary["clip_norm"] = dp.epsilon(), dp.peer_epsilon(), dp.clip_norm
        self._log(pl_module, summary)
        collapsed = dp is None and float(divergence[self.sampled].max()) == 0.0
        if len(self.sampled) > 1 and collapsed and steps.sum() > 0:
            raise CollapsedClientsError(
                "all clients ended the round with identical encoders: gradients were synchronized across clients "
                "(plain `strategy: ddp` all-reduces over the whole world). Use fedlm's ClientStrategy (the default "
                "when a federation section is given) so that each client trains on its own data."
            )

    def _check_ranks_agree(self, round_index: int) -> None:
        """A cheap guard: every rank must now hold bitwise the same global encoder (one 16-byte all-reduce)."""
        if self.topology.world_size == 1:
            return
        digest = hashlib.sha256(self.global_params.numpy().tobytes()).digest()
        low, high = extremes_over_ranks(int.from_bytes(digest[:7], "little"))  # 56 bits: fits int64
        if low != high:
            raise RanksDisagreeError(
                f"round {round_index + 1}: the ranks hold different global encoders after averaging (checksums "
                "differ). Some rank missed a round or resumed from another checkpoint; restart from the last round "
                "checkpoint with the same number of processes."
            )

    def _all_reduce(self, tensor: torch.Tensor, round_index: int) -> torch.Tensor:
        """The sum over the world: plain, or through secure aggregation (also in one process, for its rounding)."""
        start = time.perf_counter()
        if self.secure is not None:
            tensor = self.secure.sum(tensor, round_index)
        elif self.topology.world_size > 1:
            dist.all_reduce(tensor)
        self.comm_seconds += time.perf_counter() - start
        return tensor

    def _log(self, pl_module: L.LightningModule, summary: dict[str, Any]) -> None:
        metrics = {
            "round": float(summary["round"]),  # an x-axis for per-round charts (W&B: set it in the chart)
            "round/bytes_exchanged": float(summary["bytes_exchanged"]),
            "round/compute_seconds": summary["compute_seconds"],
            "round/comm_seconds": summary["comm_seconds"],
        }
        if "epsilon" in summary:
            metrics["dp/epsilon"], metrics["dp/clip_norm"] = summary["epsilon"], summary["clip_norm"]
            metrics["dp/epsilon_peer"] = summary["peer_epsilon"]
        for client in range(self.config.clients):
            metrics[f"client{client}/train_loss"] = summary["client_train_loss"][client]
            metrics[f"client{client}/divergence"] = summary["client_divergence"][client]
            metrics[f"client{client}/samples"] = summary["client_samples"][client]
            metrics[f"client{client}/bytes"] = float(summary["client_bytes"][client])
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, batch_size=1)
        losses = " ".join(f"{loss:.3f}" for loss in summary["client_train_loss"])
        rank_zero_info(
            f"[fedlm] round {summary['round']}/{self.config.rounds}: client train loss {losses} | "
            f"compute {summary['compute_seconds']:.1f}s comm {summary['comm_seconds']:.3f}s | "
            f"{summary['bytes_exchanged'] / 1e6:.2f} MB exchanged"
            + (
                f" | epsilon {summary['epsilon']:.2f} (peer {summary['peer_epsilon']:.2f}), clip {summary['clip_norm']:.3g}"
                if "epsilon" in summary
                else ""
            )
        )

    # -- after the last round: global and personalized models, per client ----------------------------------

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not getattr(trainer.datamodule, "client_holdout", 0) or self.completed_rounds < self.config.rounds:
            return
        results = personalize(self, trainer, pl_module)
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank asks
        if results is None:
            return
        table = write_personalization(results, folder)
        rank_zero_info(f"[fedlm] global vs personalized accuracy per client (held-out / shared test):\n{table}")
        metrics = {
            f"personal/client{row['client']}/{model}/{split}": row[model][split]
            for row in results
            for model in MODELS
            if model in row
            for split in ("holdout_acc", "test_acc")
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

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

    # -- checkpoints hold the round index, the global encoder and the server optimizer's state ---------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "completed_rounds": self.completed_rounds,
            "global_params": self.global_params,
            "server": self.server.state_dict(),
            "average": self.config.average,
            "private": dict(self.private),  # this process's clients only
            "dp": self.privacy.state_dict() if self.privacy else None,
            "client_states": self.client_states,  # this process's clients' optimizer moments, for exact resume
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        average = state_dict.get("average", "parameters")
        if average != self.config.average:
            raise ValueError(
                f"the checkpoint averaged the encoder's {average} but federation.average is "
                f"{self.config.average!r}; resume with the checkpoint's setting, or start a new run."
            )
        self.completed_rounds = state_dict["completed_rounds"]
        self.global_params = state_dict["global_params"]
        self.private = dict(state_dict.get("private", {}))
        self.client_states = dict(state_dict.get("client_states", {}))
        if (state_dict.get("dp") is None) != (self.privacy is None):
            raise ValueError(
                "the checkpoint and federation.dp disagree on differential privacy (one has it, the other not); "
                "resume with the checkpoint's federation.dp, or start a new run."
            )
        if self.privacy is not None:
            self.privacy.load_state_dict(state_dict["dp"])
        # checkpoints from before server optimizers were FedAvg, which has no state
        self.server.load_state_dict(state_dict.get("server", {"optimizer": "fedavg", "m": None, "v": None}))
