"""Task records (rows of named fields) from local JSONL, CSV or Parquet files, or a Hugging Face hub dataset.

Parsing goes through Hugging Face ``datasets`` (pandas' CSV reader, pyarrow's JSON and Parquet readers), which gets
quoted CSV cells with newlines and commas right. This module adds what fedlm needs on top: every value a string or a
list of strings, a ``file:line`` origin per record for later errors, and messages that name the file, line and
config field at fault instead of datasets' generic "An error occurred while generating the dataset".
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.exceptions import DatasetsError

from fedlm.errors import FedlmError

Value = str | list[str]

# suffix -> datasets' packaged builder; ".json" is read as JSON lines too
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SUPPORTED = ", ".join(sorted(BUILDERS))
# "name" or "owner/name", as on the hub; any other source that is not an existing file is a missing file
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class RecordError(FedlmError, ValueError):
    """A data file or hub dataset that cannot give records; the message names the file, line or config field."""


@dataclass(frozen=True)
class Record:
    fields: dict[str, Value]  # the task's field names -> values
    origin: str  # "path:line" (JSONL, CSV) or "path:row N" (Parquet, hub), so later errors can point at it


def read_records(
    source: str, columns: Mapping[str, str] | None = None, config_field: str = "data.train_file", split: str = "train"
) -> list[Record]:
    """The records of a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file, or of hub dataset ``source``'s split.

    ``columns`` maps each task field to its column in the file (None: every column under its own name);
    ``config_field`` is the config setting that gave ``source``, named in errors so the user knows what to fix.
    """
    file = Path(source).expanduser()
    if file.exists() or file.suffix.lower() in BUILDERS or not HUB_ID.fullmatch(source):
        table, origins = _read_local(_checked_file(file, config_field))
        return _to_records(table, origins, columns, config_field, str(file))
    table = _load_hub(source, split, config_field)
    origins = [f"{source}[{split}]:row {index}" for index in range(table.num_rows)]
    return _to_records(table, origins, columns, config_field, f"{source}[{split}]")


def write_jsonl(records: Iterable[Record], path: str | Path) -> None:
    """Write one JSON object of fields per line, UTF-8, so that ``read_records(path)`` gives the same fields back.

    The lines go to a temp file beside ``path`` that then replaces it, so a crash never leaves a half-written file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with temp.open("w", encoding="utf-8", newline="\n") as out:
            for record in records:
                out.write(json.dumps(record.fields, ensure_ascii=False) + "\n")
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _checked_file(file: Path, config_field: str) -> Path:
    """``file`` if it is a non-empty file of a supported type, else an error that says what to fix."""
    if not file.exists():
        raise RecordError(f"{config_field}: {file} does not exist (give a {SUPPORTED} file or a hub dataset id).")
    if not file.is_file():
        raise RecordError(f"{config_field}: {file} is not a file; give a {SUPPORTED} file.")
    if file.suffix.lower() not in BUILDERS:
        raise RecordError(f"{config_field}: {file} has unsupported file type {file.suffix!r}; use one of {SUPPORTED}.")
    if file.stat().st_size == 0:
        raise RecordError(f"{config_field}: {file} is empty.")
    return file


def _read_local(file: Path) -> tuple[datasets.Dataset, list[str]]:
    """The file's table and each row's origin, read as its suffix says."""
    builder = BUILDERS[file.suffix.lower()]
    if builder == "json":
        return _read_jsonl(file)
    if builder == "csv":
        return _read_csv(file)
    return _read_parquet(file)


