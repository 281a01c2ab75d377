"""The commit stage: one worker, once per run, after every fragment is written; then the upkeep.

`CommitRun` turns the run into one table version and records the run: it counts what the run did to each
row (lifecycle.py), refuses to commit when the counts say something is wrong (a broken mount, an export
that lost rows), commits exactly once (table_commit.py), appends the rejects once and writes the run's
record, keyed by its run id. It runs as a DoFn over a single element with everything upstream as side
inputs, so it is part of the pipeline on every runner, and a failure anywhere upstream means it never runs.
Nothing per item reaches it: its side inputs are fragment metadata and counts. Every step of it is safe to
run again, as Beam does with a bundle that failed: the commit knows its own version, the rejects their
fragments, and the record its run id.

Before it commits, it records the run as `committing`: a run whose process dies after the commit, before its
record says `committed`, is settled from the table by whoever reads the record next (`settle`), never
reported as "nothing committed" while its version is live.

`Upkeep` comes after it as its own step (compaction, run-tag retention and old-version cleanup, indexes,
and the drift from the version before), and updates the record. A committed version stays committed
whatever the upkeep does: its failure is "committed, upkeep failed" (exit 3), and upkeep owed is done by
the next run, even one with nothing to change.
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
from transforms.lance_sink import open_dataset
from transforms.maintain import maintain
from transforms.run_log import commit_rejects, record_run, utc_now
from transforms.staging import remove_staging, whole_batches
from transforms.table_commit import ConcurrentRunError, RunIdentity, TableChange, commit_change, committed_version

log = logging.getLogger(__name__)
UPKEEP_DONE = "done"
UPKEEP_PENDING = "pending"
COMMITTING = "committing"       # the record's status from just before the commit until the commit's outcome


@dataclass(frozen=True)
class RunContext:
    """What the commit needs to know about the run, fixed when the pipeline is built."""

    output: OutputConfig
    max_reject_ratio: float
    max_delete_ratio: float
    dataset_uri: str
    run: RunIdentity
    config_hash: str
    encoder_ids: dict
    read_version: int | None
    rows_before: int                # the table's rows at the read version
    overwrite: bool                 # a new schema: every row is written into a new table (lifecycle.py)
    reweigh: bool                   # only new weights: every stored row's `vector` column is written again
    started_at: datetime
    staging: str                    # this run's staging folder (staging.py)
    budget: dict                    # forward passes per scope (budget.py); empty: no budget
    upkeep_owed: bool = False       # the last run committed without finishing its upkeep
    adopted: tuple[str, ...] = ()   # staging folders of dead runs whose batches this run commits
    interactions: str | None = None  # the interaction log's path, recorded by run (queries by user read it)

    @property
    def run_id(self) -> str:
        return self.run.run_id


class CommitRun(beam.DoFn):
    """Side inputs, all small: per written batch its fragments and counts (`written`), per reject batch
    likewise (`rejects`), per stored fragment what the removal stage did (`removals`: lifecycle.py), per staged
    batch of a run that died its rows, the rows this run matched and its fragments (`sizes`, `matched`,
    `staged`: staging.py), under a budget the items left waiting per encoder and those that have its input
    (`waiting`, `with_input`: budget.py), and counts."""

    def __init__(self, context: RunContext, schema):
        self._context = context
        self._schema = schema

    def process(self, _trigger, written: list[dict], rejects: list[dict], removals: list[dict],
                deleted: int, absent: int, unchanged: int, read: int, matched: dict[str, int], sizes: dict[str, int],
                staged: dict[str, dict], deferred: int, waiting: dict[str, int], with_input: dict[str, int],
                trained: Sequence[dict] = (), interactions_read: int = 0):
        ctx = self._context
        resumed = [staged[batch] for batch in whole_batches(matched, sizes)]
        if resumed:
            log.info("run %s commits %d rows that a run which did not finish wrote (%d batches)", ctx.run_id,
                     sum(batch["rows"] for batch in resumed), len(resumed))
        run = self._summary([*written, *resumed], len(resumed), rejects, deleted, absent, unchanged, read, deferred)
        run["backfill"] = backfill_progress(with_input, waiting, run["encoded"], ctx.budget)
        if trained:
            run["interactions"] = self._interactions(run, trained, interactions_read, ctx.interactions)
        refusal = self._refusal(run, removals)
        storage = ctx.output.storage_options
        if refusal:
            run.update(status="failed", message=refusal, table_version=ctx.read_version)
            log.error("run %s commits nothing: %s", ctx.run_id, refusal)
        else:
            record_run(ctx.output.uri, ctx.output.table, dict(run, status=COMMITTING, upkeep=UPKEEP_PENDING), storage)
            self._commit(run, [*written, *resumed], removals)
        commit_rejects(ctx.output.uri, ctx.output.table, [raw for batch in rejects for raw in batch["fragments"]],
                       storage)
        record_run(ctx.output.uri, ctx.output.table, dict(run, ended_at=utc_now()), storage)
        # Committed: nothing staged is left to commit. Moved on: its staging is of a version the table left. Refused:
        # all it staged stays for the next run (the launcher releases it), as does what it adopted unless committed.
        if not refusal:
            for folder in [ctx.staging, *(ctx.adopted if run["status"] != "failed" else ())]:
                remove_staging(folder)
        yield run

    def _commit(self, run: dict, written: list[dict], removals: list[dict]) -> None:
        ctx = self._context
        change = TableChange(
            self._schema, new_fragments=[raw for found in [*written, *removals] for raw in
                                         found.get("fragments", found.get("carried", []))],
            removals=[(found["fragment"], found["kept"]) for found in removals if "kept" in found],
            overwrite=ctx.overwrite, reweigh=ctx.reweigh)
        try:
            version = commit_change(ctx.dataset_uri, change, ctx.run, ctx.read_version, ctx.output.storage_options)
        except ConcurrentRunError as err:   # recorded as failed, not retried: the table moved on
            run.update(status="failed", message=str(err), table_version=ctx.read_version)
            log.error("run %s commits nothing: %s", ctx.run_id, err)
            return
        run["table_version"] = version
        run["rows_after"] = lance.dataset(ctx.dataset_uri, version=version,
                                          storage_options=ctx.output.storage_options).count_rows()
        expected = run["rows_before"] - run["deleted"] + run["added"]
        if run["rows_after"] != expected:
            mismatch = (f"the counts do not add up: the table has {run['rows_after']} rows, expected "
                        f"{run['rows_before']} - {run['deleted']} deleted + {run['added']} added = {expected}")
            run["message"] = "; ".join(filter(None, [run["message"], mismatch]))
            log.error("run %s: %s", ctx.run_id, mismatch)
        if version == ctx.read_version:
            run["status"] = "unchanged"
        run["upkeep"] = UPKEEP_PENDING if version != ctx.read_version or ctx.upkeep_owed else UPKEEP_DONE

    def _refusal(self, run: dict, removals: list[dict]) -> str:
        """Why the run must not commit, or "" when it may. A broken mount must not wipe the table, nor a
        broken interaction log every behaviour vector, nor an export that lost rows a tenth of the table; and the
        rows the removal stage took out must be exactly those the run replaces and deletes (lifecycle.py)."""
        ctx = self._context
        removed, replaced = sum(found["removed"] for found in removals), run["written"] - run["added"]
        if ctx.read_version is not None and removed != replaced + run["deleted"]:
            return (f"the counts do not add up: the removal stage took {removed} rows out of the table, but the run "
                    f"replaces {replaced} and deletes {run['deleted']}; refusing to commit what could lose or "
                    "duplicate rows (are some ids in the table twice?)")
        if run["read"] == 0 and ctx.read_version is not None:
            return "the catalog has no rows; refusing to delete every item of the table"
        log_rows = run.get("interactions") or {"read": 0, "rejected": 0}
        for what, rejected, read in (("rows", run["rejected"] + run["kept"], run["read"]),
                                     ("interaction rows", log_rows["rejected"], log_rows["read"])):
            ratio = rejected / read if read else 0.0
            if ratio > ctx.max_reject_ratio:
                return (f"{rejected} of {read} {what} rejected ({ratio:.1%}), over run.max_reject_ratio "
                        f"{ctx.max_reject_ratio:.1%}; see the rejects table")
        ratio = run["deleted"] / run["rows_before"] if run["rows_before"] else 0.0
        if ratio > ctx.max_delete_ratio:
            return (f"this run would delete {run['deleted']} of the table's {run['rows_before']} rows ({ratio:.1%}), "
                    f"over output.max_delete_ratio {ctx.max_delete_ratio:.1%}: their ids are gone from the "
                    "catalog. If they really left it, run again with --max-delete-ratio "
                    f"{min(1.0, ratio + 0.005):.2f} (or raise output.max_delete_ratio)")
        return ""

    @staticmethod
    def _interactions(run: dict, trained: Sequence[dict], read: int, path: str | None) -> dict:
        """The log's path and counts (its rejects are not catalog rows: `rejected` counts those only)."""
        rejected = sum(n for reason, n in run["rejects_by"].items() if reason.startswith(f"{LOG_STAGE}/"))
        return {"path": path, "generations": {t["encoder"]: t["generation"] for t in trained},
                "read": read, "rejected": rejected, "sessions": max(t["sessions"] for t in trained),
                "needed": max(t["needed"] for t in trained), "trained": {t["encoder"]: t["items"] for t in trained}}

    def _summary(self, written: list[dict], resumed_batches: int, rejects: list[dict], deleted: int, absent: int,
                 unchanged: int, read: int, deferred: int) -> dict:
        """The run's counts (lifecycle.py). Rows a dead run wrote count as written, and their forward passes as
        that run's."""
        ctx = self._context
        encoded: Counter[str] = Counter()
        seconds: Counter[str] = Counter()
        by_reason: Counter[str] = Counter()
        for batch in written[:len(written) - resumed_batches]:
            encoded.update(batch["encoded"])
            seconds.update(batch["encode_seconds"])
        for batch in rejects:
            by_reason.update(batch["by"])
        kept = sum(batch.get("kept", 0) for batch in rejects)
        rejected = sum(n for reason, n in by_reason.items() if not reason.startswith(f"{LOG_STAGE}/")) - kept
        written_rows = sum(batch["rows"] for batch in written)
        accounted = written_rows + unchanged + kept + rejected + deferred
        message = "" if accounted == read else (f"the counts do not add up: read {read} rows, but written + "
                                                 f"unchanged + kept + rejected + deferred = {accounted}")
        if message:
            log.error("run %s: %s", ctx.run_id, message)
        return {
            "run_id": ctx.run_id, "status": "committed", "message": message, "config_hash": ctx.config_hash,
            "rewrote": "table" if ctx.overwrite else "vector" if ctx.reweigh else "rows",
            "encoder_ids": ctx.encoder_ids, "read": read, "written": written_rows, "unchanged": unchanged,
            "deleted": deleted, "rejected": rejected, "kept": kept, "absent": absent, "deferred": deferred,
            "added": sum(batch.get("added", 0) for batch in written),
            "resumed": sum(batch["rows"] for batch in written[len(written) - resumed_batches:]),
            "rows_before": ctx.rows_before, "rows_after": ctx.rows_before,
            "encoded": {name: encoded[name] for name in ctx.encoder_ids},
            # Forward passes per second of the encode stage's time, summed over workers: what a GPU-hour buys.
            "encode_rate": {name: round(encoded[name] / seconds[name], 1) for name in ctx.encoder_ids
                            if encoded[name] and seconds[name] > 0},
            "rejects_by": dict(sorted(by_reason.items())),
            "drift": {}, "interactions": {}, "index": {}, "upkeep": UPKEEP_DONE,
            "retention": {"retain_days": ctx.output.retain_days, "keep_runs": ctx.output.keep_runs},
            "read_version": ctx.read_version, "staging": ctx.staging, "table_version": None,
            "started_at": ctx.started_at,
            "ended_at": utc_now(),
        }


