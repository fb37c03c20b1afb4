"""Per-example evaluation outputs, gathered over the ranks as tensors of a declared shape (no pickled objects)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_rows(local: torch.Tensor, size: int) -> torch.Tensor:
    """The (``size``, width) rows of every rank in dataset order: rank ``r`` evaluated examples ``r, r + W, ...``
    (padding, if a sampler added any, comes last and is cut off), so the ranks' rows interleave back.

    A collective under torch.distributed: each rank sends its row count, then its rows padded to the longest, through
    the CPU (gloo) backend that every fedlm process group has.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local[:size].cpu()
    world = dist.get_world_size()
    count = torch.tensor([len(local)])
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(counts).item())
    padded = torch.zeros(longest, *local.shape[1:], dtype=local.dtype)
    padded[: len(local)] = local.cpu()
    shards = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(shards, padded)
    ordered = [shards[r][j] for j in range(longest) for r in range(world) if j < int(counts[r].item())][:size]
    return torch.stack(ordered) if ordered else local[:0].cpu()


def pad_ids(rows: list[list[int]], width: int) -> torch.Tensor:
    """Generated token ids as one (rows, width) int64 tensor, -1 past each row's end."""
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = torch.tensor(ids[:width], dtype=torch.long)
    return out


def unpad_ids(rows: torch.Tensor) -> list[list[int]]:
    return [[int(t) for t in row if t >= 0] for row in rows]
