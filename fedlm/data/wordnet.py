"""Two text-to-text tasks from Princeton WordNet 3.0, read straight from its database files (``data.noun`` ...).

The files are parsed here rather than through NLTK, whose reader only opens its own data folders. A synset yields a
record only when one of its usage examples contains one of its lemmas, so that the example shows the word in use:

- ``definition``: the word and the example in, the gloss out (definition generation in context);
- ``reverse_dictionary``: the gloss and the example with the word blanked in, the word out (closed QA).

The lexicographer files (noun.*, verb.*, adj.*/adv.*) give a natural non-IID partition into three sites.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedlm.data.datamodule import TaskData
from fedlm.data.records import Record as DataRecord
from fedlm.data.records import read_records
from fedlm.errors import FedlmError

WORDNET_ENV = "FEDLM_WORDNET_DIR"
DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")  # where Debian's wordnet-base installs the database
INSTALL_HINT = (
    "install WordNet 3.0 (apt-get install wordnet-base puts it in /usr/share/wordnet) or point data.path or the "
    f"{WORDNET_ENV} environment variable at the folder that holds data.noun, data.verb, data.adj and data.adv"
)
DATA_SS_TYPES = {"data.noun": "n", "data.verb": "v", "data.adj": "as", "data.adv": "r"}  # s: adjective satellite
SS_TYPE_POS = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
POS_LETTER = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
POS_WORD = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
# lexnames(5): the lexicographer file of each lex_filenum, 00 to 44
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption",
    "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip
LEXNAME_SITES: dict[str, tuple[str, ...]] = {
    "nouns": tuple(name for name in LEXNAMES if name.startswith("noun.")),
    "verbs": tuple(name for name in LEXNAMES if name.startswith("verb.")),
    "adjectives_adverbs": tuple(name for name in LEXNAMES if name.startswith(("adj.", "adv."))),
}
ADJECTIVE_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic position: attributive, predicative, postnominal
QUOTED = re.compile(r'"([^"]*)(?:"|$)')  # the last example may lack its closing quote (a few 3.0 glosses do)
BLANK = "___"

Task = Literal["definition", "reverse_dictionary"]
Record = dict[str, str | list[str]]


class WordNetError(FedlmError, ValueError):
    """Missing or damaged WordNet files, or a task or split that cannot be built; the message names file and fix."""


@dataclass(frozen=True)
class Synset:
    offset: int
    pos: str  # noun, verb, adj (satellites included) or adv
    lexname: str
    lemmas: tuple[str, ...]  # spaces for '_', adjective markers stripped
    gloss: str
    examples: tuple[str, ...]
    origin: str  # "file:line", so that a record can point at its source

    @property
    def key(self) -> str:
        """``<offset>-<pos letter>``: offsets are unique within a data file, and satellites share data.adj."""
        return f"{self.offset:08d}-{POS_LETTER[self.pos]}"


def wordnet_dir(path: str | None) -> Path:
    """The WordNet folder: ``path`` (from ``data.path``), else $FEDLM_WORDNET_DIR, else Debian's folder if present."""
    chosen = path or os.environ.get(WORDNET_ENV)
    if chosen:
        return Path(chosen).expanduser()
    if DEFAULT_WORDNET_DIR.is_dir():
        return DEFAULT_WORDNET_DIR
    raise WordNetError(f"WordNet location not set and {DEFAULT_WORDNET_DIR} does not exist: {INSTALL_HINT}.")


def read_wordnet(path: str | Path) -> list[Synset]:
    """Every synset of the four data files, in file order (nouns, verbs, adjectives, adverbs)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise WordNetError(f"WordNet folder {folder} does not exist: {INSTALL_HINT}.")
    missing = [name for name in DATA_SS_TYPES if not (folder / name).is_file()]
    if missing:
        raise WordNetError(f"{folder} lacks {', '.join(missing)}: {INSTALL_HINT}.")
    return [synset for name in DATA_SS_TYPES for synset in read_data_file(folder / name)]


def read_data_file(file: Path) -> list[Synset]:
    """One data file's synsets, skipping the license header (its lines start with two spaces)."""
    with file.open(encoding="utf-8") as lines:
        return [
            parse_line(line, DATA_SS_TYPES[file.name], f"{file}:{number}")
            for number, line in enumerate(lines, start=1)
            if not line.startswith("  ")
        ]


