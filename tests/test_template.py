import pytest
import torch
from conftest import train_tokenizer

from fedlm.model.template import FPB_LABEL_WORDS, FPB_TEMPLATE, IGNORE_INDEX, PromptTemplate, TemplateError

TOKENIZER = train_tokenizer()


def make(template: str = FPB_TEMPLATE, virtual: int | list[int] = 4, words: dict | None = None) -> PromptTemplate:
    return PromptTemplate(template, TOKENIZER, virtual, words or FPB_LABEL_WORDS)


def test_virtual_tokens_land_where_the_template_puts_them() -> None:
    template = make("<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}", 4)
    example = template.encode("profit rose", "positive")
    assert example.virtual_index[:4] == [0, 1, 2, 3]
    assert all(v == -1 for v in example.virtual_index[4:])
    text = TOKENIZER(" profit rose sentiment:", add_special_tokens=False).input_ids
    assert example.input_ids[4 : example.prompt_length] == text


def test_virtual_blocks_in_the_middle_and_split_over_markers() -> None:
    template = make("{sentence}<|VIRTUAL_PROMPT_0|> sentiment:<|VIRTUAL_PROMPT_1|>{label}", [2, 3])
    example = template.encode("loss widened", "negative")
    sentence = TOKENIZER("loss widened", add_special_tokens=False).input_ids
    middle = TOKENIZER(" sentiment:", add_special_tokens=False).input_ids
    n = len(sentence)
    assert example.input_ids[:n] == sentence
    assert example.virtual_index[n : n + 2] == [0, 1]
    assert example.input_ids[n + 2 : n + 2 + len(middle)] == middle
    start = n + 2 + len(middle)
    assert example.virtual_index[start : start + 3] == [2, 3, 4]
    assert example.prompt_length == start + 3
    assert template.total_virtual_tokens == 5


def test_loss_mask_covers_only_the_answer() -> None:
    template = make()
    batch = template.collate(
        [template.encode("profit rose", "positive"), template.encode("a much longer sentence here", "neutral")]
    )
    for row, label in enumerate(["positive", "neutral"]):
        answer = TOKENIZER(FPB_LABEL_WORDS[label], add_special_tokens=False).input_ids
        start = int(batch["prompt_length"][row])
        targets = batch["targets"][row]
        assert targets[start : start + len(answer)].tolist() == answer
        assert (targets[:start] == IGNORE_INDEX).all()
        assert (targets[start + len(answer) :] == IGNORE_INDEX).all()
        # padding is on the right and masked out of attention
        assert batch["attention_mask"][row].sum() == start + len(answer)


def test_candidates_hold_every_label_word_after_the_same_prompt() -> None:
    template = make()
    batch = template.collate([template.encode("profit rose", "positive")])
    candidates = template.candidates(batch)
    assert candidates["label"].tolist() == [0, 1, 2]
    prompt = batch["input_ids"][0, : batch["prompt_length"][0]]
    for row, word in enumerate(FPB_LABEL_WORDS.values()):
        answer = TOKENIZER(word, add_special_tokens=False).input_ids
        assert torch.equal(candidates["input_ids"][row, : len(prompt)], prompt)
        assert candidates["input_ids"][row, len(prompt) : len(prompt) + len(answer)].tolist() == answer


def test_long_sentences_are_truncated_to_max_length() -> None:
    template = PromptTemplate(FPB_TEMPLATE, TOKENIZER, 4, FPB_LABEL_WORDS, max_length=24)
    example = template.encode("profit rose in the quarter " * 20, "positive")
    assert len(example.input_ids) <= 24
    assert example.virtual_index[:4] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("template", "virtual", "message"),
    [
        ("<|VIRTUAL_PROMPT_0|> text sentiment:{label}", 4, "'{sentence}' exactly once"),
        ("<|VIRTUAL_PROMPT_0|> {sentence} {label} end", 4, "must end with '{label}'"),
        ("{sentence} sentiment:{label}", 4, "no virtual-token marker"),
        ("<|VIRTUAL_PROMPT_1|> {sentence}{label}", 4, "numbered 0..n-1"),
        ("<|VIRTUAL_PROMPT_0|> {sentence}<|VIRTUAL_PROMPT_1|>{label}", 4, "one positive count per marker"),
        ("<|VIRTUAL_PROMPT_0|> {sentence}{label}", 0, "one positive count per marker"),
    ],
)
def test_bad_templates_are_refused_with_the_field_named(template: str, virtual: int, message: str) -> None:
    with pytest.raises(TemplateError, match="model\\.(template|encoder\\.virtual_tokens)") as err:
        make(template, virtual)
    assert message in str(err.value)


def test_label_word_that_tokenizes_to_nothing_is_refused() -> None:
    with pytest.raises(TemplateError, match=r"model.label_words\['neutral'\]=''"):
        make(words={"negative": " negative", "neutral": "", "positive": " positive"})


def test_unknown_label_is_refused() -> None:
    with pytest.raises(TemplateError, match="'bullish' is not in model.label_words"):
        make().encode("profit rose", "bullish")
