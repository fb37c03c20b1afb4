"""Batch samplers that make federated and centralized runs reproducible batch for batch.

Each client draws from an endless stream of its own examples: shuffle 0, then shuffle 1, ... each seeded from
(seed, client, pass). A round takes the next ``steps`` global batches of that stream, so what a client sees
depends only on the seed, its data and the round index: not on which rank hosts it, nor on whether the run was
resumed.

DP-SGD instead draws every step's batch afresh (``draw="independent"``): a uniformly random subset of the client's
examples, of fixed size, independent of every other step. That is the sampling its accountant composes
(``fedlm.accounting``); shuffled passes, where each example appears exactly once per pass, are not.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
from torch.utils.data import Sampler

from fedlm.errors import ConfigError
from fedlm.seeding import derive_seed

BatchDraw = Literal["shuffle", "independent"]  # passes over shuffles, or a fresh draw per step (DP-SGD)


@dataclass(frozen=True)
class ClientBlock:
    client: int
    indices: tuple[int, ...]  # the client's examples, as indices into the training dataset
    steps: int  # local optimizer steps per round


class RoundBatchSampler(Sampler[list[int]]):
    """Per round (Lightning epoch): ``block.steps`` batches of each block's client, blocks in order.

    ``pad_to``: the round is that many batches long on every rank, the batches past this rank's own being empty
    (idle steps), because Lightning broadcasts across the world at every batch, so every rank must run the same
    number; the loop averages at the round's last batch.

    With ``ranks_per_client > 1`` every rank of a client walks the same stream and takes its own slice of each
    global batch, which is data parallelism within the client. With ``bucket_batches > 1`` and the examples'
    token ``lengths``, each window of that many global batches is regrouped by length (then the window's batches
    are shuffled), so batches pad less; a round still holds exactly the same examples. ``draw="independent"``
    replaces the stream by a fresh draw per step (module docstring).
    """

    def __init__(
        self,
        blocks: list[ClientBlock],
        batch_size: int,
        seed: int,
        rank_in_client: int = 0,
        ranks_per_client: int = 1,
        lengths: Sequence[int] | None = None,
        bucket_batches: int = 1,
        draw: BatchDraw = "shuffle",
        pad_to: int = 0,
    ) -> None:
        if bucket_batches > 1 and lengths is None:
            raise ValueError("bucket_batches > 1 needs the examples' lengths.")
        if draw == "independent":
            check_independent_draws(blocks, batch_size * ranks_per_client, bucket_batches)
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.rank_in_client, self.ranks_per_client = rank_in_client, ranks_per_client
        self.lengths, self.bucket_batches, self.draw = lengths, bucket_batches, draw
        self.pad_to = pad_to
        self.round = 0
        # Lightning calls set_epoch on dataloader.sampler and dataloader.batch_sampler.sampler, never on the batch
        # sampler itself; without this every round would replay round 0's batches.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch, i.e. every round."""
        self.round = epoch

    def __len__(self) -> int:
        return max(self.pad_to, sum(block.steps for block in self.blocks))

    def __iter__(self) -> Iterator[list[int]]:
        global_batch = self.batch_size * self.ranks_per_client
        mine = slice(self.rank_in_client * self.batch_size, (self.rank_in_client + 1) * self.batch_size)
        for block in self.blocks:
            if self.draw == "independent":
                for step in range(block.steps):
                    yield self._drawn(block, step, global_batch)[mine]
                continue
            start = self.round * block.steps * global_batch
            stream = [
                block.indices[self._position(block.client, len(block.indices), p)]
                for p in range(start, start + block.steps * global_batch)
            ]
            batches = [stream[i : i + global_batch] for i in range(0, len(stream), global_batch)]
            if self.bucket_batches > 1:
                batches = self._bucketed(block.client, batches)
            for batch in batches:
                yield batch[mine]
        for _ in range(len(self) - sum(block.steps for block in self.blocks)):
            yield []  # an idle step

    def _drawn(self, block: ClientBlock, step: int, size: int) -> list[int]:
        generator = torch.Generator().manual_seed(derive_seed("dp-batch", self.seed, block.client, self.round, step))
        return [block.indices[i] for i in torch.randperm(len(block.indices), generator=generator)[:size].tolist()]

    def _bucketed(self, client: int, batches: list[list[int]]) -> list[list[int]]:
        assert self.lengths is not None
        size, regrouped = len(batches[0]), []
        for first in range(0, len(batches), self.bucket_batches):
            window = sorted(
                (i for batch in batches[first : first + self.bucket_batches] for i in batch),
                key=self.lengths.__getitem__,
            )
            groups = [window[i : i + size] for i in range(0, len(window), size)]
            generator = torch.Generator().manual_seed(derive_seed("buckets", self.seed, client, self.round, first))
            regrouped.extend(groups[j] for j in torch.randperm(len(groups), generator=generator).tolist())
        return regrouped

    def _position(self, client: int, size: int, position: int) -> int:
        shuffle, offset = divmod(position, size)
        return _permutation(self.seed, client, shuffle, size)[offset]


def check_independent_draws(blocks: list[ClientBlock], global_batch: int, bucket_batches: int) -> None:
    """Fresh draws need a batch that fits in every client, and no regrouping across batches."""
    if bucket_batches > 1:
        raise ConfigError(
            "data.bucket_batches regroups examples across batches, so DP-SGD's batches would no longer be uniform "
            "draws; set data.bucket_batches: 1 with model.dp_sgd."
        )
    small = [block.client for block in blocks if len(block.indices) < global_batch]
    if small:
        raise ConfigError(
            f"client(s) {small} hold fewer examples than one batch of {global_batch} (data.batch_size times the "
            "client's ranks); DP-SGD draws each batch from them without replacement: lower data.batch_size."
        )


@lru_cache(maxsize=64)
def _permutation(seed: int, client: int, shuffle: int, size: int) -> list[int]:
    generator = torch.Generator().manual_seed(derive_seed("data", seed, client, shuffle))
    return torch.randperm(size, generator=generator).tolist()


class ShardBatches(Sampler[list[int]]):
    """Every ``world``-th example from ``rank``, in batches, without the padding DistributedSampler adds (honest
    metrics); a rank with fewer examples ends with an empty batch, so that every rank runs the same number of
    evaluation steps (with a sharded LM each is a collective)."""

    def __init__(self, size: int, rank: int, world: int, batch_size: int) -> None:
        indices = list(range(rank, size, world))
        self.batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        self.steps = math.ceil(math.ceil(size / world) / batch_size)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches
        for _ in range(self.steps - len(self.batches)):
            yield []
