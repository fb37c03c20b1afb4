from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SENTENCES, batch_of, single_token_words, tiny_module, trainer

from fedlm.data import FinancialPhraseBank
from fedlm.model.template import EncodedExample
from fedlm.ptuning import CheckpointMismatchError, OldCheckpointError, PTuningModule
from fedlm.ptuning.export import TrainedPrompt


def test_backbone_is_frozen_in_eval_mode_and_unchanged_by_training(
    tiny_model_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    module = tiny_module(tiny_model_dir)
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in module.encoder.named_parameters()}
    trainer(tmp_path, limit_val_batches=0).fit(module, FinancialPhraseBank(path=str(synthetic_fpb), batch_size=8))
    assert all(not p.requires_grad and p.grad is None for p in module.backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in module.backbone.state_dict().items())
    assert any(not torch.equal(encoder_before[k], v) for k, v in module.encoder.named_parameters())
    module.train()
    assert not module.backbone.training and module.encoder.training


def test_virtual_rows_replace_the_placeholder_embeddings(tiny_model_dir: str) -> None:
    module = tiny_module(tiny_model_dir).eval()
    batch = batch_of(module, SENTENCES)
    embeds = module.lm.input_embeddings(batch)
    table = module.encoder()
    tokens = module.backbone.get_input_embeddings()(batch["input_ids"])
    for row in range(2):
        for pos, v in enumerate(batch["virtual_index"][row].tolist()):
            expected = table[v] if v >= 0 else tokens[row, pos]
            assert torch.equal(embeds[row, pos], expected)
    assert (batch["virtual_index"][:, :3] == torch.arange(3)).all()  # the default template starts with them


