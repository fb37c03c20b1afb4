"""Sample-level DP-SGD for the prompt encoder (Abadi et al. 2016): per-example gradients clipped, summed, noised.

Per-example gradients are cheap here because every example reads the encoder only through the virtual-token
table: give each example its own copy of the table, run the frozen LM once for the batch, and one backward pass
yields each example's gradient with respect to its copy. Pulling those back through the small encoder (one
``autograd.grad`` per example) gives exact per-example parameter gradients, without Opacus-style per-layer hooks,
which the encoder could not use anyway: it has no batch dimension.

The privacy spent is the RDP accountant's figure for ``steps`` steps of a Gaussian on a fixed-size batch drawn
afresh each step without replacement from the client's examples (``RoundBatchSampler(draw="independent")``, which
DP-SGD runs always use), under the replace-one relation (``fedlm.accounting``). The draws are seeded by
``data.shuffle_seed``, so that a run is reproducible; the amplification by sampling holds against a party that
does not know that seed, so a site that needs it against its peers gives its own secret ``shuffle_seed``.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from torch import nn

from fedlm.errors import ConfigError
from fedlm.seeding import derive_seed


@dataclass
class DPSGDConfig:
    """``model.dp_sgd``: sample-level differential privacy of each client's (or the centralized) training.

    Args:
        noise_multiplier: std of the Gaussian noise on the sum of clipped per-example gradients, in units of
            ``clip_norm``.
        clip_norm: L2 bound on each example's gradient of the encoder's parameters.
        delta: the delta of the reported (epsilon, delta).
        noise_seed: seed the noise (reproducible, NOT private); null: the operating system's randomness.
    """

    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    delta: float = 1e-5
    noise_seed: int | None = None

    def validate(self) -> None:
        if self.noise_multiplier < 0 or self.clip_norm <= 0:
            raise ConfigError(
                f"model.dp_sgd: noise_multiplier={self.noise_multiplier} must be >= 0 and clip_norm={self.clip_norm} "
                "positive."
            )
        if not 0 < self.delta < 1:
            raise ConfigError(f"model.dp_sgd.delta={self.delta} must be in (0, 1), e.g. 1e-5.")


def private_gradients(
    encoder: nn.Module,
    table: torch.Tensor,
    per_example_table_grads: torch.Tensor,
    config: DPSGDConfig,
    expected_batch: int,
    noise_share: float,
    stream: tuple[int, ...],
) -> list[torch.Tensor]:
    """The noisy mean of clipped per-example gradients, one tensor per encoder parameter.

    Args:
        table: the encoder's output this step (with its graph).
        per_example_table_grads: (batch, virtual tokens, hidden): each example's loss gradient w.r.t. the table.
        expected_batch: the denominator (this rank's configured batch size: the client's ranks then average), fixed
            so that the noise and the clipped sum are scaled alike whatever this batch's length.
        noise_share: the fraction of the noise variance this process adds (1 / the client's ranks).
        stream: what makes this call's noise differ from every other's under ``noise_seed`` (step, rank).
    """
    params = [p for p in encoder.parameters() if p.requires_grad]
    summed = [torch.zeros_like(p) for p in params]
    for example_grad in per_example_table_grads:
        grads = torch.autograd.grad(
            table, params, grad_outputs=example_grad.to(table.dtype), retain_graph=True, allow_unused=True
        )
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
        scale = min(1.0, config.clip_norm / norm) if norm > 0 else 1.0
        for total, g in zip(summed, grads):
            total.add_(g, alpha=scale)
    seed = secrets.randbits(63) if config.noise_seed is None else derive_seed("dp-sgd", config.noise_seed, *stream)
    generator = torch.Generator().manual_seed(seed)
    std = config.noise_multiplier * config.clip_norm * math.sqrt(noise_share)
    return [
        (total + torch.randn(total.shape, generator=generator, dtype=total.dtype).to(total.device) * std)
        / expected_batch
        for total in summed
    ]
