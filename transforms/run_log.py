"""The job's own tables beside the data table: `<table>_runs` (one row per run) and `<table>_rejects`.

Rejects can be many (a broken mount, a bad export): workers write them as fragments of the rejects
table, and the commit step appends those fragments, so no reject passes through the single commit
worker. The run's row is one row, written by the commit step.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone

import apache_beam as beam
import lance
import lancedb
import pyarrow as pa
from lance.fragment import FragmentMetadata, write_fragments

from transforms.lance_sink import dataset_uri, open_dataset

RUNS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("status", pa.string()),
    pa.field("message", pa.string()),
    pa.field("config_hash", pa.string()),
    pa.field("encoder_ids", pa.string()),
    pa.field("read", pa.int64()),
    pa.field("written", pa.int64()),
    pa.field("unchanged", pa.int64()),
    pa.field("deleted", pa.int64()),
    pa.field("rejected", pa.int64()),
    pa.field("resumed", pa.int64()),        # rows of a run that died, committed by this one (staging.py)
    pa.field("deferred", pa.int64()),       # rows a budget left for a later run, not written (budget.py)
    pa.field("encoded", pa.string()),
    pa.field("encode_rate", pa.string()),   # forward passes per second of encode-stage time, per encoder
    pa.field("backfill", pa.string()),      # under a budget: per encoder, items done of those with its input
    pa.field("rejects_by", pa.string()),
    pa.field("drift", pa.string()),
    pa.field("interactions", pa.string()),
    pa.field("index", pa.string()),         # each index's state after the run's upkeep (maintain.index_state)
    pa.field("table_version", pa.int64()),
    pa.field("started_at", pa.timestamp("us", tz="UTC")),
    pa.field("ended_at", pa.timestamp("us", tz="UTC")),
])

JSON_COLUMNS = ("encoded", "rejects_by", "encoder_ids", "drift", "interactions", "index", "encode_rate", "backfill")

REJECTS_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("error", pa.string()),
    pa.field("message", pa.string()),
    pa.field("input_ref", pa.string()),
    pa.field("run_id", pa.string(), nullable=False),
])


def runs_table_name(table: str) -> str:
    return f"{table}_runs"


def rejects_table_name(table: str) -> str:
    return f"{table}_rejects"


def rejects_by(rejects: Sequence[dict]) -> dict[str, int]:
    """Reject counts keyed `stage/error`, for the summary and the runs table."""
    return dict(sorted(Counter(f"{r['stage']}/{r['error']}" for r in rejects).items()))


class WriteRejects(beam.DoFn):
    """Write a batch of rejects as fragments of `<table>_rejects`; emit their metadata and counts."""

    def __init__(self, db_uri: str, table: str, run_id: str, storage_options: dict[str, str] | None = None):
        self._uri = dataset_uri(db_uri, rejects_table_name(table))
        self._run_id = run_id
        self._storage_options = storage_options

    def process(self, rejects: list[dict]):
        data = pa.Table.from_pylist([dict(r, run_id=self._run_id) for r in rejects], schema=REJECTS_SCHEMA)
        fragments = write_fragments(data, self._uri, schema=REJECTS_SCHEMA, mode="append",
                                    storage_options=self._storage_options)
        yield {"fragments": [json.dumps(f.to_json()) for f in fragments], "rows": len(rejects),
               "by": rejects_by(rejects)}


def commit_rejects(db_uri: str, table: str, fragments: Sequence[str],
                   storage_options: dict[str, str] | None = None) -> None:
    """Append the rejects' fragments to `<table>_rejects` (creating it on the first rejects)."""
    if not fragments:
        return
    uri = dataset_uri(db_uri, rejects_table_name(table))
    metadata = [FragmentMetadata.from_json(raw) for raw in fragments]
    existing = open_dataset(uri, storage_options)
    if existing is None:
        lance.LanceDataset.commit(uri, lance.LanceOperation.Overwrite(REJECTS_SCHEMA, metadata),
                                  storage_options=storage_options)
    else:
        lance.LanceDataset.commit(uri, lance.LanceOperation.Append(metadata), read_version=existing.version,
                                  storage_options=storage_options)


SQL_TYPES = {pa.string(): "STRING", pa.int64(): "BIGINT"}


def append_rows(db_uri: str, name: str, rows: Sequence[dict], schema: pa.Schema,
                storage_options: dict[str, str] | None = None) -> None:
    if not rows:
        return
    db = lancedb.connect(db_uri, storage_options=storage_options)
    data = pa.Table.from_pylist(list(rows), schema=schema)
    if name in db.table_names():
        table = db.open_table(name)
        missing = [f for f in schema if f.name not in table.schema.names]   # written by an older release
        if missing:
            table.add_columns({f.name: f"CAST(NULL AS {SQL_TYPES[f.type]})" for f in missing})
        table.add(data)
    else:
        db.create_table(name, data, schema=schema)


def record_run(db_uri: str, table: str, run: dict, storage_options: dict[str, str] | None = None) -> None:
    row = dict(run, **{key: json.dumps(run.get(key) or {}) for key in JSON_COLUMNS})
    append_rows(db_uri, runs_table_name(table), [row], RUNS_SCHEMA, storage_options)


def read_runs(db_uri: str, table: str, storage_options: dict[str, str] | None = None) -> list[dict]:
    db = lancedb.connect(db_uri, storage_options=storage_options)
    if runs_table_name(table) not in db.table_names():
        return []
    rows = db.open_table(runs_table_name(table)).to_arrow().to_pylist()
    for row in rows:
        for key in JSON_COLUMNS:
            row[key] = json.loads(row[key]) if row.get(key) else {}
    return sorted(rows, key=lambda r: r["started_at"])


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
