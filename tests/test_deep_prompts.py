"""Deep prompts: the fast path (slots as past key/values after the prefix, only the rest run) against a reference
that runs each example's whole sequence with the slots' keys and values written into every layer at the
virtual-token positions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import synthetic_sentences, train_tokenizer, write_synthetic_fpb
from helpers import (
    FEDERATION,
    REPO,
    batch_of,
    peft_probabilities,
    predicted,
    printed_config,
    probabilities,
    replay,
    run_ranks,
    single_token_words,
    tiny_module,
    write_checkpointed_config,
    write_config,
)
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, MistralConfig, MistralForCausalLM

from fedlm.cli import cli
from fedlm.cli.export import export_main
from fedlm.federation import ServerConfig
from fedlm.model.slots import slot_key_values
from fedlm.model.template import PromptTemplate
from fedlm.ptuning import PTuningModule
from fedlm.ptuning.module import check_deep_template

HEADLINES = [sentence for sentence, _ in synthetic_sentences(6, seed=4)]
TOKENIZER = train_tokenizer()
AFTER_TEXT = "{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"
BEFORE_TEXT = "<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}"
MIXED = [
    ("profit rose in the quarter .", "positive"),
    ("loss widened .", "negative"),
    ("the board met in Helsinki according to the report this year .", "neutral"),
]
DEEP = {"type": "mlp", "virtual_tokens": 4, "hidden_size": 16, "deep": True, "init_text": "the company held"}
TOLERANCE = {"fp32": dict(rtol=1e-4, atol=1e-5), "bf16": dict(rtol=5e-2, atol=5e-2)}


class SlotsAtPositions(DynamicCache):
    """A cache for one full-sequence forward: every layer's keys and values at ``start..start + slots`` are
    replaced by the slots' before attention reads them (after the LM's own rotary embedding of its keys)."""

    def __init__(self, slots: torch.Tensor, start: int, config: object) -> None:
        super().__init__(config=config)
        self.slots, self.start = slots, start  # (layers, 2, heads, slots, head dim)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        end = self.start + self.slots.shape[3]
        keys, values = keys.clone(), values.clone()
        keys[0, :, self.start : end] = self.slots[layer_idx, 0].to(keys.dtype)
        values[0, :, self.start : end] = self.slots[layer_idx, 1].to(values.dtype)
        return super().update(keys, values, layer_idx, *args, **kwargs)


def reference(module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """(loss, scores) with each row run alone, unpadded, over its whole sequence."""
    slots = slot_key_values(module.encoder(), module.slot_shape)[:, :, 0]
    scores, token_log_probs = [], []
    for row in range(len(batch["label"])):
        length = int(batch["attention_mask"][row].sum())
        one = {name: batch[name][row : row + 1, :length] for name in ("input_ids", "virtual_index", "targets")}
        one.update(prompt_length=batch["prompt_length"][row : row + 1], label=batch["label"][row : row + 1])
        start = int((one["virtual_index"][0] >= 0).int().argmax())
        ids = one["input_ids"][:, :-1]  # the last token predicts nothing
        out = module.backbone.base_model(
            inputs_embeds=module.backbone.get_input_embeddings()(ids),
            attention_mask=torch.ones_like(ids),
            cache=SlotsAtPositions(slots, start, module.backbone.config),
            use_cache=True,
        )
        hidden = out.last_hidden_state
        token_log_probs.append(module.lm.answer_log_probs(hidden, one["targets"])[0])
        log_probs = torch.log_softmax(module.lm.last_prompt_logits(hidden, one), dim=-1)
        scores.append(log_probs[:, [answer[0] for answer in module.task.answers]])
    scores = torch.cat(scores)
    if module.task.config.loss == "label_words":
        return torch.nn.functional.cross_entropy(scores, batch["label"]), scores
    return -torch.cat(token_log_probs).mean(), scores


def encoder_grads(module, loss: torch.Tensor) -> list[torch.Tensor]:  # noqa: ANN001
    params = [p for p in module.encoder.parameters() if p.requires_grad]
    return [g.clone() for g in torch.autograd.grad(loss, params)]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("loss", ["answer_tokens", "label_words"])
@pytest.mark.parametrize("placement", ["after_text", "before_text"])
def test_the_fast_path_equals_the_whole_sequence_with_slots_in_every_layer(
    tiny_model_dir: str, placement: str, loss: str, dtype: str
) -> None:
    after = placement == "after_text"
    probe = tiny_module(tiny_model_dir)
    module = tiny_module(
        tiny_model_dir,
        encoder=DEEP,
        template=AFTER_TEXT if after else BEFORE_TEXT,
        cache_prefix=after,
        loss=loss,
        label_words=single_token_words(probe),
        dtype=dtype,
    )
    with torch.no_grad():  # trained-looking slots: the MLP's last layer starts at zero
        for p in module.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    module.train()
    batch = batch_of(module, MIXED)
    if after:
        assert len({int((row >= 0).int().argmax()) for row in batch["virtual_index"]}) > 1  # left-padded prefixes
    else:
        assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # right-padded suffixes
    loss_fast, scores_fast = module.task.loss_and_scores(module.lm, batch)
    loss_ref, scores_ref = reference(module, batch)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(scores_fast, scores_ref, **tolerance)
    torch.testing.assert_close(loss_fast, loss_ref, **tolerance)
    for fast, ref in zip(encoder_grads(module, loss_fast), encoder_grads(module, loss_ref)):
        scale = ref.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(fast / scale, ref / scale, **tolerance)


def test_deep_slots_start_as_the_init_texts_key_values_and_run_only_what_follows(tiny_model_dir: str) -> None:
    module = tiny_module(tiny_model_dir, encoder={**DEEP, "type": "embedding"}, template=AFTER_TEXT, cache_prefix=True)
    shape = module.slot_shape
    ids = module.tokenizer("the company held", add_special_tokens=False).input_ids
    assert module.encoder.input_table.shape == (4, shape.width)
    mlp = tiny_module(tiny_model_dir, encoder=DEEP, template=AFTER_TEXT, cache_prefix=True)
    torch.testing.assert_close(mlp.encoder().detach(), module.encoder().detach())  # the MLP starts at the same slots
    cache = DynamicCache(config=module.backbone.config)
    tokens = torch.tensor([ids])
    module.backbone.base_model(input_ids=tokens, attention_mask=torch.ones_like(tokens), past_key_values=cache)
    first_layer_keys = cache.layers[0].keys[0]  # (heads, tokens, head dim)
    slots = slot_key_values(module.encoder().detach(), shape)
    torch.testing.assert_close(slots[0, 0, 0, :, : len(ids)], first_layer_keys[:, : min(4, len(ids))])
    _, rest = module.lm.hidden_states(batch_of(module, MIXED))  # what runs: " sentiment:" and the answer, no more
    after = module.tokenizer(" sentiment:", add_special_tokens=False).input_ids
    assert rest["input_ids"].shape[1] == len(after) + max(map(len, module.task.answers))


def test_deep_prompts_refuse_what_cannot_work(tiny_model_dir: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.encoder.init_text"):
        tiny_module(tiny_model_dir, encoder={**DEEP, "init_text": None}, template=BEFORE_TEXT)
    with pytest.raises(ValueError, match="set model.cache.prefix=true"):
        tiny_module(tiny_model_dir, encoder=DEEP, template=AFTER_TEXT)
    with pytest.raises(ValueError, match="nothing after it"):
        tiny_module(tiny_model_dir, encoder=DEEP, template="{sentence} sentiment: <|VIRTUAL_PROMPT_0|>{label}")
    sliding = MistralConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8,
    )  # fmt: skip
    MistralForCausalLM(sliding).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sliding-window layers"):
        tiny_module(str(tmp_path), encoder=DEEP, template=BEFORE_TEXT)


@pytest.fixture(scope="module")
def deep_checkpoints(tiny_gpt2_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A few real training steps of deep slots, before the text (P-tuning v2) and after the cached text."""
    checkpoints = {}
    for placement, template in (("before_text", BEFORE_TEXT), ("after_text", AFTER_TEXT)):
        folder = tmp_path_factory.mktemp(placement)
        config = write_checkpointed_config(folder, tiny_gpt2_dir, write_synthetic_fpb(folder))
        encoder = ["--model.encoder.type", "embedding", "--model.encoder.virtual_tokens", "4"]
        deep = ["--model.encoder.deep", "true", "--model.encoder.init_text", "the company held"]
        layout = ["--model.task.template", template, "--model.cache.prefix", str(placement == "after_text").lower()]
        cli(["fit", "--config", str(config), "--trainer.limit_train_batches", "3", *encoder, *deep, *layout])
        checkpoints[placement] = folder / "ckpt" / "best.ckpt"
    return checkpoints


