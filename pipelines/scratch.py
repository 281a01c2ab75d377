"""A run's scratch folder: what it makes on the way (trained behaviour vectors, a dry run's plan) in a place
that the launcher and every worker can reach.

It lives under `--temp_location` when the options give one (any filesystem Beam writes: gs://, s3://, a
local folder), else beside the table (`<output.uri>/_catalog_embed_scratch`), never in the launcher's
own temp folder, which a worker on another machine, or in another container, does not have.

A run removes its folder when it ends. A run that was killed cannot: the next run of the same table
removes the folders of runs that ended without removing theirs (they are in `<table>_runs`) and of
those older than `output.retain_days`, which no run still uses. A younger one may belong to a run
still going (on an object store there is no lock to ask), so it stays.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from datetime import datetime, timedelta

from apache_beam.io.filesystems import FileSystems

from transforms.run_log import utc_now

log = logging.getLogger(__name__)
BESIDE_THE_TABLE = "_catalog_embed_scratch"
MARKER = "run.json"       # what each scratch folder says of its run: its id and start


def scratch_root(temp_location: str | None, db_uri: str) -> str:
    return temp_location or FileSystems.join(db_uri, BESIDE_THE_TABLE)


def scratch_folder(root: str, table: str, run_id: str) -> str:
    return FileSystems.join(root, f"catalog-embed-{table}-{run_id}")


def open_scratch(folder: str, table: str, run_id: str) -> None:
    """Mark the folder as this run's, with its start, so that a later run can tell how old it is."""
    with FileSystems.create(FileSystems.join(folder, MARKER)) as handle:
        handle.write(json.dumps({"table": table, "run_id": run_id, "started_at": utc_now().isoformat()}).encode())


def remove_scratch(folder: str) -> None:
    try:
        FileSystems.delete([folder.rstrip("/") + "/"])    # a trailing slash: a prefix, on object stores
    except OSError as err:   # the run's outcome stands; a leftover folder is only storage
        log.warning("could not remove the run's scratch folder %s: %s", folder, err)


def remove_stale_scratch(root: str, table: str, ended_runs: Collection[str], retain_days: float) -> None:
    """Remove the scratch of this table's runs that ended without removing it, or that started more than
    `retain_days` ago (a run killed before it could)."""
    pattern = FileSystems.join(scratch_folder(root, table, "*"), MARKER)
    oldest = utc_now() - timedelta(days=retain_days)
    for found in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(found.path) as handle:
            marker = json.loads(handle.read())
        started = datetime.fromisoformat(marker["started_at"])
        ended = marker["run_id"] in ended_runs
        if marker["table"] == table and (ended or started < oldest):
            folder = found.path[: -len(MARKER) - 1]
            why = "it ended without removing it" if ended else f"it started over output.retain_days {retain_days} ago"
            log.info("removing the scratch of run %s (%s, at %s): %s", marker["run_id"], why,
                     f"{started:%Y-%m-%d %H:%M}", folder)
            remove_scratch(folder)
