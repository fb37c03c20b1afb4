"""Generative tasks end to end: records from JSONL, a federated fit that validates by the teacher-forced loss and
generates at test, its per-example outputs, and ``fedlm predict`` on the export printing the test step's text; the
metrics' rules (the best over several references, SQuAD normalization) and the generated-label mapping."""

import json
from pathlib import Path

import pytest
from helpers import FEDERATION, predicted, write_yaml

from fedlm.cli import cli
from fedlm.cli.export import export_main
from fedlm.tasks.classification import label_named
from fedlm.tasks.generation import example_scores

WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano", "candle", "garden", "rocket", "lemon"]
TEMPLATE = "Word: {word} <|VIRTUAL_PROMPT_0|> Opposite of nothing:{answer}"


def write_records(folder: Path) -> dict[str, str]:
    """Tiny closed-QA files: the answer is the word itself, and either spelling in upper case is accepted too."""
    files = {}
    for split, words in (("train", WORDS * 2), ("val", WORDS[:4]), ("test", WORDS[4:9])):
        rows = [{"word": w, "answer": f" {w}", "answers": [w, w.upper()]} for w in words]
        files[split] = str(folder / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


def generative_config(folder: Path, backbone: str) -> Path:
    files = write_records(folder)
    config = {
        "seed_everything": 7,
        "test_after_fit": True,
        "trainer": {
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(folder),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(folder), "name": "logs"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"filename": "last", "dirpath": str(folder / "ckpt")},
                }
            ],
        },
        "model": {
            "backbone": backbone,
            "task": {
                "kind": "generation",
                "template": TEMPLATE,
                "references_field": "answers",
                "metrics": ["squad", "rouge", "chrf"],
                "generate_every": 2,
                "generate_examples": 3,
                "decoding": {"max_new_tokens": 4},
            },
            "cache": {"prefix": True},
            "encoder": {"type": "mlp", "virtual_tokens": 3, "hidden_size": 8, "deep": True, "init_text": "Repeat"},
            "optimizer": {"lr": 0.05},
        },  # fmt: skip
        "data": {
            "class_path": "fedlm.data.RecordFiles",
            "init_args": {
                "train_file": files["train"],
                "val_file": files["val"],
                "test_file": files["test"],
                "batch_size": 4,
                "label_field": None,
            },
        },  # fmt: skip
        "federation": {**FEDERATION, "rounds": 2},
    }
    return write_yaml(folder / "run.yaml", config)


def test_a_generative_fit_tests_by_generation_and_predict_prints_its_text(tiny_gpt2_dir: str, tmp_path: Path) -> None:
    cli(["fit", "--config", str(generative_config(tmp_path, tiny_gpt2_dir))])
    folder = tmp_path / "logs" / "version_0"
    metrics = json.loads((folder / "test_metrics.json").read_text())
    assert metrics["task"] == "generation" and metrics["kind"] == "federated"
    assert {"test/exact_match", "test/f1", "test/rougeL", "test/chrf", "test/loss"} <= set(metrics)
    examples = json.loads((folder / "test_predictions.json").read_text())["examples"]
    assert [e["index"] for e in examples] == list(range(5))
    assert examples[0]["references"] == [WORDS[4], WORDS[4].upper()]
    assert metrics["test/f1"] == pytest.approx(sum(e["f1"] for e in examples) / 5)
    logged = (folder / "metrics.csv").read_text().splitlines()[0]
    assert "val/generated/exact_match" in logged and "val/loss" in logged  # round 2 generated on validation

    export_main([str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "export")])
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"word": w}) + "\n" for w in WORDS[4:9]))
    rows = predicted(tmp_path / "export", inputs, tmp_path)
    assert [row["generated"] for row in rows] == [e["generated"] for e in examples]
    plain = tmp_path / "plain.txt"  # a one-field template also takes plain lines
    plain.write_text("\n".join(WORDS[4:9]) + "\n")
    assert [row["generated"] for row in predicted(tmp_path / "export", plain, tmp_path)] == [
        e["generated"] for e in examples
    ]


def test_scores_take_the_best_reference_after_squad_normalization() -> None:
    scores = example_scores("The Tiger!", ["lion", "tiger"], ["squad", "rouge"])
    assert scores == {"exact_match": 1.0, "f1": 1.0, "rougeL": pytest.approx(2 / 3)}  # "the" counts for ROUGE
    partial = example_scores("big red tiger", ["red tiger cub"], ["squad"])
    assert partial["exact_match"] == 0.0 and partial["f1"] == pytest.approx(2 / 3)


def test_generated_text_maps_to_the_label_it_names_first() -> None:
    words = ["negative", "neutral", "positive"]
    assert label_named(" Positive, not negative", words) == 2
    assert label_named("negative outlook; positive later", words) == 0
    assert label_named("no idea", words) == -1
