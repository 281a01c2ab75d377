"""The commit stage: one worker, once per run, after every fragment is written.

It turns the run into one table version, keeps the table in shape and records the run. It runs as
a DoFn over a single element with everything upstream as side inputs, so it is part of the pipeline
on every runner, and a failure anywhere upstream means it never runs. Nothing per item reaches it:
its side inputs are fragment metadata and counts.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import apache_beam as beam
import lance

from transforms.behaviour import STAGE as LOG_STAGE
from transforms.budget import backfill_progress
from transforms.column_drift import column_scores
from transforms.config import OutputConfig
from transforms.lance_sink import ConcurrentRunError, commit_run
from transforms.maintain import maintain
from transforms.run_log import commit_rejects, record_run, utc_now
from transforms.staging import read_fragments, remove_staging, whole_batches

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
    staging: str                    # this run's staging folder (staging.py)
    budget: dict                    # forward passes per scope (budget.py); empty: no budget


class CommitRun(beam.DoFn):
    """Side inputs, all small: per written batch its fragments and counts (`written`), per reject batch
    likewise (`rejects`), per stored fragment its deletion file (`deletions`), per staged batch of a run that
    died its rows and the rows this run matched (`sizes`, `matched`: staging.py), under a budget the items left
    waiting per encoder and those that have its input (`waiting`, `with_input`: budget.py), and counts."""

    def __init__(self, context: RunContext, schema):
        self._context = context
        self._schema = schema

    def process(self, _trigger, written: list[dict], rejects: list[dict], deletions: list[tuple],
                deleted: int, unchanged: int, read: int, matched: dict[str, int], sizes: dict[str, int],
                deferred: int, waiting: dict[str, int], with_input: dict[str, int],
                trained: Sequence[dict] = (), interactions_read: int = 0):
        ctx = self._context
        resumed = [read_fragments(batch) for batch in whole_batches(matched, sizes)]
        if resumed:
            log.info("run %s commits %d rows that a run which did not finish wrote (%d batches)", ctx.run_id,
                     sum(batch["rows"] for batch in resumed), len(resumed))
        run = self._summary(written, resumed, rejects, deleted, unchanged, read, deferred)
        run["backfill"] = backfill_progress(with_input, waiting, run["encoded"], ctx.budget)
        if trained:
            run["interactions"] = self._interactions(run, trained, interactions_read)
        refusal = self._refusal(run)
        if refusal:
            run.update(status="failed", message=refusal, table_version=ctx.read_version)
            log.error("run %s commits nothing: %s", ctx.run_id, refusal)
        else:
            self._commit(run, [raw for batch in [*written, *resumed] for raw in batch["fragments"]], deletions)
        storage = ctx.output.storage_options
        commit_rejects(ctx.output.uri, ctx.output.table, [raw for batch in rejects for raw in batch["fragments"]],
                       storage)
        record_run(ctx.output.uri, ctx.output.table, dict(run, ended_at=utc_now()), storage)
        remove_staging(ctx.staging)       # committed, or failed for good: nothing in it can be committed now
        yield run

    def _commit(self, run: dict, fragments: list[str], deletions: list[tuple]) -> None:
        ctx = self._context
        try:
            run["table_version"] = commit_run(ctx.dataset_uri, self._schema, fragments, deletions, ctx.run_id,
                                              ctx.read_version, ctx.overwrite, ctx.output.storage_options)
        except ConcurrentRunError as err:   # recorded as failed, not retried: the table moved on
            run.update(status="failed", message=str(err), table_version=ctx.read_version)
            log.error("run %s commits nothing: %s", ctx.run_id, err)
            return
        if run["table_version"] != ctx.read_version:
            run["drift"] = self._drift(run["table_version"])
            problems, run["index"] = maintain(ctx.dataset_uri, ctx.output.retain_days, ctx.output.index_min_rows,
                                              ctx.output.compact, ctx.output.storage_options)
            run["message"] = "; ".join(problems)
        else:
            run["status"] = "unchanged"

    def _drift(self, version: int) -> dict[str, float]:
        """Per vector column, how far the new version moved from the one the run started from (column_drift.py)."""
        ctx = self._context
        if ctx.read_version is None:
            return {}
        before = lance.dataset(ctx.dataset_uri, version=ctx.read_version, storage_options=ctx.output.storage_options)
        after = lance.dataset(ctx.dataset_uri, version=version, storage_options=ctx.output.storage_options)
        return {name: found["score"] for name, found in column_scores(before, after).items()}

    def _refusal(self, run: dict) -> str:
        """Why the run must not commit, or "" when it may. A broken mount must not wipe the table, nor a
        broken interaction log every behaviour vector."""
        if run["read"] == 0 and self._context.read_version is not None:
            return "the catalog has no rows; refusing to delete every item of the table"
        log_rows = run.get("interactions") or {"read": 0, "rejected": 0}
        for what, rejected, read in (("rows", run["rejected"], run["read"]),
                                     ("interaction rows", log_rows["rejected"], log_rows["read"])):
            ratio = rejected / read if read else 0.0
            if ratio > self._context.max_reject_ratio:
                return (f"{rejected} of {read} {what} rejected ({ratio:.1%}), over run.max_reject_ratio "
                        f"{self._context.max_reject_ratio:.1%}; see the rejects table")
        return ""

    @staticmethod
    def _interactions(run: dict, trained: Sequence[dict], read: int) -> dict:
        """The log's counts (its rejects are not catalog rows: `rejected` counts those only)."""
        rejected = sum(n for reason, n in run["rejects_by"].items() if reason.startswith(f"{LOG_STAGE}/"))
        return {"read": read, "rejected": rejected, "sessions": max(t["sessions"] for t in trained),
                "needed": max(t["needed"] for t in trained), "trained": {t["encoder"]: t["items"] for t in trained}}

    def _summary(self, written: list[dict], resumed: list[dict], rejects: list[dict], deleted: int, unchanged: int,
                 read: int, deferred: int) -> dict:
        """The run's counts. Rows a dead run wrote count as written, and their forward passes as that run's."""
        ctx = self._context
        resumed_rows = sum(batch["rows"] for batch in resumed)
        written_rows = sum(batch["rows"] for batch in written) + resumed_rows
        encoded: Counter[str] = Counter()
        seconds: Counter[str] = Counter()
        by_reason: Counter[str] = Counter()
        for batch in written:
            encoded.update(batch["encoded"])
            seconds.update(batch["encode_seconds"])
        for batch in rejects:
            by_reason.update(batch["by"])
        rejected = sum(n for reason, n in by_reason.items() if not reason.startswith(f"{LOG_STAGE}/"))
        if written_rows + unchanged + rejected + deferred != read:
            log.error("conservation broken: read %d rows but %d written + unchanged + rejected + deferred", read,
                      written_rows + unchanged + rejected + deferred)
        return {
            "run_id": ctx.run_id, "status": "committed", "message": "", "config_hash": ctx.config_hash,
            "encoder_ids": ctx.encoder_ids, "read": read, "written": written_rows, "unchanged": unchanged,
            "deleted": deleted, "rejected": rejected, "resumed": resumed_rows, "deferred": deferred,
            "encoded": {name: encoded[name] for name in ctx.encoder_ids},
            # Forward passes per second of the encode stage's time, summed over workers: what a GPU-hour buys.
            "encode_rate": {name: round(encoded[name] / seconds[name], 1) for name in ctx.encoder_ids
                            if encoded[name] and seconds[name] > 0},
            "rejects_by": dict(sorted(by_reason.items())),
            "drift": {}, "interactions": {}, "index": {},
            "table_version": None, "started_at": ctx.started_at, "ended_at": utc_now(),
        }
