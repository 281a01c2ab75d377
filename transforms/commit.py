"""The commit stage: one worker, once per run, after every fragment is written.

It turns the run into one table version and records the run. It runs as a DoFn over a single
element with the written fragments and the rejects as side inputs, so it is part of the pipeline on
every runner, and a failure anywhere upstream means it never runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import apache_beam as beam

from transforms.lance_sink import commit_run
from transforms.run_log import record_rejects, record_run, rejects_by, utc_now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """What the commit needs to know about the run, fixed when the pipeline is built."""

    db_uri: str
    table: str
    dataset_uri: str
    run_id: str
    config_hash: str
    encoder_ids: dict
    read_version: int | None
    started_at: object


class CommitRun(beam.DoFn):
    def __init__(self, context: RunContext, schema):
        self._context = context
        self._schema = schema

    def process(self, _trigger, written: list[dict], rejects: list[dict]):
        ctx = self._context
        written_rows = sum(len(batch["ids"]) for batch in written)
        version = commit_run(ctx.dataset_uri, self._schema, written, (), ctx.run_id, ctx.read_version)
        record_rejects(ctx.db_uri, ctx.table, rejects, ctx.run_id)
        encoded: dict[str, int] = {}
        for batch in written:
            for name, count in batch["encoded"].items():
                encoded[name] = encoded.get(name, 0) + count
        run = {
            "run_id": ctx.run_id, "status": "committed", "message": "",
            "config_hash": ctx.config_hash, "encoder_ids": ctx.encoder_ids,
            "read": written_rows + len(rejects), "written": written_rows, "unchanged": 0, "deleted": 0,
            "rejected": len(rejects), "encoded": encoded, "rejects_by": rejects_by(rejects),
            "table_version": version, "started_at": ctx.started_at, "ended_at": utc_now(),
        }
        record_run(ctx.db_uri, ctx.table, run)
        yield run
