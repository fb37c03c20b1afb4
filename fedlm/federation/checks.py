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


def extremes_over_ranks(value: int) -> tuple[int, int]:
    """The smallest and largest ``value`` over the world's ranks, in one 16-byte all-reduce."""
    extremes = torch.tensor([value, -value], dtype=torch.int64)
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
    digest = hashlib.sha256(global_params.cpu().numpy().tobytes()).digest()
    low, high = extremes_over_ranks(int.from_bytes(digest[:7], "little"))  # 56 bits: fits int64
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


def check_not_collapsed(distances: torch.Tensor, sampled: list[int], steps: int) -> None:
    """Exactly 0 for every sampled client after local steps: the clients trained as one."""
    if len(sampled) > 1 and steps > 0 and float(distances[sampled].max()) == 0.0:
        raise CollapsedClientsError(
            "all clients ended the round with identical encoders: gradients were synchronized across clients "
            "(plain `strategy: ddp` all-reduces over the whole world). Use fedlm's ClientStrategy (the default "
            "when a federation section is given) so that each client trains on its own data."
        )
