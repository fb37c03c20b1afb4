import hashlib
import json
from pathlib import Path

import numpy
import pytest
from conftest import REAL_FPB, train_tokenizer

from fedlm.data import DataError, FinancialPhraseBank, RecordFiles
from fedlm.data.sources import read_phrasebank, split_examples
from fedlm.tasks import ClassificationTask, TaskConfig

TASK = ClassificationTask(TaskConfig(), train_tokenizer(), 3)  # Financial PhraseBank's template and label words


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8"])
def test_phrasebank_lines_parse_in_both_encodings(tmp_path: Path, encoding: str) -> None:
    file = write(
        tmp_path / "f.txt",
        "Profit rose to EUR 5 mn ; margin 3 % @ both@positive\n\nA café opened .@neutral\n",
        encoding,
    )
    examples = read_phrasebank(file)
    assert [e.fields for e in examples] == [
        {"sentence": "Profit rose to EUR 5 mn ; margin 3 % @ both", "label": "positive"},
        {"sentence": "A café opened .", "label": "neutral"},
    ]
    assert examples[1].origin == f"{file}:3"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("fine sentence@neutral\nno label separator here\n", r"f\.txt:2: no '@'"),
        ("fine sentence@neutral\nbad label@bullish\n", r"f\.txt:2: unknown label 'bullish'"),
        ("@neutral\n", r"f\.txt:1: empty sentence"),
        ("\n\n", "holds no examples"),
    ],
)
def test_phrasebank_errors_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        read_phrasebank(write(tmp_path / "f.txt", content))


def test_missing_folder_names_the_field_and_the_env_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDLM_FPB_DIR", raising=False)
    with pytest.raises(DataError, match="pass data.path .* FEDLM_FPB_DIR"):
        FinancialPhraseBank().setup("fit")
    with pytest.raises(DataError, match=f"{tmp_path}/Sentences_AllAgree.txt does not exist"):
        FinancialPhraseBank(path=str(tmp_path)).setup("fit")


def test_environment_variable_gives_the_folder(synthetic_fpb: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLM_FPB_DIR", str(synthetic_fpb))
    data = FinancialPhraseBank()
    data.setup("fit")
    assert sum(len(v) for v in data.splits.values()) == 120


def test_empty_split_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "fpb"
    folder.mkdir()
    write(folder / "Sentences_AllAgree.txt", "one@neutral\ntwo@positive\n")
    with pytest.raises(DataError, match="the 'val' split is empty"):
        FinancialPhraseBank(path=str(folder)).setup("fit")


@pytest.mark.skipif(not REAL_FPB.is_dir(), reason="Financial PhraseBank is not beside the project")
def test_nemo_split_of_the_real_all_agree_file_is_1811_226_227() -> None:
    data = FinancialPhraseBank(path=str(REAL_FPB))
    data.setup("fit")
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 1811, "val": 226, "test": 227}
    again = FinancialPhraseBank(path=str(REAL_FPB))
    again.setup("fit")
    assert data.splits == again.splits
    texts = {split: {e.fields["sentence"] for e in examples} for split, examples in data.splits.items()}
    assert sum(len(v) for v in texts.values()) >= 2264 - 10  # a few duplicate sentences exist in the file


@pytest.mark.skipif(not REAL_FPB.is_dir(), reason="Financial PhraseBank is not beside the project")
def test_flowertune_split_is_the_leaderboards_1212_test_sentences() -> None:
    """FlowerTune's test part: ``datasets``' ``train_test_split(seed=42)`` of the 50%-agree file's 4,846 lines in
    order, which is ``numpy.random.default_rng(42).permutation(4846)[:1212]``; pinned by a hash of its indices."""
    data = FinancialPhraseBank(path=str(REAL_FPB), agreement="50", split="flowertune", val_fraction=0.1)
    data.setup("fit")
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 3271, "val": 363, "test": 1212}
    lines = [int(e.origin.rsplit(":", 1)[1]) - 1 for e in data.splits["test"]]  # the file has no blank lines
    assert lines == numpy.random.default_rng(42).permutation(4846)[:1212].tolist()
    digest = hashlib.sha256(numpy.array(lines, dtype=numpy.int64).tobytes()).hexdigest()
    assert digest == "e92fdcce34a01f4359ab0aa4e2d273732399e6ca30084618d7b7c4362bccb716"
    held = {e.origin for split in ("train", "val") for e in data.splits[split]}
    assert len(held) == 4846 - 1212 and not held & {e.origin for e in data.splits["test"]}


def test_split_is_seeded_and_complete(synthetic_fpb: Path) -> None:
    examples = read_phrasebank(synthetic_fpb / "Sentences_AllAgree.txt")
    a, b, c = (split_examples(examples, 0.8, seed) for seed in (1, 1, 2))
    assert a == b and a != c
    assert sorted(e.origin for split in a.values() for e in split) == sorted(e.origin for e in examples)
    assert [len(a[s]) for s in ("train", "val", "test")] == [96, 12, 12]


