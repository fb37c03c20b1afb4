"""What more than one test file uses: the paths, the tiny run configs, the worker launches and the in-process builders.

Plain functions and constants, imported as ``from helpers import ...`` (tests/ is on ``sys.path``, as for conftest);
the fixtures stay in conftest.py.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoTokenizer

from fedlm.cli import cli
from fedlm.cli.predict import predict_main
from fedlm.cli.split_data import split_data_main
from fedlm.federation import ServerConfig, ServerOptimizer
from fedlm.ptuning import PTuningModule

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# -- run configs --------------------------------------------------------------------------------------------------

FEDERATION = {"clients": 2, "rounds": 3, "local_steps": 3, "weighting": "samples", "seed": 5}
# deep slots after the cached sentence: the prefix cache fills, and the slots reach every layer
DEEP_CACHED = {"task": {"template": "{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"}, "cache": {"prefix": True},
               "encoder": {"type": "mlp", "virtual_tokens": 3, "hidden_size": 8, "deep": True,
                           "init_text": "Classify the sentiment"}}  # fmt: skip
# model options the tests name flat, and the section of model: each belongs to
SECTIONS = {"template": ("task", "template"), "label_words": ("task", "label_words"), "loss": ("task", "loss"),
            "max_length": ("task", "max_length"), "calibrate": ("task", "calibrate"),
            "cache_prefix": ("cache", "prefix"), "cache_dtype": ("cache", "dtype"), "cache_dir": ("cache", "dir"),
            "cache_budget_mb": ("cache", "budget_mb"), "lr": ("optimizer", "lr"),
            "weight_decay": ("optimizer", "weight_decay"), "warmup_steps": ("optimizer", "warmup_steps"),
            "lr_schedule": ("optimizer", "lr_schedule"),
            "final_lr_fraction": ("optimizer", "final_lr_fraction")}  # fmt: skip


def sectioned(model: dict) -> dict:
    """``model`` options with the flat names moved into their sections (``lr`` -> ``optimizer.lr``), sections merged."""
    out: dict = {}
    for key, value in model.items():
        section, name = SECTIONS.get(key, (None, key))
        if section is None and isinstance(value, dict) and key in ("task", "cache", "optimizer"):
            out[key] = {**out.get(key, {}), **value}
        elif section is None:
            out[key] = value
        else:
            out[section] = {**out.get(section, {}), name: value}
    return out


def write_yaml(path: Path, config: dict) -> Path:
    """``config`` saved as the YAML that ``--config`` reads; the path, to pass on."""
    path.write_text(yaml.safe_dump(config))
    return path


def write_config(tmp_path: Path, backbone: str, fpb: Path, federation: dict | None, **trainer) -> Path:
    """A tiny quiet run (no logger, no checkpoints, one validation batch), federated unless ``federation`` is None."""
    config = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "enable_checkpointing": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 1,
            "default_root_dir": str(tmp_path),
            **trainer,
        },
        "model": {
            "backbone": backbone,
            "encoder": {"type": "mlp", "virtual_tokens": 3, "hidden_size": 8},
            "optimizer": {"lr": 0.05},
        },  # fmt: skip
        "data": {"class_path": "fedlm.data.FinancialPhraseBank", "init_args": {"path": str(fpb), "batch_size": 4}},
        "federation": federation,
    }
    return write_yaml(tmp_path / "run.yaml", config)


def write_checkpointed_config(tmp_path: Path, backbone: str, fpb: Path) -> Path:
    """A tiny one-process fit that leaves what a real one does: CSV logs and the best checkpoint, ckpt/best.ckpt."""
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
                    "init_args": {
                        "dirpath": str(tmp_path / "ckpt"),
                        "filename": "best",
                        "monitor": "val/acc",
                        "mode": "max",
                    },
                }
            ],
        },
        "model": {
            "backbone": backbone,
            "encoder": {"type": "lstm", "virtual_tokens": 3, "hidden_size": 8},
            "optimizer": {"lr": 0.01},
        },  # fmt: skip
        "data": {"class_path": "fedlm.data.FinancialPhraseBank", "init_args": {"path": str(fpb), "batch_size": 8}},
    }
    return write_yaml(tmp_path / "tiny.yaml", config)


def with_data(config: Path, **init_args: object) -> Path:
    """``config`` with its data section's ``init_args`` updated (``path`` left out unless given)."""
    raw = yaml.safe_load(config.read_text())
    raw["data"]["init_args"] = {**raw["data"]["init_args"], "path": None, **init_args}
    return write_yaml(config, raw)


