"""How a table moved between two versions: per vector column, and per item.

Per column, the `score` and `centroid_shift` of transforms/column_drift.py: two captions edited in a catalog
of thousands score near 0, half the catalog replaced by another kind of item far higher (docs/health.md).
Per table: rows before and after, the ids added and removed; per column, how many items kept in both
versions changed their vector and the ones that moved most (1 - cosine between their old and new vector).

Memory: the samples, the two versions' ids, and the vectors of the rows written since the older
version, a batch at a time.
"""

from __future__ import annotations

import heapq
from datetime import datetime, timezone
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.errors import QueryError
from transforms.column_drift import SAMPLE_ROWS, column_scores, shared_columns
from transforms.lance_sink import vector_matrix

MOST_MOVED = 10
UNMOVED_COSINE = 0.999999      # float32 noise: a vector written again unchanged


def drift(before: lance.LanceDataset, after: lance.LanceDataset, sample_rows: int = SAMPLE_ROWS) -> dict:
    """The report: column scores, added and removed ids, and per column the items that moved most."""
    old_ids = before.to_table(columns=["id"])["id"].combine_chunks()
    new_ids = after.to_table(columns=["id"])["id"].combine_chunks()
    new_only = pc.invert(pc.is_in(new_ids, value_set=old_ids))
    added = int(pc.sum(new_only).as_py() or 0)
    removed = int(pc.sum(pc.invert(pc.is_in(old_ids, value_set=new_ids))).as_py() or 0)
    columns = column_scores(before, after, sample_rows)
    for name, moved in _moved(before, after, old_ids).items():
        columns[name].update(moved)
    return {"from": before.version, "to": after.version, "rows_from": len(old_ids), "rows_to": len(new_ids),
            "added": added, "removed": removed, "added_examples": new_ids.filter(new_only)[:MOST_MOVED].to_pylist(),
            "columns": columns}


def open_version(uri: str, version: str) -> lance.LanceDataset:
    """A table's version by number or tag."""
    try:
        return lance.dataset(uri, version=int(version) if version.isdigit() else version)
    except (ValueError, OSError, RuntimeError) as err:
        raise QueryError(f"the table has no version or tag {version!r}") from err


def previous_run_version(db_uri: str, table: str, version: int) -> int:
    """The version that the run before the one that made `version` left: what a nightly run moved from.
    Versions after a run's own (its upkeep's compaction and indexes) hold that run's rows."""
    from transforms.run_log import read_runs

    earlier = sorted(r["table_version"] for r in read_runs(db_uri, table)
                     if r["status"] == "committed" and r["table_version"] is not None and r["table_version"] <= version)
    if len(earlier) < 2:
        raise QueryError(f"no run committed a version of '{table}' before the one that made version {version}; "
                         "give --from")
    return earlier[-2]


def _moved(before: lance.LanceDataset, after: lance.LanceDataset, old_ids: pa.Array) -> dict[str, dict]:
    """Per column, among the items in both versions and written since `before`: how many changed their
    vector and the MOST_MOVED that moved most. Rows not written since keep their vectors by construction."""
    columns = shared_columns(before, after)
    since = _version_time(before)
    moved: dict[str, dict[str, Any]] = {name: {"moved": 0, "most_moved": []} for name in columns}
    heaps: dict[str, list] = {name: [] for name in columns}
    written_since = f"embedded_at > timestamp '{since}'"
    # One lookup of every candidate id in the older version (a hash of its ids), not one per batch.
    where = pc.index_in(after.to_table(columns=["id"], filter=written_since)["id"], value_set=old_ids)
    start = 0
    for batch in after.to_batches(columns=["id", *columns.values()], filter=written_since, batch_size=4096):
        found = where[start:start + batch.num_rows]
        start += batch.num_rows
        kept = pc.is_valid(found)
        if not pc.any(kept).as_py():
            continue
        batch, positions = batch.filter(kept), np.asarray(found.filter(kept), np.int64)
        old = before.take(positions, columns=list(columns.values()))
        ids = batch["id"].to_pylist()
        for name, column in columns.items():
            now, then = vector_matrix(batch[column]), vector_matrix(old[column])
            cosines = np.einsum("ij,ij->i", now, then)
            cosines[~now.any(axis=1) & ~then.any(axis=1)] = 1.0    # without this vector in both: not moved
            changed = np.flatnonzero(cosines < UNMOVED_COSINE)
            moved[name]["moved"] += len(changed)
            for row in changed:
                heapq.heappush(heaps[name], (1.0 - float(cosines[row]), ids[row]))
                if len(heaps[name]) > MOST_MOVED:
                    heapq.heappop(heaps[name])
    for name, heap in heaps.items():
        moved[name]["most_moved"] = [{"id": item, "distance": round(distance, 6)}
                                     for distance, item in sorted(heap, reverse=True)]
    return moved


def _version_time(dataset: lance.LanceDataset) -> str:
    """When the version was committed, in UTC (Lance gives it in local time, without a zone)."""
    stamp = next(v["timestamp"] for v in dataset.versions() if v["version"] == dataset.version)
    assert isinstance(stamp, datetime), "Lance gives a version's time as a datetime"
    return stamp.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
