import json
import logging.handlers
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, printed_config, write_checkpointed_config
from lightning.pytorch.utilities.rank_zero import rank_zero_module

from fedlm.cli import cli, main
from fedlm.data import DataError
from fedlm.experiment import TriadConfig
from fedlm.experiment.runner import plan


def test_fit_test_and_predict_from_a_yaml_config(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    config = write_checkpointed_config(tmp_path, tiny_gpt2_dir, synthetic_fpb)
    fit = cli(["fit", "--config", str(config)])
    assert fit.trainer.global_step == 6
    assert {"val/acc", "val/macro_f1", "val/f1_positive", "val/confusion/neutral_as_positive"} <= set(
        fit.trainer.callback_metrics
    )
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


def test_test_after_fit_tests_the_final_model_or_the_best_checkpoint(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    config = str(write_checkpointed_config(tmp_path, tiny_gpt2_dir, synthetic_fpb))
    final = cli(["fit", "--config", config, "--trainer.max_epochs", "2", "--test_after_fit", "true"])
    written = json.loads((Path(final.trainer.log_dir) / "test_metrics.json").read_text())
    assert written["checkpoint"] == "final model" and written["epochs_completed"] == 2
    (in_memory,) = final.trainer.test(final.model, datamodule=final.datamodule)
    assert written["test/loss"] == in_memory["test/loss"]

    args = [
        "fit",
        "--config",
        config,
        "--trainer.max_epochs",
        "2",
        "--test_after_fit",
        "true",
        "--test_checkpoint",
        "best",
    ]
    best = cli(args)
    written = json.loads((Path(best.trainer.log_dir) / "test_metrics.json").read_text())
    assert written["checkpoint"] == best.trainer.checkpoint_callback.best_model_path
    tested = cli(["test", "--config", config, "--ckpt_path", written["checkpoint"]])
    assert written["test/loss"] == float(tested.trainer.callback_metrics["test/loss"])

    with pytest.raises(ValueError, match="test_checkpoint: last"):
        cli([*args, "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"])


def test_configs_compose_later_files_win(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = write_checkpointed_config(tmp_path, tiny_gpt2_dir, synthetic_fpb)
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"model": {"optimizer": {"lr": 0.5}, "encoder": {"type": "embedding"}}}))
    printed = printed_config(capsys, "fit", "--config", str(base), "--config", str(override))
    assert printed["model"]["optimizer"]["lr"] == 0.5
    assert printed["model"]["encoder"]["type"] == "embedding"
    assert printed["model"]["encoder"]["virtual_tokens"] == 3  # kept from the base file
    assert printed["data"]["init_args"]["batch_size"] == 8


