"""Splitting one dataset into client shards (for simulating sites that each hold part of the data)."""

from __future__ import annotations

import torch

from fedlm.seeding import derive_seed


def iid_partition(size: int, num_clients: int, seed: int) -> list[list[int]]:
    """Shuffle ``range(size)`` and cut it into ``num_clients`` near-equal shards (the blog's 3 x ~600 split)."""
    if size < num_clients:
        raise ValueError(
            f"federation.clients={num_clients} is more than the {size} training examples; every client needs data."
        )
    order = torch.randperm(size, generator=torch.Generator().manual_seed(derive_seed("partition", seed))).tolist()
    bounds = [size * k // num_clients for k in range(num_clients + 1)]
    return [sorted(order[bounds[k] : bounds[k + 1]]) for k in range(num_clients)]
