"""Tracking: what an offline W&B run and TensorBoard receive from a federated fit, and the round progress bar."""

import time
from pathlib import Path

import pytest
import wandb
from helpers import REPO, write_config
from wandb_records import OfflineRun, read_offline_run, records

from fedlm.cli import cli
from fedlm.cli.tracking import save_confusion_png
from fedlm.experiment.runner import PlannedRun, command, log_report_to_wandb
from fedlm.wandb_mode import has_wandb_credentials

FEDERATION = {"clients": 2, "rounds": 2, "local_steps": 2, "seed": 3}
RUN = ["--seed_everything", "11", "--test_after_fit", "true"]  # a seed the run's W&B name must carry; then a test


def federated_config(tmp_path: Path, backbone: str, fpb: Path, **trainer) -> Path:
    """``write_config``'s tiny run, with CSV logs: the logger every other one joins."""
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(tmp_path), "name": "logs"},
    }
    return write_config(tmp_path, backbone, fpb, FEDERATION, logger=logger, **trainer)


def finished_offline_run(folder: Path, timeout_s: float = 60.0) -> OfflineRun:
    """``read_offline_run`` once W&B's writer has finished the file: ``wandb.finish()`` can return before the run's
    records reach the disk (under load the file was still its bare header), so wait for the run's exit record."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        paths = list(folder.rglob("offline-run-*/run-*.wandb"))
        try:
            if len(paths) == 1 and any(r.WhichOneof("record_type") == "exit" for r in records(paths[0])):
                break
        except Exception:  # a record cut off mid-write: read again
            pass
        time.sleep(0.1)
    return read_offline_run(folder)


@pytest.fixture()
def no_wandb_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_credentials_decide_offline(
    no_wandb_credentials: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not has_wandb_credentials()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789\n")
    (tmp_path / "home" / ".netrc").chmod(0o600)  # netrc refuses a password file others can read
    assert has_wandb_credentials()
    (tmp_path / "home" / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789")
    assert has_wandb_credentials()


def test_an_offline_wandb_run_holds_config_round_and_client_metrics_and_the_confusion_matrix(
    no_wandb_credentials: None, tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    config = federated_config(tmp_path, tiny_gpt2_dir, synthetic_fpb)
    try:
        run = cli(["fit", "--config", str(config), "--config", str(REPO / "configs/loggers/wandb.yaml"), *RUN])
    finally:
        wandb.finish()
    log_dir = Path(run.trainer.log_dir)
    assert log_dir == tmp_path / "logs" / "version_0"  # the CSV logger stays first: the run's folder is unchanged
    assert (log_dir / "metrics.csv").is_file() and (log_dir / "test_confusion.png").stat().st_size > 1000

    stored = finished_offline_run(tmp_path / "wandb")  # offline: no credentials, and nothing was sent anywhere
    assert (stored.group, stored.job_type, stored.name) == ("federated", "federated", "federated-seed11")
    assert set(stored.tags) == {"federated", "seed11"}
    # the whole resolved config, not only the module's hyperparameters
    assert stored.config["federation"]["clients"] == 2 and stored.config["federation"]["local_steps"] == 2
    assert stored.config["data"]["init_args"]["batch_size"] == 4
    assert stored.config["run_kind"] == "federated" and stored.config["seed"] == 11
    assert stored.logged("round") == [1, 2]
    for client in (0, 1):
        assert len(stored.logged(f"client{client}/train_loss")) == 2
        assert stored.logged(f"client{client}/samples") == [48, 48]  # its half of the 96 training sentences
        assert stored.logged(f"client{client}/bytes")[0] > 0
    assert len(stored.logged("val/acc")) == 2 and len(stored.logged("test/acc")) == 1
    # W&B's confusion-matrix chart reads a table of 3 x 3 (true, predicted, count) cells
    assert stored.logged("test/confusion_matrix_table/_type") == ["table-file"]
    assert stored.logged("test/confusion_matrix_table/nrows") == [9]
    assert stored.logged("test/confusion_png/_type") == ["image-file"]


def test_tensorboard_logs_beside_csv(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    config = federated_config(tmp_path, tiny_gpt2_dir, synthetic_fpb)
    run = cli(["fit", "--config", str(config), "--config", str(REPO / "configs/loggers/tensorboard.yaml"), *RUN])
    assert Path(run.trainer.log_dir) == tmp_path / "logs" / "version_0"
    # fit, test and figure each close their own file (reopened writers used to replace each other's files, named by
    # the second, when a phase took under a second, as here)
    files = sorted((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(files) == 3
    content = b"".join(events.read_bytes() for events in files)
    for tag in (b"client1/train_loss", b"val/acc", b"test/confusion_png", b"federation"):
        assert tag in content, tag


def test_the_progress_bar_spans_all_rounds_and_names_client_and_step(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = federated_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, enable_progress_bar=True)
    cli(["fit", "--config", str(config)])
    out = capsys.readouterr().out
    assert "round 2/2" in out and "8/8" in out  # 2 rounds x (2 clients x 2 local steps) on one bar
    assert "client=0, step=1/2" in out and "client=1, step=2/2" in out


def test_an_experiment_logs_each_run_and_the_report_plots_to_wandb(no_wandb_credentials: None, tmp_path: Path) -> None:
    run = PlannedRun("federated", 1234, ["fit", "--config", "configs/fpb_federated.yaml"])
    argv = command(run, tmp_path / "seed1234" / "federated", [], wandb_project="fpb")
    assert argv[argv.index("--wandb.project") + 1] == "fpb"  # beside the CSV logger that the report reads

    report = tmp_path / "triad" / "report"
    report.mkdir(parents=True)
    save_confusion_png([0, 1, 2, 1], [0, 1, 1, 1], ["a", "b", "c"], report / "confusion_matrices.png", "test")
    (report / "README.md").write_text("# report\n")
    log_report_to_wandb(report / "README.md", "fpb")
    stored = finished_offline_run(report)
    assert (stored.job_type, stored.group, stored.name) == ("report", "report", "report-triad")
    assert stored.logged("report/confusion_matrices/_type") == ["image-file"]
