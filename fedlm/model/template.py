"""NeMo-style prompt templates: where the virtual tokens, the sentence and the answer go.

``"<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}"`` expands marker 0 into the first block of virtual
tokens. Text between markers is tokenized as one piece (sentence included) so that tokenization matches
what the model saw in pre-training; ``{label}`` must end the template because the answer is what the
loss and the label scoring read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedlm.errors import FedlmError

VIRTUAL_MARKER = re.compile(r"<\|VIRTUAL_PROMPT_(\d+)\|>")
FPB_TEMPLATE = "<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}"
FPB_LABEL_WORDS = {"negative": " negative", "neutral": " neutral", "positive": " positive"}
IGNORE_INDEX = -100


class TemplateError(FedlmError, ValueError):
    """A template or label word the model cannot use; the message names the config field."""


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]  # placeholder id at virtual positions
    virtual_index: list[int]  # -1 for real tokens, else the row of the virtual-token table
    prompt_length: int  # the answer occupies [prompt_length, len(input_ids))
    label: int


class PromptTemplate:
    """Turns (sentence, label) pairs into token ids with virtual-token slots and an answer span."""

    def __init__(
        self,
        template: str,
        tokenizer: PreTrainedTokenizerBase,
        virtual_tokens: int | list[int],
        label_words: dict[str, str],
        max_length: int = 512,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise TemplateError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first.")
        splits = [virtual_tokens] if isinstance(virtual_tokens, int) else list(virtual_tokens)
        self.pieces = self._parse(template, splits)
        self.total_virtual_tokens = sum(splits)
        self.label_names = list(label_words)
        self.label_ids = {name: i for i, name in enumerate(self.label_names)}
        self.answers = [self._tokenize_label(name, word) for name, word in label_words.items()]
        if len({tuple(a) for a in self.answers}) < len(self.answers):
            raise TemplateError(f"model.label_words={label_words!r}: two label words tokenize identically.")
        self.single_token_answers = all(len(a) == 1 for a in self.answers)
        with_special = tokenizer("x", add_special_tokens=True).input_ids
        without = tokenizer("x", add_special_tokens=False).input_ids
        start = with_special.index(without[0]) if without and without[0] in with_special else 0
        self.prefix_ids = with_special[:start]  # e.g. BOS for Llama-style tokenizers

    @staticmethod
    def _parse(template: str, splits: list[int]) -> list[str | int]:
        """Split into text pieces (str) and virtual blocks (int: their token count), dropping ``{label}``."""
        if template.count("{sentence}") != 1:
            raise TemplateError(f"model.template={template!r} must contain '{{sentence}}' exactly once.")
        if template.count("{label}") != 1 or not template.endswith("{label}"):
            raise TemplateError(f"model.template={template!r} must end with '{{label}}' (the answer), once.")
        markers = [int(m) for m in VIRTUAL_MARKER.findall(template)]
        if not markers:
            raise TemplateError(
                f"model.template={template!r} has no virtual-token marker; add '<|VIRTUAL_PROMPT_0|>' where the "
                "virtual tokens go."
            )
        if sorted(markers) != list(range(len(markers))):
            raise TemplateError(f"model.template={template!r}: markers must be numbered 0..n-1, each used once.")
        if len(splits) != len(markers) or any(n <= 0 for n in splits):
            raise TemplateError(
                f"model.encoder.virtual_tokens={splits!r} must give one positive count per marker of model.template "
                f"({len(markers)} marker(s))."
            )
        pieces: list[str | int] = []
        for i, chunk in enumerate(VIRTUAL_MARKER.split(template.removesuffix("{label}"))):
            if i % 2 == 1:
                pieces.append(splits[int(chunk)])
            elif chunk:
                pieces.append(chunk)
        return pieces

    def _tokenize_label(self, name: str, word: str) -> list[int]:
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise TemplateError(f"model.label_words[{name!r}]={word!r} tokenizes to nothing; use a non-empty word.")
        return ids

    def encode(self, sentence: str, label: str) -> EncodedExample:
        """The gold sequence: prompt followed by the label's answer tokens."""
        if label not in self.label_ids:
            raise TemplateError(f"label {label!r} is not in model.label_words (known: {self.label_names}).")
        answer = self.answers[self.label_ids[label]]
        budget = self.max_length - len(answer)
        ids, virtual = self._prompt(sentence)
        if len(ids) > budget:
            sentence_ids = self.tokenizer(sentence, add_special_tokens=False).input_ids
            keep = len(sentence_ids) - (len(ids) - budget)
            if keep <= 0:
                raise TemplateError(f"model.max_length={self.max_length} leaves no room for the sentence.")
            ids, virtual = self._prompt(self.tokenizer.decode(sentence_ids[:keep]))
            ids, virtual = ids[:budget], virtual[:budget]  # re-tokenized text can shift by a token
        return EncodedExample(ids + answer, virtual + [-1] * len(answer), len(ids), self.label_ids[label])

    def _prompt(self, sentence: str) -> tuple[list[int], list[int]]:
        ids, virtual = list(self.prefix_ids), [-1] * len(self.prefix_ids)
        next_row = 0
        for piece in self.pieces:
            if isinstance(piece, int):
                ids += [self.pad_id] * piece
                virtual += list(range(next_row, next_row + piece))
                next_row += piece
            else:
                text = self.tokenizer(piece.replace("{sentence}", sentence), add_special_tokens=False).input_ids
                ids += text
                virtual += [-1] * len(text)
        return ids, virtual

    def fixed_head(self) -> tuple[int, ...]:
        """Token ids that begin every prompt: special prefix tokens and the text before ``{sentence}``.

        The last token of that text is left out, since a tokenizer may merge it with the sentence's first; what
        remains is what a prefix cache can store once for all sentences (an instruction before the sentence).
        """
        first = self.pieces[0]
        lead = first.split("{sentence}")[0] if isinstance(first, str) else ""
        ids = self.tokenizer(lead, add_special_tokens=False).input_ids if lead else []
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
        }

    def candidates(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One sequence per (example, label word), example-major, for scoring multi-token label words."""
        examples = []
        for row, prompt_length in enumerate(batch["prompt_length"].tolist()):
            ids = batch["input_ids"][row, :prompt_length].tolist()
            virtual = batch["virtual_index"][row, :prompt_length].tolist()
            for label, answer in enumerate(self.answers):
                examples.append(EncodedExample(ids + answer, virtual + [-1] * len(answer), prompt_length, label))
        return self.collate(examples)
