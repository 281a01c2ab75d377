"""The commit stage: one worker, once per run, after every fragment is written.

It turns the run into one table version, keeps the table in shape and records the run. It runs as
a DoFn over a single element with everything upstream as side inputs, so it is part of the pipeline
on every runner, and a failure anywhere upstream means it never runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import apache_beam as beam

from pipelines.config import OutputConfig
from transforms.lance_sink import commit_run
from transforms.maintain import maintain
from transforms.run_log import record_rejects, record_run, rejects_by, utc_now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """What the commit needs to know about the run, fixed when the pipeline is built."""

    output: OutputConfig
    max_reject_ratio: float
    dataset_uri: str
    run_id: str
    config_hash: str
    encoder_ids: dict
    read_version: int | None
    overwrite: bool
    started_at: datetime


class CommitRun(beam.DoFn):
    def __init__(self, context: RunContext, schema):
        self._context = context
        self._schema = schema

    def process(self, _trigger, written: list[dict], rejects: list[dict], deletes: list[str], unchanged: list[int],
                read: list[int]):
        ctx = self._context
        run = self._summary(written, rejects, len(deletes), sum(unchanged), sum(read))
        refusal = self._refusal(run)
        if refusal:
            run.update(status="failed", message=refusal, table_version=ctx.read_version)
            log.error("run %s commits nothing: %s", ctx.run_id, refusal)
        else:
            run["table_version"] = commit_run(ctx.dataset_uri, self._schema, written, deletes, ctx.run_id,
                                              ctx.read_version, ctx.overwrite)
            if run["table_version"] != ctx.read_version:
                maintain(ctx.dataset_uri, ctx.output.retain_days, ctx.output.index_min_rows, ctx.output.compact)
            else:
                run["status"] = "unchanged"
        record_rejects(ctx.output.uri, ctx.output.table, rejects, ctx.run_id)
        record_run(ctx.output.uri, ctx.output.table, dict(run, ended_at=utc_now()))
        yield run

    def _refusal(self, run: dict) -> str:
        """Why the run must not commit, or "" when it may. A broken mount must not wipe the table."""
        if run["read"] == 0 and self._context.read_version is not None:
            return "the catalog has no rows; refusing to delete every item of the table"
        ratio = run["rejected"] / run["read"] if run["read"] else 0.0
        if ratio > self._context.max_reject_ratio:
            return (f"{run['rejected']} of {run['read']} rows rejected ({ratio:.1%}), over run.max_reject_ratio "
                    f"{self._context.max_reject_ratio:.1%}; see the rejects table")
        return ""

    def _summary(self, written: list[dict], rejects: list[dict], deleted: int, unchanged: int, read: int) -> dict:
        ctx = self._context
        written_rows = sum(len(batch["ids"]) for batch in written)
        encoded = {name: 0 for name in ctx.encoder_ids}
        for batch in written:
            for name, count in batch["encoded"].items():
                encoded[name] += count
        outcomes = written_rows + unchanged + len(rejects)
        if outcomes != read:
            log.error("conservation broken: read %d rows but %d written + unchanged + rejected", read, outcomes)
        return {
            "run_id": ctx.run_id, "status": "committed", "message": "", "config_hash": ctx.config_hash,
            "encoder_ids": ctx.encoder_ids, "read": read, "written": written_rows, "unchanged": unchanged,
            "deleted": deleted, "rejected": len(rejects), "encoded": encoded, "rejects_by": rejects_by(rejects),
            "table_version": None, "started_at": ctx.started_at, "ended_at": utc_now(),
        }