class Upkeep(beam.DoFn):
    """After a commit (or when the last run left upkeep owed): the drift from the version the run read, then
    compaction, retention and indexes (maintain.py); the run's record says how it went."""

    def __init__(self, context: RunContext):
        self._context = context

    def process(self, run: dict):
        if run["upkeep"] == UPKEEP_DONE:
            yield run
            return
        ctx = self._context
        run = dict(run, drift=self._drift(run["table_version"]) if run["status"] == "committed" else {})
        problems, run["index"] = maintain(ctx.dataset_uri, ctx.output)
        run["upkeep"] = "; ".join(problems) or UPKEEP_DONE
        run["message"] = "; ".join(filter(None, [run["message"], *problems]))
        record_run(ctx.output.uri, ctx.output.table, dict(run, ended_at=utc_now()), ctx.output.storage_options)
        yield run

    def _drift(self, version: int) -> dict[str, float]:
        """Per vector column, how far the new version moved from the one the run started from (column_drift.py)."""
        ctx = self._context
        if ctx.read_version is None:
            return {}
        before = lance.dataset(ctx.dataset_uri, version=ctx.read_version, storage_options=ctx.output.storage_options)
        after = lance.dataset(ctx.dataset_uri, version=version, storage_options=ctx.output.storage_options)
        return {name: found["score"] for name, found in column_scores(before, after).items()}


