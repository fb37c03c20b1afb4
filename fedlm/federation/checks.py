"""The round's guards: each raises, on every rank alike, an error that says what went wrong and what to do.

They cost a few bytes of communication each (one 16-byte all-reduce), so they run every round.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from fedlm.errors import FedlmError


class CollapsedClientsError(FedlmError, RuntimeError):
    """Clients ended a round with identical encoders: gradients were synchronized across clients."""


class NonFiniteClientError(FedlmError, FloatingPointError):
    """A client's training produced nan or inf; the round is not averaged."""


class RanksDisagreeError(FedlmError, RuntimeError):
    """Ranks hold different global encoders (or resumed from different rounds)."""


def digest(vector: torch.Tensor) -> int:
    """56 bits of the SHA-256 of a vector's bytes: equal for bitwise equal vectors, and nothing else about them."""
    return int.from_bytes(hashlib.sha256(vector.detach().cpu().numpy().tobytes()).digest()[:7], "little")


def extremes_over_ranks(low: int, high: int | None = None) -> tuple[int, int]:
    """The smallest ``low`` and the largest ``high`` (by default ``low``) over the world's ranks, in one 16-byte
    all-reduce."""
    extremes = torch.tensor([low if high is None else high, -low], dtype=torch.int64)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    return -int(extremes[1]), int(extremes[0])


def check_resumed_together(completed_rounds: int) -> None:
    low, high = extremes_over_ranks(completed_rounds)
    if low != high:
        raise RanksDisagreeError(
            f"the ranks resumed from different rounds ({low} to {high} completed): a rank did not find its "
            "part of the checkpoint. Give every rank the same --ckpt_path, with its <checkpoint>.rank<r> beside it."
        )


def check_ranks_agree(global_params: torch.Tensor, round_index: int) -> None:
    """Every rank must now hold bitwise the same global encoder."""
    low, high = extremes_over_ranks(digest(global_params))
    if low != high:
        raise RanksDisagreeError(
            f"round {round_index + 1}: the ranks hold different global encoders after averaging (checksums "
            "differ). Some rank missed a round or resumed from another checkpoint; restart from the last round "
            "checkpoint with the same number of processes."
        )


def check_all_finite(failed: list[int], round_index: int) -> None:
    if failed:
        raise NonFiniteClientError(
            f"round {round_index + 1}: client(s) {failed} produced a non-finite training loss or encoder (nan/inf); "
            f"the round was not averaged, so the last good global encoder is round {round_index}'s, in the last "
            "round checkpoint. Lower model.optimizer.lr, or set trainer.gradient_clip_val, and resume from it."
        )


def check_not_collapsed(sent: dict[int, torch.Tensor], steps: dict[int, int], world_size: int) -> None:
    """Every client that trained this round sent bitwise the same vector: the clients trained as one.

    Compared by digest, not by distance, so that it also runs under DP, where distances stay home: what travels is
    the count of clients that trained and the smallest and largest digest (two all-reduces of 8 and 16 bytes).
    ``sent`` holds this rank's clients (those it leads), ``steps`` their local step counts.
    """
    digests = [digest(vector) for client, vector in sent.items() if steps[client] > 0]
    count = torch.tensor([len(digests)], dtype=torch.int64)
    low, high = min(digests, default=2**56), max(digests, default=-1)  # a rank without digests: neutral
    if world_size > 1:
        dist.all_reduce(count)
        low, high = extremes_over_ranks(low, high)
    if int(count) > 1 and low == high:
        raise CollapsedClientsError(
            f"all {int(count)} clients that trained ended the round with identical encoders: gradients were "
            "synchronized across clients (a strategy or callback that all-reduces over the whole world). Use "
            "fedlm's ClientStrategy (the default when a federation section is given) so that each client trains "
            "on its own data."
        )
