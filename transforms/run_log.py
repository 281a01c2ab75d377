"""The job's own tables beside the data table: `<table>_runs` (one row per run) and `<table>_rejects`."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone

import lancedb
import pyarrow as pa

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
    pa.field("encoded", pa.string()),
    pa.field("rejects_by", pa.string()),
    pa.field("table_version", pa.int64()),
    pa.field("started_at", pa.timestamp("us", tz="UTC")),
    pa.field("ended_at", pa.timestamp("us", tz="UTC")),
])

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


def append_rows(db_uri: str, name: str, rows: Sequence[dict], schema: pa.Schema) -> None:
    if not rows:
        return
    db = lancedb.connect(db_uri)
    data = pa.Table.from_pylist(list(rows), schema=schema)
    if name in db.table_names():
        db.open_table(name).add(data)
    else:
        db.create_table(name, data, schema=schema)


def record_rejects(db_uri: str, table: str, rejects: Sequence[dict], run_id: str) -> None:
    append_rows(db_uri, rejects_table_name(table), [dict(r, run_id=run_id) for r in rejects], REJECTS_SCHEMA)


def record_run(db_uri: str, table: str, run: dict) -> None:
    row = dict(run, encoded=json.dumps(run["encoded"]), rejects_by=json.dumps(run["rejects_by"]),
               encoder_ids=json.dumps(run["encoder_ids"]))
    append_rows(db_uri, runs_table_name(table), [row], RUNS_SCHEMA)


def read_runs(db_uri: str, table: str) -> list[dict]:
    db = lancedb.connect(db_uri)
    if runs_table_name(table) not in db.table_names():
        return []
    rows = db.open_table(runs_table_name(table)).to_arrow().to_pylist()
    for row in rows:
        for key in ("encoded", "rejects_by", "encoder_ids"):
            row[key] = json.loads(row[key]) if row[key] else {}
    return sorted(rows, key=lambda r: r["started_at"])


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
