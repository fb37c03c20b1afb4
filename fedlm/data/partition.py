"""Splitting one dataset into client shards (for simulating sites that each hold part of the data).

Every partitioner is seeded and returns one sorted list of indices per client; the lists are disjoint and cover
every example. A client left without examples is refused: it could neither train nor be weighted in FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from fedlm.data.sources import PHRASEBANK_FILES, Agreement, DataError
from fedlm.seeding import derive_seed

PartitionKind = Literal["iid", "dirichlet", "quantity", "agreement", "lexfile"]
DIRICHLET_ATTEMPTS = 100  # redraws before a Dirichlet partition that keeps leaving a client empty is refused


@dataclass
class PartitionConfig:
    """``data.partition``: how the training split is divided among the clients (seeded by ``data.partition_seed``).

    Args:
        kind: ``iid`` (random near-equal shards), ``dirichlet`` (label skew), ``quantity`` (size skew, IID labels)
            or ``agreement`` (Financial PhraseBank only: one client per annotator-agreement level), or ``lexfile``
            (WordNet only: one client per group of lexicographer files: nouns, verbs, adjectives and adverbs).
        alpha: dirichlet: concentration of each class's split over the clients; smaller is more skewed
            (0.1: most clients hold mostly one or two classes; 100: close to IID).
        exponent: quantity: client k holds a share proportional to (k+1)^-exponent (0: equal sizes).
        levels: agreement: one client per level, in this order: "50" (50-65% of annotators agree), "66"
            (66-74%), "75" (75-99%), "all" (100%).
    """

    kind: PartitionKind = "iid"
    alpha: float = 0.5
    exponent: float = 1.0
    levels: list[Agreement] = field(default_factory=lambda: list(PHRASEBANK_FILES))

    def validate(self) -> None:
        if not self.alpha > 0:
            raise DataError(f"data.partition.alpha={self.alpha} must be positive (e.g. 0.5; smaller: more label skew).")
        if not self.exponent >= 0:
            raise DataError(f"data.partition.exponent={self.exponent} must be at least 0 (0: equal client sizes).")
        unknown = [level for level in self.levels if level not in PHRASEBANK_FILES]
        if not self.levels or unknown or len(set(self.levels)) < len(self.levels):
            raise DataError(
                f"data.partition.levels={self.levels} must list distinct agreement levels out of "
                f'{list(PHRASEBANK_FILES)} (quote them in YAML: "50").'
            )

    def describe(self) -> str:
        """The kind and the one option that shapes it, for logs."""
        if self.kind == "dirichlet":
            return f"dirichlet (alpha={self.alpha})"
        if self.kind == "quantity":
            return f"quantity (exponent={self.exponent})"
        if self.kind == "agreement":
            return f"agreement (levels={self.levels})"
        return self.kind


def iid_partition(size: int, num_clients: int, seed: int) -> list[list[int]]:
    """Shuffle ``range(size)`` and cut it into ``num_clients`` near-equal shards (the blog's 3 x ~600 split)."""
    check_enough(size, num_clients)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(derive_seed("partition", seed))).tolist()
    bounds = [size * k // num_clients for k in range(num_clients + 1)]
    return [sorted(order[bounds[k] : bounds[k + 1]]) for k in range(num_clients)]


def dirichlet_partition(labels: Sequence[str], num_clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Label skew, the recipe of Hsu et al. (2019) as FedML implements it.

    Each class's examples are shuffled and split over the clients in proportions drawn from Dir(alpha). As in
    FedML, a client that already holds its fair share (size / clients) gets nothing of later classes, so sizes
    stay within reach of each other. A draw that leaves a client empty is redrawn, up to ``DIRICHLET_ATTEMPTS``
    times; the generator runs on, so the result depends only on the seed.
    """
    size = len(labels)
    check_enough(size, num_clients)
    generator = torch.Generator().manual_seed(derive_seed("partition", "dirichlet", seed))
    classes = sorted(set(labels))
    members = {c: [i for i, label in enumerate(labels) if label == c] for c in classes}
    concentration = torch.full((num_clients,), float(alpha), dtype=torch.float64)
    for _ in range(DIRICHLET_ATTEMPTS):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            order = [members[c][j] for j in torch.randperm(len(members[c]), generator=generator).tolist()]
            # torch.distributions.Dirichlet cannot take a generator; this is the op it samples with.
            shares = torch._sample_dirichlet(concentration, generator=generator)
            shares *= torch.tensor([len(part) < size / num_clients for part in parts], dtype=torch.float64)
            bounds = [0, *(shares.cumsum(0) / shares.sum() * len(order)).long().tolist()[:-1], len(order)]
            for k in range(num_clients):
                parts[k] += order[bounds[k] : bounds[k + 1]]
        if min(map(len, parts)) > 0:
            return [sorted(part) for part in parts]
    raise DataError(
        f"data.partition.alpha={alpha} left a client without examples in {DIRICHLET_ATTEMPTS} draws "
        f"({size} examples, {len(classes)} classes, {num_clients} clients); raise data.partition.alpha or lower "
        "federation.clients."
    )


def quantity_partition(size: int, num_clients: int, exponent: float, seed: int) -> list[list[int]]:
    """Size skew with IID labels: a shuffle cut so that client k holds a share proportional to (k+1)^-exponent.

    A power law rather than random sizes, so the skew is the same for every seed and client 0 is the largest.
    Shares are rounded by largest remainder: sizes add up to ``size`` and never increase with k.
    """
    check_enough(size, num_clients)
    weights = [(k + 1) ** -exponent for k in range(num_clients)]
    exact = [size * w / sum(weights) for w in weights]
    sizes = [int(x) for x in exact]
    for k in sorted(range(num_clients), key=lambda k: exact[k] - sizes[k], reverse=True)[: size - sum(sizes)]:
        sizes[k] += 1
    if sizes[-1] == 0:
        raise DataError(
            f"data.partition.exponent={exponent} leaves client {num_clients - 1} none of the {size} training "
            f"examples (its share is {exact[-1]:.2f}); lower data.partition.exponent or federation.clients."
        )
    generator = torch.Generator().manual_seed(derive_seed("partition", "quantity", seed))
    order = torch.randperm(size, generator=generator).tolist()
    starts = [sum(sizes[:k]) for k in range(num_clients)]
    return [sorted(order[start : start + n]) for start, n in zip(starts, sizes)]


def agreement_partition(levels: Sequence[str], wanted: Sequence[str], num_clients: int) -> list[list[int]]:
    """Client k holds the examples whose agreement level is ``wanted[k]`` (``levels``: one per example)."""
    if len(wanted) != num_clients:
        raise DataError(
            f"data.partition.kind=agreement makes one client per level of data.partition.levels={list(wanted)} "
            f"({len(wanted)} clients), but there are {num_clients}; set federation.clients (or data.local_clients) "
            f"to {len(wanted)}, or list {num_clients} levels."
        )
    parts = [[i for i, level in enumerate(levels) if level == w] for w in wanted]
    for k, part in enumerate(parts):
        if not part:
            raise DataError(
                f"client {k} (agreement level {wanted[k]!r}) has no training sentences outside validation and test; "
                "drop that level from data.partition.levels."
            )
    return parts


def check_enough(size: int, num_clients: int) -> None:
    if size < num_clients:
        raise DataError(
            f"federation.clients={num_clients} is more than the {size} training examples; every client needs data."
        )
