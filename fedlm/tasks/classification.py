"""Classification as a text-to-text task: the answer is a class's label word, scored by its log-probability after the
prompt (constrained scoring), and optionally also by the label that generated text names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score
from transformers import PreTrainedTokenizerBase

from fedlm.model.decoding import cut_at_stop, decode
from fedlm.model.prompted import Batch, PromptedLM
from fedlm.model.template import EncodedExample, PromptTemplate, TemplateError
from fedlm.tasks.calibration import fit_label_biases, split_half
from fedlm.tasks.config import TaskConfig
from fedlm.tasks.outputs import gather_rows

Logged = dict[str, Any]


def label_named(text: str, words: list[str], order: list[int] | None = None, default: int = -1) -> int:
    """The class whose label word ``text`` names first (case-insensitive); or, given ``order``, the first class in
    that order whose word it contains as written or capitalized (FlowerTune's rule); ``default`` when none."""
    if order is not None:
        return next((i for i in order if words[i] in text or words[i].capitalize() in text), default)
    lowered = text.lower()
    found = [(lowered.find(word), i) for i, word in enumerate(words) if word and word in lowered]
    return min(found)[1] if found else default


class ClassificationTask(nn.Module):
    """Records with input fields and a class label; metrics, calibration biases and per-example scores."""

    def __init__(self, config: TaskConfig, tokenizer: PreTrainedTokenizerBase, virtual_tokens: int | list[int]) -> None:
        super().__init__()
        self.config = config
        self.template = PromptTemplate(
            config.template, tokenizer, virtual_tokens, config.max_length, config.truncate_field
        )
        label_words = config.label_words
        self.label_names = list(label_words)
        self.label_ids = {name: i for i, name in enumerate(self.label_names)}
        self.answers = [self._label_ids(name, word) for name, word in label_words.items()]
        if len({tuple(a) for a in self.answers}) < len(self.answers):
            raise TemplateError(f"model.task.label_words={label_words!r}: two label words tokenize identically.")
        self.single_token_answers = all(len(a) == 1 for a in self.answers)
        if config.loss == "label_words" and not self.single_token_answers:
            raise TemplateError(
                "model.task.loss=label_words scores each class by its label word's one token, but some of "
                f"model.task.label_words {label_words} take several tokens with this tokenizer; pick one-token words "
                "or model.task.loss=answer_tokens."
            )
        num_classes = len(label_words)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.val_metrics, self.test_metrics = metrics.clone(prefix="val/"), metrics.clone(prefix="test/")
        self.test_calibrated_metrics = metrics.clone(prefix="test/calibrated/")
        # Zero until a validation fits it; float64 so that a fitted midpoint between two scores stays between them.
        self.register_buffer("label_bias", torch.zeros(num_classes, dtype=torch.float64))
        self.val_class_f1, self.test_class_f1 = (MulticlassF1Score(num_classes, average=None) for _ in range(2))
        self.val_confusion, self.test_confusion = (MulticlassConfusionMatrix(num_classes) for _ in range(2))
        self.outputs: list[torch.Tensor] = []  # (examples, 2 + classes [+ 1]): index, label, scores, generated class
        self.generating = False  # whether the evaluation in progress also generates each answer
        self.predictions: dict[str, Any] = {}  # the last test's, per example

    def _label_ids(self, name: str, word: str) -> list[int]:
        ids = self.template.tokenize(word)
        if not ids:
            raise TemplateError(
                f"model.task.label_words[{name!r}]={word!r} tokenizes to nothing; use a non-empty word."
            )
        return ids + ([self.template.tokenizer.eos_token_id] if self.config.eos else [])

    # -- records -----------------------------------------------------------------------------------------------

    def encode(self, record: Mapping[str, Any], index: int = -1) -> EncodedExample:
        """The prompt followed by the label's answer tokens."""
        label = str(record.get(self.template.answer_field, ""))
        if label not in self.label_ids:
            raise TemplateError(f"label {label!r} is not in model.task.label_words (known: {self.label_names}).")
        answer = self.answers[self.label_ids[label]]
        return self.template.encode(record, answer, self.label_ids[label], index)

    # -- losses and scores -------------------------------------------------------------------------------------

    def train_loss(self, lm: PromptedLM, batch: Batch) -> torch.Tensor:
        """The mean answer-token loss of the gold labels, or the cross-entropy over the label words' scores."""
        hidden, aligned = lm.hidden_states(batch)
        if self.config.loss == "answer_tokens":
            return -lm.answer_log_probs(hidden, aligned["targets"])[0].mean()
        logits = lm.last_prompt_logits(hidden, aligned)[:, [answer[0] for answer in self.answers]]
        return F.cross_entropy(logits, aligned["label"])

    def loss_and_scores(self, lm: PromptedLM, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss, and the (batch, classes) log-probability of each label word after the prompt."""
        hidden, aligned = lm.hidden_states(batch)
        loss = None if self.config.loss == "label_words" else -lm.answer_log_probs(hidden, aligned["targets"])[0].mean()
        if self.single_token_answers:
            # Every label word is one token: the gold pass already holds all of their scores.
            log_probs = F.log_softmax(lm.last_prompt_logits(hidden, aligned), dim=-1)
            scores = log_probs[:, [answer[0] for answer in self.answers]]
            if loss is None:  # the softmax over the scores is the one over the label words' logits: train_loss's
                loss = F.cross_entropy(scores, aligned["label"])
            return loss, scores
        candidates = {k: v.to(lm.device) for k, v in self.candidates(batch).items()}
        hidden, aligned = lm.hidden_states(candidates)
        token_log_probs, rows = lm.answer_log_probs(hidden, aligned["targets"])
        totals = torch.zeros(len(candidates["label"]), device=lm.device).index_add_(0, rows, token_log_probs)
        return loss, totals.view(-1, len(self.answers))

    def candidates(self, batch: Batch) -> Batch:
        """One sequence per (example, label word), example-major, for scoring multi-token label words."""
        examples = []
        for row, prompt_length in enumerate(batch["prompt_length"].tolist()):
            ids = batch["input_ids"][row, :prompt_length].tolist()
            virtual = batch["virtual_index"][row, :prompt_length].tolist()
            for label, answer in enumerate(self.answers):
                examples.append(EncodedExample(ids + answer, virtual + [-1] * len(answer), prompt_length, label))
        return self.template.collate(examples)

    def calibrated_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The label scores plus the fitted per-class biases (unchanged while there are none)."""
        return scores.double() + self.label_bias if bool(self.label_bias.any()) else scores

    def generated_classes(self, lm: PromptedLM, batch: Batch | None) -> list[int]:
        """The class each row's generated answer names (-1: none)."""
        prompts = None if batch is None else self.template.prompts(batch)
        generated = decode(lm, prompts, self.config.decoding, self.template.tokenizer)
        words = [word.strip().lower() for word in self.config.label_words.values()]
        names, c = list(self.config.label_words), self.config
        order = None if c.generated_order is None else [names.index(name) for name in c.generated_order]
        default = -1 if c.generated_default is None else names.index(c.generated_default)
        texts = self.template.tokenizer.batch_decode(generated)
        return [label_named(cut_at_stop(text, c.decoding.stop), words, order, default) for text in texts]

    # -- evaluation --------------------------------------------------------------------------------------------

    def eval_step(self, lm: PromptedLM, batch: Batch, split: str) -> tuple[torch.Tensor, Logged]:
        """Score a batch: its loss and what to log per batch; keeps the rows for ``evaluated``."""
        loss, scores = self.loss_and_scores(lm, batch)
        preds, labels = scores.argmax(-1), batch["label"]
        metrics = getattr(self, f"{split}_metrics")
        metrics.update(preds, labels)
        getattr(self, f"{split}_class_f1").update(preds, labels)
        getattr(self, f"{split}_confusion").update(preds, labels)
        logged: Logged = dict(metrics)
        if split == "test" and self.config.calibrate is not None:
            self.test_calibrated_metrics.update(self.calibrated_scores(scores).argmax(-1), labels)
            logged.update(self.test_calibrated_metrics)
        columns = [batch["index"][:, None].double(), labels[:, None].double(), scores.double()]
        if self.generating:
            columns.append(torch.tensor(self.generated_classes(lm, batch), dtype=torch.float64)[:, None])
        self.outputs.append(torch.cat([c.cpu() for c in columns], dim=1))
        return loss, logged

    def idle_eval_step(self, lm: PromptedLM, split: str) -> None:
        """The forwards of ``eval_step`` on no rows, for a rank past its share (see ``PromptedLM.idle_pass``)."""
        for _ in range(1 if self.single_token_answers else 2):  # multi-token answers: gold, then candidates
            lm.idle_pass()
        if self.generating:
            self.generated_classes(lm, None)

    def start_evaluation(self, split: str, generating: bool) -> None:
        """``generating`` is the module's schedule (at test, and every ``generate_every`` rounds); classification
        follows it when ``generated_labels`` asks, on every row (a label word is a token or two)."""
        self.generating = generating and self.config.generated_labels
        # Reset here, not after logging: state made under `validate`'s inference mode could not be updated by
        # fit's validation (no-grad mode) later.
        getattr(self, f"{split}_class_f1").reset()
        getattr(self, f"{split}_confusion").reset()
        self.outputs = []

    def evaluated(self, size: int) -> torch.Tensor:
        """Every rank's rows of the last evaluation, in dataset order (a collective)."""
        width = 2 + len(self.answers) + int(self.config.generated_labels)
        local = torch.cat(self.outputs) if self.outputs else torch.zeros(0, width, dtype=torch.float64)
        if local.shape[1] != width:  # validation rows carry no generated class
            local = torch.cat([local, torch.full((len(local), width - local.shape[1]), -1.0, dtype=local.dtype)], 1)
        return gather_rows(local, size)

    def end_evaluation(self, split: str, records: list[Mapping[str, Any]], fit_calibration: bool) -> Logged:
        """Per-class F1 and the confusion matrix (as scalars, so that every logger keeps them), the generated labels'
        accuracy, after a validation the calibration biases, and after a test each example's prediction
        (``predictions``). A collective when it gathers rows."""
        size = len(records)
        names = self.label_names
        class_f1, confusion = getattr(self, f"{split}_class_f1"), getattr(self, f"{split}_confusion")
        logged: Logged = {f"{split}/f1_{name}": f1 for name, f1 in zip(names, class_f1.compute())}
        matrix = confusion.compute()
        for i, true in enumerate(names):
            for j, pred in enumerate(names):
                logged[f"{split}/confusion/{true}_as_{pred}"] = matrix[i, j].float()
        if self.generating:
            rows = self.evaluated(size)
            generated, scored = rows[:, -1], rows[:, 2 : 2 + len(self.answers)].argmax(-1)
            logged[f"{split}/generated_acc"] = float((generated == rows[:, 1]).double().mean()) if len(rows) else 0.0
            logged[f"{split}/generated_agreement"] = float((generated == scored).double().mean()) if len(rows) else 0.0
        if fit_calibration:
            logged.update(self.fit_calibration(size))
        if split == "test":
            self.predictions = self.test_predictions(size)
        return logged

    def fit_calibration(self, size: int) -> Logged:
        """Fit the label biases to the last validation's scores (every rank alike); what they are worth on the half of
        the validation set they were not fitted on."""
        rows = self.evaluated(size)
        labels, scores = rows[:, 1].long(), rows[:, 2 : 2 + len(self.answers)]
        objective = self.config.calibrate
        self.label_bias.copy_(fit_label_biases(scores, labels, objective))
        raw, calibrated = split_half(scores, labels, objective)
        logged: Logged = {
            f"val/calibration/halves_raw_{objective}": raw,
            f"val/calibration/halves_calibrated_{objective}": calibrated,
        }
        logged.update({f"val/calibration/bias_{n}": b for n, b in zip(self.label_names, self.label_bias.tolist())})
        return logged

    def test_predictions(self, size: int) -> dict[str, Any]:
        """Gold, predicted (and calibrated, generated) class of each test example of the last test. A collective."""
        rows = self.evaluated(size)
        scores = rows[:, 2 : 2 + len(self.answers)]
        predictions: dict[str, Any] = {
            "classes": self.label_names,
            "label": rows[:, 1].long().tolist(),
            "predicted": scores.argmax(-1).tolist(),
        }
        if self.config.calibrate is not None:
            predictions["predicted_calibrated"] = self.calibrated_scores(scores).argmax(-1).tolist()
        if self.config.generated_labels:
            predictions["predicted_generated"] = rows[:, -1].long().tolist()
        return predictions

    def predict(self, lm: PromptedLM, batch: Batch) -> dict[str, Any]:
        """Each row's label and class probabilities (renormalized over the label words)."""
        _, scores = self.loss_and_scores(lm, batch)
        probs = self.calibrated_scores(scores).softmax(-1).float()
        return {"label": [self.label_names[i] for i in probs.argmax(-1).tolist()], "probs": probs.cpu()}
