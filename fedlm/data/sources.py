"""Financial PhraseBank files, and the seeded splits of a list of records: NeMo's, and FlowerTune's."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Literal

from fedlm.data.records import Record
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


def read_text(path: Path) -> str:
    """UTF-8 if it decodes, else latin-1 (the encoding Financial PhraseBank v1.0 ships in)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # less a BOM, which an editor may have added
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


def format_phrasebank(examples: list[Record]) -> str:
    """The ``sentence@label`` lines that ``read_phrasebank`` reads back as the same records."""
    return "".join(f"{example.fields['sentence']}@{example.fields['label']}\n" for example in examples)


def read_phrasebank(file: Path) -> list[Record]:
    """Lines of ``sentence@label`` as records of fields ``sentence`` and ``label``; the last '@' separates the label."""
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
        examples.append(Record({"sentence": sentence.strip(), "label": label}, origin))
    if not examples:
        raise DataError(f"{file} holds no examples.")
    return examples


def phrasebank_levels(path: str | None) -> dict[str, list[Record]]:
    """Each sentence once, under its exact agreement level, from the highest level down.

    The files are nested (50Agree contains 66Agree contains 75Agree contains AllAgree), so a sentence's level is
    the highest file it appears in: "all" (100% of annotators agree), "75" (75-99%), "66" (66-74%), "50"
    (50-65%). A sentence repeated within the files is kept once, from its first line in its highest file.
    """
    seen: set[str] = set()
    levels: dict[str, list[Record]] = {}
    for level in reversed(PHRASEBANK_FILES):
        levels[level] = []
        for example in read_phrasebank(phrasebank_file(path, level)):
            if example.fields["sentence"] not in seen:
                seen.add(example.fields["sentence"])
                levels[level].append(example)
    return levels


def split_examples(examples: list[Record], train_fraction: float, seed: int) -> dict[str, list[Record]]:
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


FLOWERTUNE_TEST_SEED = 42  # FlowerTune's finance evaluation: ``train_test_split(seed=42)``, default test size 0.25


def flowertune_split(examples: list[Record], val_fraction: float, seed: int) -> dict[str, list[Record]]:
    """FlowerTune's protocol: the test part of ``datasets``' ``train_test_split(seed=42)`` of the file's lines in
    order (25 %: 1,212 of the 50%-agree file's 4,846), made by ``datasets`` itself; validation is ``val_fraction``
    of the rest, shuffled with ``random.seed(seed)`` as NeMo's split is, and training the remainder."""
    from datasets import Dataset

    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1.")
    parts = Dataset.from_dict({"index": range(len(examples))}).train_test_split(seed=FLOWERTUNE_TEST_SEED)
    rest = [examples[i] for i in parts["train"]["index"]]
    random.Random(seed).shuffle(rest)
    n_val = round(len(rest) * val_fraction)
    return {"train": rest[n_val:], "val": rest[:n_val], "test": [examples[i] for i in parts["test"]["index"]]}
