"""The interaction log's layout, read without a pipeline: its columns, checked before a run, and the
items of one user's rows.

The log is a CSV, Parquet or JSONL file (by its extension) of `session_id`, `item_id`, optionally `ts`,
and optionally `user_id`. The job reads it through Beam (behaviour.py); `query --user` only scans it for
one user's rows, and this module keeps that scan free of the job's model libraries.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.config import INTERACTION_COLUMNS, ConfigError
from transforms.csv_records import csv_header
from transforms.readers import JSON_LINES

USER_COLUMN = "user_id"         # optional; without it, each session is its own user
LOOKUP_BATCH_ROWS = 65_536      # log rows per batch when a user's rows are looked for


def log_columns(path: str) -> list[str]:
    """The interaction log's column names: Parquet's schema, a CSV's header, or a JSONL file's first row."""
    ext = path.lower().rsplit(".", 1)[-1]
    if ext == "parquet":
        with FileSystems.open(path) as handle:
            return pq.read_schema(handle).names
    if ext in JSON_LINES:
        with FileSystems.open(path) as handle:
            first = next((line for line in handle if line.strip()), b"{}")
        return list(json.loads(first))
    return csv_header(path)


def check_interactions(path: str) -> None:
    """Fail before any work when the log lacks a column that every row needs."""
    try:
        columns = log_columns(path)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise ConfigError(f"catalog.interactions {path} cannot be read: {err}") from err
    missing = [name for name in INTERACTION_COLUMNS if name not in columns]
    if missing:
        raise ConfigError(f"catalog.interactions {path} has no column {', '.join(missing)}; "
                          f"it needs {', '.join(INTERACTION_COLUMNS)} and optionally ts")


def items_of_user(path: str, user: str) -> list[str]:
    """The items in a user's rows of the log, each once, in the log's order. A user is a `user_id`; in a
    log without that column, each session is its own user. The log is streamed, a batch of rows at a
    time, and rows the job would reject (no item id, an unreadable line) are passed over."""
    key = USER_COLUMN if USER_COLUMN in log_columns(path) else INTERACTION_COLUMNS[0]
    items: dict[str, None] = {}
    for keys, item_ids in _id_batches(path, [key, "item_id"]):
        theirs = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(keys), user.strip()), False)
        items.update((item, None) for item in pc.utf8_trim_whitespace(item_ids.filter(theirs)).to_pylist() if item)
    return list(items)


def _id_batches(path: str, columns: list[str]) -> Iterator[tuple[pa.Array, pa.Array]]:
    """Two columns of the log as string arrays, a batch at a time."""
    ext = path.lower().rsplit(".", 1)[-1]
    with FileSystems.open(path) as handle:
        if ext == "parquet":
            batches = pq.ParquetFile(handle).iter_batches(LOOKUP_BATCH_ROWS, columns=columns)
        elif ext in JSON_LINES:
            batches = _json_batches(handle, columns)
        else:
            batches = pa_csv.open_csv(handle, convert_options=pa_csv.ConvertOptions(
                include_columns=columns, column_types=dict.fromkeys(columns, pa.string())),
                parse_options=pa_csv.ParseOptions(invalid_row_handler=lambda _row: "skip"))
        for batch in batches:
            yield tuple(batch.column(name).cast(pa.string()) for name in columns)


def _json_batches(lines, columns: list[str]) -> Iterator[pa.RecordBatch]:
    schema = pa.schema([(name, pa.string()) for name in columns])
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append({name: None if row.get(name) is None else str(row[name]) for name in columns})
        if len(rows) == LOOKUP_BATCH_ROWS:
            yield pa.RecordBatch.from_pylist(rows, schema=schema)
            rows = []
    yield pa.RecordBatch.from_pylist(rows, schema=schema)
