"""Staged work: what a run wrote before it died, found and committed by the next run instead of encoded again.

Each write batch leaves two small files in the staging folder of its (table, config hash, read version),
under the scratch root (`--temp_location`, or beside the table): `<batch>.fragments.json`, the Lance
fragments it wrote with their counts, and `<batch>.rows.json`, each row's id and signature (a digest of
everything the row was made from: its inputs' fingerprints, its other columns, its image's stat), with its
image's path, stat and digest, so that a resumed run does not read an unchanged image again.

A run of the same config from the same table version finds the folder. Its rows join the catalog's items
by id beside the table's (compare.py); an item still to be written whose signature equals its staged row's
is that row, and a batch all of whose rows are such items is committed as it was written: its items are
not encoded again. A batch with a row that no longer matches is dropped, its items encoded as usual.

Staging from another config or another read version (the table moved meanwhile), or older than
`output.retain_days`, can never be committed: the next run removes it, with a log line. A run removes its
own staging once it has committed or failed for good.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.compare import row_digest
from transforms.fingerprint import has_input, written_fingerprints
from transforms.items import ITEMS, pack, unpack

log = logging.getLogger(__name__)
MARKER = "staging.json"
FRAGMENTS, ROWS = ".fragments.json", ".rows.json"
STAGED = "staged"      # the tag of items whose staged row is committed instead of being written again


def staging_folder(root: str, table: str, config_hash: str, read_version: int | None) -> str:
    return FileSystems.join(root, f"catalog-embed-{table}-staging-{config_hash}-v{read_version or 0}")


def row_signature(item: dict, inputs: dict[str, tuple[str, str]]) -> str:
    """A digest of everything the item's row is made from: equal signatures, equal rows (but run_id and
    embedded_at)."""
    made_from = [sorted(written_fingerprints(item, inputs).items()), row_digest(item["label"], item["image_uri"],
                                                                        item["fields"]),
                 item["image_stat"], item["text"]]
    return hashlib.sha256(json.dumps(made_from, separators=(",", ":")).encode()).hexdigest()[:32]


def open_staging(root: str, table: str, config_hash: str, read_version: int | None, retain_days: float) -> list[str]:
    """The batches a run before this one left in this run's staging folder; other staging of the table, which
    no run can commit any more, is removed."""
    folder = staging_folder(root, table, config_hash, read_version)
    oldest = datetime.now(timezone.utc) - timedelta(days=retain_days)
    pattern = FileSystems.join(root, f"catalog-embed-{table}-staging-*", MARKER)
    for found in FileSystems.match([pattern])[0].metadata_list:
        other = found.path[: -len(MARKER) - 1]
        with FileSystems.open(found.path) as handle:
            marker = json.loads(handle.read())
        created = datetime.fromisoformat(marker["created_at"])
        if marker.get("table") == table and (other.rstrip("/") != folder.rstrip("/") or created < oldest):
            why = ("it is older than output.retain_days" if other.rstrip("/") == folder.rstrip("/")
                   else f"it was staged for config {marker['config_hash']} from version {marker['read_version']}")
            log.info("removing staged work that cannot be committed (%s): %s", why, other)
            remove_staging(other)
    batches = sorted(m.path[: -len(FRAGMENTS)] for m in
                     FileSystems.match([FileSystems.join(folder, "*" + FRAGMENTS)])[0].metadata_list)
    if not FileSystems.exists(FileSystems.join(folder, MARKER)):
        with FileSystems.create(FileSystems.join(folder, MARKER)) as handle:
            handle.write(json.dumps({"table": table, "config_hash": config_hash, "read_version": read_version,
                                     "created_at": datetime.now(timezone.utc).isoformat()}).encode())
    if batches:
        log.info("resuming: %d write batches staged by a run that did not finish, in %s", len(batches), folder)
    return batches


def remove_staging(folder: str) -> None:
    try:
        FileSystems.delete([folder.rstrip("/") + "/"])
    except OSError as err:   # a leftover folder is only storage; the next run removes it
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


class MarkStaged(beam.DoFn):
    """Keep an item's staged row (`staged`: its batch) only where the item would be written just so."""

    def __init__(self, inputs: dict[str, tuple[str, str]]):
        self._inputs = inputs

    def process(self, item: dict):
        staged = item["staged"]
        item["staged"] = staged["batch"] if staged and staged["signature"] == row_signature(item, self._inputs) \
            else None
        yield item


class TakeStaged(beam.DoFn):
    """Items whose staged batch is whole (every row of it matched) leave the encode path, tagged `staged`,
    as (replaced fragment, id) for the deletion of the row they replace; the rest go on."""

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
