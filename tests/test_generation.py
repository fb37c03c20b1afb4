"""Generative tasks end to end: records from JSONL, a federated fit that validates by the teacher-forced loss and
generates at test, its per-example outputs, and ``fedlm predict`` on the export printing the test step's text; the
metrics' rules (the best over several references, SQuAD normalization) and the generated-label mapping."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FEDERATION, batch_of, predicted, tiny_module, write_yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedlm.cli import cli
from fedlm.cli.export import export_main, peft_usage
from fedlm.errors import ConfigError
from fedlm.model.decoding import DecodingConfig, decode
from fedlm.model.template import VIRTUAL_MARKER
from fedlm.ptuning.export import TrainedPrompt
from fedlm.tasks import TaskConfig
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


def test_flowertunes_rule_checks_positive_then_negative_and_defaults_to_neutral() -> None:
    """Flower's benchmarks/flowertune-llm/evaluation/finance: "positive" or "Positive" anywhere wins, then
    "negative" or "Negative", else neutral; the rule is a config, checked against the label words."""
    words, order = ["negative", "neutral", "positive"], [2, 0]
    assert label_named("negative outlook; positive later", words, order, default=1) == 2
    assert label_named(" Negative.", words, order, default=1) == 0
    assert label_named("NEGATIVE", words, order, default=1) == 1  # their check is case-sensitive but for a capital
    assert label_named("no idea", words, order, default=1) == 1
    flowertune = TaskConfig(
        generated_labels=True, generated_order=["positive", "negative"], generated_default="neutral"
    )
    flowertune.validate()
    with pytest.raises(ConfigError, match=r"generated_order=\['positive', 'bullish'\] .* name classes"):
        TaskConfig(generated_labels=True, generated_order=["positive", "bullish"]).validate()
    with pytest.raises(ConfigError, match="set model.task.generated_labels: true"):
        TaskConfig(generated_default="neutral").validate()


SENTENCES = [
    "profit rose .",
    "sales were flat",
    "the loss widened sharply",
    "shares fell",
    "orders doubled",
    "the board met",
    "costs rose again",
    "margins held",
    "the bank cut jobs",
    "revenue grew fast",
]


def perturbed_module(backbone: str, label_words: dict[str, str] | None = None):  # noqa: ANN201
    """A deep cached classifier whose encoder output is far from its start (as after training), greedy one token."""
    task = {
        "template": "{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}",
        "generated_labels": True,
        "decoding": {"max_new_tokens": 1, "stop": []},
        **({"label_words": label_words} if label_words else {}),
    }
    module = tiny_module(backbone, task=task, cache={"prefix": True}, encoder={
        "type": "mlp", "virtual_tokens": 3, "hidden_size": 8, "deep": True, "init_text": "Classify"})  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module.encoder.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return module.eval()


def test_generated_labels_agree_with_label_scoring_wherever_the_first_token_is_a_label_word(
    tiny_gpt2_dir: str,
) -> None:
    # the label words: a token the model generates first for some rows and not others, and two it never generates
    probe = perturbed_module(tiny_gpt2_dir)
    tokenizer = probe.tokenizer
    labels = ["negative", "neutral", "positive"]
    records = [(sentence, labels[i % 3]) for i, sentence in enumerate(SENTENCES)]
    batch = batch_of(probe, records)
    batch["index"] = torch.arange(len(records))
    with torch.no_grad():
        first = [ids[0] for ids in decode(probe.lm, probe.task.template.prompts(batch), DecodingConfig(1, []),
                                           tokenizer)]  # fmt: skip
    one_token = [
        t for t in range(len(tokenizer)) if tokenizer(tokenizer.decode([t]), add_special_tokens=False).input_ids == [t]
    ]
    generated = [t for t in dict.fromkeys(first) if t in one_token and 0 < first.count(t) < len(first)]
    assert generated, f"no one-token word is generated first by some rows only: {first}"
    others = [t for t in one_token if t not in first][:2]
    label_tokens = dict(zip(labels, [generated[0], *others]))
    module = perturbed_module(tiny_gpt2_dir, {name: tokenizer.decode([t]) for name, t in label_tokens.items()})
    names_a_label = [token in label_tokens.values() for token in first]
    names_the_gold = [token == label_tokens[label] for token, (_, label) in zip(first, records)]
    assert 0 < sum(names_a_label) < len(first) and sum(names_the_gold) < sum(names_a_label)

    task, batch = module.task, batch_of(module, records)
    batch["index"] = torch.arange(len(records))
    fields = [{"sentence": s, "label": label} for s, label in records]
    with torch.no_grad():
        task.start_evaluation("val", generating=True)
        task.eval_step(module.lm, batch, "val")
        logged = task.end_evaluation("val", fields, fit_calibration=False)
        task.start_evaluation("val", generating=False)  # a round off the generate_every schedule
        task.eval_step(module.lm, batch, "val")
        quiet = task.end_evaluation("val", fields, fit_calibration=False)
    assert logged["val/generated_agreement"] == pytest.approx(sum(names_a_label) / len(first))
    assert logged["val/generated_acc"] == pytest.approx(sum(names_the_gold) / len(first))
    assert "val/generated_acc" not in quiet and "val/generated_agreement" not in quiet


# -- PEFT's generate on an export -------------------------------------------------------------------------------

PEFT_TEMPLATE = "<|VIRTUAL_PROMPT_0|> Word: {word} Opposite of nothing:{answer}"  # PEFT's layout: virtual tokens first
PEFT_LAYOUTS = {  # shallow virtual tokens -> a prompt-tuning adapter; deep slots placed first -> a prefix-tuning one
    "PROMPT_TUNING": {"type": "mlp", "virtual_tokens": 3, "hidden_size": 8, "deep": False},
    "PREFIX_TUNING": {"type": "mlp", "virtual_tokens": 3, "hidden_size": 8, "deep": True, "init_text": "Repeat"},
}


@pytest.mark.parametrize("peft_type", list(PEFT_LAYOUTS))
def test_peft_generates_what_fedlm_generates_from_virtual_tokens_placed_first(
    peft_type: str, tiny_gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A generative run's export, fed to PEFT as the export's message says (the template's text without the marker,
    fields filled, then greedy ``generate``): PEFT generates fedlm's tokens, from the same next-token logits at every
    step, and the adapter is what makes them so."""
    config = yaml.safe_load(generative_config(tmp_path, tiny_gpt2_dir).read_text())
    model = config["model"]
    model["task"].update(template=PEFT_TEMPLATE, generate_every=0, decoding={"max_new_tokens": 4, "stop": []})
    model["cache"] = {"prefix": False}
    model["encoder"] = PEFT_LAYOUTS[peft_type]
    model["optimizer"]["lr"] = 1.0  # deep slots move enough for the tiny LM's answers to differ by word
    config["federation"]["local_steps"] = 6
    cli(["fit", "--config", str(write_yaml(tmp_path / "peft.yaml", config))])
    capsys.readouterr()
    out = tmp_path / "export"
    export_main([str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(out), "--peft", "require"])
    printed = capsys.readouterr().out
    text = VIRTUAL_MARKER.sub("", PEFT_TEMPLATE).removesuffix("{answer}")
    assert f"Feed PeftModel the text {text!r}" in printed
    assert "max_new_tokens=4, do_sample=False), which generates fedlm's tokens" in printed
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["peft_type"] == peft_type

    module = TrainedPrompt.load(out).module()
    task, eos = module.task, module.tokenizer.eos_token_id
    records = [{"word": word} for word in WORDS[4:9]]
    prompts = task.template.collate([task.encode_prompt(record, i) for i, record in enumerate(records)])
    with torch.inference_mode():
        ours = task.generate(module.lm, prompts)
        state, logits = module.lm.prefill(prompts)  # fedlm's next-token logits at each step, fed its own tokens
        fed = [answer + [eos] * (4 - len(answer)) for answer in ours]
        steps = [logits] + [module.lm.step(state, torch.tensor([row[k] for row in fed])) for k in range(3)]
    examples = json.loads((tmp_path / "logs" / "version_0" / "test_predictions.json").read_text())["examples"]
    assert task.texts(ours) == [example["generated"] for example in examples]  # what the run's test generated

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), out / "peft").eval()
    for row, (record, expected) in enumerate(zip(records, ours)):
        input_ids = torch.tensor([task.template.tokenize(text.format(**record))])  # one piece, as fedlm's prompt
        with torch.inference_mode():
            generated = peft_model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=4,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
            with peft_model.disable_adapter():
                plain = peft_model(input_ids=input_ids).logits[0, -1]
        new = generated.sequences[0, input_ids.shape[1] :].tolist()
        assert (new[: new.index(eos)] if eos in new else new) == expected
        for k, step_logits in enumerate(generated.logits):  # PEFT stops after an end-of-sequence token
            torch.testing.assert_close(step_logits[0], steps[k][row], atol=1e-5, rtol=0)
        assert (plain - steps[0][row]).abs().max() > 0.1  # without the adapter, the backbone's logits differ


def test_the_peft_usage_line_names_the_generation_settings_that_give_fedlm_answers() -> None:
    greedy = peft_usage(TaskConfig(kind="generation", template=PEFT_TEMPLATE, decoding={"max_new_tokens": 7}))
    assert "Feed PeftModel the text ' Word: {word} Opposite of nothing:'" in greedy
    assert "generate(input_ids, attention_mask=attention_mask, max_new_tokens=7, do_sample=False)" in greedy
    assert "before the end-of-sequence token" in greedy and "cut before the first of ['\\n']" in greedy
    sampled = peft_usage(
        TaskConfig(kind="generation", template=PEFT_TEMPLATE, decoding={"sample": True, "temperature": 0.7, "stop": []})
    )
    assert "do_sample=True, temperature=0.7, top_p=1.0, top_k=0" in sampled and "not the same draws" in sampled
    assert "cut before" not in sampled
    classify = peft_usage(TaskConfig(template="<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}"))
    assert classify == (
        "Feed PeftModel the text ' {sentence} sentiment:' with the record's fields in place of their {names} "
        "(tokenized without special tokens) and score the label words' tokens after it."
    )
