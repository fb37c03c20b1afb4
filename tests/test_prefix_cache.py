"""The cached-prefix layout gives what the full forward gives, on both tiny architectures (absolute and RoPE)."""

from pathlib import Path

import pytest
import torch
from helpers import batch_of, single_token_words, tiny_module, trainer

from fedlm.data import FinancialPhraseBank
from fedlm.model.prefix_cache import PrefixCache, split_at_first_virtual
from fedlm.ptuning import PTuningModule

CACHED_TEMPLATE = "{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"
# Prefixes of different lengths (one repeated), and gold answers of different lengths with multi-token words.
MIXED = [
    ("profit rose in the quarter .", "positive"),
    ("loss widened this year .", "negative"),
    ("the board met in Helsinki for the period according to the report .", "neutral"),
    ("loss widened this year .", "positive"),
]


def sharpen_attention(module: PTuningModule) -> PTuningModule:
    """Scale the query/key projections: a tiny random model attends almost uniformly, so a wrong position or
    mask would change its outputs too little to be caught."""
    with torch.no_grad():
        for name, weight in module.backbone.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "c_attn.weight")):
                weight.mul_(4)
    return module


def pair(backbone: str, words: str, **cached: object) -> tuple[PTuningModule, PTuningModule]:
    """An uncached and a cached module with the same encoder (tiny_module seeds the initialization)."""
    label_words = single_token_words(tiny_module(backbone)) if words == "single-token" else None
    plain = sharpen_attention(tiny_module(backbone, template=CACHED_TEMPLATE, label_words=label_words))
    fast = tiny_module(backbone, template=CACHED_TEMPLATE, label_words=label_words, cache_prefix=True, **cached)
    sharpen_attention(fast)
    assert plain.task.single_token_answers == (words == "single-token")
    assert all(torch.equal(a, b) for a, b in zip(plain.encoder.parameters(), fast.encoder.parameters()))
    return plain, fast


def mixed_batch(module: PTuningModule) -> dict[str, torch.Tensor]:
    batch = batch_of(module, MIXED)
    prefixes, suffix = split_at_first_virtual(batch)
    assert len(set(prefixes)) == 3 and len({len(p) for p in prefixes}) > 1  # prefix lengths differ
    if not module.task.single_token_answers:
        assert len(set(suffix["attention_mask"].sum(1).tolist())) > 1  # suffix lengths differ
    return batch


@pytest.mark.parametrize("words", ["multi-token", "single-token"])
def test_cached_loss_and_scores_equal_the_uncached_path(tiny_model_dir: str, words: str) -> None:
    plain, fast = (m.eval() for m in pair(tiny_model_dir, words))
    batch = mixed_batch(plain)
    with torch.no_grad():
        expected_loss, expected_scores = plain.task.loss_and_scores(plain.lm, batch)
        loss, scores = fast.task.loss_and_scores(fast.lm, batch)
    torch.testing.assert_close(scores, expected_scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, expected_loss, atol=1e-4, rtol=1e-4)
    assert len(fast.prefix_cache) == 3  # one entry per distinct prefix


