"""The typed sections of ``model:`` besides the task and the encoder: the prefix cache and the optimizer."""

from __future__ import annotations

from dataclasses import dataclass

from fedlm.errors import ConfigError
from fedlm.model.backbone import DTYPES, Dtype
from fedlm.ptuning.schedule import Schedule


@dataclass
class CacheConfig:
    """``model.cache``: the frozen LM's key/values of the text before the first virtual token, computed once.

    Args:
        prefix: compute the frozen LM's key/values of the text before the first virtual token once per distinct prefix
            and run forward/backward over the rest only (exact; needs a template that starts with text, e.g.
            ``"{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"``).
        dtype: storage dtype of the cached key/values; bf16 halves the memory at a small loss of precision.
        dir: also keep the cached key/values in this folder (null: in memory only), so that later runs on the same
            backbone read them instead of running the LM over their texts again (about 1.4 MiB a sentence for SmolLM2
            in fp32). Entries are keyed by the backbone's weights, dtype and the torch build and thread count, so a
            run gives the same bits with or without them. They are derived from the data: keep them private.
        budget_mb: how much memory the prefix cache may hold (null: no limit). Past it the least recently used
            entries are dropped, and read back from ``dir`` or computed again when a text comes back: the same bits,
            so only the time changes.
    """

    prefix: bool = False
    dtype: Dtype = "fp32"
    dir: str | None = None
    budget_mb: float | None = None

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.cache.dtype={self.dtype!r} is not supported; use one of {sorted(DTYPES)}.")
        if self.dir is not None and not self.prefix:
            raise ConfigError(
                f"model.cache.dir={self.dir!r} stores the prefix cache, which is off; set model.cache.prefix=true."
            )
        if self.budget_mb is not None and (not self.prefix or self.budget_mb < 0):
            raise ConfigError(
                f"model.cache.budget_mb={self.budget_mb} bounds the prefix cache: it must be >= 0, with "
                "model.cache.prefix=true."
            )


@dataclass
class OptimizerConfig:
    """``model.optimizer``: AdamW on the encoder and its learning-rate schedule.

    Args:
        lr, weight_decay: AdamW's.
        warmup_steps, lr_schedule, final_lr_fraction: the lr warms up linearly over ``warmup_steps``, then stays
            (``constant``) or decays (``cosine``, ``linear``) to ``final_lr_fraction * lr`` at the last step. The
            horizon is the optimizer's steps in the run: in a federated run, a client's steps over all rounds
            (``rounds x local steps``), so in round r (from 0) its local step j is step ``r * local_steps + j``, also
            for a client that sat rounds out under client sampling.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Schedule = "constant"
    final_lr_fraction: float = 0.0

    def validate(self) -> None:
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ConfigError(
                f"model.optimizer.lr_schedule={self.lr_schedule!r} is unknown; use 'constant', 'cosine' or 'linear'."
            )
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ConfigError(
                f"model.optimizer.final_lr_fraction={self.final_lr_fraction} must be in [0, 1] (a fraction of lr)."
            )
        if self.warmup_steps < 0:
            raise ConfigError(f"model.optimizer.warmup_steps={self.warmup_steps} must be >= 0.")
