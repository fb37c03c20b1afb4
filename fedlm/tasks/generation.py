"""Generation as a text-to-text task (closed QA over a given context, definitions, summaries): trained on the answer's
tokens and its end-of-sequence token, validated by the teacher-forced answer loss, and scored by what the model
generates, against every accepted reference, with torchmetrics' text metrics (offline, unlike HF ``evaluate``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchmetrics.functional.text import chrf_score, rouge_score, sacre_bleu_score, squad
from transformers import PreTrainedTokenizerBase

from fedlm.model.decoding import cut_at_stop, decode
from fedlm.model.prompted import Batch, PromptedLM
from fedlm.model.template import EncodedExample, PromptTemplate, TemplateError
from fedlm.tasks.config import TaskConfig
from fedlm.tasks.outputs import gather_rows, pad_ids, unpad_ids

Logged = dict[str, Any]
PER_EXAMPLE = {"squad": ("exact_match", "f1"), "rouge": ("rougeL",)}  # metrics with a score per example


def example_scores(prediction: str, references: list[str], metrics: list[str]) -> dict[str, float]:
    """One generated answer's scores, each the best over the references (SQuAD's rule for several answers)."""
    scores: dict[str, float] = {}
    if "squad" in metrics:
        target = [{"answers": {"text": references, "answer_start": [0] * len(references)}, "id": "0"}]
        found = squad([{"prediction_text": prediction, "id": "0"}], target)
        scores.update(exact_match=float(found["exact_match"]) / 100, f1=float(found["f1"]) / 100)
    if "rouge" in metrics:
        found = rouge_score(prediction, [references], rouge_keys="rougeL", accumulate="best")
        scores["rougeL"] = float(found["rougeL_fmeasure"])
    return scores


def corpus_scores(predictions: list[str], references: list[list[str]], metrics: list[str]) -> dict[str, float]:
    """BLEU and chrF, which are defined over a corpus, not as a mean of per-example scores."""
    scores: dict[str, float] = {}
    if "bleu" in metrics:
        scores["bleu"] = float(sacre_bleu_score(predictions, references))
    if "chrf" in metrics:
        scores["chrf"] = float(chrf_score(predictions, references))
    return scores


class GenerationTask(nn.Module):
    """Records with input fields and an answer field (and optionally a field of every accepted answer)."""

    def __init__(self, config: TaskConfig, tokenizer: PreTrainedTokenizerBase, virtual_tokens: int | list[int]) -> None:
        super().__init__()
        self.config = config
        self.template = PromptTemplate(
            config.template, tokenizer, virtual_tokens, config.max_length, config.truncate_field
        )
        self.outputs: list[torch.Tensor] = []  # (examples, 1 + max_new_tokens): index, generated ids (-1 padded)
        self.generating = False  # whether the evaluation in progress decodes
        self.predictions: dict[str, Any] = {}  # the last test's: each example's answer and scores

    # -- records -----------------------------------------------------------------------------------------------

    def answer_text(self, record: Mapping[str, Any]) -> str:
        value = record.get(self.template.answer_field)
        value = value[0] if isinstance(value, list) and value else value
        if not isinstance(value, str) or not value.strip():
            raise TemplateError(f"the record has no answer in field {self.template.answer_field!r}.")
        return value

    def references(self, record: Mapping[str, Any]) -> list[str]:
        """The answers a generated one is scored against: ``references_field``'s, else the answer itself."""
        field = self.config.references_field
        if field is None:
            return [self.answer_text(record)]
        value = record.get(field)
        refs = [value] if isinstance(value, str) else list(value or [])
        if not refs:
            raise TemplateError(f"the record has no references in model.task.references_field={field!r}.")
        return refs

    def encode(self, record: Mapping[str, Any], index: int = -1) -> EncodedExample:
        """The prompt followed by the answer's tokens (and end-of-sequence token: ``add_eos``)."""
        answer = self.template.tokenize(self.config.answer_prefix + self.answer_text(record).strip())
        eos = [self.template.tokenizer.eos_token_id] if self.config.eos else []
        return self.template.encode(record, answer + eos, -1, index)

    def encode_prompt(self, record: Mapping[str, Any], index: int = -1) -> EncodedExample:
        """The prompt alone, to decode from (the record needs no answer)."""
        return self.template.encode(record, [], -1, index)

    # -- training and evaluation -------------------------------------------------------------------------------

    def train_loss(self, lm: PromptedLM, batch: Batch) -> torch.Tensor:
        hidden, aligned = lm.hidden_states(batch)
        return -lm.answer_log_probs(hidden, aligned["targets"])[0].mean()

    def generate(self, lm: PromptedLM, prompts: Batch | None) -> list[list[int]]:
        return decode(lm, prompts, self.config.decoding, self.template.tokenizer)

    def predict(self, lm: PromptedLM, batch: Batch) -> dict[str, Any]:
        """Each row's generated answer (``batch`` may hold answers: they are left out)."""
        return {"generated": self.texts(self.generate(lm, self.template.prompts(batch)))}

    def texts(self, generated: list[list[int]]) -> list[str]:
        """The answers as text, cut at the first stop string."""
        decoded = self.template.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [cut_at_stop(text, self.config.decoding.stop).strip() for text in decoded]

    def start_evaluation(self, split: str, generating: bool) -> None:
        self.outputs, self.generating = [], generating

    def eval_step(self, lm: PromptedLM, batch: Batch, split: str) -> tuple[torch.Tensor, Logged]:
        """The teacher-forced answer loss; when this evaluation generates, each row's answer too (validation: the
        rows of the fixed subset only)."""
        loss = self.train_loss(lm, batch)
        if self.generating:
            chosen = batch["index"] < self.config.generate_examples if split == "val" else batch["index"] >= 0
            rows = chosen.nonzero()[:, 0]
            subset = {name: tensor[rows] for name, tensor in batch.items()} if len(rows) else None
            generated = self.generate(lm, None if subset is None else self.template.prompts(subset))
            if generated:
                ids = pad_ids(generated, self.config.decoding.max_new_tokens)
                self.outputs.append(torch.cat([subset["index"][:, None].cpu(), ids], dim=1))
        return loss, {}

    def idle_eval_step(self, lm: PromptedLM, split: str) -> None:
        lm.idle_pass()
        if self.generating:
            self.generate(lm, None)

    def end_evaluation(self, split: str, records: list[Mapping[str, Any]], fit_calibration: bool = False) -> Logged:
        """Metrics over the generated answers of every rank against the ``records``' references, and after a test
        each example's answer and scores (``predictions``). A collective."""
        if not self.generating:
            return {}
        references = [self.references(record) for record in records]
        local = torch.cat(self.outputs) if self.outputs else torch.zeros(0, 1 + self.config.decoding.max_new_tokens)
        rows = gather_rows(local.long(), len(references))
        rows = rows[rows[:, 0].argsort(stable=True)]
        rows = rows[torch.cat([torch.tensor([True]), rows[1:, 0] != rows[:-1, 0]])[: len(rows)]]  # once each
        texts = self.texts(unpad_ids(rows[:, 1:]))
        examples = []
        for index, text in zip(rows[:, 0].tolist(), texts):
            scores = example_scores(text, references[index], self.config.metrics)
            examples.append({"index": index, "generated": text, "references": references[index], **scores})
        prefix = f"{split}/" if split == "test" else "val/generated/"
        logged: Logged = {}
        for name in (name for metric in self.config.metrics for name in PER_EXAMPLE.get(metric, ())):
            logged[prefix + name] = sum(e[name] for e in examples) / max(1, len(examples))
        corpus = corpus_scores(texts, [references[e["index"]] for e in examples], self.config.metrics)
        logged.update({prefix + name: value for name, value in corpus.items()})
        if split == "test":
            self.predictions = {"examples": examples}
        return logged
