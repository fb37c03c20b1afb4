"""``fedlm export`` and ``fedlm predict``: the virtual-token table alone predicts what the trained module predicts,
in fedlm and through PEFT."""

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, synthetic_sentences, train_tokenizer, write_synthetic_fpb
from helpers import REPO, Payload, peft_probabilities, predicted, probabilities, write_checkpointed_config
from peft import PeftModel
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlm.checkpointing import UnsafeCheckpointError
from fedlm.cli import cli, main
from fedlm.cli.export import export_main, run_checkpoint
from fedlm.cli.predict import predict_main
from fedlm.model.template import FPB_TEMPLATE, PromptTemplate
from fedlm.ptuning import CheckpointMismatchError, PTuningModule
from fedlm.ptuning.export import PeftLayoutError, PromptFormatError, TrainedPrompt, peft_mismatch

MID_TEMPLATE = "{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"  # the shipped configs'
SENTENCES = [sentence for sentence, _ in synthetic_sentences(9, seed=3)]


def fit(backbone: str, folder: Path, *overrides: str) -> Path:
    """A few real training steps of ``write_checkpointed_config``'s tiny LSTM run with the module's default template
    (the prefix layout); the checkpoint's path."""
    config = write_checkpointed_config(folder, backbone, write_synthetic_fpb(folder))
    cli(["fit", "--config", str(config), "--trainer.limit_train_batches", "3", *overrides])
    return folder / "ckpt" / "best.ckpt"


