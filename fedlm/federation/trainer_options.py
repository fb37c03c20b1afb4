"""Lightning options that would break a round, refused before any work with a message that names the fix.

One epoch is one round: every client runs ``federation.local_steps`` optimizer steps, one batch each; the round's
average lands at its last batch; validation and the round checkpoint follow at the epoch's end. Options that split,
stretch or skip any of that would make rounds mean something else without an error.
"""

from __future__ import annotations

import lightning as L

from fedlm.checkpointing import AtomicCheckpointIO
from fedlm.errors import ConfigError
from fedlm.federation.strategy import ClientStrategy


def round_breakers(trainer: L.Trainer, world_size: int) -> list[str]:
    """What in ``trainer`` breaks a round, each with its fix (empty: nothing)."""
    problems = []
    if trainer.limit_train_batches not in (1.0, None):
        problems.append("trainer.limit_train_batches: a round's length is federation.local_steps; remove it")
    if trainer.max_steps != -1:
        problems.append("trainer.max_steps: federation.rounds sets a run's length; remove it")
    if trainer.accumulate_grad_batches != 1:
        problems.append(
            "trainer.accumulate_grad_batches: a local step is one optimizer step on one batch; raise "
            "data.init_args.batch_size instead"
        )
    if trainer.val_check_interval not in (1.0, None):
        problems.append("trainer.val_check_interval: validation runs once per round, after its average; remove it")
    if trainer.check_val_every_n_epoch not in (1, None):
        problems.append("trainer.check_val_every_n_epoch: every round is validated and checkpointed; remove it")
    if not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
        problems.append(
            "trainer.plugins: they replace fedlm's AtomicCheckpointIO, and a crash while a round checkpoint is written "
            "would leave it torn; leave trainer.plugins out, or add fedlm.checkpointing.AtomicCheckpointIO"
        )
    if world_size > 1 and not isinstance(trainer.strategy, ClientStrategy):
        problems.append(
            f"trainer.strategy ({type(trainer.strategy).__name__}): it would synchronize gradients over every rank, "
            "so the clients would train as one; leave trainer.strategy at auto (fedlm's ClientStrategy)"
        )
    return problems


def check_trainer_options(trainer: L.Trainer, world_size: int) -> None:
    problems = round_breakers(trainer, world_size)
    if problems:
        raise ConfigError("federation cannot run with " + "; ".join(problems) + ".")
