import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedlm.cli import cli

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, backbone: str, fpb: Path) -> Path:
    config = {
        "seed_everything": 7,
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 6,
            "log_every_n_steps": 2,
            "limit_val_batches": 2,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ckpt"), "filename": "best", "monitor": "val/acc", "mode": "max"},
                }
            ],
        },
        "model": {"backbone": backbone, "encoder": {"type": "lstm", "virtual_tokens": 3, "hidden_size": 8}, "lr": 0.01},
        "data": {"class_path": "fedlm.data.FinancialPhraseBank", "init_args": {"path": str(fpb), "batch_size": 8}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_test_and_predict_from_a_yaml_config(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb)
    fit = cli(["fit", "--config", str(config)])
    assert fit.trainer.global_step == 6
    assert {"val/acc", "val/macro_f1", "val/f1_positive", "val/confusion/neutral_as_positive"} <= set(fit.trainer.callback_metrics)
    checkpoint = tmp_path / "ckpt" / "best.ckpt"
    assert checkpoint.is_file()

    tested = cli(["test", "--config", str(config), "--ckpt_path", str(checkpoint)])
    metrics = tested.trainer.callback_metrics
    assert 0.0 <= float(metrics["test/acc"]) <= 1.0
    confusion = sum(float(v) for k, v in metrics.items() if k.startswith("test/confusion/"))
    assert confusion == 12  # every test example lands in exactly one cell

    predicted = cli(["predict", "--config", str(config), "--ckpt_path", str(checkpoint)])
    predictions = predicted.trainer.predict_loop.predictions
    assert sum(len(p["label"]) for p in predictions) == 12


def test_test_after_fit_tests_the_final_model_or_the_best_checkpoint(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    config = str(write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb))
    final = cli(["fit", "--config", config, "--trainer.max_epochs", "2", "--test_after_fit", "true"])
    written = json.loads((Path(final.trainer.log_dir) / "test_metrics.json").read_text())
    assert written["checkpoint"] == "final model" and written["epochs_completed"] == 2
    (in_memory,) = final.trainer.test(final.model, datamodule=final.datamodule)
    assert written["test/loss"] == in_memory["test/loss"]

    args = ["fit", "--config", config, "--trainer.max_epochs", "2", "--test_after_fit", "true", "--test_checkpoint", "best"]
    best = cli(args)
    written = json.loads((Path(best.trainer.log_dir) / "test_metrics.json").read_text())
    assert written["checkpoint"] == best.trainer.checkpoint_callback.best_model_path
    tested = cli(["test", "--config", config, "--ckpt_path", written["checkpoint"]])
    assert written["test/loss"] == float(tested.trainer.callback_metrics["test/loss"])

    with pytest.raises(ValueError, match="test_checkpoint: last"):
        cli([*args, "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"])


def test_configs_compose_later_files_win(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    base = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb)
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"model": {"lr": 0.5, "encoder": {"type": "embedding"}}}))
    result = subprocess.run(
        [sys.executable, "-m", "fedlm", "fit", "--config", str(base), "--config", str(override), "--print_config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["lr"] == 0.5
    assert printed["model"]["encoder"]["type"] == "embedding"
    assert printed["model"]["encoder"]["virtual_tokens"] == 3  # kept from the base file
    assert printed["data"]["init_args"]["batch_size"] == 8


@pytest.mark.parametrize("name", ["fpb_centralized", "fpb_federated", "fpb_local"])
def test_shipped_configs_parse(name: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedlm", "fit", "--config", f"configs/{name}.yaml", "--print_config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["template"] == "{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"
    assert printed["model"]["cache_prefix"] is True
    assert printed["data"]["class_path"] == "fedlm.data.FinancialPhraseBank"
    assert printed["test_checkpoint"] == "last"