@pytest.fixture(scope="module")
def checkpoint(tiny_gpt2_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An LSTM encoder: its output, the table, is far from its input table."""
    return fit(tiny_gpt2_dir, tmp_path_factory.mktemp("lstm"))


@pytest.fixture(scope="module")
def embedding_checkpoint(tiny_gpt2_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain prompt tuning: rows as different from each other as the LM's own token embeddings (an LSTM's are
    nearly alike in a tiny random model), so that a table exported in the wrong row order would show."""
    folder = tmp_path_factory.mktemp("embedding")
    return fit(tiny_gpt2_dir, folder, "--model.encoder.type", "embedding", "--model.optimizer.lr", "0.005")


@pytest.fixture(scope="module")
def mid_checkpoint(checkpoint: Path) -> Path:
    """The same prompt under the shipped configs' template (text first, prefix cache on)."""
    saved = torch.load(checkpoint, weights_only=True)
    saved["hyper_parameters"]["task"]["template"] = MID_TEMPLATE
    saved["hyper_parameters"]["cache"]["prefix"] = True
    path = checkpoint.with_name("mid.ckpt")
    torch.save(saved, path)
    return path


@pytest.fixture()
def headlines(tmp_path: Path) -> Path:
    path = tmp_path / "headlines.txt"
    path.write_text("\n".join([*SENTENCES[:4], "", "   ", *SENTENCES[4:]]) + "\n")
    return path


@pytest.mark.parametrize("name", ["checkpoint", "mid_checkpoint"])
def test_the_table_alone_predicts_what_the_trained_module_predicts(
    name: str, request: pytest.FixtureRequest, headlines: Path, tmp_path: Path
) -> None:
    path = request.getfixturevalue(name)
    rows = predicted(path, headlines, tmp_path)
    assert [row["input"] for row in rows] == SENTENCES  # blank lines skipped
    assert [row["line"] for row in rows] == [1, 2, 3, 4, *range(7, 12)]

    trained = PTuningModule.load_from_checkpoint(path).eval()  # its LSTM encoder; mid: with the prefix cache
    assert trained.task.config.template == (MID_TEMPLATE if name == "mid_checkpoint" else FPB_TEMPLATE)
    assert (trained.prefix_cache is not None) == (name == "mid_checkpoint")
    assert not torch.allclose(trained.encoder.inference_table, trained.encoder.input_table)
    task = trained.task
    batch = task.template.collate([task.encode({"sentence": sentence, "label": "neutral"}) for sentence in SENTENCES])
    with torch.inference_mode():
        expected = task.loss_and_scores(trained.lm, batch)[1].softmax(-1)
    torch.testing.assert_close(probabilities(rows), expected, atol=1e-6, rtol=0)
    assert [row["label"] for row in rows] == [task.label_names[i] for i in expected.argmax(-1).tolist()]


def test_peft_adapter_predicts_what_fedlm_predicts(
    embedding_checkpoint: Path, tiny_gpt2_dir: str, headlines: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "export"
    export_main([str(embedding_checkpoint), "--out", str(out), "--peft", "require"])
    assert "PEFT adapter:" in capsys.readouterr().out
    rows = predicted(out, headlines, tmp_path)
    assert rows == predicted(embedding_checkpoint, headlines, tmp_path)

    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    model = PeftModel.from_pretrained(base, out / "peft").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    label_words = json.loads((out / "prompt.json").read_text())["task"]["label_words"]
    through_peft, through_fedlm = peft_probabilities(model, tokenizer, label_words, SENTENCES), probabilities(rows)
    difference = (through_peft - through_fedlm).abs().max()
    print(f"PEFT vs fedlm predict: max abs difference of probabilities {difference:.1e}")
    torch.testing.assert_close(through_peft, through_fedlm, atol=1e-5, rtol=0)
    # A tiny random LM puts most mass on one label whatever the prompt, so the logs of the small probabilities are
    # what shows a wrong prompt: the same rows in another order move them by 2e-3.
    assert (through_peft.log() - through_fedlm.log()).abs().max() < 1e-4
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(model.prompt_encoder["default"].embedding.weight.flip(0))
    assert (peft_probabilities(model, tokenizer, label_words, SENTENCES).log() - through_fedlm.log()).abs().max() > 1e-3


def test_a_text_first_template_exports_the_table_but_no_peft_adapter(
    checkpoint: Path, mid_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "export"
    export_main([str(checkpoint), "--out", str(out)])
    assert (out / "peft" / "adapter_config.json").is_file()
    export_main([str(mid_checkpoint), "--out", str(out), "--force"])
    printed = capsys.readouterr().out
    assert "no PEFT adapter written: the template does not start with its only block" in printed
    assert (
        "--model.task.template '<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}' --model.cache.prefix false"
        in printed
    )
    assert sorted(p.name for p in out.iterdir()) == ["prompt.json", "prompt.safetensors"]  # the stale adapter is gone
    settings = json.loads((out / "prompt.json").read_text())
    assert settings["task"]["template"] == MID_TEMPLATE and settings["virtual_tokens"] == 3
    with pytest.raises(PeftLayoutError, match="--peft require"):
        export_main([str(mid_checkpoint), "--out", str(tmp_path / "strict"), "--peft", "require"])


def test_stdin_tsv_and_batch_sizes(
    checkpoint: Path, headlines: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr("fedlm.cli.predict.PROGRESS_AFTER", 4)  # batches: longer inputs show a progress bar
    reference = predicted(checkpoint, headlines, tmp_path, "--batch-size", "1")
    assert re.search(r"\| 9/9 \[.*input/s", capsys.readouterr().err)  # 9 batches: the bar, on stderr
    in_sevens = predicted(checkpoint, headlines, tmp_path, "--batch-size", "7")
    assert "9/9" not in capsys.readouterr().err  # 2 batches: none
    torch.testing.assert_close(probabilities(in_sevens), probabilities(reference))  # batched by length, in order
    in_bf16 = predicted(checkpoint, headlines, tmp_path, "--batch-size", "7", "--dtype", "bf16")
    assert [row["input"] for row in in_bf16] == SENTENCES
    torch.testing.assert_close(probabilities(in_bf16), probabilities(reference), atol=0.05, rtol=0)

    monkeypatch.setattr(sys, "stdin", io.StringIO(headlines.read_text()))
    predict_main([str(checkpoint)])
    header, *lines = capsys.readouterr().out.splitlines()
    assert header == "label\tnegative\tneutral\tpositive\tinput"
    cells = [line.split("\t") for line in lines]
    assert [row[0] for row in cells] == [row["label"] for row in reference]
    assert [row[4] for row in cells] == SENTENCES
    printed = torch.tensor([[float(p) for p in row[1:4]] for row in cells])
    torch.testing.assert_close(printed, probabilities(reference), atol=1e-4, rtol=0)  # printed with 4 decimals


def test_json_object_lines_predict_what_their_text_predicts(
    checkpoint: Path, headlines: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    records = [json.dumps({"sentence": sentence}) for sentence in SENTENCES]
    inputs = tmp_path / "headlines.jsonl"
    inputs.write_text("\n".join([*records[:4], "", *records[4:]]) + "\n")
    rows = predicted(checkpoint, inputs, tmp_path)
    assert [row["input"] for row in rows] == records and [row["line"] for row in rows] == [1, 2, 3, 4, *range(6, 11)]
    reference = predicted(checkpoint, headlines, tmp_path)
    assert [row["label"] for row in rows] == [row["label"] for row in reference]
    torch.testing.assert_close(probabilities(rows), probabilities(reference), atol=0, rtol=0)

    inputs.write_text(f"{records[0]}\n{json.dumps({'text': SENTENCES[1]})}\n")
    with pytest.raises(SystemExit):
        predict_main([str(checkpoint), str(inputs)])
    assert "INPUT line 2: no field 'sentence'" in capsys.readouterr().err
    inputs.write_text('{"sentence": "unterminated\n')
    with pytest.raises(SystemExit):
        predict_main([str(checkpoint), str(inputs)])
    assert "INPUT line 1: not valid JSON" in capsys.readouterr().err


def test_a_prompt_exported_before_the_task_section_predicts_the_same(
    checkpoint: Path, headlines: Path, tmp_path: Path
) -> None:
    """A version 2 folder (template, label words and max_length at the top), as the last version before the task
    section exported it: what an older checkpoint's users are told to make."""
    export_main([str(checkpoint), "--out", str(tmp_path / "export")])
    settings = json.loads((tmp_path / "export" / "prompt.json").read_text())
    task = settings.pop("task")
    settings.update(version=2, template=task["template"], label_words=task["label_words"], max_length=512)
    (tmp_path / "export" / "prompt.json").write_text(json.dumps(settings))
    old = TrainedPrompt.load(tmp_path / "export")
    assert old.task == {"template": FPB_TEMPLATE, "label_words": task["label_words"], "max_length": 512}
    assert predicted(tmp_path / "export", headlines, tmp_path) == predicted(checkpoint, headlines, tmp_path)


def test_backbone_override_finds_moved_files_and_refuses_another_model(
    checkpoint: Path, tiny_gpt2_dir: str, headlines: Path, tmp_path: Path
) -> None:
    moved = shutil.copytree(tiny_gpt2_dir, tmp_path / "moved")
    where_trained = predicted(checkpoint, headlines, tmp_path)
    assert predicted(checkpoint, headlines, tmp_path, "--backbone", str(moved)) == where_trained
    llama = build_tiny("llama", tmp_path / "llama")  # the same tokenizer and hidden size, another model
    with pytest.raises(CheckpointMismatchError, match="another model .* Pass --backbone"):
        predict_main([str(checkpoint), str(headlines), "--backbone", str(llama)])


def test_unsafe_foreign_and_incomplete_inputs_are_refused(
    checkpoint: Path, headlines: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "evil": Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError):
        export_main([str(tmp_path / "evil.ckpt"), "--out", str(tmp_path / "export")])
    with pytest.raises(UnsafeCheckpointError):
        predict_main([str(tmp_path / "evil.ckpt"), str(headlines)])
    assert not marker.exists()

    torch.save({"state_dict": {"weight": torch.zeros(2)}, "hyper_parameters": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(PromptFormatError, match="foreign.ckpt is not a fedlm checkpoint"):
        export_main([str(tmp_path / "foreign.ckpt"), "--out", str(tmp_path / "export")])

    export_main([str(checkpoint), "--out", str(tmp_path / "export")])
    settings = json.loads((tmp_path / "export" / "prompt.json").read_text())
    del settings["task"]["label_words"]
    (tmp_path / "export" / "prompt.json").write_text(json.dumps(settings))
    with pytest.raises(PromptFormatError, match=r"lacks \['task.label_words'\]; re-export"):
        predict_main([str(tmp_path / "export"), str(headlines)])

    with pytest.raises(SystemExit):
        export_main([str(checkpoint), "--out", str(tmp_path / "export")])
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_main([str(tmp_path / "missing.ckpt"), str(headlines)])
    assert "SOURCE" in capsys.readouterr().err


def test_export_of_a_run_folder_takes_its_latest_version_with_a_checkpoint(
    checkpoint: Path,
    embedding_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    run = tmp_path / "runs" / "x"
    logs = run / "logs"
    saved = {9: {"best.ckpt": embedding_checkpoint}, 10: {"best.ckpt": embedding_checkpoint, "last.ckpt": checkpoint}}
    for version in (0, 9, 10, 11):  # 0 and 11: runs that failed before their first checkpoint
        (logs / f"version_{version}" / "checkpoints").mkdir(parents=True)
        for name, source in saved.get(version, {}).items():
            shutil.copy(source, logs / f"version_{version}" / "checkpoints" / name)
    latest = logs / "version_10" / "checkpoints" / "last.ckpt"
    assert run_checkpoint(run) == run_checkpoint(logs) == run_checkpoint(logs / "version_10") == latest
    assert run_checkpoint(logs / "version_9") == logs / "version_9" / "checkpoints" / "best.ckpt"

    export_main([str(run), "--out", str(tmp_path / "export")])
    assert f"exporting {latest}, the latest version's with a checkpoint" in capsys.readouterr().out
    exported, trained = TrainedPrompt.load(tmp_path / "export"), TrainedPrompt.load(checkpoint)
    torch.testing.assert_close(exported.table, trained.table, atol=0, rtol=0)

    monkeypatch.setattr(sys, "argv", ["fedlm", "export", str(logs / "version_11"), "--out", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"fedlm: error: {logs / 'version_11'}: no version_N/checkpoints/*.ckpt in it or one folder down (1 " in err


@pytest.mark.multiprocess
def test_python_m_fedlm_predict_pipes_stdin_to_stdout(checkpoint: Path, headlines: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedlm", "predict", str(checkpoint), "-", "--format", "jsonl"],
        input=headlines.read_text(),
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["input"] for row in rows] == SENTENCES


def test_peft_is_written_only_for_one_virtual_block_first_and_no_special_prefix() -> None:
    tokenizer = train_tokenizer()
    assert peft_mismatch(PromptTemplate(FPB_TEMPLATE, tokenizer, 3)) is None
    two_blocks = "<|VIRTUAL_PROMPT_0|> {sentence} <|VIRTUAL_PROMPT_1|> sentiment:{label}"
    for template, blocks in [(MID_TEMPLATE, 3), (two_blocks, [2, 1])]:
        reason = peft_mismatch(PromptTemplate(template, tokenizer, blocks))
        assert "does not start with its only block" in reason
    # A Llama-style tokenizer puts BOS first, before fedlm's virtual tokens; PEFT would put it after them.
    bos_first = processors.TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 1)])
    tokenizer.backend_tokenizer.post_processor = bos_first
    assert "special tokens [1]" in peft_mismatch(PromptTemplate(FPB_TEMPLATE, tokenizer, 3))
