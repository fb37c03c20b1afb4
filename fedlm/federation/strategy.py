"""A Lightning strategy that starts torch.distributed like DDP but never syncs gradients over the world.

Plain ``strategy: ddp`` all-reduces gradients across every rank, so clients silently collapse into one
data-parallel job. Here the model stays unwrapped; ``FederatedLoop`` reduces gradients inside each client's
process group and averages the encoder across clients only at round boundaries.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy


class ClientStrategy(DDPStrategy):
    strategy_name = "fedlm_clients"

    def configure_ddp(self) -> None:
        """No DistributedDataParallel wrapper: gradient reduction is FederatedLoop's job, per client."""
