"""FederatedLoop: federated p-tuning rounds as Lightning hooks on top of its fit loop.

One Lightning epoch is one round. Within it every rank runs, for each client it hosts, that client's local steps
(the ``RoundBatchSampler`` lays the batches out client after client). At a client's first batch its state is
swapped in (``fedlm.federation.clients``); at its last, its vector is set aside. After the rank's last client, the
round is averaged (``fedlm.federation.aggregate``: pack, one all-reduce, unpack, average) and the server optimizer
makes the new global encoder. The frozen LM never travels.

Client sampling (``client_fraction < 1``) leaves the batch layout alone: Lightning fixes an epoch's length and its
end-of-epoch validation at setup, and every rank must reach the round's all-reduce and validation together, so a
rank cannot run fewer batches in some rounds. An unsampled client therefore still runs its local steps, then rolls
back: it sends nothing (the average's weights renormalize over the sampled clients) and its optimizer state is
restored. The price is the unsampled clients' compute; what sampling saves here is their communication.

What travels is an ``EncoderExchange`` vector (the encoder's parameters, or its virtual-token table) minus the
client's private virtual tokens. With ``data.client_holdout``, the end of fit evaluates the global and
personalized models per client (``personalize``).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.utils import parameters_to_vector

from fedlm.errors import ConfigError
from fedlm.federation import checks, telemetry
from fedlm.federation.aggregate import Aggregation, Contribution, divergence, pack, unpack
from fedlm.federation.clients import ClientStates, HostedClient, RoundState
from fedlm.federation.config import FederationConfig, sample_clients
from fedlm.federation.exchange import EncoderExchange
from fedlm.federation.personalize import MODELS, personalize, write_personalization
from fedlm.federation.privacy import ClientPrivacy, PrivateAggregation
from fedlm.federation.robust import poisoned, robust_rule
from fedlm.federation.secure import SecureAggregator
from fedlm.federation.server import ServerOptimizer
from fedlm.federation.topology import Topology
from fedlm.seeding import derive_seed


class FederatedLoop(L.Callback):
    """Built once per run from the validated config and the launch's topology (``rounds_to_train`` is what the
    trainer's ``max_epochs`` must be)."""

    def __init__(self, config: FederationConfig, topology: Topology) -> None:
        config.validate()
        self.config, self.topology = config, topology
        self.server = ServerOptimizer(config.server)
        self.privacy = (
            ClientPrivacy(
                config.dp, config.rounds, config.clients, config.sampled_per_round, config.secure_aggregation.enabled
            )
            if config.dp
            else None
        )
        rule = robust_rule(
            config.robust,
            config.sampled_per_round,
            functools.partial(sample_clients, config.clients, config.client_fraction, config.seed),
        )
        self.rule: Aggregation = PrivateAggregation(self.privacy, rule) if self.privacy else rule
        self.rounds_to_train = (
            self.privacy.planned_rounds() if self.privacy else config.rounds
        )  # DP: refuses overspending
        self.secure: SecureAggregator | None = None
        self.client_group: dist.ProcessGroup | None = None
        self.hosted: list[HostedClient] = []
        self.exchange: EncoderExchange | None = None
        # what lasts across rounds (and goes into checkpoints)
        self.global_params: torch.Tensor | None = None  # the global exchange vector
        self.clients = ClientStates()
        self.completed_rounds = 0
        self.round: RoundState | None = None

    # -- setup ---------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        topology, datamodule = self.topology, trainer.datamodule
        topology.check_process_group()
        if stage != "fit":
            datamodule.eval_shard = (topology.rank, topology.world_size) if topology.world_size > 1 else None
            return
        if trainer.limit_train_batches not in (1.0, None):
            raise ConfigError("trainer.limit_train_batches cannot be used with federation; set federation.local_steps.")
        if self.config.personalize_steps > 0 and not getattr(datamodule, "client_holdout", 0):
            raise ConfigError(
                "federation.personalize_steps needs each client's own held-out data to evaluate on: set "
                "data.init_args.client_holdout (e.g. 0.2), or federation.personalize_steps: 0."
            )
        self.client_group = topology.client_groups().get(topology.hosted_clients[0])
        if self.config.secure_aggregation.enabled and self.secure is None:
            self.secure = SecureAggregator(self.config.secure_aggregation)
            self.secure.setup()  # a collective: key agreement, once per run
        if self.privacy is not None:
            self._describe_privacy()
        blocks = datamodule.federate(topology, self.config.local_steps, self.config.local_epochs)
        self.hosted, first = [], 0
        for block in blocks:
            weight = float(len(block.indices)) if self.config.weighting == "samples" else 1.0
            self.hosted.append(HostedClient(block.client, first, first + block.steps - 1, len(block.indices), weight))
            first += block.steps
        held = getattr(datamodule, "holdouts", {})
        described = ", ".join(
            f"client {c.client}: {c.examples} examples"
            + (f" (+{len(held[c.client])} held out)" if held.get(c.client) else "")
            + f", {c.last - c.first + 1} steps/round"
            for c in self.hosted
        )
        print(
            f"[fedlm] rank {topology.rank}/{topology.world_size}: {self.config.clients} clients, "
            f"{topology.ranks_per_client} rank(s) per client, hosting {described}",
            flush=True,
        )

    def _describe_privacy(self) -> None:
        p, rounds = self.privacy, self.rounds_to_train
        rank_zero_info(
            f"[fedlm dp] noise multiplier {p.noise_multiplier:.3f}, clip norm {p.clip_norm:g}"
            f"{' (adaptive)' if p.config.adaptive_clipping else ''}: {rounds} rounds spend epsilon "
            f"{p.epsilon_for(rounds):.2f} at delta {p.config.delta:g} (replace-one; {p.peer_epsilon_for(rounds):.2f} "
            "against a peer)"
            + (f"; stopping there, before the {self.config.rounds} configured" if rounds < self.config.rounds else "")
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a checkpoint is restored and before any training (a rank whose rounds are all done skips training
        altogether): every rank must resume from the same round."""
        if self.topology.world_size > 1:
            checks.check_resumed_together(self.completed_rounds)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        c = self.config
        self.exchange = EncoderExchange(pl_module.encoder, c.average, c.private_tokens)
        self.global_params = self.exchange.read()  # on resume: the checkpoint's global model
        initial_private = self.global_params[~self.exchange.shared]
        self.clients.start([h.client for h in self.hosted], trainer, initial_private, self.completed_rounds > 0)

    # -- within a round ------------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        c, index = self.config, trainer.current_epoch
        self.round = RoundState(index, sample_clients(c.clients, c.client_fraction, c.seed, index))
        self.round.losses = {h.client: [] for h in self.hosted}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for hosted in self.hosted:
            if batch_idx == hosted.first:
                self._begin_client(trainer, hosted.client)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.client_group is not None:
            self._reduce_client_gradients(pl_module)
        if self.config.prox_mu > 0:
            self._add_proximal_gradient(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for hosted in self.hosted:
            if batch_idx <= hosted.last:
                self.round.losses[hosted.client].append(float(outputs["loss"]))
                if batch_idx == hosted.last:
                    self._end_client(trainer, hosted.client)
                break
        # Average here, at the round's last batch, not in on_train_epoch_end: Lightning's end-of-epoch validation
        # and checkpointing run before the callbacks' epoch-end hooks, and must see the new global encoder.
        if batch_idx == self.hosted[-1].last:
            self._end_round(pl_module)

    def _begin_client(self, trainer: L.Trainer, client: int) -> None:
        self.exchange.write(self.clients.model(client, self.global_params, self.exchange.shared))
        self.round.anchor = self.exchange.parameters()
        self.clients.swap_in(client, trainer, client in self.round.sampled)
        # The client's own dropout stream, the same whichever rank hosts it and whether or not the run resumed.
        seed = derive_seed("client-rng", self.config.seed, self.round.index, client, self.topology.rank_in_client)
        torch.manual_seed(seed)

    def _end_client(self, trainer: L.Trainer, client: int) -> None:
        sampled, private = client in self.round.sampled, None
        if sampled:
            vector = self.round.vectors[client] = self.exchange.read()
            if torch.isfinite(vector).all() and all(map(math.isfinite, self.round.losses[client])):
                private = vector[~self.exchange.shared]
            else:
                self.round.failed.add(client)
        self.clients.swap_out(client, trainer, sampled, private)

    def _reduce_client_gradients(self, pl_module: L.LightningModule) -> None:
        """Data parallelism inside a client: average gradients over the client's ranks only."""
        grads = [p.grad for p in pl_module.encoder.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        start = time.perf_counter()
        dist.all_reduce(flat, group=self.client_group)
        self.round.comm_seconds += time.perf_counter() - start
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
        pull = (parameters_to_vector(params).detach() - self.round.anchor) * self.config.prox_mu
        for p, term in zip(params, pull.split([p.numel() for p in params])):
            term = term.view_as(p)
            if p.grad is None:
                p.grad = term.clone()
            else:
                p.grad.add_(term)

    # -- the round boundary: average the shared part of the sampled clients' vectors -----------------------

    def _end_round(self, pl_module: L.LightningModule) -> None:
        r, clients, shared = self.round, self.config.clients, self.exchange.shared
        size, lead, figures = int(shared.sum()), self.topology.is_client_lead, self.rule.shares_client_figures
        global_shared, poison = self.global_params[shared], self.config.poison
        own = {client: vector[shared] for client, vector in r.vectors.items()} if lead else {}
        for client in set(own) & set(poison.clients):  # a simulated attack: what this client sends instead
            own[client] = poisoned(own[client], global_shared, poison.scale)
        weights = {h.client: h.weight for h in self.hosted}
        contributions = []
        for client in r.vectors:
            losses, summand, weight, count = r.losses[client], None, 0.0, 0.0
            failed = lead and client in r.failed
            if client in own and not failed:  # only a client's lead rank sends its vector
                summand, weight, count = self.rule.summand(client, own[client], weights[client], global_shared, r.index)
            loss = sum(losses) if figures else None
            contributions.append(Contribution(client, len(losses), loss, summand, weight, count, failed))
        samples = {h.client: h.examples for h in self.hosted} if lead else {}
        width = self.rule.width(size)
        totals = unpack(self._sum(pack(contributions, samples, width, clients)), width, clients)
        checks.check_all_finite(totals.failed, r.index)

        self.global_params[shared] = self.server.step(global_shared, self.rule.average(totals, global_shared))
        self.exchange.write(self.global_params)
        if self.topology.world_size > 1:
            checks.check_ranks_agree(self.global_params, r.index)
        self.completed_rounds = r.index + 1

        distances = divergence(own, self.global_params[shared], clients)
        if figures:
            distances = self._sum(distances)
        else:  # each rank reports only its own clients', and the collapse check, which would need them all, is off
            distances[[client for client in range(clients) if client not in own]] = float("nan")
        losses = telemetry.client_losses(totals.loss, totals.steps, None if figures else r.losses, clients)
        skipped = [client for client in range(clients) if client not in r.sampled]
        losses[skipped] = distances[skipped] = float("nan")  # no update this round, nothing to report
        p = self.privacy
        report = telemetry.RoundReport(
            round=self.completed_rounds,
            losses=losses.tolist(),
            distances=distances.tolist(),
            samples=totals.samples.tolist(),
            client_bytes=telemetry.exchanged_bytes(r.sampled, clients, size * self.global_params.element_size()),
            compute_seconds=time.perf_counter() - r.started - r.comm_seconds,
            comm_seconds=r.comm_seconds,
            privacy=(p.epsilon(), p.peer_epsilon(), p.clip_norm) if p else None,
        )
        pl_module.log_dict(telemetry.metrics(report), on_step=False, on_epoch=True, batch_size=1)
        rank_zero_info(telemetry.log_line(report, self.config.rounds))
        if figures:
            checks.check_not_collapsed(distances, r.sampled, int(totals.steps.sum()))

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the world: plain, or through secure aggregation (also in one process, for its rounding)."""
        start = time.perf_counter()
        if self.secure is not None:
            tensor = self.secure.sum(tensor, self.round.index)
        elif self.topology.world_size > 1:
            dist.all_reduce(tensor)
        self.round.comm_seconds += time.perf_counter() - start
        return tensor

    # -- after the last round: global and personalized models, per client ----------------------------------

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not getattr(trainer.datamodule, "client_holdout", 0) or self.completed_rounds < self.config.rounds:
            return
        models = {}
        for hosted in self.hosted if self.topology.is_client_lead else []:
            models[hosted.client] = {"global": self.global_params}
            if self.config.private_tokens > 0:
                models[hosted.client]["private"] = self.clients.model(
                    hosted.client, self.global_params, self.exchange.shared
                )
        c = self.config
        results = personalize(
            trainer, pl_module, self.exchange, models, c.personalize_steps, c.seed, self.topology.world_size
        )
        self.exchange.write(self.global_params)  # the module leaves as the global model, for test_after_fit
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

    # -- checkpoints hold the round index, the global encoder, the server's and the hosted clients' state ----

    def state_dict(self) -> dict[str, Any]:
        return {
            "completed_rounds": self.completed_rounds,
            "global_params": self.global_params,
            "server": self.server.state_dict(),
            "average": self.config.average,
            "dp": self.privacy.state_dict() if self.privacy else None,
            **self.clients.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        average = state_dict.get("average", "parameters")
        if average != self.config.average:
            raise ConfigError(
                f"the checkpoint averaged the encoder's {average} but federation.average is "
                f"{self.config.average!r}; resume with the checkpoint's setting, or start a new run."
            )
        if (state_dict.get("dp") is None) != (self.privacy is None):
            raise ConfigError(
                "the checkpoint and federation.dp disagree on differential privacy (one has it, the other not); "
                "resume with the checkpoint's federation.dp, or start a new run."
            )
        self.completed_rounds = state_dict["completed_rounds"]
        self.global_params = state_dict["global_params"]
        self.clients.load_state_dict(state_dict)
        if self.privacy is not None:
            self.privacy.load_state_dict(state_dict["dp"])
        # checkpoints from before server optimizers were FedAvg, which has no state
        self.server.load_state_dict(state_dict.get("server", {"optimizer": "fedavg", "m": None, "v": None}))