def _read_jsonl(file: Path) -> tuple[datasets.Dataset, list[str]]:
    """JSON lines; the origins are the numbers of the non-blank lines, which are the rows pyarrow reads."""
    text, encoding = _decode(file)
    lines = text.split("\n")  # not splitlines(): a JSON string may hold U+2028, where splitlines() would split
    numbers = [number for number, line in enumerate(lines, start=1) if line.strip()]
    _require_rows(numbers, str(file))
    if lines[numbers[0] - 1].lstrip().startswith("["):
        # datasets would read a JSON array as the whole file's rows, or a list of strings as a "text" column
        raise RecordError(f"{file}:{numbers[0]}: a JSON array; write JSON lines, one {{...}} object per line.")
    try:
        # on_mixed_types=None: by default datasets stores a column of mixed types as JSON text and decodes it
        # back, which turns strings such as "007" or "true" into 7 and True
        table = _load_file("json", file, encoding=encoding, on_mixed_types=None)
    except RecordError as err:
        raise (_jsonl_problem(file, lines) or err) from None
    return table, [f"{file}:{number}" for number in numbers]


def _jsonl_problem(file: Path, lines: list[str]) -> RecordError | None:
    """The first line that is not a JSON object, or that gives a column another type than an earlier line did:
    datasets' own error names neither the line nor the column."""
    first_kind: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return RecordError(f"{file}:{number}: not valid JSON ({err.msg} at column {err.colno}).")
        if not isinstance(row, dict):
            return RecordError(f"{file}:{number}: not a JSON object; each line must be one {{...}} object.")
        for column, value in row.items():
            if value is None:
                continue
            kind = _json_kind(value)
            if isinstance(value, list) and len(items := {_json_kind(item) for item in value if item is not None}) > 1:
                return RecordError(
                    f"{file}:{number}: column {column!r} mixes {' and '.join(sorted(items))} items in one list; "
                    f"write them all as strings."
                )
            seen_kind, seen_line = first_kind.setdefault(column, (kind, number))
            if kind != seen_kind:
                return RecordError(
                    f"{file}:{number}: column {column!r} holds a {kind} here but a {seen_kind} on line {seen_line}; "
                    f'a column needs one type on every line (write numbers as strings, e.g. "1").'
                )
    return None


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "list", dict: "object"}[type(value)]


def _read_csv(file: Path) -> tuple[datasets.Dataset, list[str]]:
    """A CSV file with a header row, every cell read as a string ("007" stays "007", "NA" stays "NA").

    The csv module walks the file once more for what datasets cannot give: the line each row starts on (a quoted
    cell may span lines), and rows whose cell count differs from the header's, which pandas would silently shift.
    """
    text, encoding = _decode(file)
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.reader(lines, strict=True)
    header: list[str] = []
    starts: list[int] = []
    end = 0  # the line the previous row ended on
    try:
        for row in reader:
            start, end = end + 1, reader.line_num
            if start == end and not lines[start - 1].strip():
                continue  # a blank line, which pandas skips too
            if not header:
                header = row
                if "" in header or len(set(header)) < len(header):
                    raise RecordError(f"{file}:{start}: the header needs distinct, non-empty column names: {header}.")
            elif len(row) != len(header):
                raise RecordError(
                    f"{file}:{start}: {len(row)} cells, but the header has {len(header)}; "
                    f"quote any cell that holds a comma."
                )
            else:
                starts.append(start)
    except csv.Error as err:
        raise RecordError(f"{file}:{reader.line_num}: not valid CSV ({err}).") from None
    _require_rows(starts, str(file))
    features = datasets.Features({name: datasets.Value("string") for name in header})
    table = _load_file("csv", file, encoding=encoding, features=features, keep_default_na=False)
    return table, [f"{file}:{start}" for start in starts]


def _read_parquet(file: Path) -> tuple[datasets.Dataset, list[str]]:
    """A Parquet file; the origins are row indices from 0 ("row N"), as pandas or pyarrow would show them."""
    try:
        rows = pq.read_metadata(file).num_rows
    except pa.ArrowInvalid as err:
        raise RecordError(f"{file}: not a Parquet file ({err}).") from None
    origins = [f"{file}:row {index}" for index in range(rows)]
    _require_rows(origins, str(file))  # datasets fails on a Parquet file of no rows with an opaque error
    return _load_file("parquet", file), origins


