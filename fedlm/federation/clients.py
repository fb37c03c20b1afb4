"""Where a client's state lives, by lifetime.

- ``HostedClient`` (the run): which batches of a round are the client's, and its weight in the average.
- ``ClientState`` (across rounds, in the holding rank's checkpoint): its optimizer and scheduler state and its
  private virtual tokens. A rank that simulates several clients has one optimizer; each client's state is swapped
  in at its first batch and out at its last, so simulated clients never share Adam moments. States of clients not
  in the round stay off the hot path: in memory up to a budget, on disk past it; a state that moves to another
  rank travels as tensors of a layout both ends derive for themselves (``StateCodec``). The client's RNG
  needs no state: it is re-seeded from ``federation.seed``, the round and the client at each swap-in, so a
  resumed run draws the same dropout masks.
- ``RoundState`` (one round, made fresh at its start): who takes part, the clients' losses and vectors, failures
  and timings.
"""

from __future__ import annotations

import copy
import functools
import operator
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection

from fedlm.errors import ConfigError
from fedlm.federation import wire
from fedlm.federation.wire import Field, WireError


@dataclass(frozen=True)
class HostedClient:
    client: int
    first: int  # the client's first and last batch index within a round
    last: int
    examples: int  # training set size
    weight: float  # FedAvg weight


@dataclass
class ClientState:
    private: torch.Tensor  # the client's private virtual tokens (empty without split prompts)
    # {"optimizers": [state_dict...], "schedulers": [state_dict...]}; None: fresh (the client has not trained yet)
    # or spilled to disk (``ClientStates.spilled``)
    optimizer: dict[str, Any] | None = None


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
    batches: int = 0  # the round's batches on every rank, idle steps included
    idle: bool = False  # the current batch is an idle step: this rank's clients are done for the round


def optimizer_state(trainer: L.Trainer) -> dict[str, Any]:
    return {
        "optimizers": [opt.state_dict() for opt in trainer.optimizers],
        "schedulers": [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs],
    }


def cpu_copy(state: Any) -> Any:
    """A copy of a nested state with every tensor in CPU memory. Client states wait there, off the device, and from
    there travel to other ranks (through gloo, ``exchange_states``), to disk and into checkpoints; the optimizer's
    ``load_state_dict`` moves them back to its parameters' device. Each tensor is copied straight into CPU memory
    (the containers are rebuilt), so a GPU state is never duplicated on the GPU."""
    return apply_to_collection(state, torch.Tensor, lambda tensor: tensor.detach().to("cpu", copy=True))


def load_optimizer_state(trainer: L.Trainer, state: dict[str, Any]) -> None:
    for opt, saved in zip(trainer.optimizers, state["optimizers"]):
        opt.load_state_dict(copy.deepcopy(saved))
    for cfg, saved in zip(trainer.lr_scheduler_configs, state["schedulers"]):
        cfg.scheduler.load_state_dict(saved)


def place_schedules(trainer: L.Trainer, step: int) -> None:
    """Put every lr scheduler (fedlm's are ``LambdaLR``) at optimizer step ``step``, as if it had stepped there: a
    client's lr follows the rounds, so round r's first local step is step ``r x local steps`` also for a client that
    sat rounds out under client sampling (``OptimizerConfig``), rather than resuming where its own last step was."""
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        scheduler.last_epoch = step
        lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs


