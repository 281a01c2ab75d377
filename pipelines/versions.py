"""Versions, tags and runs of a table, and rollback to an earlier one."""

from __future__ import annotations

import lance

from pipelines.errors import QueryError
from transforms.config import OutputConfig
from transforms.lance_sink import dataset_uri, open_dataset
from transforms.maintain import why_kept
from transforms.run_log import read_runs


def history(db_uri: str, table: str) -> dict:
    """The table's versions (with their tags, and why the retention keeps each: by the last run's
    output.retain_days and keep_runs) and its runs."""
    dataset = _open(db_uri, table)
    runs = read_runs(db_uri, table)
    retention = next((r["retention"] for r in reversed(runs) if r.get("retention")), None) or {
        "retain_days": OutputConfig.retain_days, "keep_runs": OutputConfig.keep_runs}
    kept = why_kept(dataset, retention["retain_days"], retention["keep_runs"])
    tags_by_version: dict[int, list[str]] = {}
    for tag, info in dataset.tags.list().items():
        tags_by_version.setdefault(info["version"], []).append(tag)
    versions = [
        {"version": v["version"], "timestamp": v["timestamp"], "rows": int(v["metadata"].get("total_rows", 0)),
         "tags": sorted(tags_by_version.get(v["version"], [])), "kept": kept.get(v["version"], "")}
        for v in dataset.versions()
    ]
    return {"latest": dataset.version, "versions": versions, "runs": runs}


def rollback(db_uri: str, table: str, to: str) -> int:
    """Make the content of an earlier version (number or tag) the table's new latest version."""
    dataset = _open(db_uri, table)
    target: int | str = int(to) if to.isdigit() else to
    try:
        old = lance.dataset(dataset.uri, version=target)
    except (ValueError, OSError) as err:
        raise QueryError(f"table '{table}' has no version or tag {to!r}") from err
    old.restore()
    return lance.dataset(dataset.uri).version


def _open(db_uri: str, table: str) -> lance.LanceDataset:
    dataset = open_dataset(dataset_uri(db_uri, table))
    if dataset is None:
        raise QueryError(f"no table '{table}' under {db_uri}")
    return dataset
