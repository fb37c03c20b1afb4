"""The lr schedule: warm-up then decay to a floor, over each client's own steps in a federated run."""

import math
from pathlib import Path

import lightning as L
import pytest
from helpers import FEDERATION, write_config

from fedlm.ptuning.schedule import lr_factor


def test_warmup_then_cosine_or_linear_decay_to_the_floor() -> None:
    assert [lr_factor(s, 4, 10, "constant", 0.0) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, 2, 10, "cosine", 0.1) for s in range(12)]
    assert cosine[:2] == [0.5, 1.0] and cosine[9] == pytest.approx(0.1) and cosine[10:] == [cosine[9]] * 2
    assert cosine[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a > b for a, b in zip(cosine[1:9], cosine[2:10]))  # strictly down after the warm-up
    linear = [lr_factor(s, 0, 5, "linear", 0.0) for s in range(5)]
    assert linear == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])


class LrRecorder(L.Callback):
    """The lr of every optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_each_simulated_client_follows_the_schedule_over_its_own_steps(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """Round r, local step j of client k: lr * factor(r * local_steps + j), for every client alike."""
    from fedlm.cli import cli

    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, FEDERATION, limit_val_batches=0)
    schedule = [
        "--model.optimizer.lr_schedule",
        "cosine",
        "--model.optimizer.warmup_steps",
        "2",
        "--model.optimizer.final_lr_fraction",
        "0.1",
    ]
    run = cli(["fit", "--config", str(config), *schedule, "--trainer.callbacks+=test_schedule.LrRecorder"])
    (recorder,) = [c for c in run.trainer.callbacks if isinstance(c, LrRecorder)]
    rounds, steps, clients, lr = FEDERATION["rounds"], FEDERATION["local_steps"], FEDERATION["clients"], 0.05
    expected = [
        lr * lr_factor(r * steps + j, 2, rounds * steps, "cosine", 0.1)
        for r in range(rounds)
        for _ in range(clients)
        for j in range(steps)
    ]
    assert recorder.lrs == pytest.approx(expected, rel=1e-12)
    assert recorder.lrs[-1] == pytest.approx(0.1 * lr)


def test_a_decaying_schedule_over_clients_of_unequal_steps_is_refused(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    from fedlm.cli import cli

    skewed = {"clients": 2, "rounds": 2, "local_epochs": 0.5, "seed": 1}
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, skewed, limit_val_batches=0)
    partition = '{"kind": "quantity", "exponent": 2.0}'
    with pytest.raises(ValueError, match="model.optimizer.lr_schedule='cosine' decays over a client's steps"):
        cli(
            [
                "fit",
                "--config",
                str(config),
                "--model.optimizer.lr_schedule",
                "cosine",
                "--data.init_args.partition",
                partition,
            ]
        )
