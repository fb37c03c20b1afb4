"""Decoding through the key/value cache: the same tokens as recomputing the whole sequence at every step, in every
layout (shallow or deep, cached text or not; GPT-2 and Llama shapes), for padded batches of mixed lengths, and the
same tokens for a row alone as in a batch (greedy, and sampled with per-row seeds)."""

import warnings

import pytest
import torch
from helpers import batch_of, tiny_module

from fedlm.model.backbone import cache_argument
from fedlm.model.decoding import DecodingConfig, cut_at_stop, decode, recompute_logits

MIXED = [
    ("profit rose .", "positive"),
    ("the company said that its quarterly loss widened sharply this year .", "negative"),
    ("sales were flat", "neutral"),
]
AFTER_TEXT = "{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"
FIRST = "<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}"
DEEP = {"type": "mlp", "virtual_tokens": 3, "hidden_size": 8, "deep": True, "init_text": "Classify the sentiment"}
LAYOUTS = {
    "shallow": {"template": FIRST},
    "shallow_cached": {"template": AFTER_TEXT, "cache_prefix": True},
    "deep_cached": {"template": AFTER_TEXT, "cache_prefix": True, "encoder": DEEP},
    "deep_first": {"template": FIRST, "encoder": DEEP},
}
GREEDY = DecodingConfig(max_new_tokens=6, stop=[])


def trained_looking(backbone: str, layout: dict):
    """A module of ``layout`` whose encoder output is far from its start (as after training), in eval mode."""
    module = tiny_module(backbone, **layout)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module.encoder.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return module.eval()


def prompts_of(module, sentences: list[tuple[str, str]]) -> dict[str, torch.Tensor]:  # noqa: ANN001
    batch = batch_of(module, sentences)
    batch["index"] = torch.arange(len(sentences))
    return module.task.template.prompts(batch)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_decoding_gives_the_tokens_of_recomputing_the_whole_sequence(tiny_model_dir: str, layout: str) -> None:
    module = trained_looking(tiny_model_dir, LAYOUTS[layout])
    prompts = prompts_of(module, MIXED)
    assert len(set(prompts["attention_mask"].sum(1).tolist())) > 1  # padded rows of mixed lengths
    eos_free = DecodingConfig(max_new_tokens=6, stop=[])
    cached = decode(module.lm, prompts, eos_free, module.tokenizer)
    recomputed = decode(module.lm, prompts, eos_free, module.tokenizer, next_logits=recompute_logits)
    assert cached == recomputed
    assert max(map(len, cached)) > 1  # more than the prefill's token: the cached steps were compared too


@pytest.mark.parametrize("layout", ["shallow_cached", "deep_cached"])
def test_the_first_step_logits_equal_the_training_forward(tiny_model_dir: str, layout: str) -> None:
    module = trained_looking(tiny_model_dir, LAYOUTS[layout])
    prompts = prompts_of(module, MIXED)
    _, logits = module.lm.prefill(prompts)
    torch.testing.assert_close(logits, recompute_logits(module.lm, prompts, [[] for _ in MIXED]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sample", [False, True])
def test_a_row_alone_decodes_as_in_its_batch(tiny_model_dir: str, sample: bool) -> None:
    module = trained_looking(tiny_model_dir, LAYOUTS["deep_cached"])
    config = DecodingConfig(max_new_tokens=5, stop=[], sample=sample, temperature=1.5, seed=3)
    prompts = prompts_of(module, MIXED)
    together = decode(module.lm, prompts, config, module.tokenizer)
    for row in range(len(MIXED)):
        alone = prompts_of(module, [MIXED[row]])
        alone["index"] = torch.tensor([row])  # the example's own seed
        assert decode(module.lm, alone, config, module.tokenizer) == [together[row]]
    if sample:  # another seed draws other tokens somewhere
        other = DecodingConfig(max_new_tokens=5, stop=[], sample=True, temperature=1.5, seed=4)
        assert decode(module.lm, prompts, other, module.tokenizer) != together


def test_stop_strings_and_eos_end_a_row(tiny_gpt2_dir: str) -> None:
    module = trained_looking(tiny_gpt2_dir, LAYOUTS["shallow_cached"])
    prompts = prompts_of(module, MIXED)
    free = decode(module.lm, prompts, DecodingConfig(max_new_tokens=6, stop=[]), module.tokenizer)
    first_text = module.tokenizer.decode(free[0][:2])
    stop = first_text[-1]  # a character the first row generates by its second token
    stopped = decode(module.lm, prompts, DecodingConfig(max_new_tokens=6, stop=[stop]), module.tokenizer)
    assert len(stopped[0]) <= 2 and stop in module.tokenizer.decode(stopped[0])
    assert cut_at_stop("a cat\nsat", ["\n", "t"]) == "a ca"
    assert cut_at_stop("no stop", ["\n"]) == "no stop"


@pytest.mark.parametrize("layout", ["shallow_cached", "deep_cached"])
def test_no_forward_passes_the_keyword_transformers_removes(tiny_model_dir: str, layout: str) -> None:
    module = trained_looking(tiny_model_dir, LAYOUTS[layout])
    prompts = prompts_of(module, MIXED)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        module.task.train_loss(module.lm, batch_of(module, MIXED))
        decode(module.lm, prompts, GREEDY, module.tokenizer)


def test_the_cache_keyword_follows_the_model_signature(tiny_gpt2_dir: str) -> None:
    model = tiny_module(tiny_gpt2_dir).backbone
    assert list(cache_argument(model, "c")) == ["cache"]

    class OldStyle(torch.nn.Module):  # a remote-code model that still names it past_key_values
        def forward(self, input_ids=None, past_key_values=None):  # noqa: ANN001, ANN202
            return past_key_values

    old = OldStyle()
    old.base_model = old
    assert cache_argument(old, "c") == {"past_key_values": "c"}
