import pytest
import torch
from conftest import train_tokenizer

from fedlm.model.template import FPB_LABEL_WORDS, FPB_TEMPLATE, IGNORE_INDEX, PromptTemplate, TemplateError
from fedlm.tasks import ClassificationTask, TaskConfig

TOKENIZER = train_tokenizer()


def make(template: str = FPB_TEMPLATE, virtual: int | list[int] = 4, **options: object) -> PromptTemplate:
    return PromptTemplate(template, TOKENIZER, virtual, **options)


def make_task(
    template: str = FPB_TEMPLATE, virtual: int | list[int] = 4, words: dict | None = None, **config: object
) -> ClassificationTask:
    task_config = TaskConfig(template=template, label_words=words or dict(FPB_LABEL_WORDS), **config)
    return ClassificationTask(task_config, TOKENIZER, virtual)


def ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False).input_ids


def test_virtual_tokens_land_where_the_template_puts_them() -> None:
    task = make_task("<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}", 4)
    example = task.encode({"sentence": "profit rose", "label": "positive"})
    assert example.virtual_index[:4] == [0, 1, 2, 3]
    assert all(v == -1 for v in example.virtual_index[4:])
    assert example.input_ids[4 : example.prompt_length] == ids(" profit rose sentiment:")
    assert example.input_ids[example.prompt_length :] == ids(FPB_LABEL_WORDS["positive"])
    assert example.label == 2


def test_virtual_blocks_in_the_middle_and_split_over_markers() -> None:
    task = make_task("{sentence}<|VIRTUAL_PROMPT_0|> sentiment:<|VIRTUAL_PROMPT_1|>{label}", [2, 3])
    example = task.encode({"sentence": "loss widened", "label": "negative"})
    sentence = ids("loss widened")
    middle = ids(" sentiment:")
    n = len(sentence)
    assert example.input_ids[:n] == sentence
    assert example.virtual_index[n : n + 2] == [0, 1]
    assert example.input_ids[n + 2 : n + 2 + len(middle)] == middle
    start = n + 2 + len(middle)
    assert example.virtual_index[start : start + 3] == [2, 3, 4]
    assert example.prompt_length == start + 3
    assert task.template.total_virtual_tokens == 5


def test_several_input_fields_fill_the_template_and_the_last_field_is_the_answer() -> None:
    template = make("{context} <|VIRTUAL_PROMPT_0|> Question: {question} Answer:{answer}", 2)
    assert (template.fields, template.answer_field) == (["context", "question"], "answer")
    answer = ids(" yes")
    example = template.encode({"context": "profit rose", "question": "up?"}, answer, index=7)
    head, tail = ids("profit rose "), ids(" Question: up? Answer:")
    assert example.input_ids[: len(head)] == head
    assert example.virtual_index[len(head) : len(head) + 2] == [0, 1]
    assert example.input_ids[len(head) + 2 : example.prompt_length] == tail
    assert example.input_ids[example.prompt_length :] == answer
    assert (example.label, example.index) == (-1, 7)
    with pytest.raises(TemplateError, match="the record has no field 'question'"):
        template.encode({"context": "profit rose"}, answer)


def test_loss_mask_covers_only_the_answer() -> None:
    task = make_task()
    records = [{"sentence": "profit rose", "label": "positive"}, {"sentence": "a much longer one", "label": "neutral"}]
    batch = task.template.collate([task.encode(record, index) for index, record in enumerate(records)])
    assert batch["index"].tolist() == [0, 1] and batch["label"].tolist() == [2, 1]
    for row, record in enumerate(records):
        answer = ids(FPB_LABEL_WORDS[record["label"]])
        start = int(batch["prompt_length"][row])
        targets = batch["targets"][row]
        assert targets[start : start + len(answer)].tolist() == answer
        assert (targets[:start] == IGNORE_INDEX).all()
        assert (targets[start + len(answer) :] == IGNORE_INDEX).all()
        # padding is on the right and masked out of attention
        assert batch["attention_mask"][row].sum() == start + len(answer)


def test_candidates_hold_every_label_word_after_the_same_prompt() -> None:
    task = make_task()
    batch = task.template.collate([task.encode({"sentence": "profit rose", "label": "positive"})])
    candidates = task.candidates(batch)
    assert candidates["label"].tolist() == [0, 1, 2]
    prompt = batch["input_ids"][0, : batch["prompt_length"][0]]
    for row, word in enumerate(FPB_LABEL_WORDS.values()):
        answer = ids(word)
        assert torch.equal(candidates["input_ids"][row, : len(prompt)], prompt)
        assert candidates["input_ids"][row, len(prompt) : len(prompt) + len(answer)].tolist() == answer


def test_long_sentences_are_truncated_to_max_length() -> None:
    task = make_task(max_length=24)
    example = task.encode({"sentence": "profit rose in the quarter " * 20, "label": "positive"})
    assert len(example.input_ids) <= 24
    assert example.virtual_index[:4] == [0, 1, 2, 3]
    assert example.input_ids[example.prompt_length :] == ids(FPB_LABEL_WORDS["positive"])  # the answer is kept whole


@pytest.mark.parametrize(
    ("template", "virtual", "message"),
    [
        ("<|VIRTUAL_PROMPT_0|> text sentiment:{label}", 4, "must name at least one input field"),
        ("<|VIRTUAL_PROMPT_0|> {sentence} {label} end", 4, "end with the answer field"),
        ("<|VIRTUAL_PROMPT_0|> {label} {sentence} {label}", 4, "the answer field {label} appears twice"),
        ("{sentence} sentiment:{label}", 4, "no virtual-token marker"),
        ("<|VIRTUAL_PROMPT_1|> {sentence}{label}", 4, "numbered 0..n-1"),
        ("<|VIRTUAL_PROMPT_0|> {sentence}<|VIRTUAL_PROMPT_1|>{label}", 4, "one positive count per marker"),
        ("<|VIRTUAL_PROMPT_0|> {sentence}{label}", 0, "one positive count per marker"),
    ],
)
def test_bad_templates_are_refused_with_the_field_named(template: str, virtual: int, message: str) -> None:
    with pytest.raises(TemplateError, match="model\\.(task\\.template|encoder\\.virtual_tokens)") as err:
        make(template, virtual)
    assert message in str(err.value)


def test_truncate_field_must_be_an_input_field() -> None:
    with pytest.raises(TemplateError, match="model.task.truncate_field='label' is not a field"):
        make(truncate_field="label")


def test_label_word_that_tokenizes_to_nothing_is_refused() -> None:
    with pytest.raises(TemplateError, match=r"model.task.label_words\['neutral'\]=''"):
        make_task(words={"negative": " negative", "neutral": "", "positive": " positive"})


def test_unknown_label_is_refused() -> None:
    with pytest.raises(TemplateError, match="'bullish' is not in model.task.label_words"):
        make_task().encode({"sentence": "profit rose", "label": "bullish"})