@pytest.mark.parametrize("words", ["multi-token", "single-token"])
def test_encoder_gradients_equal_the_uncached_path(tiny_model_dir: str, words: str) -> None:
    plain, fast = (m.train() for m in pair(tiny_model_dir, words))
    batch = mixed_batch(plain)
    torch.testing.assert_close(
        fast.task.train_loss(fast.lm, batch), plain.task.train_loss(plain.lm, batch), atol=1e-4, rtol=1e-4
    )
    expected = torch.autograd.grad(plain.task.train_loss(plain.lm, batch), list(plain.encoder.parameters()))
    grads = torch.autograd.grad(fast.task.train_loss(fast.lm, batch), list(fast.encoder.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-3)
    assert all(p.grad is None for p in fast.backbone.parameters())


def test_a_second_pass_reuses_the_cache(tiny_model_dir: str) -> None:
    module = tiny_module(tiny_model_dir, template=CACHED_TEMPLATE, cache_prefix=True).eval()
    batch = mixed_batch(module)
    with torch.no_grad():
        first = module.task.loss_and_scores(module.lm, batch)
        entries = dict(module.prefix_cache.entries)
        size = module.prefix_cache.nbytes
        second = module.task.loss_and_scores(module.lm, batch)
    assert module.prefix_cache.entries.keys() == entries.keys()
    assert all(module.prefix_cache.entries[k] is v for k, v in entries.items())  # not recomputed
    head = module.prefix_cache.head_entry
    assert (
        module.prefix_cache.nbytes
        == size
        == sum(v.numel() * 4 for v in [*entries.values(), *([head] if head is not None else [])])
    )
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_an_instruction_before_the_sentence_is_cached_once_and_stays_exact(tiny_model_dir: str) -> None:
    template = "Classify the sentiment of this news.\nSentence: {sentence}\n<|VIRTUAL_PROMPT_0|> Sentiment:{label}"
    path = tiny_model_dir
    plain = sharpen_attention(tiny_module(path, template=template)).eval()
    fast = sharpen_attention(tiny_module(path, template=template, cache_prefix=True)).eval()
    batch = batch_of(plain, MIXED)
    with torch.no_grad():
        expected_loss, expected_scores = plain.task.loss_and_scores(plain.lm, batch)
        loss, scores = fast.task.loss_and_scores(fast.lm, batch)
    torch.testing.assert_close(scores, expected_scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, expected_loss, atol=1e-4, rtol=1e-4)
    cache = fast.prefix_cache
    head = fast.task.template.fixed_head()
    assert len(head) >= 8 and cache.head == head and cache.head_entry.shape[3] == len(head)
    prefixes = split_at_first_virtual(batch)[0]
    assert all(prefix[: len(head)] == head for prefix in prefixes)
    # Each entry holds only what follows the head; the head is stored once.
    assert all(cache.entries[prefix].shape[3] == len(prefix) - len(head) for prefix in prefixes)
    assert cache.nbytes == sum(v.numel() * 4 for v in [*cache.entries.values(), cache.head_entry])


def test_the_bf16_cache_stays_close_at_half_the_size(tiny_model_dir: str) -> None:
    plain, fast = (m.eval() for m in pair(tiny_model_dir, "multi-token", cache_dtype="bf16"))
    batch = mixed_batch(plain)
    with torch.no_grad():
        expected_loss, expected_scores = plain.task.loss_and_scores(plain.lm, batch)
        loss, scores = fast.task.loss_and_scores(fast.lm, batch)
    assert all(v.dtype == torch.bfloat16 for v in fast.prefix_cache.entries.values())
    assert fast.prefix_cache.nbytes == sum(v.numel() * 2 for v in fast.prefix_cache.entries.values())
    torch.testing.assert_close(scores, expected_scores, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(loss, expected_loss, atol=5e-3, rtol=5e-3)


def test_a_template_without_leading_text_is_refused(tiny_gpt2_dir: str) -> None:
    with pytest.raises(ValueError, match=r"model\.cache\.prefix.*model\.task\.template.*Put text first"):
        tiny_module(tiny_gpt2_dir, cache_prefix=True)  # the default template starts with the virtual tokens


def test_an_unknown_cache_dtype_is_refused(tiny_gpt2_dir: str) -> None:
    with pytest.raises(ValueError, match=r"model\.cache\.dtype='fp16'"):
        tiny_module(tiny_gpt2_dir, template=CACHED_TEMPLATE, cache_prefix=True, cache_dtype="fp16")


def test_fit_with_the_cache_trains_the_encoder_only(tiny_model_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    module = tiny_module(tiny_model_dir, template=CACHED_TEMPLATE, cache_prefix=True)
    data = FinancialPhraseBank(path=str(synthetic_fpb), batch_size=8)
    backbone = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    encoder = {k: v.clone() for k, v in module.encoder.named_parameters()}
    run = trainer(tmp_path, max_steps=-1, max_epochs=2, limit_train_batches=3, limit_val_batches=2)
    run.validate(module, data, verbose=False)  # fills entries under inference mode, which training then reads
    run.fit(module, data)
    assert all(torch.equal(backbone[k], v) for k, v in module.backbone.state_dict().items())
    assert all(p.grad is None for p in module.backbone.parameters())
    assert any(not torch.equal(encoder[k], v) for k, v in module.encoder.named_parameters())
    # 2 validation batches and 3 training batches of 8 synthetic sentences, some of which repeat.
    assert 0 < len(module.prefix_cache) <= 5 * 8
    assert run.callback_metrics["cache/entries"] == len(module.prefix_cache)
    assert run.callback_metrics["cache/bytes"] == module.prefix_cache.nbytes
    assert not any("cache" in key for key in module.state_dict())  # never checkpointed


def test_bf16_autocast_trains_through_the_cache_close_to_fp32(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    _, fast = pair(tiny_gpt2_dir, "multi-token")
    batch = mixed_batch(fast)
    exact = fast.task.train_loss(fast.lm, batch)
    fast.prefix_cache.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approx = fast.task.train_loss(fast.lm, batch)
    assert approx.dtype == torch.float32  # the log-softmax over the vocabulary stays in fp32
    torch.testing.assert_close(approx, exact, rtol=0.02, atol=0.0)

    encoder = [p.clone() for p in fast.encoder.parameters()]
    run = trainer(tmp_path, max_steps=3, precision="bf16-mixed")
    run.fit(fast, FinancialPhraseBank(path=str(synthetic_fpb), batch_size=8))
    assert torch.isfinite(run.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in fast.encoder.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(encoder, fast.encoder.parameters()))


def test_an_entry_depends_on_its_own_prefix_only_not_on_what_it_was_filled_with(tiny_model_dir: str) -> None:
    """Content-addressed means exact: a prefix's key/values are bitwise the same whether it is first seen alone or
    in a batch beside longer prefixes (padding changes the kernels' shapes, hence their summation order). Without
    this a resumed run, whose cache starts empty, or a rank that hosts other clients would train on other bits."""
    module = tiny_module(tiny_model_dir, template=CACHED_TEMPLATE, cache_prefix=True).eval()
    prefixes = list(dict.fromkeys(split_at_first_virtual(mixed_batch(module))[0]))
    shortest = min(prefixes, key=len)
    together = PrefixCache(module.backbone)
    together.past(prefixes)
    for prefix in prefixes:
        alone = PrefixCache(module.backbone)
        alone.past([prefix])
        assert torch.equal(together.entries[prefix], alone.entries[prefix]), (len(prefix), len(shortest))


@pytest.mark.parametrize(
    "template", [CACHED_TEMPLATE, "Classify this news.\nSentence: {sentence}\n<|VIRTUAL_PROMPT_0|> Sentiment:{label}"]
)
def test_a_later_process_reads_the_stored_entries_and_computes_the_same_bits(
    tiny_model_dir: str, tmp_path: Path, template: str
) -> None:
    """A run that reads its prefixes from disk trains on the bits a run that computes them trains on."""
    store = tmp_path / "prefixes"
    first = tiny_module(tiny_model_dir, template=template, cache_prefix=True, cache_dir=str(store))
    batch = mixed_batch(first)
    first.task.train_loss(first.lm, batch).backward()
    written = first.prefix_cache.store.writes
    assert written == len(first.prefix_cache) + (first.prefix_cache.head_entry is not None) > 0
    assert first.prefix_cache.store.hits == 0

    second = tiny_module(tiny_model_dir, template=template, cache_prefix=True, cache_dir=str(store))
    loss = second.task.train_loss(second.lm, batch)
    loss.backward()
    assert second.prefix_cache.store.hits == written and second.prefix_cache.store.writes == 0
    assert second.prefix_cache.entries.keys() == first.prefix_cache.entries.keys()
    assert all(torch.equal(second.prefix_cache.entries[k], v) for k, v in first.prefix_cache.entries.items())
    assert torch.equal(loss, first.task.train_loss(first.lm, batch))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(first.encoder.parameters(), second.encoder.parameters()))
    assert not list(store.rglob(".entry-*"))  # no staging file left behind


def test_stored_entries_are_kept_apart_per_backbone_and_a_colliding_file_is_a_miss(
    tiny_gpt2_dir: str, tmp_path: Path
) -> None:
    module = tiny_module(tiny_gpt2_dir, template=CACHED_TEMPLATE, cache_prefix=True).eval()
    one = PrefixCache(module.backbone, store=tmp_path)
    with torch.no_grad():
        module.backbone.get_input_embeddings().weight.add_(1e-3)  # other weights: other bits, another folder
    other = PrefixCache(module.backbone, store=tmp_path)
    assert one.store.folder != other.store.folder
    prefix = (5, 6, 7)
    one.past([prefix])
    one.store.path((8, 9)).write_bytes(one.store.path(prefix).read_bytes())  # as if (8, 9) hashed like (5, 6, 7)
    assert one.store.load((8, 9)) is None and one.store.load(prefix) is not None


def test_a_cache_dir_without_the_cache_is_refused(tiny_gpt2_dir: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.cache\.dir=.*model\.cache\.prefix=true"):
        tiny_module(tiny_gpt2_dir, cache_dir=str(tmp_path))


def test_a_budget_bounds_the_cache_and_a_dropped_entry_comes_back_the_same(tiny_model_dir: str) -> None:
    """Under a budget smaller than one entry the cache drops every entry after its batch; a batch that needs a dropped
    prefix again recomputes it, and trains on the bits an unbounded cache gives."""
    plain = tiny_module(tiny_model_dir, template=CACHED_TEMPLATE, cache_prefix=True)
    bounded = tiny_module(tiny_model_dir, template=CACHED_TEMPLATE, cache_prefix=True, cache_budget_mb=1e-9)
    batches = [batch_of(plain, MIXED[:2]), batch_of(plain, MIXED[2:3]), batch_of(plain, MIXED[:2])]
    for batch in batches:
        plain.zero_grad()
        bounded.zero_grad()
        expected, loss = plain.task.train_loss(plain.lm, batch), bounded.task.train_loss(bounded.lm, batch)
        expected.backward()
        loss.backward()
        assert torch.equal(loss, expected)
        assert all(
            torch.equal(a.grad, b.grad) for a, b in zip(plain.encoder.parameters(), bounded.encoder.parameters())
        )
        assert len(bounded.prefix_cache) == 0 and bounded.prefix_cache.nbytes == 0  # all dropped after each batch
    assert len(plain.prefix_cache) == 3
    with pytest.raises(ValueError, match=r"model\.cache\.budget_mb=1.*model\.cache\.prefix=true"):
        tiny_module(tiny_model_dir, cache_budget_mb=1.0)


@pytest.mark.parametrize("template", [CACHED_TEMPLATE, "Headline: {sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"])
def test_a_batched_fill_gives_the_one_at_a_time_entries_up_to_rounding(tiny_model_dir: str, template: str) -> None:
    """``fedlm predict``'s fill: the rows of one left-padded forward, with and without an instruction head."""
    single = tiny_module(tiny_model_dir, template=template, cache_prefix=True).eval()
    batched = tiny_module(tiny_model_dir, template=template, cache_prefix=True).eval()
    batched.prefix_cache.batch_fill = True
    batch = mixed_batch(single)
    with torch.inference_mode():
        expected = single.task.loss_and_scores(single.lm, batch)[1]
        scores = batched.task.loss_and_scores(batched.lm, batch)[1]
    assert len(batched.prefix_cache) == len(single.prefix_cache) > 1
    for prefix, entry in single.prefix_cache.entries.items():
        torch.testing.assert_close(batched.prefix_cache.entries[prefix], entry, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