def parse_line(line: str, ss_types: str, origin: str) -> Synset:
    """One synset from ``offset lex_filenum ss_type w_cnt (word lex_id)... p_cnt ptr... [frames] | gloss``."""
    head, bar, gloss = line.rstrip().partition(" | ")
    try:
        if not bar:
            raise ValueError("no ' | ' before the gloss")
        offset, lex_filenum, ss_type, words = parse_head(head.split(), ss_types)
    except IndexError:
        problem = "fewer fields than its counts announce"
    except ValueError as error:
        problem = str(error)
    else:
        definition, examples = split_gloss(gloss)
        return Synset(
            offset=offset,
            pos=SS_TYPE_POS[ss_type],
            lexname=LEXNAMES[lex_filenum],
            lemmas=tuple(ADJECTIVE_MARKER.sub("", word).replace("_", " ") for word in words),
            gloss=definition,
            examples=examples,
            origin=origin,
        )
    raise WordNetError(f"{origin}: malformed WordNet data line ({problem}): {line.rstrip()[:80]!r}.")


def parse_head(fields: list[str], ss_types: str) -> tuple[int, int, str, list[str]]:
    """Offset, lex_filenum, ss_type and words, with every count checked against the fields it announces, so that a
    damaged line fails instead of shifting lemmas into pointers unnoticed."""
    offset, lex_filenum, ss_type, w_cnt = int(fields[0]), int(fields[1]), fields[2], int(fields[3], 16)
    if ss_type not in ss_types:
        raise ValueError(f"ss_type {ss_type!r} is not one of {list(ss_types)} in this file")
    if not 0 <= lex_filenum < len(LEXNAMES):
        raise ValueError(f"lex_filenum {lex_filenum} is not 0-{len(LEXNAMES) - 1}")
    words, lex_ids = fields[4 : 4 + 2 * w_cnt : 2], fields[5 : 5 + 2 * w_cnt : 2]
    pointers_end = 5 + 2 * w_cnt + 4 * int(fields[4 + 2 * w_cnt])  # p_cnt pointers of 4 fields each
    frames_end = pointers_end + (1 + 3 * int(fields[pointers_end]) if ss_type == "v" else 0)  # f_cnt, "+ f w"...
    if w_cnt == 0 or any(len(lex_id) != 1 or lex_id not in "0123456789abcdef" for lex_id in lex_ids):
        raise ValueError("no words, or a lex_id that is not one hex digit")
    if len(fields) != frames_end:
        raise ValueError(f"{len(fields)} fields before the gloss where its counts announce {frames_end}")
    return offset, lex_filenum, ss_type, words


def split_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """The definition and the quoted usage examples after it.

    The definition ends at the first '"' outside parentheses: definitions quote words only inside parentheses
    ('(usually expressed as "on behalf of")'), and some join their first example with ':' or ',' rather than ';'.
    """
    depth, end = 0, len(gloss)
    for index, char in enumerate(gloss):
        depth = depth + 1 if char == "(" else max(depth - 1, 0) if char == ")" else depth
        if char == '"' and depth == 0:
            end = index
            break
    examples = (example.strip() for example in QUOTED.findall(gloss[end:]))
    return gloss[:end].rstrip(" ;:,"), tuple(example for example in examples if example)


