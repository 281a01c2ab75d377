"""`GET /api/versions` and `GET /api/health/{report}`: what the `versions`, `duplicates`, `outliers` and `drift`
commands print with `--json`. A report is fixed for a table version, so each is computed once per version
and options, on the service's one report thread, and kept (`ServedTable.reports`): at 1M rows a report takes
about a minute, a search 30 ms. A request waiting for one holds no thread while it waits."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from pipelines.errors import QueryError
from pipelines.serve.search_api import MAX_K, BadRequest, version_asked
from pipelines.serve.state import ServedTable

HEALTH_REPORTS = ("duplicates", "outliers", "drift")


def router(served: ServedTable) -> APIRouter:
    api = APIRouter()

    @api.get("/api/versions")
    def versions() -> Any:
        """`versions --json`, read again at most every refresh period (tags and runs change between commits)."""
        from pipelines.versions import history

        period = int(time.monotonic() // served.refresh_s)
        return served.history.get((served.at().handle.version, period),
                                  lambda: _plain(history(served.uri, served.name)))

    @api.get("/api/health/{report}")
    async def health(report: str, version: int | None = None, tag: str | None = None, k: int = 20,
                     isolated: bool | None = None) -> Any:
        """The report's `--json`. Outliers: captions that disagree with their pictures where the table has a text
        and an image encoder in one space, else (or with `isolated=true`) the items farthest from the rest;
        the `k` most suspicious of the MAX_K the service computes."""
        if report not in HEALTH_REPORTS:
            raise BadRequest(f"no report '{report}'; there are {', '.join(HEALTH_REPORTS)}", 404)
        if not 1 <= k <= MAX_K:
            raise BadRequest(f"k must be a whole number from 1 to {MAX_K}")
        table = await run_in_threadpool(served.at, version_asked(version, tag))
        outliers = report == "outliers"
        key = (report, table.handle.version, isolated if outliers else None)
        found = await asyncio.wrap_future(served.reports.future(
            key, lambda: _plain(health_report(served, table, report, MAX_K, isolated))))
        return found[:k] if outliers else found

    return api


def health_report(served: ServedTable, table, report: str, k: int, isolated: bool | None = None) -> Any:
    from pipelines.health.drift import previous_run_version
    from pipelines.health.outliers import DEFAULT_NEIGHBOURS, caption_pair
    from pipelines.health.reports import drift_report, duplicates_report, outliers_report
    from transforms.lance_sink import dataset_uri
    from transforms.vector_columns import COMBINED

    if report == "duplicates":
        return duplicates_report(table, None, None).data
    if report == "outliers":
        if isolated is None:
            try:
                caption_pair(table)
                isolated = False
            except QueryError:
                isolated = True
        return outliers_report(table, None, k, isolated, COMBINED, DEFAULT_NEIGHBOURS).data
    to = table.handle.version
    before = previous_run_version(served.uri, served.name, to)
    return drift_report(table, dataset_uri(served.uri, served.name), str(before), str(to)).data


def _plain(data: Any) -> Any:
    """The report as JSON types (dates as text), as `--json` prints it."""
    return json.loads(json.dumps(data, default=str))
