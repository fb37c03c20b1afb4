"""Readers for labelled sentences: Financial PhraseBank files and generic JSONL/CSV tables."""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedlm.errors import FedlmError

PHRASEBANK_ENV = "FEDLM_FPB_DIR"
PHRASEBANK_LABELS = ("negative", "neutral", "positive")
Agreement = Literal["50", "66", "75", "all"]
PHRASEBANK_FILES: dict[str, str] = {
    "50": "Sentences_50Agree.txt",
    "66": "Sentences_66Agree.txt",
    "75": "Sentences_75Agree.txt",
    "all": "Sentences_AllAgree.txt",
}


class DataError(FedlmError, ValueError):
    """Bad data or data config; the message names the file and line or the config field."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    origin: str  # "file:line", so that later errors can point at the source


def read_text(path: Path) -> str:
    """UTF-8 if it decodes, else latin-1 (the encoding Financial PhraseBank v1.0 ships in)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def phrasebank_file(path: str | None, agreement: Agreement) -> Path:
    if agreement not in PHRASEBANK_FILES:
        raise DataError(f"data.agreement={agreement!r} is unknown; use one of {sorted(PHRASEBANK_FILES)}.")
    root = path or os.environ.get(PHRASEBANK_ENV)
    if not root:
        raise DataError(
            f"Financial PhraseBank location not set: pass data.path (the FinancialPhraseBank-v1.0 folder) or set "
            f"the {PHRASEBANK_ENV} environment variable."
        )
    file = Path(root).expanduser() / PHRASEBANK_FILES[agreement]
    if not file.is_file():
        raise DataError(
            f"{file} does not exist: data.path (or {PHRASEBANK_ENV}) must be the folder that holds "
            f"{PHRASEBANK_FILES[agreement]} (the unzipped FinancialPhraseBank-v1.0)."
        )
    return file


def existing_file(path: str, field: str) -> Path:
    """``path`` as a file that exists, else an error naming the config ``field`` that gave it."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{field}: {file} does not exist.")
    return file


def format_phrasebank(examples: list[Example]) -> str:
    """The ``sentence@label`` lines that ``read_phrasebank`` reads back as the same examples."""
    return "".join(f"{example.text}@{example.label}\n" for example in examples)


def read_phrasebank(file: Path) -> list[Example]:
    """Lines of ``sentence@label``; the last '@' separates the label."""
    examples = []
    for number, line in enumerate(read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        origin = f"{file}:{number}"
        sentence, at, label = line.rpartition("@")
        if not at:
            raise DataError(f"{origin}: no '@' between sentence and label in {line[:80]!r}.")
        label = label.strip()
        if label not in PHRASEBANK_LABELS:
            raise DataError(f"{origin}: unknown label {label!r}; expected one of {PHRASEBANK_LABELS}.")
        if not sentence.strip():
            raise DataError(f"{origin}: empty sentence.")
        examples.append(Example(sentence.strip(), label, origin))
    if not examples:
        raise DataError(f"{file} holds no examples.")
    return examples


def phrasebank_levels(path: str | None) -> dict[str, list[Example]]:
    """Each sentence once, under its exact agreement level, from the highest level down.

    The files are nested (50Agree contains 66Agree contains 75Agree contains AllAgree), so a sentence's level is
    the highest file it appears in: "all" (100% of annotators agree), "75" (75-99%), "66" (66-74%), "50"
    (50-65%). A sentence repeated within the files is kept once, from its first line in its highest file.
    """
    seen: set[str] = set()
    levels: dict[str, list[Example]] = {}
    for level in reversed(PHRASEBANK_FILES):
        levels[level] = []
        for example in read_phrasebank(phrasebank_file(path, level)):
            if example.text not in seen:
                seen.add(example.text)
                levels[level].append(example)
    return levels


def read_table(file: Path, text_field: str, label_field: str) -> list[Example]:
    """A ``.jsonl`` file (one object per line) or a ``.csv`` file with a header row."""
    if not file.is_file():
        raise DataError(f"{file} does not exist.")
    if file.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(read_text(file).splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DataError(f"{file}:{number}: not valid JSON ({err.msg}).") from None
    elif file.suffix == ".csv":
        reader = csv.DictReader(read_text(file).splitlines())
        rows = [(number, row) for number, row in enumerate(reader, start=2)]
    else:
        raise DataError(f"{file}: unsupported file type {file.suffix!r}; use .jsonl or .csv.")
    examples = []
    for number, row in rows:
        for field in (text_field, label_field):
            if not isinstance(row, dict) or row.get(field) in (None, ""):
                raise DataError(
                    f"{file}:{number}: no value for field {field!r} (data.text_field={text_field!r}, "
                    f"data.label_field={label_field!r})."
                )
        examples.append(Example(str(row[text_field]).strip(), str(row[label_field]).strip(), f"{file}:{number}"))
    if not examples:
        raise DataError(f"{file} holds no examples.")
    return examples


def split_examples(examples: list[Example], train_fraction: float, seed: int) -> dict[str, list[Example]]:
    """NeMo's protocol: shuffle with ``random.seed(seed)``, take the train fraction, halve the rest into val/test.

    For the Financial PhraseBank all-agree file (2264 lines), seed 1234 and 0.8 give 1811/226/227.
    """
    if not 0.0 < train_fraction < 1.0:
        raise DataError(f"data.train_fraction={train_fraction} must be between 0 and 1.")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_train = int(len(shuffled) * train_fraction)
    n_val = (len(shuffled) - n_train) // 2
    return {
        "train": shuffled[:n_train],
        "val": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val :],
    }