def word_pattern(word: str) -> re.Pattern[str]:
    """``word`` as a whole word or phrase, any case: 'bank' matches 'Bank' but not 'banks' or 'embankment'."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def example_with_lemma(synset: Synset) -> tuple[str, str] | None:
    """The first (example, lemma) pair, examples then lemmas in file order, where the example uses the lemma."""
    for example in synset.examples:
        for lemma in synset.lemmas:
            if word_pattern(lemma).search(example):
                return example, lemma
    return None


def task_records(synsets: Iterable[Synset], task: Task) -> list[tuple[Record, str]]:
    """At most one (record, origin) per synset: those with a definition and an example that uses one of its lemmas."""
    if task not in ("definition", "reverse_dictionary"):
        raise WordNetError(f"unknown WordNet task {task!r}; use 'definition' or 'reverse_dictionary'.")
    records: list[tuple[Record, str]] = []
    for synset in synsets:
        found = example_with_lemma(synset)
        if found is None or not synset.gloss:
            continue
        example, word = found
        pos = POS_WORD[synset.pos]
        if task == "definition":
            record: Record = {"word": word, "pos": pos, "example": example, "gloss": synset.gloss}
        else:
            blanked = word_pattern(word).sub(BLANK, example)
            record = {
                "gloss": synset.gloss,
                "example": blanked,
                "pos": pos,
                "word": word,
                "answers": list(synset.lemmas),
            }
        record |= {"lexname": synset.lexname, "synset": synset.key}
        records.append((record, synset.origin))
    return records


def split_records(
    records: Sequence[tuple[Record, str]], train_size: int | None, val_size: int, test_size: int, seed: int
) -> dict[str, list[tuple[Record, str]]]:
    """Train/val/test with every word (lowercased) in one split only, so that val and test ask about unseen words.

    Whole word groups, in a seeded shuffle of their sorted keys (the same in every process: no ``hash()``), fill
    val then test up to ``val_size`` and ``test_size`` records without exceeding them; the rest is train, cut to a
    seeded sample of ``train_size`` records if given. Each split keeps the input order.
    """
    if val_size < 0 or test_size < 0 or (train_size is not None and train_size < 1):
        raise WordNetError(
            f"split sizes train_size={train_size}, val_size={val_size}, test_size={test_size}: val and test must be "
            "at least 0, train at least 1 (or None for every remaining record)."
        )
    groups: dict[str, list[int]] = {}
    for index, (record, _) in enumerate(records):
        groups.setdefault(str(record["word"]).lower(), []).append(index)
    keys = sorted(groups)
    rng = random.Random(seed)
    rng.shuffle(keys)
    limits = {"val": val_size, "test": test_size}
    chosen: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for key in keys:
        members = groups[key]
        split = next((name for name, limit in limits.items() if len(chosen[name]) + len(members) <= limit), "train")
        chosen[split] += members
    if not chosen["train"]:
        raise WordNetError(
            f"val_size={val_size} + test_size={test_size} leave none of the {len(records)} records for training."
        )
    if train_size is not None and train_size < len(chosen["train"]):
        chosen["train"] = rng.sample(chosen["train"], train_size)
    return {name: [records[index] for index in sorted(indices)] for name, indices in chosen.items()}


def equal_sites(records: list[tuple[Record, str]], size: int, seed: int) -> list[tuple[Record, str]]:
    """A seeded sample of ``size`` records, an equal share from each lexicographer-file site, in input order."""
    share = size // len(LEXNAME_SITES)
    rng = random.Random(f"equal-sites-{seed}")
    chosen: list[int] = []
    for site in range(len(LEXNAME_SITES)):
        members = [index for index, (record, _) in enumerate(records) if site_of(record) == site]
        if len(members) < share:
            raise WordNetError(
                f"data.train_size={size} asks {share} training records of site {site}, which has {len(members)}; "
                "lower data.train_size."
            )
        chosen += rng.sample(members, share)
    return [records[index] for index in sorted(chosen)]


def site_of(record: Record) -> int:
    """The record's site in the 3-site partition by lexicographer file: 0 nouns, 1 verbs, 2 adjectives and adverbs."""
    for site, lexnames in enumerate(LEXNAME_SITES.values()):
        if record["lexname"] in lexnames:
            return site
    raise WordNetError(f"lexname {record['lexname']!r} is not a WordNet 3.0 lexicographer file.")


