from fedlm.ptuning.config import CacheConfig, OptimizerConfig
from fedlm.ptuning.module import CheckpointMismatchError, OldCheckpointError, PTuningModule

__all__ = ["CacheConfig", "CheckpointMismatchError", "OldCheckpointError", "OptimizerConfig", "PTuningModule"]