# -- launching the worker scripts ---------------------------------------------------------------------------------


def torchrun(nproc: int, *options: str) -> list[str]:
    """The command that starts ``nproc`` ranks on this machine (standalone rendezvous), before the script."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *options]


def launcher_for(nproc: int) -> list[str]:
    """torchrun for several ranks, a plain process for one: the way each of fedlm's two paths is started."""
    return torchrun(nproc) if nproc > 1 else [sys.executable]


def worker_env(**extra: str) -> dict[str, str]:
    """A worker's environment: the worker scripts and fedlm importable, one thread per rank so ranks share the cores."""
    return {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1", **extra}


def run_ranks(tmp_path: Path, config: Path, nproc: int, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``fedlm fit`` on ``nproc`` ranks of tests/federated_worker.py, to its end; what each rank recorded if it ran."""
    out = tmp_path / f"out-{nproc}"
    out.mkdir(exist_ok=True)
    result = subprocess.run(
        [*launcher_for(nproc), str(TESTS / "federated_worker.py"), str(out), "fit", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=600,
    )
    records = [torch.load(out / f"rank{r}.pt") for r in range(nproc)] if result.returncode == 0 else []
    return result, records


def start_worker(
    worker: str, out: Path, config: Path, launcher: list[str], *extra: str, env: dict | None = None
) -> subprocess.Popen:
    """tests/``worker`` running ``fedlm fit`` as ``launcher`` starts it, writing into ``out``; left running to watch."""
    out.mkdir(parents=True, exist_ok=True)
    command = [*launcher, str(TESTS / worker), str(out), "fit", "--config", str(config), *extra]
    environment = worker_env(**(env or {}))
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)


# -- what the ranks recorded --------------------------------------------------------------------------------------


def replay(
    records: list[dict], server: ServerConfig, sampled_each_round: int, shared: torch.Tensor | None = None
) -> None:
    """Every rank ends each round with the same encoder: the server step on the renormalized average of the
    round's sampled clients only (of their ``shared`` part, by default all of it)."""
    shared = torch.ones_like(records[0]["initial"], dtype=torch.bool) if shared is None else shared
    optimizer, x = ServerOptimizer(server), records[0]["initial"][shared]
    for round_index in range(len(records[0]["rounds"])):
        rounds = [r["rounds"][round_index] for r in records]
        for other in rounds[1:]:
            assert torch.equal(other["global"], rounds[0]["global"])
        clients = {k: v for r in rounds for k, v in r["client_params"].items()}
        weights = {k: w for r in rounds for k, w in r["weights"].items()}
        assert len(clients) == sampled_each_round
        total = sum(weights[k] for k in clients)
        normalized = {k: weights[k] / total for k in clients}
        assert math.isclose(sum(normalized.values()), 1.0)
        average = sum(normalized[k] * clients[k][shared].double() for k in clients)
        x = optimizer.step(x, average)
        torch.testing.assert_close(rounds[0]["global"][shared], x, rtol=0, atol=1e-6)


# -- data locality: split files, site folders, what a rank opened -------------------------------------------------


def split_data(fpb: Path, out: Path, *args: str) -> Path:
    """``fedlm split-data`` for 2 clients, in this process; returns the folder it wrote."""
    split_data_main(["--out", str(out), "--path", str(fpb), "--clients", "2", *args])
    return out


def site_layout(split: Path, folder: Path, client: int) -> Path:
    """What a site holds: its own training file and the shared evaluation files, copied into ``folder``."""
    folder.mkdir(parents=True)
    for name in (f"site{client}.txt", "val.txt", "test.txt"):
        shutil.copyfile(split / name, folder / name)
    return folder


def opened_by(out: Path, rank: int) -> list[Path]:
    """What tests/audited_worker.py saw ``rank`` open, resolved."""
    return [Path(p).resolve() for p in json.loads((out / f"opened-rank{rank}.json").read_text())]


def assert_opened_only_its_own(opened: list[Path], own: list[Path], forbidden: list[Path]) -> None:
    """It read its own data files and touched nothing under the ``forbidden`` files and folders."""
    missing = [str(file) for file in own if file.resolve() not in opened]
    assert not missing, f"did not open its own data {missing} (the audit saw nothing?)"
    seen = [str(p) for p in opened for f in forbidden if p.is_relative_to(f.resolve())]
    assert not seen, f"opened data it must not hold: {seen}"


# -- in-process modules, trainers and batches ---------------------------------------------------------------------

SENTENCES = [("profit rose in the quarter .", "positive"), ("loss widened this year .", "negative")]


def tiny_module(backbone: str, **kwargs) -> PTuningModule:
    """A seeded module with a small MLP encoder (or ``encoder``) on ``backbone``."""
    torch.manual_seed(0)
    encoder = kwargs.pop("encoder", {"type": "mlp", "virtual_tokens": 3, "hidden_size": 16})
    return PTuningModule(backbone=backbone, encoder=encoder, **sectioned({"lr": 1e-2, **kwargs}))


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    """A quiet CPU trainer (no logger, checkpoints, bars or sanity steps): four steps unless ``kwargs`` say else."""
    defaults = dict(
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    return L.Trainer(**{**defaults, **kwargs})


def batch_of(module: PTuningModule, sentences: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """``sentences`` encoded and collated by ``module``'s template, as the datamodule would batch them."""
    task = module.task
    return task.template.collate([task.encode({"sentence": s, "label": label}) for s, label in sentences])


def single_token_words(module: PTuningModule) -> dict[str, str]:
    """Three label words that the tiny tokenizer keeps as one token each."""
    words = []
    for token_id in range(len(module.tokenizer)):
        text = module.tokenizer.decode([token_id])
        if text.startswith(" ") and module.tokenizer(text, add_special_tokens=False).input_ids == [token_id]:
            words.append(text)
    return dict(zip(["negative", "neutral", "positive"], words[:3]))


# -- predictions and checkpoints ----------------------------------------------------------------------------------


def predicted(source: Path, headlines: Path, tmp_path: Path, *options: str) -> list[dict]:
    """The rows ``fedlm predict`` writes for ``headlines`` from ``source`` (a checkpoint or an export)."""
    out = tmp_path / "predictions.jsonl"
    predict_main([str(source), str(headlines), "--out", str(out), *options])
    return [json.loads(line) for line in out.read_text().splitlines()]


def probabilities(rows: list[dict]) -> torch.Tensor:
    """The label probabilities of ``predicted`` rows, one row a sentence."""
    return torch.tensor([list(row["probs"].values()) for row in rows])


def peft_probabilities(
    model: PeftModel, tokenizer: AutoTokenizer, label_words: dict[str, str], sentences: list[str]
) -> torch.Tensor:
    """Label-word probabilities of ``sentences`` by PEFT alone: the text after the template's virtual tokens,
    tokenized as one piece as fedlm does, then each label word's tokens, whose log-probabilities add up to the
    word's."""
    answers = [tokenizer(word, add_special_tokens=False).input_ids for word in label_words.values()]
    assert max(len(answer) for answer in answers) > 1  # the tiny tokenizer splits some label words
    rows = []
    with torch.inference_mode():
        for sentence in sentences:
            prompt = tokenizer(f" {sentence} sentiment:", add_special_tokens=False).input_ids
            scores = []
            for answer in answers:
                logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
                log_probs = logits[-len(answer) - 1 : -1].log_softmax(-1)
                scores.append(log_probs[torch.arange(len(answer)), answer].sum())
            rows.append(torch.stack(scores).softmax(-1))
    return torch.stack(rows)


class Payload:
    """Unpickling this creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def printed_config(capsys: pytest.CaptureFixture[str], *fedlm_args: str) -> dict:
    """The config ``fedlm ARGS`` would run with: ``--print_config`` parsed by LightningCLI in this process, without a
    subprocess's start-up cost."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli([*fedlm_args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


class LrRecorder(L.Callback):
    """The lr of every optimizer step, as the step sees it (after FederatedLoop has swapped the client in)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:  # noqa: ANN001
        self.lrs.append(optimizer.param_groups[0]["lr"])
