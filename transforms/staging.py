"""Staged work: what a run wrote before it died, found and committed by the next run instead of encoded again.

Each run stages into a folder of its own, `<table>-staging-<config hash>-v<read version>/<run id>/`, under
the scratch root (`--temp_location`, or beside the table). `owner.json` says which process runs it (host,
boot, pid and the pid's start time) and `lease.json` is renewed while it runs (`Lease`). Each write batch
leaves two small files there: `<batch>.fragments.json`, the Lance fragments it wrote with their counts, and
`<batch>.rows.json`, each row's id and signature (a digest of everything the row was made from: its inputs'
fingerprints, its other columns, its image's stat), with its image's path, stat and digest, so that a
resumed run does not read an unchanged image again. Batches are written every `output.write_batch_rows` rows
or `output.stage_seconds`, whichever comes first, so a kill loses at most that much encoding per worker.

A run of the same config from the same table version adopts the folders of runs that are provably dead: a
run that ended without committing (its launcher released the lease); on the same machine, a process that no
longer runs (killed); elsewhere, a lease not renewed for LEASE_SECONDS. A
folder whose owner still runs is never touched. Adopted rows join the catalog's items by id beside the
table's (compare.py); an item still to be written whose signature equals its staged row's is that row, and
a batch all of whose rows are such items is committed as it was written: its items are not encoded again.
A batch with a row that no longer matches is dropped, its items encoded as usual.

A run removes its own folder once it has committed or failed for good, and the folders it adopted once it
has committed them. Folders of another config or version can never be committed: the next run removes
them once their owner is dead, and removes rather than adopts one older than ADOPT_DAYS, with a log line.
The folder of a run that still runs is never touched, whatever its age.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from transforms.compare import row_digest
from transforms.fingerprint import has_input, written_fingerprints
from transforms.items import ITEMS, pack, unpack

log = logging.getLogger(__name__)
OWNER, LEASE = "owner.json", "lease.json"
FRAGMENTS, ROWS = ".fragments.json", ".rows.json"
STAGED = "staged"      # the tag of items whose staged row is committed instead of being written again
LEASE_SECONDS = 600    # a lease not renewed for this long belongs to a run that is gone
RENEW_SECONDS = 60
# Lance's cleanup removes data files no version references once they are 7 days old (its "unverified" files):
# staged fragments older than that may be gone, so such staging is removed instead of adopted.
ADOPT_DAYS = 6
STAGE_MIN_ROWS = 256   # the smallest write batch cut by time: at 5 items/s a worker still stages every 51 s


def staging_folder(root: str, table: str, config_hash: str, read_version: int | None, run_id: str) -> str:
    return FileSystems.join(_parent(root, table, config_hash, read_version), run_id)


def _parent(root: str, table: str, config_hash: str, read_version: int | None) -> str:
    return FileSystems.join(root, f"catalog-embed-{table}-staging-{config_hash}-v{read_version or 0}")


def row_signature(item: dict, inputs: dict[str, tuple[str, str]]) -> str:
    """A digest of everything the item's row is made from: equal signatures, equal rows (but run_id and
    embedded_at)."""
    made_from = [sorted(written_fingerprints(item, inputs).items()), row_digest(item["label"], item["image_uri"],
                                                                        item["fields"]),
                 item["image_stat"], item["text"]]
    return hashlib.sha256(json.dumps(made_from, separators=(",", ":")).encode()).hexdigest()[:32]


def this_process() -> dict:
    """What tells this process from any other, now or later: the host, its boot, the pid and the pid's start."""
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "start": _started(os.getpid())}


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return None


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None when it does not run."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return "running"


