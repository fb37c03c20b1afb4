"""Lightning options that would break a federated round are refused before any work, each naming its fix."""

from pathlib import Path

import lightning as L
import pytest
from helpers import FEDERATION, write_config

from fedlm.checkpointing import AtomicCheckpointIO
from fedlm.cli import cli
from fedlm.errors import ConfigError
from fedlm.federation.trainer_options import round_breakers


def quiet_trainer(**options) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, **options)


def test_what_fedlm_builds_breaks_nothing_and_each_option_that_would_is_named() -> None:
    assert round_breakers(quiet_trainer(plugins=[AtomicCheckpointIO()]), world_size=1) == []
    named = {
        "max_steps": 5,
        "accumulate_grad_batches": 2,
        "val_check_interval": 0.5,
        "check_val_every_n_epoch": 2,
        "limit_train_batches": 3,
    }
    for option, value in named.items():
        problems = round_breakers(quiet_trainer(plugins=[AtomicCheckpointIO()], **{option: value}), world_size=1)
        assert len(problems) == 1 and problems[0].startswith(f"trainer.{option}:"), problems
    (plugins,) = round_breakers(quiet_trainer(), world_size=1)  # Lightning's own, non-atomic checkpoint writer
    assert plugins.startswith("trainer.plugins:") and "AtomicCheckpointIO" in plugins


@pytest.mark.parametrize(("option", "value"), [("accumulate_grad_batches", 2), ("val_check_interval", 0.5)])
def test_fedlm_fit_refuses_them_before_training(
    option: str, value: float, tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, FEDERATION, **{option: value})
    with pytest.raises(ConfigError, match=f"federation cannot run with trainer.{option}:"):
        cli(["fit", "--config", str(config)])
    assert not list(tmp_path.rglob("*.ckpt"))