class WordNet(TaskData):
    """A WordNet 3.0 task (``definition`` or ``reverse_dictionary``), split so that no word is asked about in two
    splits; ``partition: {kind: lexfile}`` gives 3 non-IID sites by lexicographer file (nouns, verbs, adjectives and
    adverbs), any other partition divides the training split as usual (iid by default).

    WordNet 3.0 is Princeton University's, under the WordNet 3.0 license (permissive; its notice is in the data
    files and in docs/cli.md); it is read from its installed files and never copied into a run's folder.

    Args:
        task: ``definition`` (word, part of speech, usage example -> gloss) or ``reverse_dictionary`` (gloss and the
            example with the word blanked -> the word; any lemma of the synset is accepted).
        path: the folder of ``data.noun`` ... (null: ``FEDLM_WORDNET_DIR``, else /usr/share/wordnet).
        train_size, val_size, test_size: records per split (train null: every remaining record).
        balance_sites: the training sample takes ``train_size / 3`` records of each lexicographer-file site (nouns,
            verbs, adjectives and adverbs: the blog's equal sites), whatever the partition, so that centralized, IID
            and lexfile runs train on the same records; false: a plain seeded sample (adjectives then dominate).
        split_seed: seed of the split by word and of the training sample.
        **kwargs: batching, client, partition and seed options of ``TaskData``.
    """

    partition_kinds = (*TaskData.partition_kinds, "lexfile")

    def __init__(
        self,
        task: Task = "definition",
        path: str | None = None,
        train_size: int | None = 1800,
        val_size: int = 200,
        test_size: int = 300,
        split_seed: int = 1234,
        balance_sites: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("label_field", None)  # no labels to skew or count: the answers are free text
        super().__init__(**kwargs)
        if task not in ("definition", "reverse_dictionary"):
            raise WordNetError(f"data.task={task!r} is unknown; use 'definition' or 'reverse_dictionary'.")
        self.task_name, self.path = task, path
        self.sizes, self.split_seed = (train_size, val_size, test_size), split_seed
        self.balance_sites = balance_sites

    def load_splits(self) -> dict[str, list[DataRecord]]:
        synsets = read_wordnet(wordnet_dir(self.path))
        train_size, val_size, test_size = self.sizes
        by_site = self.balance_sites and train_size is not None
        records = task_records(synsets, self.task_name)
        splits = split_records(records, None if by_site else train_size, val_size, test_size, self.split_seed)
        if by_site:
            splits["train"] = equal_sites(splits["train"], train_size, self.split_seed)
        return {name: [DataRecord(record, origin) for record, origin in rows] for name, rows in splits.items()}

    def partition_train(self, num_clients: int) -> list[list[int]]:
        if self.partition.kind != "lexfile":
            return super().partition_train(num_clients)
        if num_clients != len(LEXNAME_SITES):
            raise WordNetError(
                f"data.partition.kind=lexfile gives {len(LEXNAME_SITES)} sites ({', '.join(LEXNAME_SITES)}), but the "
                f"run has {num_clients} clients; set federation.clients (or data.local_clients) to "
                f"{len(LEXNAME_SITES)}."
            )
        sites: list[list[int]] = [[] for _ in LEXNAME_SITES]
        for index, example in enumerate(self.examples("train")):
            sites[site_of(example.fields)].append(index)
        for site, (name, indices) in enumerate(zip(LEXNAME_SITES, sites)):
            if not indices:  # it could neither train nor be weighted, as every partitioner refuses
                raise WordNetError(
                    f"data.partition.kind=lexfile leaves site {site} ({name}) no training records; raise "
                    "data.train_size, or use another data.partition.kind."
                )
        return sites

    def read_file(self, path: str, field: str = "data.client_files") -> list[DataRecord]:
        """A site's own file of records with the task's fields (JSON lines, CSV or Parquet, as ``read_records``
        reads; ``fedlm.data.records.write_jsonl`` writes them)."""
        return read_records(path, None, field)