@pytest.mark.parametrize("name", ["fpb_centralized", "fpb_federated", "fpb_local"])
def test_shipped_configs_parse(name: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    printed = printed_config(capsys, "fit", "--config", f"configs/{name}.yaml")
    assert printed["model"]["task"]["template"] == "{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"
    assert printed["model"]["cache"]["prefix"] is True and printed["model"]["encoder"]["deep"] is True
    assert printed["data"]["class_path"] == "fedlm.data.FinancialPhraseBank"
    assert printed["test_checkpoint"] == "last"
    shallow = printed_config(
        capsys, "fit", "--config", f"configs/{name}.yaml", "--config", "configs/layouts/shallow_cached.yaml"
    )
    assert shallow["model"]["encoder"]["deep"] is False and shallow["model"]["optimizer"]["lr"] == 0.001


def test_the_blog_protocol_gives_every_run_kind_the_same_passes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """configs/fpb_blog.yaml: 50 rounds of one local epoch, and 50 epochs for the centralized and local-only runs
    (each client's sentences seen 50 times in every kind of run), composed from the shipped configs."""
    monkeypatch.chdir(REPO)
    triad = TriadConfig(**yaml.safe_load(Path("configs/fpb_blog.yaml").read_text()))
    printed = {run.name: printed_config(capsys, *run.args) for run in plan(triad)}
    assert list(printed) == ["centralized", "federated", "local0", "local1", "local2"]
    federation = printed["federated"]["federation"]
    assert (federation["rounds"], federation["local_epochs"], federation["local_steps"]) == (50, 1.0, None)
    for name in ("centralized", "local0", "local2"):
        assert printed[name]["trainer"]["max_epochs"] == 50
    assert printed["local2"]["data"]["init_args"]["local_client"] == 2
    federated = printed["federated"]["model"]
    assert printed["centralized"]["model"] == federated | {"optimizer": federated["optimizer"] | {"warmup_steps": 513}}


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """``fedlm ARGS`` in this process, which must fail: its exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["fedlm", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


def test_fedlm_errors_print_one_line_and_exit_2(
    tiny_gpt2_dir: str,
    synthetic_fpb: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.delenv("FEDLM_TRACEBACK", raising=False)
    config = str(write_checkpointed_config(tmp_path, tiny_gpt2_dir, synthetic_fpb))
    code, err = run_main(monkeypatch, capsys, "fit", "--config", config, "--model.optimizer.warmup_steps", "-1")
    assert code == 2 and "fedlm: error: model.optimizer.warmup_steps=-1 must be >= 0.\n" in err
    assert err.splitlines()[-1] == "fedlm: (set FEDLM_TRACEBACK=1 to see the traceback)"

    code, err = run_main(
        monkeypatch, capsys, "fit", "--config", config, "--federation.clients", "2", "--federation.rounds", "0"
    )
    assert code == 2 and "fedlm: error: federation.rounds=0 must be at least 1.\n" in err

    with (synthetic_fpb / "Sentences_AllAgree.txt").open("a", encoding="latin-1") as file:
        file.write("a sentence without its label\n")
    code, err = run_main(monkeypatch, capsys, "fit", "--config", config)  # the file is read in setup, inside fit
    assert code == 2 and "no '@' between sentence and label in 'a sentence without its label'" in err

    monkeypatch.setenv("FEDLM_TRACEBACK", "1")
    with pytest.raises(DataError, match="no '@' between sentence and label"):
        main()


@pytest.mark.multiprocess
def test_a_fedlm_error_from_the_console_script_has_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    args = [sys.executable, "-m", "fedlm", "test", "--config", "configs/fpb_centralized.yaml"]
    environment = {**os.environ, "FEDLM_TRACEBACK": "0"}
    result = subprocess.run(
        [*args, "--ckpt_path", str(tmp_path / "notes.ckpt")], capture_output=True, text=True, cwd=REPO, env=environment
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-2:] == [
        f"fedlm: error: {tmp_path / 'notes.ckpt'} is not a readable checkpoint: it is damaged, truncated, or not a "
        "file that torch.save wrote. Pass a .ckpt written by fedlm fit.",
        "fedlm: (set FEDLM_TRACEBACK=1 to see the traceback)",
    ]


def test_default_root_dir_alone_moves_the_whole_run_and_lightning_shows_no_adverts(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in the shipped configs, the CSV logger's save_dir is the config's default_root_dir, and checkpoints go to the
    logger's folder: one flag moves them all, TensorBoard's files and the test outputs too. Lightning's default
    checkpoint callback is the one that would advertise litmodels."""
    path = write_checkpointed_config(tmp_path, tiny_gpt2_dir, synthetic_fpb)
    config = yaml.safe_load(path.read_text())
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "runs/tiny", "name": "logs"},
    }
    config["trainer"].update(default_root_dir="runs/tiny", logger=logger, callbacks=[])
    path.write_text(yaml.safe_dump({**config, "test_after_fit": True, "tensorboard": True}))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    lines = logging.handlers.BufferingHandler(capacity=10_000)  # what Lightning's rank_zero_info lets through
    rank_zero_module.log.addHandler(lines)
    try:
        cli(["fit", "--config", str(path), "--trainer.default_root_dir", "moved"])
    finally:
        rank_zero_module.log.removeHandler(lines)

    assert [p.name for p in cwd.iterdir()] == ["moved"]
    assert sorted(p.name for p in (cwd / "moved").iterdir()) == ["logs", "tensorboard"]
    version = cwd / "moved" / "logs" / "version_0"
    assert {"config.yaml", "metrics.csv", "test_metrics.json", "checkpoints"} <= {p.name for p in version.iterdir()}
    assert [p.name for p in (version / "checkpoints").iterdir()] == ["epoch=0-step=6.ckpt"]
    assert (
        yaml.safe_load((version / "config.yaml").read_text())["trainer"]["logger"]["init_args"]["save_dir"] == "moved"
    )
    messages = [record.getMessage() for record in lines.buffer]
    assert any(message.startswith("GPU available") for message in messages)
    assert not [message for message in messages if "Tip" in message or "litmodels" in message]