class Lease:
    """This run's claim on its staging folder: its owner record, and a lease renewed on a thread until the run
    ends. `start()` and `release()` are the launcher's: a released folder is one whose run ended without
    committing it (its pipeline failed), free for the next run to adopt."""

    def __init__(self, folder: str, table: str, run_id: str):
        self._folder = folder
        self._record = {"table": table, "run_id": run_id, "process": this_process(),
                        "created_at": datetime.now(timezone.utc).isoformat()}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="staging-lease", daemon=True)

    def start(self) -> None:
        _write_json(FileSystems.join(self._folder, OWNER), self._record)
        self._write_lease()
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing: the run ended, and its commit step removed the folder if it could."""
        self._stopped.set()

    def release(self) -> None:
        """The run failed before its commit step could say: what it staged is for the next run to adopt."""
        self.stop()
        try:
            self._write_lease(released=True)
        except OSError as err:          # then the lease runs out instead
            log.warning("could not release the staging lease in %s: %s", self._folder, err)

    def _renew(self) -> None:
        while not self._stopped.wait(RENEW_SECONDS):
            try:
                self._write_lease()
            except OSError as err:      # the next renewal tries again; a lease lasts LEASE_SECONDS
                log.warning("could not renew the staging lease in %s: %s", self._folder, err)

    def _write_lease(self, released: bool = False) -> None:
        if FileSystems.exists(FileSystems.join(self._folder, OWNER)):      # not once the folder is removed
            _write_json(FileSystems.join(self._folder, LEASE), {"renewed_at": time.time(), "released": released})


def _write_json(path: str, value: dict) -> None:
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(value).encode())


def _read_json(path: str) -> dict | None:
    try:
        with FileSystems.open(path) as handle:
            return json.loads(handle.read())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Adopted:
    """Staging of dead runs that this run commits: their folders, and their batches."""

    folders: tuple[str, ...] = ()
    batches: tuple[str, ...] = ()


def adopt_staging(root: str, table: str, config_hash: str, read_version: int | None, run_id: str) -> Adopted:
    """The staging this run may commit: that of dead runs of the same config from the same version. The staging
    of dead runs that no run can commit any more (another config or version, or too old) is removed."""
    mine = _parent(root, table, config_hash, read_version).rstrip("/")
    oldest = datetime.now(timezone.utc) - timedelta(days=ADOPT_DAYS)
    folders, batches = [], []
    pattern = FileSystems.join(root, f"catalog-embed-{table}-staging-*", "*", OWNER)
    for found in FileSystems.match([pattern])[0].metadata_list:
        folder = found.path[: -len(OWNER) - 1]
        owner = _read_json(found.path)
        if owner is None or owner.get("table") != table or owner.get("run_id") == run_id:
            continue
        if not _is_dead(folder, owner):         # a run that still runs: its staging is its own
            continue
        same = folder.rsplit("/", 1)[0].rstrip("/") == mine
        expired = datetime.fromisoformat(owner["created_at"]) < oldest
        if expired or not same:
            log.info("removing staged work that cannot be committed (run %s, which is gone, %s): %s",
                     owner["run_id"], f"older than {ADOPT_DAYS} days" if expired else
                     "staged for another config or table version", folder)
            remove_staging(folder)
        else:
            staged = sorted(m.path[: -len(FRAGMENTS)] for m in
                            FileSystems.match([FileSystems.join(folder, "*" + FRAGMENTS)])[0].metadata_list)
            log.info("resuming: %d write batches staged by run %s, which did not finish, in %s", len(staged),
                     owner["run_id"], folder)
            folders.append(folder)
            batches += staged
    return Adopted(tuple(folders), tuple(batches))


def owner_is_gone(folder: str) -> bool:
    """Whether the run that owns a staging folder is provably gone (or nothing owns it)."""
    owner = _read_json(FileSystems.join(folder, OWNER))
    return owner is None or _is_dead(folder, owner)


def _is_dead(folder: str, owner: dict) -> bool:
    """Provably gone: a run that released its lease as it ended; a process of this machine (since its last
    boot) that no longer runs, a pid reused since being another; or, of another machine, a lease not renewed
    in LEASE_SECONDS."""
    lease = _read_json(FileSystems.join(folder, LEASE)) or {}
    if lease.get("released"):
        return True
    process = owner.get("process") or {}
    if process.get("host") == socket.gethostname() and process.get("boot") == _boot_id():
        return _started(process["pid"]) != process["start"]
    return time.time() - float(lease.get("renewed_at", 0)) > LEASE_SECONDS


def remove_staging(folder: str) -> None:
    try:
        FileSystems.delete([folder.rstrip("/") + "/"])
    except OSError as err:   # a leftover folder is only storage; a later run removes it
        log.warning("could not remove the staging folder %s: %s", folder, err)


def stage_batch(folder: str, written: dict, items: Sequence[dict], inputs: dict[str, tuple[str, str]]) -> None:
    """Record a written batch: its fragments (what the commit needs) and its rows (what a resume matches)."""
    batch = FileSystems.join(folder, uuid.uuid4().hex)
    rows = [[item["id"], row_signature(item, inputs), item["image_uri"], item["image_stat"],
             item["digests"].get("image") if has_input(item, "image") else None] for item in items]
    with FileSystems.create(batch + ROWS) as handle:
        handle.write(json.dumps(rows).encode())
    with FileSystems.create(batch + FRAGMENTS) as handle:      # last: a batch without it was never staged
        handle.write(json.dumps(written).encode())


def read_fragments(batch: str) -> dict:
    with FileSystems.open(batch + FRAGMENTS) as handle:
        return json.loads(handle.read())


def _staged_rows(batch: str):
    with FileSystems.open(batch + ROWS) as handle:
        rows = json.loads(handle.read())
    for item_id, signature, image_uri, image_stat, image_digest in rows:
        yield item_id, pack({"batch": batch, "signature": signature, "image_uri": image_uri, "image_stat": image_stat,
                             "image_digest": image_digest})


class ReadStagedRows(beam.PTransform):
    """(id, packed {batch, signature, image_uri, image_stat, image_digest}) of every staged row; none when
    nothing was staged."""

    def __init__(self, batches: Sequence[str]):
        super().__init__()
        self._batches = list(batches)

    def expand(self, pbegin):
        return (pbegin
                | "Staged batches" >> beam.Create(self._batches)
                | "Spread batches" >> beam.Reshuffle()
                | "Read staged rows" >> beam.FlatMap(_staged_rows))


def staged_fragments(pipeline: beam.Pipeline, batches: Sequence[str]):
    """Each staged batch's fragments and counts, by batch (a side input for the commit: a retried commit reads
    no staging file, which the first try may have removed)."""
    return beam.pvalue.AsDict(pipeline
                              | "Staged batch names" >> beam.Create(list(batches))
                              | "Staged fragments" >> beam.Map(lambda batch: (batch, read_fragments(batch))))


class MarkStaged(beam.DoFn):
    """Keep an item's staged row (`staged`: its batch) only where the item would be written just so."""

    def __init__(self, inputs: dict[str, tuple[str, str]]):
        self._inputs = inputs

    def process(self, item: dict):
        staged = item["staged"]
        yield dict(item, staged=staged["batch"] if staged and staged["signature"] == row_signature(item, self._inputs)
                   else None)


