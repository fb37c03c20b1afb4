"""fedlm.data.records: local JSONL/CSV/Parquet files and hub ids through Hugging Face datasets, as task records."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedlm.data.records import Record, RecordError, read_records, write_jsonl
from fedlm.errors import FedlmError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def fields(records: list[Record]) -> list[dict[str, str | list[str]]]:
    return [record.fields for record in records]


def test_jsonl_numbers_become_strings_and_origins_are_line_numbers(tmp_path: Path) -> None:
    file = write(tmp_path / "t.jsonl", '{"text": "profit rose", "label": 1}\n\n{"text": "loss widened", "label": 0}\n')
    records = read_records(str(file))
    assert fields(records) == [{"text": "profit rose", "label": "1"}, {"text": "loss widened", "label": "0"}]
    assert [r.origin for r in records] == [f"{file}:1", f"{file}:3"]


def test_jsonl_list_valued_field(tmp_path: Path) -> None:
    file = write(
        tmp_path / "t.jsonl", '{"question": "q1", "choices": ["a", "b"]}\n{"question": "q2", "choices": ["c"]}\n'
    )
    assert fields(read_records(str(file))) == [
        {"question": "q1", "choices": ["a", "b"]},
        {"question": "q2", "choices": ["c"]},
    ]


def test_csv_quoted_newline_and_comma_and_labels_kept_as_written(tmp_path: Path) -> None:
    file = write(
        tmp_path / "t.csv",
        'sentence,label\n"Profit rose, as\nexpected",1\n\nNA,007\n"say ""hi""",2\n',
    )
    records = read_records(str(file))
    assert fields(records) == [
        {"sentence": "Profit rose, as\nexpected", "label": "1"},
        {"sentence": "NA", "label": "007"},  # not NaN, not 7: every cell is read as a string
        {"sentence": 'say "hi"', "label": "2"},
    ]
    assert [r.origin for r in records] == [f"{file}:2", f"{file}:5", f"{file}:6"]


def test_csv_with_bom_and_crlf(tmp_path: Path) -> None:
    file = write(tmp_path / "t.csv", '\ufefftext,label\r\n"a\r\nb",x\r\nc,y\r\n')
    records = read_records(str(file))
    assert fields(records) == [{"text": "a\r\nb", "label": "x"}, {"text": "c", "label": "y"}]
    assert [r.origin for r in records] == [f"{file}:2", f"{file}:4"]


@pytest.mark.parametrize(
    ("name", "text"),
    [("t.csv", "text,label\nA café opened,neutral\n"), ("t.jsonl", '{"text": "A café opened", "label": "neutral"}\n')],
)
def test_latin1_files_are_decoded(tmp_path: Path, name: str, text: str) -> None:
    file = write(tmp_path / name, text, encoding="latin-1")
    assert fields(read_records(str(file))) == [{"text": "A café opened", "label": "neutral"}]


def test_parquet_rows_count_from_zero(tmp_path: Path) -> None:
    file = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["up", "down"], "label": [1, 0], "tags": [["a"], ["b", "c"]]}), file)
    records = read_records(str(file))
    assert fields(records) == [
        {"text": "up", "label": "1", "tags": ["a"]},
        {"text": "down", "label": "0", "tags": ["b", "c"]},
    ]
    assert [r.origin for r in records] == [f"{file}:row 0", f"{file}:row 1"]


def test_class_label_ids_become_class_names(tmp_path: Path) -> None:
    file = tmp_path / "t.parquet"  # as a hub dataset stores labels: ids, with the names in the schema metadata
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.Dataset.from_dict({"text": ["up", "down"], "label": [1, 0]}, features=features).to_parquet(str(file))
    assert fields(read_records(str(file))) == [{"text": "up", "label": "pos"}, {"text": "down", "label": "neg"}]


def test_column_mapping_renames_and_keeps_only_mapped_columns(tmp_path: Path) -> None:
    file = write(tmp_path / "t.csv", "id,text,label\n7,profit rose,positive\n")
    records = read_records(str(file), columns={"sentence": "text", "label": "label"})
    assert fields(records) == [{"sentence": "profit rose", "label": "positive"}]


def test_missing_column_names_config_field_column_and_file_columns(tmp_path: Path) -> None:
    file = write(tmp_path / "t.jsonl", '{"text": "a", "label": "b"}\n')
    with pytest.raises(RecordError) as err:
        read_records(str(file), columns={"sentence": "sentence", "label": "label"}, config_field="data.val_file")
    message = str(err.value)
    assert "data.val_file" in message and "'sentence'" in message and "['text', 'label']" in message