def settle(run: dict, dataset_uri: str, why: str, storage_options: dict[str, str] | None = None) -> dict:
    """The record of a run that ended (`why`: its error) after the commit stage recorded it: `committed` (its
    upkeep owed) if the table holds its commit, whether or not the record had caught up; else `failed`."""
    if run["status"] == COMMITTING:
        dataset = open_dataset(dataset_uri, storage_options)
        version = None if dataset is None else committed_version(dataset, run["run_id"], run.get("read_version"))
        if version is None:
            return dict(run, status="failed", message=why, table_version=run["read_version"])
        run = dict(run, status="unchanged" if version == run.get("read_version") else "committed",
                   table_version=version, upkeep=UPKEEP_PENDING,
                   rows_after=lance.dataset(dataset_uri, version=version, storage_options=storage_options).count_rows())
    if run["status"] == "failed" or run.get("upkeep") in (None, UPKEEP_DONE):
        return run
    return dict(run, upkeep=f"failed: {why.splitlines()[0]}",
                message="; ".join(filter(None, [run.get("message"), f"upkeep failed: {why}"])))


def upkeep_owed(runs: Sequence[dict]) -> bool:
    """Whether the last run that committed left upkeep undone (an older release's record says nothing: done)."""
    ended = [r for r in runs if r["status"] in ("committed", "unchanged", COMMITTING)]
    return bool(ended) and ended[-1].get("upkeep") not in (None, UPKEEP_DONE)

