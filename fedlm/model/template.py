"""NeMo-style prompt templates: where the virtual tokens, the record's fields and the answer go.

``"<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}"`` expands marker 0 into the first block of virtual tokens, and
``"{context} <|VIRTUAL_PROMPT_0|> Question: {question} Answer:{answer}"`` reads two fields of a record. Text between
markers is tokenized as one piece (fields substituted) so that tokenization matches what the model saw in
pre-training. The template's last field is the answer: it must end the template, because the answer is what the loss
reads and what decoding produces. A too long example is shortened in one field (``truncate_field``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedlm.errors import FedlmError

VIRTUAL_MARKER = re.compile(r"<\|VIRTUAL_PROMPT_(\d+)\|>")
FIELD = re.compile(r"\{(\w+)\}")
FPB_TEMPLATE = "<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}"
FPB_LABEL_WORDS = {"negative": " negative", "neutral": " neutral", "positive": " positive"}
IGNORE_INDEX = -100


class TemplateError(FedlmError, ValueError):
    """A template or label word the model cannot use; the message names the config field."""


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]  # placeholder id at virtual positions
    virtual_index: list[int]  # -1 for real tokens, else the row of the virtual-token table
    prompt_length: int  # the answer occupies [prompt_length, len(input_ids)); nothing after it at inference
    label: int  # the gold class of a classification task; -1 otherwise
    index: int = -1  # the example's position in its split: where its references are


class PromptTemplate:
    """Turns a record's fields into token ids with virtual-token slots, and an answer's ids after them."""

    def __init__(
        self,
        template: str,
        tokenizer: PreTrainedTokenizerBase,
        virtual_tokens: int | list[int],
        max_length: int = 512,
        truncate_field: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise TemplateError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first.")
        splits = [virtual_tokens] if isinstance(virtual_tokens, int) else list(virtual_tokens)
        self.answer_field, self.fields = self._fields(template)
        self.truncate_field = truncate_field or self.fields[0]
        if self.truncate_field not in self.fields:
            raise TemplateError(
                f"model.task.truncate_field={truncate_field!r} is not a field of model.task.template={template!r} "
                f"(its input fields: {self.fields})."
            )
        self.pieces = self._parse(template, splits)
        self.total_virtual_tokens = sum(splits)
        with_special = tokenizer("x", add_special_tokens=True).input_ids
        without = tokenizer("x", add_special_tokens=False).input_ids
        start = with_special.index(without[0]) if without and without[0] in with_special else 0
        self.prefix_ids = with_special[:start]  # e.g. BOS for Llama-style tokenizers

    @staticmethod
    def _fields(template: str) -> tuple[str, list[str]]:
        """The answer field (the last one, ending the template) and the input fields in order of appearance."""
        names = FIELD.findall(template)
        if len(names) < 2 or not template.endswith("{" + names[-1] + "}"):
            raise TemplateError(
                f"model.task.template={template!r} must name at least one input field and end with the answer field, "
                "e.g. '{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}'."
            )
        answer, inputs = names[-1], list(dict.fromkeys(names[:-1]))
        if answer in inputs:
            raise TemplateError(f"model.task.template={template!r}: the answer field {{{answer}}} appears twice.")
        return answer, inputs

    def _parse(self, template: str, splits: list[int]) -> list[str | int]:
        """Split into text pieces (str) and virtual blocks (int: their token count), dropping the answer field."""
        markers = [int(m) for m in VIRTUAL_MARKER.findall(template)]
        if not markers:
            raise TemplateError(
                f"model.task.template={template!r} has no virtual-token marker; add '<|VIRTUAL_PROMPT_0|>' where the "
                "virtual tokens go."
            )
        if sorted(markers) != list(range(len(markers))):
            raise TemplateError(f"model.task.template={template!r}: markers must be numbered 0..n-1, each used once.")
        if len(splits) != len(markers) or any(n <= 0 for n in splits):
            raise TemplateError(
                f"model.encoder.virtual_tokens={splits!r} must give one positive count per marker of "
                f"model.task.template ({len(markers)} marker(s))."
            )
        pieces: list[str | int] = []
        for i, chunk in enumerate(VIRTUAL_MARKER.split(template.removesuffix("{" + self.answer_field + "}"))):
            if i % 2 == 1:
                pieces.append(splits[int(chunk)])
            elif chunk:
                pieces.append(chunk)
        return pieces

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode(self, fields: Mapping[str, str], answer: list[int], label: int = -1, index: int = -1) -> EncodedExample:
        """The prompt made of ``fields`` followed by the ``answer`` ids (none: a prompt to decode from), shortened
        in ``truncate_field`` to fit ``max_length``."""
        missing = [name for name in self.fields if name not in fields]
        if missing:
            raise TemplateError(f"the record has no field {missing[0]!r}, which model.task.template names.")
        budget = self.max_length - len(answer)
        ids, virtual = self._prompt(fields)
        if len(ids) > budget:
            long_ids = self.tokenize(fields[self.truncate_field])
            keep = len(long_ids) - (len(ids) - budget)
            if keep <= 0:
                raise TemplateError(
                    f"model.task.max_length={self.max_length} leaves no room for field {self.truncate_field!r}."
                )
            ids, virtual = self._prompt({**fields, self.truncate_field: self.tokenizer.decode(long_ids[:keep])})
            ids, virtual = ids[:budget], virtual[:budget]  # re-tokenized text can shift by a token
        return EncodedExample(ids + answer, virtual + [-1] * len(answer), len(ids), label, index)

    def _prompt(self, fields: Mapping[str, str]) -> tuple[list[int], list[int]]:
        ids, virtual = list(self.prefix_ids), [-1] * len(self.prefix_ids)
        next_row = 0
        for piece in self.pieces:
            if isinstance(piece, int):
                ids += [self.pad_id] * piece
                virtual += list(range(next_row, next_row + piece))
                next_row += piece
            else:
                text = self.tokenize(FIELD.sub(lambda match: str(fields[match.group(1)]), piece))
                ids += text
                virtual += [-1] * len(text)
        return ids, virtual

    def fixed_head(self) -> tuple[int, ...]:
        """Token ids that begin every prompt: special prefix tokens and the text before the first field.

        The last token of that text is left out, since a tokenizer may merge it with the field's first; what
        remains is what a prefix cache can store once for all records (an instruction before the input).
        """
        first = self.pieces[0]
        lead = FIELD.split(first)[0] if isinstance(first, str) else ""
        ids = self.tokenize(lead) if lead else []
        return (*self.prefix_ids, *ids[:-1])

    def collate(self, examples: list[EncodedExample]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest example of the batch (dynamic padding)."""
        length = max(len(e.input_ids) for e in examples)
        batch = len(examples)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        virtual_index = torch.full((batch, length), -1, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        targets = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            input_ids[row, :n] = torch.tensor(e.input_ids)
            virtual_index[row, :n] = torch.tensor(e.virtual_index)
            attention_mask[row, :n] = 1
            targets[row, e.prompt_length : n] = input_ids[row, e.prompt_length : n]
        return {
            "input_ids": input_ids,
            "virtual_index": virtual_index,
            "attention_mask": attention_mask,
            "targets": targets,  # answer tokens only; everything else is IGNORE_INDEX
            "prompt_length": torch.tensor([e.prompt_length for e in examples]),
            "label": torch.tensor([e.label for e in examples]),
            "index": torch.tensor([e.index for e in examples]),
        }

    def prompts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch without its answers: what decoding starts from."""
        examples = [
            EncodedExample(
                batch["input_ids"][row, :length].tolist(),
                batch["virtual_index"][row, :length].tolist(),
                length,
                int(batch["label"][row]),
                int(batch["index"][row]),
            )
            for row, length in enumerate(batch["prompt_length"].tolist())
        ]
        return {name: tensor.to(batch["input_ids"].device) for name, tensor in self.collate(examples).items()}