class TakeStaged(beam.DoFn):
    """Items whose staged batch is whole (every row of it matched) leave the encode path, tagged `staged`,
    as (replaced fragment, id) for the removal of the row they replace; the rest go on."""

    def process(self, item: dict, matched: dict[str, int], sizes: dict[str, int]):
        batch = item["staged"]
        if batch is not None and matched.get(batch) == sizes.get(batch):
            yield beam.pvalue.TaggedOutput(STAGED, (item["replaces"], item["id"]))
        else:
            yield item


def whole_batches(matched: dict[str, int], sizes: dict[str, int]) -> list[str]:
    return sorted(batch for batch, size in sizes.items() if matched.get(batch) == size)


def resume(items, staged_rows, inputs: dict[str, tuple[str, str]]) -> dict:
    """Split items to be written into those a staged batch already holds (`staged`) and the rest (`items`),
    and give the batch counts for the commit (`matched`, `sizes`: rows per batch, as side inputs)."""
    marked = items | "Match staged rows" >> beam.ParDo(MarkStaged(inputs))
    sizes = (staged_rows
             | "Staged batch of row" >> beam.Map(lambda pair: unpack(pair[1])["batch"])
             | "Rows per staged batch" >> beam.combiners.Count.PerElement())
    matched = (marked
               | "Matched batch" >> beam.FlatMap(lambda item: [item["staged"]] if item["staged"] else [])
               | "Matched rows per batch" >> beam.combiners.Count.PerElement())
    matched_view, sizes_view = beam.pvalue.AsDict(matched), beam.pvalue.AsDict(sizes)
    split = marked | "Take staged rows" >> beam.ParDo(TakeStaged(), matched_view, sizes_view).with_outputs(
        STAGED, main=ITEMS)
    return {ITEMS: split[ITEMS], STAGED: split[STAGED], "matched": matched_view, "sizes": sizes_view}


class BatchRows(beam.DoFn):
    """Items into write batches of `rows`, or of what came within `seconds` of a batch's first item (at least
    STAGE_MIN_ROWS of them), whichever is first: a batch is written and staged as soon as it is cut, so a kill
    loses at most that much work, and a slow encoder still writes fragments worth a file."""

    def __init__(self, rows: int, seconds: float):
        self._rows = rows
        self._seconds = seconds

    def start_bundle(self):
        self._batch: list[dict] = []
        self._since = 0.0

    def process(self, item: dict):
        if not self._batch:
            self._since = time.monotonic()
        self._batch.append(item)
        waited = time.monotonic() - self._since >= self._seconds and len(self._batch) >= STAGE_MIN_ROWS
        if len(self._batch) >= self._rows or waited:
            yield self._cut()

    def finish_bundle(self):
        if self._batch:
            yield GlobalWindows.windowed_value(self._cut())     # this batch pipeline's items: the global window

    def _cut(self) -> list[dict]:
        batch, self._batch = self._batch, []
        return batch
