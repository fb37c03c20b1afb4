"""Tasks: how a record becomes tokens, what training minimizes, and how outputs are scored."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from fedlm.tasks.classification import ClassificationTask
from fedlm.tasks.config import TaskConfig
from fedlm.tasks.generation import GenerationTask

Task = ClassificationTask | GenerationTask


def build_task(config: TaskConfig, tokenizer: PreTrainedTokenizerBase, virtual_tokens: int | list[int]) -> Task:
    config.validate()
    kind = ClassificationTask if config.kind == "classification" else GenerationTask
    return kind(config, tokenizer, virtual_tokens)


__all__ = ["ClassificationTask", "GenerationTask", "Task", "TaskConfig", "build_task"]
