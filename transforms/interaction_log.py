"""The interaction log's layout, read without a pipeline: its columns, checked before a run, and the
items of one user's rows.

The log is a CSV, Parquet or JSONL file (by its extension) of `session_id`, `item_id`, optionally `ts`,
and optionally `user_id`. The job reads it through Beam (behaviour.py); `query --user` only scans it for
one user's rows, the service reads it once into a `UserIndex`, and this module keeps both free of the job's
model libraries.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
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
    items: dict[str, None] = {}
    for keys, item_ids in _user_batches(path):
        theirs = pc.fill_null(pc.equal(keys, user.strip()), False)
        items.update((item, None) for item in item_ids.filter(theirs).to_pylist() if item)
    return list(items)


class UserIndex:
    """A log's items by user, read once: `items(user)` answers as `items_of_user` does, without a scan. It holds
    the log's two columns as Arrow arrays sorted by user (the sort is stable, so each user's rows keep the log's
    order) and each user's first row: about 30 bytes an event plus 100 a user."""

    def __init__(self, path: str):
        batches = list(_user_batches(path))
        keys = pa.chunked_array([k for k, _ in batches], pa.string()).combine_chunks()
        items = pa.chunked_array([i for _, i in batches], pa.string()).combine_chunks()
        order = pc.sort_indices(keys)
        self._keys, self._items = keys.take(order), items.take(order)
        valid = np.asarray(pc.is_valid(self._keys), dtype=bool)     # nulls sort last
        new_user = np.ones(len(valid), dtype=bool)
        new_user[1:] = np.asarray(pc.fill_null(pc.not_equal(self._keys[1:], self._keys[:-1]), True), dtype=bool)
        self._starts = np.flatnonzero(valid & new_user)
        self._ends = np.r_[self._starts[1:], valid.sum()]
        self._first = {user: run for run, user in enumerate(self._keys.take(self._starts).to_pylist())}

    def items(self, user: str) -> list[str]:
        run = self._first.get(user.strip())
        if run is None:
            return []
        found = self._items[self._starts[run]:self._ends[run]].to_pylist()
        return list(dict.fromkeys(item for item in found if item))


def _user_batches(path: str) -> Iterator[tuple[pa.Array, pa.Array]]:
    """The log's (user, item) columns, trimmed, a batch at a time."""
    key = USER_COLUMN if USER_COLUMN in log_columns(path) else INTERACTION_COLUMNS[0]
    for keys, item_ids in _id_batches(path, [key, "item_id"]):
        yield pc.utf8_trim_whitespace(keys), pc.utf8_trim_whitespace(item_ids)


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