def test_unsupported_extension_lists_supported_ones(tmp_path: Path) -> None:
    file = write(tmp_path / "t.txt", "a@b\n")
    with pytest.raises(
        RecordError, match=r"unsupported file type '\.txt'; use one of \.csv, \.json, \.jsonl, \.parquet"
    ):
        read_records(str(file))


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.txt", "no such dir/missing"])
def test_missing_file_names_config_field_and_path(tmp_path: Path, name: str) -> None:
    source = str(tmp_path / name)
    with pytest.raises(RecordError) as err:
        read_records(source, config_field="data.test_file")
    assert str(err.value).startswith(f"data.test_file: {source} does not exist")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', r"t\.jsonl:2: field 'label' is empty or missing"),
        ("t.jsonl", '{"text": "a", "label": ""}\n', r"t\.jsonl:1: field 'label' is empty or missing"),
        ("t.jsonl", '{"text": "a", "label": []}\n', r"t\.jsonl:1: field 'label' is empty or missing"),
        ("t.jsonl", '{"text": "a", "label": {"x": 1}}\n', r"t\.jsonl:1: field 'label' holds a dict"),
        ("t.jsonl", '{"text": "a", "label": [["x"]]}\n', r"t\.jsonl:1: field 'label' holds a list"),
        ("t.csv", "text,label\na,x\n\nb,\n", r"t\.csv:4: field 'label' is empty or missing"),
        ("t.csv", 'text,label\n"a\nb",x\n   ,y\n', r"t\.csv:4: field 'text' is empty or missing"),
    ],
)
def test_empty_value_names_file_row_and_field(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        read_records(str(write(tmp_path / name, text)))


def test_empty_value_names_mapped_column(tmp_path: Path) -> None:
    file = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["up", None]}), file)
    with pytest.raises(RecordError, match=r"t\.parquet:row 1: field 'sentence' \(column 'text'\) is empty or missing"):
        read_records(str(file), columns={"sentence": "text"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"text": "a"}\n\n{"text": "b",\n', r"t\.jsonl:3: not valid JSON"),
        ('{"text": "a"}\n["b"]\n', r"t\.jsonl:2: not a JSON object"),
        ('["a", "b"]\n', r"t\.jsonl:1: a JSON array"),
        ('{"choices": ["a"]}\n{"choices": ["b", 2]}\n', r"t\.jsonl:2: column 'choices' mixes number and string items"),
        ('{"label": "pos"}\n{"label": 1}\n', r"t\.jsonl:2: column 'label' holds a number here but a string on line 1"),
    ],
)
def test_bad_jsonl_line_is_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        read_records(str(write(tmp_path / "t.jsonl", text)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("text,label\na,x\nb,y,z\n", r"t\.csv:3: 3 cells, but the header has 2"),
        ('text,label\na,x\n"b,y\n', r"t\.csv:\d+: not valid CSV"),
        ("text,text\na,b\n", r"t\.csv:1: the header needs distinct, non-empty column names"),
    ],
)
def test_bad_csv_row_is_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        read_records(str(write(tmp_path / "t.csv", text)))


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.jsonl", "", r"data\.train_file: .*t\.jsonl is empty"),
        ("t.csv", "", r"data\.train_file: .*t\.csv is empty"),
        ("t.jsonl", "\n  \n", r"t\.jsonl holds no records"),
        ("t.csv", "text,label\n\n", r"t\.csv holds no records"),
        ("t.parquet", "not parquet", r"t\.parquet: not a Parquet file"),
    ],
)
def test_empty_or_unreadable_file(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        read_records(str(write(tmp_path / name, text)))


def test_parquet_without_rows(tmp_path: Path) -> None:
    file = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), file)
    with pytest.raises(RecordError, match=r"t\.parquet holds no records"):
        read_records(str(file))


def test_hub_id_offline_says_to_give_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(RecordError) as err:
        read_records("someone/no-such-dataset", config_field="data.train_file")
    message = str(err.value)
    assert "data.train_file='someone/no-such-dataset'" in message and "offline" in message
    assert "local .csv, .json, .jsonl, .parquet file" in message
    assert isinstance(err.value, FedlmError) and isinstance(err.value, ValueError)


def test_reads_are_quiet_and_leave_no_cache(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = sorted(cache.rglob("*")) if cache.exists() else []
    datasets.enable_progress_bars()
    read_records(str(write(tmp_path / "t.jsonl", '{"text": "a"}\n')))
    read_records(str(write(tmp_path / "t.csv", "text\na\n")))
    assert capfd.readouterr().err == ""
    assert not datasets.are_progress_bars_disabled()  # the caller's setting comes back
    assert (sorted(cache.rglob("*")) if cache.exists() else []) == before


def test_write_jsonl_round_trip(tmp_path: Path) -> None:
    records = [
        Record({"text": 'café, "quoted"\nsecond line \u2028 after', "label": "1"}, "a:1"),
        Record({"text": "plain", "label": "007"}, "a:2"),
    ]
    path = tmp_path / "out" / "split.jsonl"
    write_jsonl(records, path)
    assert "café" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    assert fields(read_records(str(path))) == fields(records)
    assert [p.name for p in path.parent.iterdir()] == ["split.jsonl"]  # no temp file left
    write_jsonl(records[:1], path)  # replaces, not appends
    assert fields(read_records(str(path))) == fields(records[:1])


def test_jsonl_read_time_2000_rows(tmp_path: Path) -> None:
    file = tmp_path / "t.jsonl"
    rows = [
        {"sentence": f"sentence {i} about quarterly profits", "label": ["positive", "negative"][i % 2]}
        for i in range(2000)
    ]
    file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    read_records(str(file))  # the first read in a process pays one-off set-up
    start = time.perf_counter()
    records = read_records(str(file))
    print(f"read_records: 2,000-row JSONL in {1000 * (time.perf_counter() - start):.1f} ms")
    assert fields(records) == rows


def test_list_of_numbers_becomes_strings(tmp_path: Path) -> None:
    file = write(tmp_path / "t.jsonl", '{"scores": [1, 2]}\n')
    assert fields(read_records(str(file))) == [{"scores": ["1", "2"]}]
