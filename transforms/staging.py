"""Staged work: what a run wrote before it died, found and committed by the next run instead of encoded again.

Each run stages into a folder of its own, `<table>-staging-<config hash>-v<read version>/<run id>/` (with
`-reembed` for `run --reembed`, whose rows keep no stored vector), under the scratch root (`--temp_location`, or
beside the table), which it owns (`run_lease.py`: an owner record and a lease). Each write batch leaves two small
files there: `<batch>.rows.json`, each row's id and signature (a digest of everything the row was made from: its
inputs' fingerprints, its other columns, its image's stat), with its image's path, stat and digest, so that a
resumed run does not read an unchanged image again; then `<batch>.fragments.json`, the Lance fragments it wrote
with their counts, which makes the batch whole. Batches are written every `output.write_batch_rows` rows or
`output.stage_seconds`, whichever comes first, so a kill loses at most that much encoding per worker.

A run of the same config from the same table version adopts the folders of runs that are provably gone (a run
of its own id that died included), never one whose run still runs. An adopted batch whose files cannot be read,
or whose fragments' data files are missing, is dropped. Adopted rows join the catalog's items by id beside the
table's (compare.py); an item still to be written whose signature equals its staged row's is that row, and a
batch all of whose rows are such items is committed as it was written: its items are not encoded again. A batch
with a row that no longer matches is dropped, its items encoded as usual.

A run removes its own folder once it has committed (or its table moved on), and the folders it adopted once it
has committed them; a run its commit step refused keeps its staging for the next run. Folders of another config
or version can never be committed: the next run removes them once their run is gone, and removes rather than
adopts one older than ADOPT_DAYS, with a log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows
from lance.fragment import FragmentMetadata

from transforms.compare import row_digest
from transforms.config import ConfigError
from transforms.fingerprint import has_input, unhashed, written_fingerprints
from transforms.items import ITEMS, pack, unpack
from transforms.run_lease import OWNER, is_gone, owner, read_json, write_json

log = logging.getLogger(__name__)
FRAGMENTS, ROWS = ".fragments.json", ".rows.json"
STAGED = "staged"      # the tag of items whose staged row is committed instead of being written again
STAGED_FRAGMENTS = "staged_fragments"    # the tag of (batch, its fragments and counts) of readable staged batches
# Lance's cleanup removes data files no version references once they are 7 days old (its "unverified" files):
# staged fragments older than that may be gone, so such staging is removed instead of adopted.
ADOPT_DAYS = 6
STAGE_MIN_ROWS = 256   # the smallest write batch cut by time: at 5 items/s a worker still stages every 51 s


def staging_folder(root: str, table: str, config_hash: str, read_version: int | None, run_id: str,
                   reembed: bool = False) -> str:
    return FileSystems.join(_parent(root, table, config_hash, read_version, reembed), run_id)


def _parent(root: str, table: str, config_hash: str, read_version: int | None, reembed: bool) -> str:
    return FileSystems.join(root, f"catalog-embed-{table}-staging-{config_hash}-v{read_version or 0}"
                                  + ("-reembed" if reembed else ""))


def row_signature(item: dict, inputs: dict[str, tuple[str, str]]) -> str:
    """A digest of everything the item's row is made from: equal signatures, equal rows (but run_id and
    embedded_at)."""
    made_from = [sorted(written_fingerprints(item, inputs).items()), row_digest(item["label"], item["image_uri"],
                                                                        item["fields"]),
                 item["image_stat"], item["text"]]
    return hashlib.sha256(json.dumps(made_from, separators=(",", ":")).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Adopted:
    """Staging of runs that are gone that this run commits: their folders, and their batches."""

    folders: tuple[str, ...] = ()
    batches: tuple[str, ...] = ()


def adopt_staging(root: str, table: str, config_hash: str, read_version: int | None, run_id: str,
                  reembed: bool = False) -> Adopted:
    """The staging this run may commit: that of gone runs of the same config from the same version (its own
    folder's, when a run of its id died). The staging of gone runs that no run can commit any more (another
    config or version, or too old) is removed. Raises ConfigError when a run of this id still runs."""
    mine = staging_folder(root, table, config_hash, read_version, run_id, reembed).rstrip("/")
    oldest = datetime.now(timezone.utc) - timedelta(days=ADOPT_DAYS)
    folders, batches = [], []
    pattern = FileSystems.join(root, f"catalog-embed-{table}-staging-*", "*", OWNER)
    for found in FileSystems.match([pattern])[0].metadata_list:
        folder = found.path[: -len(OWNER) - 1].rstrip("/")
        try:
            owned_by = owner(folder)
            gone = owned_by is not None and owned_by.get("table") == table and is_gone(folder, owned_by)
        except (OSError, ValueError) as err:     # its files cannot be read now: its run may still run
            log.warning("leaving staged work whose owner cannot be read (%s): %s", err, folder)
            continue
        if folder == mine and owned_by is not None and not gone:
            raise ConfigError(f"a run with id {run_id} is running (its staging: {folder}); give each run its own "
                              "--run-id")
        if not gone or owned_by is None:
            continue
        expired = datetime.fromisoformat(owned_by["created_at"]) < oldest
        if expired or folder.rsplit("/", 1)[0] != mine.rsplit("/", 1)[0]:
            log.info("removing staged work that cannot be committed (run %s, which is gone, %s): %s",
                     owned_by["run_id"], f"older than {ADOPT_DAYS} days" if expired else
                     "staged for another config or table version", folder)
            remove_staging(folder)
            continue
        staged = sorted(m.path[: -len(FRAGMENTS)] for m in
                        FileSystems.match([FileSystems.join(folder, "*" + FRAGMENTS)])[0].metadata_list)
        log.info("resuming: %d write batches staged by run %s, which did not finish, in %s", len(staged),
                 owned_by["run_id"], folder)
        batches += staged
        if folder != mine:              # this run's own folder is removed as its own
            folders.append(folder)
    return Adopted(tuple(folders), tuple(batches))


def remove_staging(folder: str) -> None:
    try:
        FileSystems.delete([folder.rstrip("/") + "/"])
    except OSError as err:   # a leftover folder is only storage; a later run removes it
        log.warning("could not remove the staging folder %s: %s", folder, err)


def stage_batch(folder: str, written: dict, items: Sequence[dict], inputs: dict[str, tuple[str, str]]) -> None:
    """Record a written batch: its rows (what a resume matches), then its fragments (what the commit needs)."""
    batch = FileSystems.join(folder, uuid.uuid4().hex)
    write_json(batch + ROWS, [[item["id"], row_signature(item, inputs), item["image_uri"], item["image_stat"],
                               item["digests"].get("image") if has_input(item, "image") else None]
                              for item in items])
    write_json(batch + FRAGMENTS, written)       # last: a batch without it was never staged


class ReadStagedRows(beam.PTransform):
    """(id, packed {batch, signature, image_uri, image_stat, image_digest}) of every row of the staged batches
    that can be committed, and (tagged `staged_fragments`) each such batch's fragments and counts; none when
    nothing was staged. A batch whose files cannot be read, or whose fragments' data files (under `dataset_uri`)
    are gone, is dropped with a log line: its items are encoded again."""

    def __init__(self, batches: Sequence[str], dataset_uri: str):
        super().__init__()
        self._batches = list(batches)
        self._dataset_uri = dataset_uri

    def expand(self, pbegin):
        return (pbegin
                | "Staged batches" >> beam.Create(self._batches)
                | "Spread batches" >> beam.Reshuffle()
                | "Read staged rows" >> beam.ParDo(_ReadBatch(self._dataset_uri)).with_outputs(
                    STAGED_FRAGMENTS, main=ITEMS))


class _ReadBatch(beam.DoFn):
    def __init__(self, dataset_uri: str):
        self._dataset_uri = dataset_uri

    def process(self, batch: str):
        try:
            written, rows = read_json(batch + FRAGMENTS), read_json(batch + ROWS)
            missing = self._missing_data(written)
        except (OSError, ValueError) as err:
            log.warning("dropping staged batch %s, which cannot be read: %s", batch, err)
            return
        if written is None or rows is None or missing:
            log.warning("dropping staged batch %s: %s", batch, f"its data files are gone: {missing[:3]}" if missing
                        else "its files are gone")
            return
        yield beam.pvalue.TaggedOutput(STAGED_FRAGMENTS, (batch, written))
        for item_id, signature, image_uri, image_stat, image_digest in rows:
            yield item_id, pack({"batch": batch, "signature": signature, "image_uri": image_uri,
                                 "image_stat": image_stat, "image_digest": image_digest})

    def _missing_data(self, written: dict | None) -> list[str]:
        paths = [FileSystems.join(self._dataset_uri, "data", data.path) for raw in (written or {}).get("fragments", [])
                 for data in FragmentMetadata.from_json(raw).files]
        found = {m.path: m.size_in_bytes for result in FileSystems.match(paths) for m in result.metadata_list}
        return [path for path in paths if not found.get(path)]


class MarkStaged(beam.DoFn):
    """Keep an item's staged row (`staged`: its batch) only where the item would be written just so."""

    def __init__(self, inputs: dict[str, tuple[str, str]]):
        self._inputs = inputs

    def process(self, item: dict):
        staged = item["staged"]
        # A picture still to be hashed changed since it was staged: the compare took the staged digest otherwise.
        matches = staged and not unhashed(item) and staged["signature"] == row_signature(item, self._inputs)
        yield dict(item, staged=staged["batch"] if matches else None)


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
