"""The job's own tables beside the data table: `<table>_runs` (one row per run) and `<table>_rejects`.

Rejects can be many (a broken mount, a bad export): workers write them as fragments of the rejects
table, and the commit step appends those fragments once (a retried commit finds them there), so no
reject passes through the single commit worker. A reject's `kept` says whether the table kept the row it
held for that id (docs/safety.md). The run's row is one row, keyed by its run id: the commit step writes it,
the upkeep step after it updates it, and a retry of either writes the same row again, never a second one.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone

import apache_beam as beam
import lancedb
import pyarrow as pa
from lance.fragment import write_fragments

from transforms.lance_sink import dataset_uri, open_dataset
from transforms.table_commit import append_once

log = logging.getLogger(__name__)

RECORD_ATTEMPTS = 5          # a run's row is written again after a store's error, waiting 0.5, 1, 2, 4 s between
RECORD_BACKOFF_S = 0.5
RUNS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("status", pa.string()),
    pa.field("message", pa.string()),
    pa.field("config_hash", pa.string()),
    pa.field("rewrote", pa.string()),       # rows (those that changed), vector (new weights: that column), table
    pa.field("encoder_ids", pa.string()),
    pa.field("read", pa.int64()),
    pa.field("written", pa.int64()),
    pa.field("unchanged", pa.int64()),
    pa.field("deleted", pa.int64()),
    pa.field("rejected", pa.int64()),
    pa.field("resumed", pa.int64()),        # rows of a run that died, committed by this one (staging.py)
    pa.field("deferred", pa.int64()),       # rows a budget left for a later run, not written (budget.py)
    pa.field("kept", pa.int64()),           # rows that failed this run but stay as the table held them
    pa.field("added", pa.int64()),          # written rows with an id new to the table
    pa.field("absent", pa.int64()),         # stored ids the catalog no longer lists that stay (docs/safety.md)
    pa.field("rows_before", pa.int64()),    # the table's rows at the version the run read ...
    pa.field("rows_after", pa.int64()),     # ... and at the version it committed: before - deleted + added
    pa.field("upkeep", pa.string()),        # "done", or what is owed (the next run does it)
    pa.field("retention", pa.string()),     # the run's output.retain_days and keep_runs (`versions` says why)
    pa.field("encoded", pa.string()),
    pa.field("encode_rate", pa.string()),   # forward passes per second of encode-stage time, per encoder
    pa.field("backfill", pa.string()),      # under a budget: per encoder, items done of those with its input
    pa.field("rejects_by", pa.string()),
    pa.field("drift", pa.string()),
    pa.field("interactions", pa.string()),
    pa.field("index", pa.string()),         # each index's state after the run's upkeep (maintain.index_state)
    pa.field("read_version", pa.int64()),   # the version the run started from
    pa.field("staging", pa.string()),       # the run's staging folder, whose lease says whether it still runs
    pa.field("table_version", pa.int64()),
    pa.field("started_at", pa.timestamp("us", tz="UTC")),
    pa.field("ended_at", pa.timestamp("us", tz="UTC")),
])

JSON_COLUMNS = ("encoded", "rejects_by", "encoder_ids", "drift", "interactions", "index", "encode_rate", "backfill",
                "retention")

REJECTS_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("error", pa.string()),
    pa.field("message", pa.string()),
    pa.field("input_ref", pa.string()),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("kept", pa.bool_()),           # the table kept the row it held for this id
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
               "by": rejects_by(rejects), "kept": sum(1 for r in rejects if r.get("kept"))}


def commit_rejects(db_uri: str, table: str, fragments: Sequence[str],
                   storage_options: dict[str, str] | None = None) -> None:
    """Append the rejects' fragments to `<table>_rejects` (creating it on the first rejects), once."""
    if fragments:
        append_once(dataset_uri(db_uri, rejects_table_name(table)), REJECTS_SCHEMA, fragments, storage_options)


SQL_TYPES = {pa.string(): "STRING", pa.int64(): "BIGINT", pa.bool_(): "BOOLEAN"}


def upgrade_side_tables(db_uri: str, table: str, storage_options: dict[str, str] | None = None) -> None:
    """Give the runs and rejects tables that an older release wrote the columns this one writes (as nulls in
    their old rows), before any worker writes a fragment of the new schema."""
    for name, schema in ((runs_table_name(table), RUNS_SCHEMA), (rejects_table_name(table), REJECTS_SCHEMA)):
        dataset = open_dataset(dataset_uri(db_uri, name), storage_options)
        missing = [] if dataset is None else [f for f in schema if f.name not in dataset.schema.names]
        if dataset is not None and missing:
            dataset.add_columns({f.name: f"CAST(NULL AS {SQL_TYPES[f.type]})" for f in missing})


def record_run(db_uri: str, table: str, run: dict, storage_options: dict[str, str] | None = None,
               only_if_committing: bool = False) -> None:
    """Write the run's row, or rewrite it: one row per run id, however often this is called. With
    `only_if_committing`, an existing row is rewritten only while it still says `committing` (a settlement
    never overwrites what the run itself recorded since)."""
    row = dict(run, **{key: json.dumps(run.get(key) or {}) for key in JSON_COLUMNS})
    data = pa.Table.from_pylist([row], schema=RUNS_SCHEMA)
    db = lancedb.connect(db_uri, storage_options=storage_options)
    name = runs_table_name(table)
    if name not in db.table_names():
        try:
            db.create_table(name, data, schema=RUNS_SCHEMA)
            return
        except (OSError, ValueError, RuntimeError):    # another run created it first: merge into theirs
            pass
    # Keyed by run id, so a retry after a store's error (a reset, a 503) writes the same row, never a second.
    for attempt in range(RECORD_ATTEMPTS):
        merge = db.open_table(name).merge_insert("run_id")
        merge = merge.when_matched_update_all(where="target.status = 'committing'" if only_if_committing else None)
        try:
            merge.when_not_matched_insert_all().execute(data)
            return
        except (OSError, RuntimeError) as err:
            if attempt == RECORD_ATTEMPTS - 1:
                raise
            log.info("recording run %s again: %s", run["run_id"], str(err).splitlines()[0])
            time.sleep(RECORD_BACKOFF_S * 2 ** attempt)


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