@pytest.fixture()
def headlines(tmp_path: Path) -> Path:
    path = tmp_path / "headlines.txt"
    path.write_text("\n".join(HEADLINES) + "\n")
    return path


@pytest.mark.parametrize("placement", ["before_text", "after_text"])
def test_an_export_of_deep_slots_predicts_what_the_trained_module_predicts(
    deep_checkpoints: dict[str, Path], placement: str, headlines: Path, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    export_main([str(deep_checkpoints[placement]), "--out", str(out)])
    settings = json.loads((out / "prompt.json").read_text())
    assert settings["deep"] is True and settings["version"] == 3
    trained = PTuningModule.load_from_checkpoint(deep_checkpoints[placement]).eval()
    assert load_file(out / "prompt.safetensors")["virtual_tokens"].shape == (4, trained.slot_shape.width)
    rows = predicted(out, headlines, tmp_path)
    assert rows == predicted(deep_checkpoints[placement], headlines, tmp_path)
    batch = trained.task.template.collate(
        [trained.task.encode({"sentence": sentence, "label": "neutral"}) for sentence in HEADLINES]
    )
    with torch.inference_mode():
        expected = trained.task.loss_and_scores(trained.lm, batch)[1].softmax(-1)
    torch.testing.assert_close(probabilities(rows), expected, atol=1e-6, rtol=0)
    assert (out / "peft").is_dir() == (placement == "before_text")  # PEFT's prefix tuning puts slots first


def test_peft_prefix_tuning_reproduces_deep_slots_placed_first(
    deep_checkpoints: dict[str, Path], tiny_gpt2_dir: str, headlines: Path, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    export_main([str(deep_checkpoints["before_text"]), "--out", str(out), "--peft", "require"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), out / "peft").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    label_words = json.loads((out / "prompt.json").read_text())["task"]["label_words"]
    through_peft = peft_probabilities(model, tokenizer, label_words, HEADLINES)
    through_fedlm = probabilities(predicted(out, headlines, tmp_path))
    torch.testing.assert_close(through_peft, through_fedlm, atol=1e-5, rtol=0)
    assert (through_peft.log() - through_fedlm.log()).abs().max() < 1e-4
    with torch.no_grad():  # keys and values swapped in each layer (a misread layout): PEFT's predictions move
        weight = model.prompt_encoder["default"].embedding.weight  # (slots, layers * 2 * heads * head dim)
        layers = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).config.num_hidden_layers
        weight.copy_(weight.view(len(weight), layers, 2, -1).flip(2).reshape(weight.shape))
    assert (peft_probabilities(model, tokenizer, label_words, HEADLINES).log() - through_fedlm.log()).abs().max() > 1e-3


# -- federated: what travels is the slot table (or the encoder's parameters) like any prompt's ---------------------

SLOTS_AFTER_TEXT = (
    "--model.encoder.deep", "true", "--model.encoder.init_text", "the company held",
    "--model.task.template", AFTER_TEXT, "--model.cache.prefix", "true",
)  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.parametrize("average", ["parameters", "table"])
def test_federated_deep_slots_on_two_ranks_average_only_their_shared_part(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path, average: str
) -> None:
    server = {"optimizer": "fedadam", "lr": 0.01}
    federation = {**FEDERATION, "private_tokens": 1, "server": server, "prox_mu": 0.1, "average": average}
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation)
    result, records = run_ranks(tmp_path, config, 2, *SLOTS_AFTER_TEXT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not records[0]["shared"].all()  # the private slot's part stays home
    replay(records, ServerConfig(**server), 2, shared=records[0]["shared"])


@pytest.mark.multiprocess
def test_deep_slots_resume_bitwise_under_client_dp_and_secure_aggregation(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    dp = {"clip_norm": 0.5, "noise_multiplier": 0.5, "noise_seed": 1, "adaptive_clipping": True, "count_noise": 1.0}
    federation = {**FEDERATION, "clients": 3, "weighting": "uniform", "dp": dp, "private_tokens": 1}
    federation["secure_aggregation"] = {"enabled": True}
    every_round = {"dirpath": str(tmp_path / "ckpt"), "filename": "round{epoch}", "save_top_k": -1}
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": every_round}]
    config = write_config(
        tmp_path, tiny_gpt2_dir, synthetic_fpb, federation, enable_checkpointing=True, callbacks=callbacks
    )
    result, (full,) = run_ranks(tmp_path, config, 1, *SLOTS_AFTER_TEXT)
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp_path / "resumed").mkdir()
    resume = ("--ckpt_path", str(tmp_path / "ckpt" / "roundepoch=0.ckpt"))
    result, (resumed,) = run_ranks(tmp_path / "resumed", config, 1, *SLOTS_AFTER_TEXT, *resume)
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(full["rounds"][1:], resumed["rounds"]):
        assert torch.equal(a["global"], b["global"])
    assert full["losses"][-18:] == resumed["losses"]


@pytest.mark.parametrize("layout", ["deep_after_text", "deep_before_text"])
def test_the_layout_configs_compose_with_every_fpb_config(layout: str, capsys: pytest.CaptureFixture[str]) -> None:
    for base in ("fpb_federated", "fpb_centralized", "fpb_local"):
        configs = ("--config", f"{REPO}/configs/{base}.yaml", "--config", f"{REPO}/configs/layouts/{layout}.yaml")
        model = printed_config(capsys, "fit", *configs)["model"]
        assert model["encoder"]["deep"] is True and model["encoder"]["init_text"]
        assert model["cache"]["prefix"] == (layout == "deep_after_text")
        check_deep_template(PromptTemplate(model["task"]["template"], TOKENIZER, 10), "", True)