def test_dataloader_pads_dynamically(synthetic_fpb: Path) -> None:
    data = FinancialPhraseBank(path=str(synthetic_fpb), batch_size=4)
    data.setup("fit")
    data.connect(TASK)
    lengths = [batch["input_ids"].shape[1] for batch in data.val_dataloader()]
    longest = [max(int(m.sum()) for m in batch["attention_mask"]) for batch in data.val_dataloader()]
    assert lengths == longest  # each batch is padded to its own longest example, not a global length


def test_record_files_read_jsonl_and_csv_through_a_fields_mapping(tmp_path: Path) -> None:
    """The reader itself is tested in test_records.py; here: the datamodule maps columns to the template's fields."""
    rows = [
        {"id": str(i), "headline": f"profit rose {i} .", "tone": ["positive", "negative", "neutral"][i % 3]}
        for i in range(30)
    ]
    jsonl = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    csv = write(
        tmp_path / "d.csv", "id,headline,tone\n" + "\n".join(f'{r["id"]},"{r["headline"]}",{r["tone"]}' for r in rows)
    )
    expected = {(r["headline"], r["tone"]) for r in rows}
    for file in (jsonl, csv):
        data = RecordFiles(train_file=str(file), fields={"sentence": "headline", "label": "tone"})
        data.setup("fit")
        assert [len(data.splits[s]) for s in ("train", "val", "test")] == [24, 3, 3]
        records = [e for split in data.splits.values() for e in split]
        assert {tuple(e.fields) for e in records} == {("sentence", "label")}  # only the mapped columns, renamed
        assert {(e.fields["sentence"], e.fields["label"]) for e in records} == expected
        data.connect(TASK)
        encoded = data.encoded("train").examples
        assert len(encoded) == 24 and [e.index for e in encoded] == list(range(24))
        assert [e.label for e in encoded] == [TASK.label_ids[e.fields["label"]] for e in data.splits["train"]]


def test_record_files_take_validation_and_test_files_together(tmp_path: Path) -> None:
    file = write(tmp_path / "d.jsonl", '{"sentence": "a", "label": "neutral"}\n')
    with pytest.raises(DataError, match="val_file and data.test_file both"):
        RecordFiles(train_file=str(file), val_file=str(file))


def test_label_outside_the_label_words_names_its_file_and_line(tmp_path: Path) -> None:
    labels = ["neutral"] * 9 + ["bullish"]
    file = write(
        tmp_path / "d.jsonl", "\n".join(json.dumps({"text": f"x {i}", "tone": lab}) for i, lab in enumerate(labels))
    )
    mapping = {"sentence": "text", "label": "tone"}
    data = RecordFiles(train_file=str(file), val_file=str(file), test_file=str(file), fields=mapping)
    data.setup("fit")
    data.connect(TASK)
    with pytest.raises(DataError, match=r"d\.jsonl:10: label 'bullish' is not in model.task.label_words"):
        data.encoded("train")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_file": "v.txt"}, "give data.val_file and data.test_file both, or neither"),
        ({"train_file": "t.txt"}, "data.train_file needs data.val_file and data.test_file"),
        ({"val_file": "v.txt", "test_file": "t.txt", "path": "fpb"}, "data.path='fpb' and data.agreement='all' pick"),
        ({"val_file": "v.txt", "test_file": "t.txt", "agreement": "75"}, "remove data.path and data.agreement"),
        (
            {"val_file": "v.txt", "test_file": "t.txt", "partition": {"kind": "agreement"}},
            "builds its clients from every agreement file",
        ),
        (
            {"client_files": ["a.txt", "b.txt"], "partition": {"kind": "dirichlet"}},
            "divides the pooled training split, but data.client_files",
        ),
    ],
    ids=[
        "val-without-test",
        "train-without-evaluation",
        "path-and-files",
        "agreement-and-files",
        "agreement-partition-and-files",
        "partition-and-client-files",
    ],
)
def test_incoherent_phrasebank_sources_are_refused_with_the_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        FinancialPhraseBank(**kwargs)


def test_evaluation_files_without_a_training_source_test_but_do_not_fit(tmp_path: Path) -> None:
    lines = "\n".join(f"sentence {i} .@{['negative', 'neutral', 'positive'][i % 3]}" for i in range(6))
    val, test = write(tmp_path / "val.txt", lines), write(tmp_path / "test.txt", lines)
    rows = "\n".join(json.dumps({"sentence": f"sentence {i} .", "label": "neutral"}) for i in range(6))
    table = {split: str(write(tmp_path / f"{split}.jsonl", rows)) for split in ("val", "test")}
    for make in (
        lambda: FinancialPhraseBank(val_file=str(val), test_file=str(test)),
        lambda: RecordFiles(val_file=table["val"], test_file=table["test"]),
    ):
        make().setup("test")  # zero-shot: the evaluation files are all it needs
        with pytest.raises(
            DataError, match="has no training split to fit on: .* Give data.train_file .* or data.client_files"
        ):
            make().setup("fit")
    with pytest.raises(DataError, match=f"data.test_file: {tmp_path}/missing.txt does not exist"):
        FinancialPhraseBank(val_file=str(val), test_file=str(tmp_path / "missing.txt")).setup("test")
    with pytest.raises(DataError, match="give data.train_file .*, or data.val_file and data.test_file"):
        RecordFiles()
