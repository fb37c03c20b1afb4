"""WordNet 3.0 tasks: parsing the database files, the two tasks' records, word-disjoint splits and the 3 sites.

Every test but the last reads tiny data files written in the real format into tmp_path, never WordNet itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlm.data import wordnet
from fedlm.data.wordnet import (
    LEXNAME_SITES,
    LEXNAMES,
    Synset,
    WordNet,
    WordNetError,
    equal_sites,
    read_wordnet,
    site_of,
    split_records,
    task_records,
    wordnet_dir,
)

HEADER = [
    "  1 This software and database is being provided to you, the LICENSEE, by  ",
    "  2 Princeton University under the following license.  ",
]
DATA = {
    "data.noun": [
        "00000100 14 n 02 bank 0 depository_financial_institution 0 001 @ 00000400 n 0000 | a financial institution "
        'that accepts deposits; "he cashed a check at the bank"; "the Bank of England"  ',
        "00000200 17 n 01 embankment 0 000 | a long mound of earth; built to hold back water; "
        '"they walked along the river"; "the embankment held, the bank did not"  ',
        '00000300 18 n 01 big_shot 0 000 | an important influential person; "he thinks he\'s a Big Shot now"  ',
        "00000400 03 n 01 entity 0 000 | that which is perceived to have its own distinct existence  ",
        '00000500 17 n 01 bank 1 000 | sloping land beside a body of water; "they pulled the canoe up on the bank"  ',
        '00000600 04 n 01 run 0 000 | a score in baseball; "he scored two runs"  ',
    ],
    "data.verb": [
        "00000100 38 v 02 run 0 scat 0 001 @ 00000300 v 0000 01 + 02 00 | move fast by using one's feet; "
        '"Don\'t run--you\'ll be out of breath"; "The children ran to the store"  ',
        '00000300 38 v 01 travel 0 000 02 + 01 00 + 02 00 | change location; "the policemen went from door to door"  ',
    ],
    "data.adj": [
        '00000100 00 a 01 good(a) 0 001 ! 00000200 a 0101 | having desirable qualities; "good news"  ',
        "00000200 00 s 02 well-made(p) 0 sturdy 0 001 & 00000100 a 0000 | built solidly; "
        '"the table is sturdy and well-made"  ',
    ],
    "data.adv": ['00000100 02 r 01 quickly 0 000 | with speed; "Quickly, she answered quickly"  '],
}


def write_wordnet(folder: Path, data: dict[str, list[str]] = DATA) -> Path:
    folder.mkdir(exist_ok=True)
    for name, lines in data.items():
        (folder / name).write_text("\n".join(HEADER + lines) + "\n")
    return folder


@pytest.fixture
def synsets(tmp_path: Path) -> list[Synset]:
    return read_wordnet(write_wordnet(tmp_path / "wordnet"))


def by_synset(records: list[tuple[dict, str]]) -> dict[str, dict]:
    return {record["synset"]: record for record, _ in records}


def test_read_wordnet_parses_every_synset_after_the_header(synsets: list[Synset], tmp_path: Path) -> None:
    assert len(synsets) == 11
    bank = synsets[0]
    assert bank == Synset(
        offset=100,
        pos="noun",
        lexname="noun.group",
        lemmas=("bank", "depository financial institution"),
        gloss="a financial institution that accepts deposits",
        examples=("he cashed a check at the bank", "the Bank of England"),
        origin=f"{tmp_path / 'wordnet' / 'data.noun'}:3",
    )
    assert bank.key == "00000100-n"
    embankment, big_shot, entity = synsets[1:4]
    assert embankment.gloss == "a long mound of earth; built to hold back water"  # ';' inside a definition
    assert embankment.examples == ("they walked along the river", "the embankment held, the bank did not")
    assert big_shot.lemmas == ("big shot",)
    assert entity.examples == ()
    run, travel = synsets[6:8]
    assert (run.pos, run.lexname, run.lemmas) == ("verb", "verb.motion", ("run", "scat"))  # after its frames
    assert travel.gloss == "change location"
    good, sturdy = synsets[8:10]
    assert good.lemmas == ("good",)
    assert (sturdy.pos, sturdy.lemmas, sturdy.key) == ("adj", ("well-made", "sturdy"), "00000200-a")  # satellite
    assert (synsets[10].pos, synsets[10].lexname) == ("adv", "adv.all")


def test_quotes_inside_parentheses_belong_to_the_definition(tmp_path: Path) -> None:
    line = (
        '00000100 02 r 01 on_behalf_of 0 000 | as the agent of (usually expressed as "on behalf of"); '
        '"signed on behalf of the minor"; "unclosed example  '
    )
    synset = read_wordnet(write_wordnet(tmp_path, {**DATA, "data.adv": [line]}))[-1]
    assert synset.gloss == 'as the agent of (usually expressed as "on behalf of")'
    assert synset.examples == ("signed on behalf of the minor", "unclosed example")


def test_definition_records_take_the_first_example_that_uses_a_lemma(synsets: list[Synset]) -> None:
    records = task_records(synsets, "definition")
    assert [origin.rsplit("/", 1)[1] for _, origin in records] == [
        "data.noun:3",
        "data.noun:4",
        "data.noun:5",
        "data.noun:7",
        "data.verb:3",
        "data.adj:3",
        "data.adj:4",
        "data.adv:3",
    ]  # not entity (no example), travel (its example lacks the lemma) or the baseball run ('runs' is not 'run')
    chosen = by_synset(records)
    assert chosen["00000100-n"] == {
        "word": "bank",
        "pos": "noun",
        "example": "he cashed a check at the bank",
        "gloss": "a financial institution that accepts deposits",
        "lexname": "noun.group",
        "synset": "00000100-n",
    }
    assert chosen["00000200-n"]["example"] == "the embankment held, the bank did not"  # the first lacks the lemma
    assert chosen["00000300-n"]["word"] == "big shot"
    assert chosen["00000200-a"] == {
        "word": "well-made",
        "pos": "adjective",
        "example": "the table is sturdy and well-made",
        "gloss": "built solidly",
        "lexname": "adj.all",
        "synset": "00000200-a",
    }
    assert chosen["00000100-r"]["pos"] == "adverb"


def test_reverse_dictionary_records_blank_every_whole_word_use(synsets: list[Synset]) -> None:
    records = by_synset(task_records(synsets, "reverse_dictionary"))
    assert records["00000100-n"] == {
        "gloss": "a financial institution that accepts deposits",
        "example": "he cashed a check at the ___",
        "pos": "noun",
        "word": "bank",
        "answers": ["bank", "depository financial institution"],
        "lexname": "noun.group",
        "synset": "00000100-n",
    }
    assert records["00000200-n"]["example"] == "the ___ held, the bank did not"
    assert records["00000300-n"]["example"] == "he thinks he's a ___ now"
    assert records["00000100-v"]["example"] == "Don't ___--you'll be out of breath"
    assert records["00000200-a"]["answers"] == ["well-made", "sturdy"]
    assert records["00000200-a"]["example"] == "the table is sturdy and ___"
    assert records["00000100-r"]["example"] == "___, she answered ___"


def test_unknown_task_is_refused(synsets: list[Synset]) -> None:
    with pytest.raises(WordNetError, match="reverse_dictionary"):
        task_records(synsets, "synonyms")  # type: ignore[arg-type]


def many_records(count: int = 60) -> list[tuple[dict, str]]:
    """Records of 25 words, most words in several synsets, as a split sees them."""
    return [
        ({"word": f"Word{i % 25}" if i % 2 else f"word{i % 25}", "synset": f"{i:08d}-n"}, f"f:{i}")
        for i in range(count)
    ]


def word_sets(splits: dict[str, list]) -> dict[str, set[str]]:
    return {name: {record["word"].lower() for record, _ in split} for name, split in splits.items()}


@pytest.mark.parametrize("records", [many_records(), None], ids=["synthetic", "wordnet"])
def test_split_keeps_each_word_and_synset_in_one_split(records: list | None, synsets: list[Synset]) -> None:
    records = records or task_records(synsets, "reverse_dictionary")
    val_size, test_size = len(records) // 5, len(records) // 4
    splits = split_records(records, train_size=None, val_size=val_size, test_size=test_size, seed=0)
    words = word_sets(splits)
    assert not (words["train"] & words["val"] or words["train"] & words["test"] or words["val"] & words["test"])
    assert sorted(record["synset"] for split in splits.values() for record, _ in split) == sorted(
        record["synset"] for record, _ in records
    )  # every record once
    assert 0 < len(splits["val"]) <= val_size and 0 < len(splits["test"]) <= test_size
    assert all(split == sorted(split, key=records.index) for split in splits.values())  # input order kept


def test_split_sizes_are_exact_when_words_are_unique() -> None:
    records = [({"word": f"w{i}"}, f"f:{i}") for i in range(50)]
    splits = split_records(records, train_size=20, val_size=7, test_size=9, seed=3)
    assert {name: len(split) for name, split in splits.items()} == {"train": 20, "val": 7, "test": 9}
    uncapped = split_records(records, train_size=None, val_size=7, test_size=9, seed=3)
    assert set(map(id, splits["train"])) < set(map(id, uncapped["train"]))  # a subset of the same train words
    assert splits["val"] == uncapped["val"] and splits["test"] == uncapped["test"]


def test_split_is_deterministic_and_follows_the_seed() -> None:
    records = many_records()

    def split(seed: int) -> dict[str, list]:
        return split_records(records, train_size=20, val_size=10, test_size=10, seed=seed)

    assert split(0) == split(0)
    assert len({repr(split(seed)) for seed in range(5)}) > 1


@pytest.mark.parametrize(
    ("train_size", "val_size", "test_size"), [(None, -1, 5), (0, 5, 5), (None, 60, 0)], ids=["neg", "zero", "full"]
)
def test_split_sizes_that_cannot_work_are_refused(train_size: int | None, val_size: int, test_size: int) -> None:
    with pytest.raises(WordNetError, match="train"):
        split_records(many_records(), train_size=train_size, val_size=val_size, test_size=test_size, seed=0)


def test_sites_follow_the_lexicographer_files(synsets: list[Synset]) -> None:
    assert sorted(name for names in LEXNAME_SITES.values() for name in names) == sorted(LEXNAMES)
    assert len(LEXNAMES) == 45 and LEXNAMES[:4] == ("adj.all", "adj.pert", "adv.all", "noun.Tops")
    sites = {record["synset"]: site_of(record) for record, _ in task_records(synsets, "definition")}
    assert sites == {
        "00000100-n": 0,
        "00000200-n": 0,
        "00000300-n": 0,
        "00000500-n": 0,
        "00000100-v": 1,
        "00000100-a": 2,
        "00000200-a": 2,
        "00000100-r": 2,
    }
    with pytest.raises(WordNetError, match="noun.bogus"):
        site_of({"lexname": "noun.bogus"})


def test_wordnet_datamodule_splits_by_word_and_puts_each_record_at_its_lexname_site(tmp_path: Path) -> None:
    folder = write_wordnet(tmp_path / "wordnet")
    sizes = {"train_size": 3, "val_size": 2, "test_size": 1}
    data = WordNet(path=str(folder), split_seed=0, partition={"kind": "lexfile"}, **sizes)
    data.setup("fit")
    splits = data.splits
    assert {name: len(records) for name, records in splits.items()} == {"train": 3, "val": 2, "test": 1}
    keys = {name: {record.fields["synset"] for record in records} for name, records in splits.items()}
    words = {name: {record.fields["word"].lower() for record in records} for name, records in splits.items()}
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not keys[a] & keys[b] and not words[a] & words[b]
    assert all(record.origin.startswith(str(folder / "data.")) for records in splits.values() for record in records)

    train = splits["train"]
    sites = data.partition_train(3)
    assert sorted(i for site in sites for i in site) == list(range(len(train)))
    assert [len(site) for site in sites] == [1, 1, 1]  # an equal share of train_size from each site
    for site, indices in enumerate(sites):
        assert {site_of(train[i].fields) for i in indices} == {site}
        assert all(train[i].fields["lexname"] in list(LEXNAME_SITES.values())[site] for i in indices)
    with pytest.raises(WordNetError, match=r"gives 3 sites .* but the run has 2 clients; set federation.clients"):
        data.partition_train(2)
    kwargs = {"split_seed": 4, "partition": {"kind": "lexfile"}, "train_size": None, "val_size": 1, "test_size": 1}
    verbless = WordNet(path=str(folder), **kwargs)
    verbless.setup("fit")  # the one verb record lands in validation or test
    with pytest.raises(WordNetError, match=r"leaves site 1 \(verbs\) no training records"):
        verbless.partition_train(3)


def test_missing_folder_or_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(WordNetError, match="apt-get install wordnet-base") as missing:
        read_wordnet(tmp_path / "absent")
    assert "FEDLM_WORDNET_DIR" in str(missing.value) and "data.path" in str(missing.value)
    folder = write_wordnet(tmp_path / "wordnet")
    (folder / "data.verb").unlink()
    with pytest.raises(WordNetError, match="lacks data.verb"):
        read_wordnet(folder)


def test_wordnet_dir_prefers_the_config_then_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLM_WORDNET_DIR", str(tmp_path / "env"))
    assert wordnet_dir(str(tmp_path / "config")) == tmp_path / "config"
    assert wordnet_dir(None) == tmp_path / "env"
    monkeypatch.delenv("FEDLM_WORDNET_DIR")
    monkeypatch.setattr(wordnet, "DEFAULT_WORDNET_DIR", tmp_path)
    assert wordnet_dir(None) == tmp_path
    monkeypatch.setattr(wordnet, "DEFAULT_WORDNET_DIR", tmp_path / "absent")
    with pytest.raises(WordNetError, match="FEDLM_WORDNET_DIR"):
        wordnet_dir(None)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("00000900 03 n 01 thing 0 000 a thing without a bar", "no ' | '"),
        ("00000900 03 n 02 thing 0 000 | w_cnt says two words", "fewer fields"),
        ("00000900 03 n 01 thing 0 001 | p_cnt says one pointer", "7 fields before the gloss where .* 11"),
        ("00000900 03 n 01 thing 0 000 extra | a field too many", "8 fields before the gloss where .* 7"),
        ("00000900 03 v 01 thing 0 000 | a verb in the noun file", "ss_type 'v'"),
        ("00000900 45 n 01 thing 0 000 | lex_filenum past adj.ppl", "lex_filenum 45"),
        ("00000900 03 n 01 thing 10 000 | lex_id of two digits", "lex_id"),
        ("0000x900 03 n 01 thing 0 000 | offset not a number", "invalid literal"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    folder = write_wordnet(tmp_path, {**DATA, "data.noun": [DATA["data.noun"][0], line]})
    with pytest.raises(WordNetError, match=problem) as error:
        read_wordnet(folder)
    assert str(error.value).startswith(f"{folder / 'data.noun'}:4: malformed WordNet data line")


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="needs WordNet 3.0 (wordnet-base)")
def test_real_wordnet_has_every_synset() -> None:
    assert len(read_wordnet("/usr/share/wordnet")) == 117_659


def test_equal_sites_takes_the_same_share_of_each_site() -> None:
    records = [
        ({"lexname": name, "word": f"w{i}"}, f"f:{i}")
        for i, name in enumerate(["noun.act"] * 5 + ["verb.body"] * 4 + ["adj.all"] * 6)
    ]
    chosen = equal_sites(records, 6, seed=1)
    assert [site_of(record) for record, _ in chosen].count(0) == 2
    assert sorted(site_of(record) for record, _ in chosen) == [0, 0, 1, 1, 2, 2]
    assert chosen == equal_sites(records, 6, seed=1) and chosen != equal_sites(records, 6, seed=2)
    with pytest.raises(WordNetError, match="data.train_size=15 asks 5 training records of site 1, which has 4"):
        equal_sites(records, 15, seed=1)