def _decode(file: Path) -> tuple[str, str]:
    """The file's text and the encoding datasets must read it with: UTF-8 (less a BOM) if it decodes, else latin-1
    (which decodes any bytes, and is what Financial PhraseBank v1.0 ships in), as fedlm's FPB reader does."""
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1"


def _load_file(builder: str, file: Path, **options: Any) -> datasets.Dataset:
    """``file`` through datasets' packaged ``builder``, held in memory.

    datasets always writes an Arrow copy of what it reads; in its default cache (~/.cache/huggingface/datasets)
    that would keep a copy of every version of every file read, so it goes to a temp folder removed afterwards.
    """
    try:
        with _quiet(), tempfile.TemporaryDirectory(prefix="fedlm-records-") as cache:
            return datasets.load_dataset(
                builder, data_files=str(file), split="train", cache_dir=cache, keep_in_memory=True, **options
            )
    except (DatasetsError, ValueError) as err:
        raise RecordError(f"{file}: datasets cannot read it ({err.__cause__ or err}).") from err


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence datasets' progress bars and logs for one local read (a RecordError says what matters), then restore
    the caller's settings."""
    bars_were_on = not datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def _load_hub(source: str, split: str, config_field: str) -> datasets.Dataset:
    """Hub dataset ``source``'s split, cached where datasets caches downloads.

    Offline, datasets raises a ConnectionError that does not say a local file would do.
    """
    try:
        return datasets.load_dataset(source, split=split)
    except (OSError, ValueError, DatasetsError) as err:
        raise RecordError(
            f"{config_field}={source!r} is not a local file, and loading it as a Hugging Face hub dataset failed "
            f"({err}). The machine may be offline, or the name or split ({split!r}) wrong: give a local "
            f"{SUPPORTED} file instead."
        ) from err


def _require_rows(rows: list[Any], where: str) -> None:
    if not rows:
        raise RecordError(f"{where} holds no records.")


def _to_records(
    table: datasets.Dataset, origins: list[str], columns: Mapping[str, str] | None, config_field: str, where: str
) -> list[Record]:
    """The rows as records of the task's fields, after checking that every mapped column exists."""
    _require_rows(origins, where)
    mapping = dict(columns) if columns is not None else {name: name for name in table.column_names}
    for field, column in mapping.items():
        if column not in table.column_names:
            raise RecordError(
                f"{config_field}: {where} has no column {column!r} (for field {field!r}); "
                f"its columns are {table.column_names}."
            )
    labels = {
        column: feature
        for column in mapping.values()
        if isinstance(feature := table.features[column], datasets.ClassLabel)
    }
    rows = table.select_columns(list(dict.fromkeys(mapping.values()))).to_list()
    return [
        Record(
            {
                field: _to_value(row[column], labels.get(column), origin, _named(field, column))
                for field, column in mapping.items()
            },
            origin,
        )
        for row, origin in zip(rows, origins)
    ]


def _named(field: str, column: str) -> str:
    return f"field {field!r}" + (f" (column {column!r})" if column != field else "")


def _to_value(raw: object, label: datasets.ClassLabel | None, origin: str, named: str) -> Value:
    """``raw`` as a string or a list of strings: numbers by ``str`` (1 -> "1"), class ids as their class names (hub
    datasets store labels as ClassLabel ids); anything empty or missing is an error."""
    if label is not None and isinstance(raw, int):
        raw = label.int2str(raw) if raw >= 0 else None  # -1: the row has no label
    if isinstance(raw, list) and raw:
        return [_to_text(item, origin, named) for item in raw]
    return _to_text(raw, origin, named)


def _to_text(raw: object, origin: str, named: str) -> str:
    if isinstance(raw, str) and raw.strip():
        return raw
    if isinstance(raw, int | float) and not (isinstance(raw, float) and math.isnan(raw)):
        return str(raw)
    if raw is None or isinstance(raw, str | float) or raw == []:
        raise RecordError(f"{origin}: {named} is empty or missing.")
    raise RecordError(f"{origin}: {named} holds a {type(raw).__name__}; it must be a string or a list of strings.")