class ClientStates:
    """The ``ClientState`` of each client this rank holds, and its checkpoint part.

    A client that has not trained yet has no optimizer state of its own: it starts from the trainer's at the start of
    training (``fresh``). Trained clients' optimizer states stay in memory, least recently used first; past
    ``budget_bytes`` the oldest are written to ``spill_dir`` and read back when their client runs again, so memory
    stays bounded however many clients a rank holds. ``in_place``: a rank that runs one client only keeps its
    state in the trainer (nothing to swap) and copies it only to roll an unsampled round back.
    """

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.states: dict[int, ClientState] = {}
        self.recent: OrderedDict[int, int] = OrderedDict()  # clients whose optimizer state is in memory: its bytes
        self.spilled: dict[int, Path] = {}
        self.budget_bytes, self.spill_dir = budget_bytes, None
        self.fresh: dict[str, Any] = {}
        self.in_place = False
        self._restored: dict[str, dict[Any, Any]] = {"private": {}, "client_states": {}, "fresh": {}}

    def start(
        self,
        clients: list[int],
        trainer: L.Trainer,
        initial_private: torch.Tensor,
        resumed: bool,
        in_place: bool = False,
        spill_dir: Path | None = None,
    ) -> None:
        """At the start of training: each held client's restored state, or fresh (the trainer's optimizer as it is
        now, after Lightning restored it on resume, and the global model's private tokens)."""
        private, optimizers = self._restored["private"], self._restored["client_states"]
        missing = [client for client in clients if client not in private]
        if missing and resumed and initial_private.numel() > 0:
            raise ConfigError(
                f"the checkpoint holds no private tokens for client(s) {missing}: it was written by a process that "
                "did not host them. Resume with the same number of processes, from the checkpoint folder of each."
            )
        # On resume the trainer holds the optimizer state Lightning restored (the last client's): a client that has
        # not trained yet starts from the fresh state the checkpoint kept instead.
        fresh = self._restored["fresh"] or optimizer_state(trainer)
        self.fresh, self.in_place, self.spill_dir = cpu_copy(fresh), in_place, spill_dir
        for client in clients:
            self.states[client] = ClientState(cpu_copy(private[client] if client in private else initial_private))
            if client in optimizers and not in_place:
                self._keep(client, cpu_copy(optimizers[client]))

    @property
    def held(self) -> list[int]:
        return sorted(self.states)

    def model(self, client: int, global_params: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """The global exchange vector with this client's private tokens in place."""
        vector = global_params.clone()
        vector[~shared] = self.states[client].private.to(vector.device)
        return vector

    def swap_in(self, client: int, trainer: L.Trainer, sampled: bool) -> None:
        """Load the client's optimizer state; in place, an unsampled client keeps a copy to roll back to."""
        if not self.in_place:
            load_optimizer_state(trainer, self._optimizer(client))
        elif not sampled:
            self.states[client].optimizer = cpu_copy(optimizer_state(trainer))

    def swap_out(self, client: int, trainer: L.Trainer, sampled: bool, private: torch.Tensor | None) -> None:
        """Keep what the client's steps changed; an unsampled client rolls back, as if it had not trained. A failed
        client (``private`` None) keeps nothing: the round stops."""
        if not sampled:
            if self.in_place:
                load_optimizer_state(trainer, self.states[client].optimizer)
            return
        if private is None:
            return
        self.states[client].private = private.cpu()
        if not self.in_place:
            self._keep(client, cpu_copy(optimizer_state(trainer)))

    def take(self, clients: list[int]) -> dict[int, ClientState]:
        """Hand these clients' whole states over (to the rank that runs them next); this rank holds them no more."""
        out = {}
        for client in clients:
            optimizer = self._optimizer(client) if self._trained(client) else None
            out[client] = ClientState(self.states.pop(client).private, optimizer)
            self._forget(client)
        return out

    def give(self, states: dict[int, ClientState]) -> None:
        for client, state in states.items():
            self.states[client] = ClientState(state.private)
            if state.optimizer is not None:
                self._keep(client, state.optimizer)

    def memory_bytes(self) -> int:
        """What the held optimizer states take in memory."""
        return sum(self.recent.values())

    def _trained(self, client: int) -> bool:
        """Whether the client has an optimizer state of its own, in memory or on disk."""
        return client in self.recent or client in self.spilled

    def _forget(self, client: int) -> None:
        """Drop where the client's optimizer state was kept: its memory entry and its file."""
        self.recent.pop(client, None)
        if client in self.spilled:
            self.spilled.pop(client).unlink()

    def _optimizer(self, client: int) -> dict[str, Any]:
        """The client's optimizer state, from memory, from disk, or fresh."""
        if client in self.recent:
            self.recent.move_to_end(client)
            return self.states[client].optimizer
        if client in self.spilled:
            return torch.load(self.spilled[client], weights_only=True)  # tensors and plain data only
        return self.fresh

    def _keep(self, client: int, optimizer: dict[str, Any]) -> None:
        self._forget(client)
        self.states[client].optimizer = optimizer
        self.recent[client] = tensor_bytes(optimizer)  # the most recently used, last
        while self.budget_bytes is not None and self.memory_bytes() > self.budget_bytes and self.recent:
            self._spill(next(iter(self.recent)))

    def _spill(self, client: int) -> None:
        if self.spill_dir is None:
            raise RuntimeError("ClientStates has a memory budget but no spill_dir; pass one to start().")
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"client{client}.pt"
        torch.save(self.states[client].optimizer, path)
        self.spilled[client], self.states[client].optimizer = path, None
        del self.recent[client]

    def close(self) -> None:
        """Remove the spilled states' folder (the checkpoint holds what must last)."""
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
        self.spilled.clear()

    def state_dict(self) -> dict[str, Any]:
        """This process's clients only (their moments, for exact resume, and private tokens); spilled states are
        read back into it, one after another."""
        trained = [client for client in self.held if self._trained(client)]
        return {
            "private": {client: state.private for client, state in self.states.items()},
            "client_states": {client: self._optimizer(client) for client in trained},
            "fresh_client_state": self.fresh,  # where a client that has not trained yet starts
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = {
            "private": dict(state.get("private", {})),
            "client_states": dict(state.get("client_states", {})),
            "fresh": dict(state.get("fresh_client_state", {})),
        }


# -- a client's state as tensors of a fixed layout: how it moves between ranks, never pickled ---------------------

KeyPath = tuple[str | int, ...]  # keys and indices from a state's root to one of its numbers


class StateCodec:
    """A client's whole ``ClientState`` as a fixed list of tensors, and back: what travels when a spread client
    moves to the rank that runs it next (``exchange_states``).

    Every rank derives the layout from its own trainer at the start of training, never from what a sender says:
    the private tokens; whether the client has trained (else it has no optimizer state of its own); Adam's step and
    moments for each of the encoder's parameters (zeros for an untrained client); and, as float64, every number of
    the optimizers' param groups and the schedulers' states (the lr and the schedule's position differ between
    clients), which the receiver writes into its own copy of them, whose keys, strings and None are the same on
    every rank.
    """

    def __init__(self, trainer: L.Trainer, private: torch.Tensor) -> None:
        state = optimizer_state(trainer)
        self.settings = {  # this rank's own, without the optimizers' per-parameter state
            "optimizers": [
                {"state": {}, "param_groups": copy.deepcopy(s["param_groups"])} for s in state["optimizers"]
            ],
            "schedulers": copy.deepcopy(state["schedulers"]),
        }
        self.numbers = number_paths(self.settings)
        self.slots = [slot for o, optimizer in enumerate(trainer.optimizers) for slot in adam_slots(o, optimizer)]
        self.schema = (
            Field("private tokens", tuple(private.shape), private.dtype),
            Field("trained", (), torch.bool),
            *(field for _, _, _, field in self.slots),
            Field("optimizer and scheduler numbers", (len(self.numbers),), torch.float64),
        )

    def encode(self, state: ClientState) -> list[torch.Tensor]:
        trained, saved = state.optimizer is not None, state.optimizer
        moments = [
            saved["optimizers"][o]["state"][index][key] if trained else torch.zeros(f.shape, dtype=f.dtype)
            for o, index, key, f in self.slots
        ]
        numbers = [float(functools.reduce(operator.getitem, path, saved)) if trained else 0.0 for path in self.numbers]
        return [state.private, torch.tensor(trained), *moments, torch.tensor(numbers, dtype=torch.float64)]

    def blank(self) -> list[torch.Tensor]:
        """Zeros in every field: what pads a rank's message to the length every rank expects."""
        return [torch.zeros(f.shape, dtype=f.dtype) for f in self.schema]

    def decode(self, tensors: list[torch.Tensor]) -> ClientState:
        private, trained, *moments, numbers = tensors
        if not bool(trained):
            return ClientState(private)
        saved = with_numbers(self.settings, dict(zip(self.numbers, numbers.tolist())))
        for (o, index, key, _), tensor in zip(self.slots, moments):
            saved["optimizers"][o]["state"].setdefault(index, {})[key] = tensor
        return ClientState(private, saved)


def adam_slots(o: int, optimizer: torch.optim.Optimizer) -> list[tuple[int, int, str, Field]]:
    """Where Adam keeps each parameter's state in optimizer ``o``'s state dict (parameter index, key), and its field:
    the step count (a float32 scalar, as torch keeps it) and the moments, shaped like their parameter."""
    if not isinstance(optimizer, torch.optim.Adam):  # AdamW too
        raise ConfigError(
            f"federation.skip_unsampled moves client states between processes, laid out for Adam and AdamW (fedlm's "
            f"optimizer), not {type(optimizer).__name__}; set federation.skip_unsampled: false."
        )
    slots, index = [], 0
    for group in optimizer.param_groups:
        moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")
        for param in group["params"]:
            name = f"optimizer {o} parameter {index}"
            slots.append((o, index, "step", Field(f"{name} step", (), torch.float32)))
            slots += [(o, index, key, Field(f"{name} {key}", tuple(param.shape), param.dtype)) for key in moments]
            index += 1
    return slots


def number_paths(tree: Any, path: KeyPath = ()) -> list[KeyPath]:
    """Where ``tree`` holds numbers (bool, int, float), in a fixed order; parameter indices (``params``) excluded:
    they are the layout, not the client's."""
    if isinstance(tree, bool | int | float):
        return [path]
    if isinstance(tree, dict):
        return [p for key, value in tree.items() if key != "params" for p in number_paths(value, (*path, key))]
    if isinstance(tree, list | tuple):
        return [p for index, value in enumerate(tree) for p in number_paths(value, (*path, index))]
    return []


def with_numbers(tree: Any, numbers: dict[KeyPath, float], path: KeyPath = ()) -> Any:
    """A copy of ``tree`` with the numbers at ``numbers``' paths put in, each as the type ``tree`` has there."""
    if path in numbers:
        return number_as(tree, numbers[path], path)
    if isinstance(tree, dict):
        return {key: with_numbers(value, numbers, (*path, key)) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(with_numbers(value, numbers, (*path, index)) for index, value in enumerate(tree))
    return copy.deepcopy(tree)


def number_as(like: bool | int | float, value: float, path: KeyPath) -> bool | int | float:
    """A received number as ``like``'s type; an int that is not whole or a bool that is not 0 or 1 is refused."""
    if isinstance(like, float):
        return value
    if not value.is_integer() or (isinstance(like, bool) and value not in (0.0, 1.0)):
        where = "/".join(map(str, path))
        raise WireError(f"client states: {where} must be a {type(like).__name__}, but {value} arrived.")
    return type(like)(value)


def exchange_states(
    codec: StateCodec, leaving: dict[int, ClientState], moving: list[list[int]], rank: int
) -> list[dict[int, ClientState]]:
    """Every rank's leaving client states, on every rank, as tensors (``fedlm.federation.wire``). ``moving`` (the
    same on every rank) says which clients each rank hands over, so each message's length is known beforehand: a
    rank sends as many states as the most that any rank hands over, padded with blank ones (a gather takes one
    length from every rank)."""
    most = max(map(len, moving))
    if most == 0:
        return [{} for _ in moving]
    tensors = [t for client in moving[rank] for t in codec.encode(leaving[client])]
    tensors += codec.blank() * (most - len(moving[rank]))
    gathered = wire.gather_flat(tensors, codec.schema * most, "client states")
    width = len(codec.schema)
    return [
        {client: codec.decode(row[i * width : (i + 1) * width]) for i, client in enumerate(clients)}
        for row, clients in zip(gathered, moving)
    ]


def tensor_bytes(value: Any) -> int:
    """The bytes of every tensor in a nested state dict."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0
