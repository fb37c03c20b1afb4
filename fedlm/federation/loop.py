"""FederatedLoop: federated p-tuning rounds as Lightning hooks on top of its fit loop.

One Lightning epoch is one round. Within it every rank runs, for each client it hosts, that client's local steps
(the ``RoundBatchSampler`` lays the batches out client after client). At a client's first batch its state is
swapped in (``fedlm.federation.clients``); at its last, its vector is set aside. After the rank's last client, the
round is averaged (``fedlm.federation.aggregate``: pack, one all-reduce, unpack, average) and the server optimizer
makes the new global encoder. The frozen LM never travels.

Client sampling (``client_fraction < 1``, ``fedlm.federation.plan``): in a simulation from one dataset on fewer
processes than clients, a round's batches are its sampled clients' only, spread over the processes (Lightning
rebuilds the batch layout every round), and each client's state moves to the process that runs it (as tensors of a
layout that both ends derive for themselves: ``StateCodec``). Pinned clients
(their own files, or their own processes) run every round and an unsampled one rolls back: it sends nothing (the
average's weights renormalize over the sampled clients) and its optimizer state is restored. Both give the same
result; the first costs only the sampled clients' steps.

What travels is an ``EncoderExchange`` vector (the encoder's parameters, or its virtual-token table) minus the
client's private virtual tokens. With ``data.client_holdout``, the end of fit evaluates the global and
personalized models per client (``personalize``).
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.utils import parameters_to_vector

from fedlm.errors import ConfigError
from fedlm.federation import checks, telemetry
from fedlm.federation.aggregate import (
    WIRE_DTYPES,
    Aggregation,
    Contribution,
    divergence,
    from_wire,
    pack,
    unpack,
    wire_parts,
)
from fedlm.federation.clients import (
    ClientStates,
    HostedClient,
    RoundState,
    StateCodec,
    exchange_states,
    place_schedules,
)
from fedlm.federation.config import FederationConfig, sample_clients
from fedlm.federation.exchange import EncoderExchange
from fedlm.federation.personalize import MODELS, personalize, write_personalization
from fedlm.federation.plan import RoundPlan
from fedlm.federation.privacy import ClientPrivacy, PrivateAggregation
from fedlm.federation.releases import ReleaseJournal, fingerprint
from fedlm.federation.robust import poisoned, robust_rule
from fedlm.federation.secure import CONTROL, SecureAggregator
from fedlm.federation.server import ServerOptimizer
from fedlm.federation.sharding import ShardedBytes, shard_backbone, sharded_names
from fedlm.federation.topology import Topology, TopologyError
from fedlm.federation.trainer_options import check_trainer_options
from fedlm.seeding import derive_seed

LISTED = 8  # hosted clients described one by one in the setup line


class Unit(NamedTuple):
    """What the loop needs of a client it may run: from the data module's block and the weighting."""

    examples: int  # training set size
    steps: int  # local steps per round
    weight: float  # FedAvg weight


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
        # one drawing of each round's clients, for the plan and the order statistics' rows alike
        self.sampled = functools.lru_cache(maxsize=1)(
            functools.partial(sample_clients, config.clients, config.client_fraction, config.seed)
        )
        rule = robust_rule(config.robust, config.sampled_per_round, self.sampled)
        self.rule: Aggregation = PrivateAggregation(self.privacy, rule) if self.privacy else rule
        self.wire_dtype = WIRE_DTYPES[config.payload]
        self.rounds_to_train = (
            self.privacy.planned_rounds() if self.privacy else config.rounds
        )  # DP: refuses overspending
        self.secure: SecureAggregator | None = None
        self.releases: ReleaseJournal | None = None  # DP without noise_seed: what this rank has released
        self.client_group: dist.ProcessGroup | None = None
        self.sharded: ShardedBytes | None = None  # what this rank holds of the LM, once shard_backbone has run
        self.hosted: list[HostedClient] = []
        self.exchange: EncoderExchange | None = None
        # what lasts across rounds (and goes into checkpoints)
        self.global_params: torch.Tensor | None = None  # the global exchange vector
        budget = config.client_state_budget_mb
        self.clients = ClientStates(None if budget is None else int(budget * 2**20))
        self.plan: RoundPlan | None = None
        self.units: dict[int, Unit] = {}  # every client this rank may run
        self.holders: list[int] | None = None  # spread: which rank holds each client's state now
        self.codec: StateCodec | None = None  # spread over several ranks: how client states travel between them
        self.completed_rounds = 0
        self.round: RoundState | None = None

    # -- setup ---------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        topology, datamodule = self.topology, trainer.datamodule
        topology.check_process_group()
        if self.client_group is None:
            self.client_group = topology.client_groups().get(topology.hosted_clients[0])
        if self.config.shard_backbone and self.sharded is None:  # once: fit's test calls setup again
            self._shard(trainer, pl_module)
        if stage != "fit":
            datamodule.eval_shard = (topology.rank, topology.world_size) if topology.world_size > 1 else None
            return
        check_trainer_options(trainer, topology.world_size)
        if self.config.personalize_steps > 0 and not getattr(datamodule, "client_holdout", 0):
            raise ConfigError(
                "federation.personalize_steps needs each client's own held-out data to evaluate on: set "
                "data.init_args.client_holdout (e.g. 0.2), or federation.personalize_steps: 0."
            )
        if self.config.personalize_steps > 0 and pl_module.task.config.kind != "classification":
            raise ConfigError(
                "federation.personalize_steps picks each client's model by held-out accuracy, which only "
                "classification has; set federation.personalize_steps: 0 for model.task.kind=generation."
            )
        if self.config.secure_aggregation.enabled and self.secure is None:
            self.secure = SecureAggregator(self.config.secure_aggregation)
            self.secure.setup(getattr(trainer.strategy, "membership", None))  # a collective, once per run
        if self.privacy is not None:
            self._describe_privacy()
        c = self.config
        skips = (
            c.skip_unsampled
            and c.client_fraction < 1
            and topology.world_size < topology.num_clients
            and datamodule.simulated
        )
        runnable = list(range(c.clients)) if skips else topology.hosted_clients
        blocks = datamodule.federate(topology, c.local_steps, c.local_epochs, runnable, self._round_layout)
        self.units = {
            b.client: Unit(len(b.indices), b.steps, float(len(b.indices)) if c.weighting == "samples" else 1.0)
            for b in blocks
        }
        steps = {client: unit.steps for client, unit in self.units.items()}
        pinned = 0 if skips else sum(steps.values())
        if not skips and topology.world_size > 1:  # every rank runs the longest rank's steps each round
            pinned = checks.extremes_over_ranks(pinned)[1]
        self.plan = RoundPlan(self.sampled, topology.world_size, steps, skips, pinned)
        if skips:
            # the round's batches are its sampled clients', whose steps can change from round to round: Lightning
            # must rebuild the train loader, and count its batches again, at every round
            trainer.reload_dataloaders_every_n_epochs = 1
            if self.holders is None:  # not restored: each rank starts holding the clients it would host pinned
                self.holders = [topology.client_ranks(client)[0] for client in range(c.clients)]
        else:
            self.hosted = self._layout(runnable)
        print(f"[fedlm] rank {topology.rank}/{topology.world_size}: {self._describe(runnable, datamodule)}", flush=True)

    def _shard(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The frozen LM spread over this client's ranks; the prefix cache then fills in lockstep with them."""
        if self.client_group is None:
            raise TopologyError(
                f"federation.shard_backbone spreads the LM over each client's ranks, but this launch gives each of "
                f"the {self.topology.num_clients} clients one rank (world size {self.topology.world_size}); start "
                f"a multiple of them, e.g. torchrun --nproc_per_node={2 * self.topology.num_clients}."
            )
        device_type = trainer.strategy.root_device.type
        held = self.sharded = shard_backbone(pl_module.backbone, self.client_group, device_type)
        # Lightning broadcasts rank 0's weights before a test or validation; each rank's shards are its own
        pl_module._ddp_params_and_buffers_to_ignore = sharded_names(pl_module)
        if pl_module.prefix_cache is not None:
            pl_module.prefix_cache.lockstep = self.client_group
        pl_module.lm.lockstep = self.client_group  # decoding steps are forwards too
        print(
            f"[fedlm] rank {self.topology.rank}: the LM's {held.layers} decoder layers sharded over client "
            f"{self.topology.hosted_clients[0]}'s {self.topology.ranks_per_client} ranks: this rank holds "
            f"{held.local:,} of their {held.whole:,} bytes",
            flush=True,
        )

    def _round_layout(self, round_index: int) -> tuple[list[int], int]:
        """This rank's clients in a round and every rank's batches in it (what the data module lays out)."""
        return self.plan.layout(round_index, self.topology.rank)

    def _layout(self, clients: list[int]) -> list[HostedClient]:
        """The clients' batches in a round, one block after another, as the data module lays them out."""
        hosted, first = [], 0
        for client in clients:
            unit = self.units[client]
            hosted.append(HostedClient(client, first, first + unit.steps - 1, unit.examples, unit.weight))
            first += unit.steps
        return hosted

    def _describe(self, runnable: list[int], datamodule: Any) -> str:
        c, topology = self.config, self.topology
        held = getattr(datamodule, "holdouts", {})
        if self.plan.skips:
            examples = [self.units[k].examples for k in runnable]
            steps = [self.units[k].steps for k in runnable]
            return (
                f"{c.clients} clients of {min(examples)}-{max(examples)} examples ({min(steps)}-{max(steps)} "
                f"steps/round), {c.sampled_per_round} sampled per round and spread over {topology.world_size} "
                "process(es); the others do not run"
            )
        described = ", ".join(
            f"client {k}: {self.units[k].examples} examples"
            + (f" (+{len(held[k])} held out)" if held.get(k) else "")
            + f", {self.units[k].steps} steps/round"
            for k in runnable[:LISTED]
        )
        more = f", and {len(runnable) - LISTED} more" if len(runnable) > LISTED else ""
        return f"{c.clients} clients, {topology.ranks_per_client} rank(s) per client, hosting {described}{more}" + (
            "; unsampled clients run, then roll back" if c.client_fraction < 1 else ""
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
        if self.privacy is not None and c.dp.noise_seed is None:
            self.releases = self._open_releases(trainer, pl_module)
            self.privacy.noise_secret = self.releases.secret
        current = self.exchange.read()
        restored = self.global_params  # on resume: the checkpoint's global vector, kept as it was saved
        self.global_params = current if restored is None else restored.to(current.device)
        initial_private = self.global_params[~self.exchange.shared]
        rank, skips, budget = self.topology.rank, self.plan.skips, self.config.client_state_budget_mb
        held = [k for k, holder in enumerate(self.holders) if holder == rank] if skips else list(self.units)
        if not skips and self.holders is not None and self.topology.world_size > 1:
            raise ConfigError(
                "the checkpoint's clients were spread over the processes round by round (federation.skip_unsampled "
                "with client sampling), this run pins them: resume with the checkpoint's federation settings."
            )
        spill = None
        if budget is not None:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            spill = Path(tempfile.mkdtemp(prefix=f".client-states-rank{rank}-", dir=root))
        # in place: one client that runs every batch of the round (idle steps would step its lr scheduler)
        in_place = not skips and len(held) == 1 and self.plan.pinned_batches == self.units[held[0]].steps
        self.clients.start(held, trainer, initial_private, self.completed_rounds > 0, in_place, spill)
        if skips and self.topology.world_size > 1:
            self.codec = StateCodec(trainer, initial_private)

    # -- within a round ------------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        index = trainer.current_epoch
        self.round = RoundState(index, self.plan.sampled(index))
        if self.plan.skips:
            self._move_states(self.plan.runners(index))
        clients, self.round.batches = self._round_layout(index)
        self.hosted = self._layout(clients)
        self.round.losses = {h.client: [] for h in self.hosted}

    def _move_states(self, runners: list[list[int]]) -> None:
        """Spread clients: each rank hands the states it holds of clients another rank runs this round to that
        rank (in one process, nothing moves)."""
        runner = {client: rank for rank, clients in enumerate(runners) for client in clients}
        rank, world = self.topology.rank, self.topology.world_size
        if world > 1:
            start = time.perf_counter()
            # the same on every rank: which clients each rank holds and another runs
            moving = [
                [k for k, holder in enumerate(self.holders) if holder == sender != runner.get(k, sender)]
                for sender in range(world)
            ]
            arrived = exchange_states(self.codec, self.clients.take(moving[rank]), moving, rank)
            for sender, states in enumerate(arrived):
                if sender != rank:
                    self.clients.give({k: state for k, state in states.items() if runner[k] == rank})
            self.round.comm_seconds += time.perf_counter() - start
        for client, holder in runner.items():
            self.holders[client] = holder

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.round.idle = not self.hosted or batch_idx > self.hosted[-1].last
        for hosted in self.hosted:
            if batch_idx == hosted.first:
                self._begin_client(trainer, hosted)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.round.idle:
            return
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
        # and checkpointing run before the callbacks' epoch-end hooks, and must see the new global encoder. Every
        # rank runs the same number of batches (idle steps after its own clients'), so they all get here together.
        if batch_idx == self.round.batches - 1:
            self._end_round(pl_module)

    def _begin_client(self, trainer: L.Trainer, hosted: HostedClient) -> None:
        client = hosted.client
        self.exchange.write(self.clients.model(client, self.global_params, self.exchange.shared))
        self.round.anchor = self.exchange.parameters()
        self.clients.swap_in(client, trainer, client in self.round.sampled)
        place_schedules(trainer, self.round.index * (hosted.last - hosted.first + 1))
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
        everything = bool(shared.all())  # then no copy: a boolean index would copy every client's vector
        own = {client: vector if everything else vector[shared] for client, vector in r.vectors.items()} if lead else {}
        for client in set(own) & set(poison.clients):  # a simulated attack: what this client sends instead
            own[client] = poisoned(own[client], global_shared, poison.scale)
        weights = {h.client: h.weight for h in self.hosted}
        # a narrow payload carries updates, whose small values keep their precision: the rule works in the frame
        # whose origin is the global vector, which is added back to its average
        origin = None if self.wire_dtype == torch.float64 else global_shared.double()
        frame = global_shared if origin is None else torch.zeros_like(origin)

        def contributions() -> Iterator[Contribution]:
            """One client at a time, so that only one float64 summand is alive while the payload is packed."""
            for client in r.vectors:
                losses, summand, weight, count = r.losses[client], None, 0.0, 0.0
                failed = lead and client in r.failed
                if client in own and not failed:  # only a client's lead rank sends its vector
                    vector = own[client] if origin is None else own[client].double() - origin
                    summand, weight, count = self.rule.summand(client, vector, weights[client], frame, r.index)
                loss = sum(losses) if figures else None
                yield Contribution(client, len(losses), loss, summand, weight, count, failed)

        samples = {h.client: h.examples for h in self.hosted} if lead else {}
        width = self.rule.width(size)
        payload = pack(contributions(), samples, width, clients, global_shared.device)
        if self.releases is not None:
            self.releases.record(r.index, payload)  # a re-run of a released round must send the same bits
        parts = wire_parts(payload, width, self.wire_dtype)
        totals = unpack(from_wire([self._sum(part) for part in parts]), width, clients)
        checks.check_all_finite(totals.failed, r.index)

        average = self.rule.average(totals, frame)
        self.global_params[shared] = self.server.step(global_shared, average if origin is None else average + origin)
        self.exchange.write(self.global_params)
        if self.topology.world_size > 1:
            checks.check_ranks_agree(self.global_params, r.index)
        self.completed_rounds = r.index + 1

        distances = divergence(own, self.global_params[shared], clients)
        if figures:
            distances = self._sum(distances)
        else:  # each rank reports only its own clients'
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
            client_bytes=telemetry.exchanged_bytes(r.sampled, clients, self._wire_bytes(parts)),
            compute_seconds=time.perf_counter() - r.started - r.comm_seconds,
            comm_seconds=r.comm_seconds,
            privacy=(p.epsilon(), p.peer_epsilon(), p.clip_norm) if p else None,
        )
        pl_module.log_dict(telemetry.metrics(report), on_step=False, on_epoch=True, batch_size=1)
        rank_zero_info(telemetry.log_line(report, self.config.rounds))
        checks.check_not_collapsed(own, {c: len(r.losses[c]) for c in own}, self.topology.world_size)

    def _open_releases(self, trainer: L.Trainer, pl_module: L.LightningModule) -> ReleaseJournal:
        """This run's DP release journal, beside its logs; a restart of the same run finds the one it left."""
        data = getattr(trainer.datamodule, "hparams", {})
        settings = {"federation": asdict(self.config), "model": dict(pl_module.hparams), "data": dict(data),
                    "world_size": self.topology.world_size}  # fmt: skip
        return ReleaseJournal.open(Path(trainer.default_root_dir), self.topology.rank, fingerprint(settings))

    def _wire_bytes(self, parts: list[torch.Tensor]) -> int:
        """What one rank hands to the round's all-reduces: the payload (a robust rule's holds a row per client) in
        its wire precision, or under secure aggregation its int64 encoding with the control slots."""
        values = sum(part.numel() * part.element_size() for part in parts)
        return values + (CONTROL * parts[0].element_size() if self.secure is not None else 0)

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
        for client in self.clients.held if self.topology.is_client_lead else []:
            models[client] = {"global": self.global_params}
            if self.config.private_tokens > 0:
                models[client]["private"] = self.clients.model(client, self.global_params, self.exchange.shared)
        c = self.config
        results = personalize(trainer, pl_module, self.exchange, models, c.personalize_steps, c.seed, c.clients)
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

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.clients.close()

    # -- checkpoints hold the round index, the global encoder, the server's and the hosted clients' state ----

    def state_dict(self) -> dict[str, Any]:
        return {
            "completed_rounds": self.completed_rounds,
            "global_params": self.global_params,
            "server": self.server.state_dict(),
            "average": self.config.average,
            "dp": self.privacy.state_dict() if self.privacy else None,
            "holders": self.holders,
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
        self.holders = state_dict.get("holders")
        self.clients.load_state_dict(state_dict)
        if self.privacy is not None:
            self.privacy.load_state_dict(state_dict["dp"])
        # checkpoints from before server optimizers were FedAvg, which has no state
        self.server.load_state_dict(state_dict.get("server", {"optimizer": "fedavg", "m": None, "v": None}))