def reference_scores(module: PTuningModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Label-word log-probabilities from the full Hugging Face forward, one candidate at a time."""
    rows = []
    for row in range(len(batch["label"])):
        n = int(batch["prompt_length"][row])
        scores = []
        for answer in module.task.answers:
            single = module.task.template.collate(
                [
                    EncodedExample(
                        batch["input_ids"][row, :n].tolist() + answer,
                        batch["virtual_index"][row, :n].tolist() + [-1] * len(answer),
                        n,
                        0,
                    )
                ]
            )
            logits = module.backbone(inputs_embeds=module.lm.input_embeddings(single)).logits[0].float()
            log_probs = F.log_softmax(logits, -1)
            scores.append(sum(log_probs[n - 1 + i, t] for i, t in enumerate(answer)))
        rows.append(torch.stack(scores))
    return torch.stack(rows)


@pytest.mark.parametrize("words", ["multi-token", "single-token"])
def test_label_scores_equal_the_full_model_forward(tiny_model_dir: str, words: str) -> None:
    module = tiny_module(tiny_model_dir)
    if words == "single-token":
        module = tiny_module(tiny_model_dir, label_words=single_token_words(module))
        assert module.task.single_token_answers
    else:
        assert not module.task.single_token_answers
    module.eval()
    batch = batch_of(
        module, SENTENCES + [("the board met in Helsinki for the period according to the report .", "neutral")]
    )
    with torch.no_grad():
        loss, scores = module.task.loss_and_scores(module.lm, batch)
        expected = reference_scores(module, batch)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    gold = expected[torch.arange(3), batch["label"]]
    answer_tokens = torch.tensor([len(module.task.answers[i]) for i in batch["label"]])
    torch.testing.assert_close(loss, -(gold.sum() / answer_tokens.sum()), atol=1e-4, rtol=1e-4)


def test_scoring_picks_the_label_a_hand_built_model_prefers(tiny_gpt2_dir: str) -> None:
    module = tiny_module(tiny_gpt2_dir)
    words = single_token_words(module)
    module = tiny_module(tiny_gpt2_dir, label_words=words).eval()
    positive = module.task.answers[module.task.label_ids["positive"]][0]
    with torch.no_grad():
        # Final layer norm outputs a constant vector aligned with the " positive" token's (tied) embedding.
        wte = module.backbone.transformer.wte.weight
        wte[positive] *= 50
        module.backbone.transformer.ln_f.weight.zero_()
        module.backbone.transformer.ln_f.bias.copy_(wte[positive])
        module.encoder.refresh_table()
        predictions = module.predict_step(batch_of(module, SENTENCES), 0)
    assert predictions["label"] == ["positive", "positive"]
    assert (predictions["probs"][:, 2] > 0.99).all()


def test_checkpoint_round_trip_restores_predictions_and_holds_no_backbone(
    tiny_model_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    module = tiny_module(
        tiny_model_dir, encoder={"type": "lstm", "virtual_tokens": 4, "hidden_size": 8, "dropout": 0.1}
    )
    data = FinancialPhraseBank(path=str(synthetic_fpb), batch_size=8)
    fit = trainer(tmp_path, limit_val_batches=0)
    fit.fit(module, data)
    path = tmp_path / "encoder.ckpt"
    fit.save_checkpoint(path)

    raw = torch.load(path, weights_only=True)
    assert not any(k.startswith("backbone.") for k in raw["state_dict"])
    assert "encoder.inference_table" in raw["state_dict"]
    assert raw["hyper_parameters"]["encoder"]["type"] == "lstm"
    assert path.stat().st_size < 1_000_000

    module.eval()
    batch = batch_of(module, SENTENCES)
    with torch.no_grad():
        expected = module.predict_step(batch, 0)["probs"]
    restored = PTuningModule.load_from_checkpoint(path, weights_only=True).eval()
    assert restored.encoder._table_params is not None  # prediction uses the saved table, not a recomputation
    with torch.no_grad():
        assert torch.equal(restored.predict_step(batch, 0)["probs"], expected)
    del raw["state_dict"]["encoder.table_offset"]  # a checkpoint from before table averaging
    torch.save(raw, tmp_path / "old.ckpt")
    old = PTuningModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True).eval()
    with torch.no_grad():
        assert torch.equal(old.predict_step(batch, 0)["probs"], expected)


def test_checkpoint_for_another_encoder_shape_is_refused(
    tiny_model_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    fit.fit(tiny_module(tiny_model_dir), FinancialPhraseBank(path=str(synthetic_fpb), batch_size=8))
    fit.save_checkpoint(tmp_path / "a.ckpt")
    other = tiny_module(tiny_model_dir, encoder={"type": "mlp", "virtual_tokens": 5, "hidden_size": 16})
    with pytest.raises(CheckpointMismatchError, match="model.encoder"):
        trainer(tmp_path).test(other, FinancialPhraseBank(path=str(synthetic_fpb)), ckpt_path=tmp_path / "a.ckpt")


def flat_hyperparameters(sectioned: dict) -> dict:
    """The hyperparameters as fedlm wrote them before model.task, model.cache and model.optimizer: one flat dict."""
    flat = {k: v for k, v in sectioned.items() if k not in ("task", "cache", "optimizer")}
    task = sectioned["task"]
    flat.update({name: task[name] for name in ("template", "label_words", "loss", "max_length", "calibrate")})
    flat.update({f"cache_{name}": value for name, value in sectioned["cache"].items()})
    flat.update(sectioned["optimizer"])
    return flat


def test_a_checkpoint_from_before_the_sections_is_refused_with_what_to_do(
    tiny_model_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    data = FinancialPhraseBank(path=str(synthetic_fpb), batch_size=8)
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    fit.fit(tiny_module(tiny_model_dir), data)
    fit.save_checkpoint(tmp_path / "new.ckpt")
    saved = torch.load(tmp_path / "new.ckpt", weights_only=True)
    saved["hyper_parameters"] = flat_hyperparameters(saved["hyper_parameters"])
    saved["state_dict"]["label_bias"] = saved["state_dict"].pop("task.label_bias")  # its name then
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)

    refusal = r"old\.ckpt is a fedlm checkpoint from before the model\.task, model\.cache and model\.optimizer"
    with pytest.raises(OldCheckpointError, match=r"before the model\.task.*Re-train .*export it with the older"):
        PTuningModule.load_from_checkpoint(old, weights_only=True)
    with pytest.raises(OldCheckpointError, match="before the model.task, model.cache and model.optimizer sections"):
        trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(tiny_module(tiny_model_dir), data, ckpt_path=old)
    with pytest.raises(OldCheckpointError, match=refusal):
        TrainedPrompt.from_checkpoint(old)
    assert isinstance(PTuningModule.load_from_checkpoint(tmp_path / "new.ckpt", weights_only=True), PTuningModule)


def test_validate_before_fit_then_validate_during_fit(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    """Metric state made under validate's inference mode must not break fit's no-grad validation."""
    module = tiny_module(tiny_gpt2_dir)
    data = FinancialPhraseBank(path=str(synthetic_fpb), batch_size=8)
    run = trainer(tmp_path, max_steps=-1, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    before = run.validate(module, data, verbose=False)[0]
    run.fit(module, data)
    after = run.callback_metrics
    assert sum(v for k, v in before.items() if k.startswith("val/confusion/")) == 8
    assert sum(float(v) for k, v in after.items() if k.startswith("val/confusion/")) == 8


def test_validation_during_fit_sees_the_trained_encoder(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """Lightning flips .training flags between training and validation; the inference table must follow."""
    module = tiny_module(tiny_gpt2_dir)
    run = trainer(
        tmp_path, max_steps=-1, max_epochs=2, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=1
    )
    run.fit(module, FinancialPhraseBank(path=str(synthetic_fpb), batch_size=8))
    module.eval()
    with torch.no_grad():
        assert torch.equal(module.encoder(), module.encoder.compute())
        batch = next(iter(run.datamodule.val_dataloader()))
        loss, _ = module.task.loss_and_scores(module.lm, batch)
    torch.testing.assert_close(run.callback_metrics["val/loss"], loss)


def test_a_compiled_backbone_trains_like_the_eager_one(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    trained = []
    for compile in (False, True):
        module = tiny_module(
            tiny_gpt2_dir,
            template="{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}",
            cache_prefix=True,
            compile=compile,
        )
        trainer(tmp_path, max_steps=3).fit(module, FinancialPhraseBank(path=str(synthetic_fpb), batch_size=8))
        trained.append(torch.cat([p.detach().flatten() for p in module.encoder.parameters()]))
    assert module.hparams.compile and module.backbone.base_model._compiled_call_impl is not None
    torch.testing.assert_close(trained[1], trained[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cache_prefix", [False, True])
def test_the_label_words_loss_is_the_cross_entropy_over_the_class_scores(
    tiny_model_dir: str, cache_prefix: bool
) -> None:
    words = single_token_words(tiny_module(tiny_model_dir))
    template = "{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"
    module = tiny_module(
        tiny_model_dir, label_words=words, loss="label_words", template=template, cache_prefix=cache_prefix
    )
    batch = batch_of(module, SENTENCES)
    evaluated, scores = module.task.loss_and_scores(module.lm, batch)  # log-probabilities of the label words
    loss = module.task.train_loss(module.lm, batch)
    torch.testing.assert_close(loss, F.cross_entropy(scores, batch["label"]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(evaluated, loss, atol=1e-6, rtol=1e-6)  # val/loss is the loss that is trained
    loss.backward()
    assert all(p.grad is not None for p in module.encoder.parameters() if p.requires_grad)


def test_the_label_words_loss_needs_one_token_words(tiny_gpt2_dir: str) -> None:
    with pytest.raises(ValueError, match="model.task.loss=label_words scores each class by its label word's one token"):
        tiny_module(tiny_gpt2_dir, loss="label_words")  # the tiny tokenizer splits " negative"
