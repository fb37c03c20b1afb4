"""``model.task``: what the prompted LM is adapted to do, as one typed section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedlm.errors import ConfigError
from fedlm.model.decoding import DecodingConfig
from fedlm.model.template import FPB_LABEL_WORDS, FPB_TEMPLATE
from fedlm.tasks.calibration import OBJECTIVES, Objective

Loss = Literal["answer_tokens", "label_words"]
Kind = Literal["classification", "generation"]
METRICS = ("squad", "rouge", "bleu", "chrf")


@dataclass
class TaskConfig:
    """The ``model.task:`` section: a text-to-text task over records of named fields.

    Args:
        kind: ``classification`` (the answer is a class's label word, scored by label-word probability) or
            ``generation`` (the answer is free text, scored by what the model generates).
        template: where virtual tokens (``<|VIRTUAL_PROMPT_n|>``) and the record's fields (``{name}``) go; the last
            field is the answer and ends the template.
        label_words: classification: class name -> the text the model should produce after the prompt.
        loss: ``answer_tokens``: the cross-entropy of the gold answer's tokens over the whole vocabulary;
            ``label_words`` (classification): the cross-entropy over the classes' scores (a softmax over the label
            words only; needs one-token label words).
        max_length: longest sequence in tokens; longer examples are shortened in ``truncate_field``.
        truncate_field: the field shortened when an example is too long (null: the template's first field).
        add_eos: append the end-of-sequence token to each training answer, so that the model learns where an answer
            ends (null: on for generation, off for classification, whose label words are scored, not generated).
        answer_prefix: generation: text put before the answer (a space: the answer is tokenized as a word that
            follows the prompt, as the model saw such text; classification's label words carry their own).
        references_field: generation: the field that holds every accepted answer (a list, e.g. all the lemmas of a
            synset; null: the answer field alone). Scores take the best over them.
        metrics: generation: ``squad`` (exact match and token F1 with SQuAD normalization), ``rouge`` (ROUGE-L F1),
            ``bleu`` (SacreBLEU), ``chrf``.
        calibrate: classification: label calibration (``accuracy`` or ``macro_f1``; null: none). After every
            validation one additive bias per class is fitted to the validation scores, maximizing that objective, and
            kept in the checkpoint: test, predict and export then report both raw and calibrated predictions.
        generated_labels: classification: at test (and every ``generate_every`` rounds on validation), also generate
            each answer and map it to the class whose label word it names first, as leaderboards that score generated
            text do: ``generated_acc``, and ``generated_agreement`` with the label-scoring prediction. Greedy decoding
            with one-token label words agrees wherever the first generated token is a label word, which training
            with ``loss: answer_tokens`` teaches and ``label_words`` does not.
        generated_order, generated_default: how generated text maps to a class, for a leaderboard's rule: with
            ``generated_order``, the first of these classes whose label word the text contains (as written or
            capitalized), else ``generated_default`` (null: no class, counted wrong). FlowerTune's finance
            evaluation: ``[positive, negative]``, default ``neutral``. Without them: the class named first.
        generate_every: validate by generation every this many rounds (epochs): generation on the first
            ``generate_examples`` validation examples, classification with ``generated_labels`` on all of them (0:
            generate at test only). Validation always logs the teacher-forced answer loss.
        generate_examples: the fixed validation subset that periodic generation scores.
        decoding: how answers are generated (``DecodingConfig``).
    """

    kind: Kind = "classification"
    template: str = FPB_TEMPLATE
    label_words: dict[str, str] | None = None
    loss: Loss = "answer_tokens"
    max_length: int = 512
    truncate_field: str | None = None
    add_eos: bool | None = None
    answer_prefix: str = " "
    references_field: str | None = None
    metrics: list[str] = field(default_factory=lambda: ["squad", "rouge"])
    calibrate: Objective | None = None
    generated_labels: bool = False
    generated_order: list[str] | None = None
    generated_default: str | None = None
    generate_every: int = 0
    generate_examples: int = 64
    decoding: DecodingConfig = field(default_factory=DecodingConfig)

    def __post_init__(self) -> None:
        if isinstance(self.decoding, dict):
            self.decoding = DecodingConfig(**self.decoding)
        if self.kind == "classification" and self.label_words is None:
            self.label_words = dict(FPB_LABEL_WORDS)

    @property
    def eos(self) -> bool:
        return self.kind == "generation" if self.add_eos is None else self.add_eos

    def validate(self) -> None:
        if self.kind not in ("classification", "generation"):
            raise ConfigError(f"model.task.kind={self.kind!r} is unknown; use 'classification' or 'generation'.")
        if self.loss not in ("answer_tokens", "label_words"):
            raise ConfigError(f"model.task.loss={self.loss!r} is unknown; use 'answer_tokens' or 'label_words'.")
        if self.kind == "generation":
            if self.label_words is not None or self.loss != "answer_tokens" or self.calibrate or self.generated_labels:
                raise ConfigError(
                    "model.task.kind=generation scores generated text: remove model.task.label_words, calibrate and "
                    "generated_labels, and keep model.task.loss: answer_tokens."
                )
            unknown = [name for name in self.metrics if name not in METRICS]
            if unknown or not self.metrics:
                raise ConfigError(f"model.task.metrics={self.metrics!r}: use one or more of {list(METRICS)}.")
        elif self.references_field is not None:
            raise ConfigError("model.task.references_field is for generation; a class's label word is its reference.")
        named = [*(self.generated_order or []), *([self.generated_default] if self.generated_default else [])]
        if named and (not self.generated_labels or set(named) - set(self.label_words or {})):
            raise ConfigError(
                f"model.task.generated_order={self.generated_order!r} and generated_default="
                f"{self.generated_default!r} name classes of model.task.label_words "
                f"({list(self.label_words or {})}) that generated answers map to: set model.task.generated_labels: "
                "true and use those names."
            )
        if self.calibrate is not None and self.calibrate not in OBJECTIVES:
            raise ConfigError(f"model.task.calibrate={self.calibrate!r} is unknown; use one of {OBJECTIVES} or null.")
        if self.generate_every < 0 or self.generate_examples <= 0:
            raise ConfigError(
                f"model.task.generate_every={self.generate_every} must be >= 0 (0: at test only) and "
                f"model.task.generate_examples={self.generate_examples} positive."
            )
        self.decoding.validate()
