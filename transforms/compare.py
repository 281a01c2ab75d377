"""Compare the catalog with the table: what is new, changed, unchanged or gone.

The table's rows are read per fragment on the workers, at the version the run started from, and
reduced to a summary (fragment, fingerprints, image stat and digest, a digest of the other columns)
before they are joined to the catalog's items by id: no stored vector crosses the join. An item then
knows which encoders' stored vectors are still right (`keep`, fetched only for items that are
written again, see reuse.py); an item whose inputs and columns all match is unchanged and is not
written. Ids only in the table are deleted (or kept, by config).
"""

from __future__ import annotations

import hashlib
import json

import apache_beam as beam
import lance

from transforms.fingerprint import fingerprints, unhashed
from transforms.items import HELD, ITEMS, REJECTS, make_reject, pack, unpack

UNCHANGED = "unchanged"
DELETES = "deletes"
ABSENT = "absent"       # (fragment, id) of stored rows the catalog no longer lists that stay (lifecycle.py)
STAGED_ROWS = "staged_rows"


def row_digest(label: str | None, image_uri: str | None, fields: dict) -> str:
    """A digest of the columns written from the catalog row itself, besides the vectors' inputs."""
    data = json.dumps([label, image_uri, sorted(fields.items())], separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()[:32]


class ReadTableSummaries(beam.PTransform):
    """(id, packed summary) of every row of one table version, one fragment per work item."""

    def __init__(self, uri: str, version: int, encoders: list[str], fields: list[str],
                 storage_options: dict[str, str] | None = None):
        super().__init__()
        self._uri = uri
        self._storage_options = storage_options
        self._version = version
        self._encoders = encoders
        self._fields = fields

    def expand(self, pbegin):
        fragment_ids = [f.fragment_id for f in self._dataset().get_fragments()]
        return (
            pbegin
            | "Fragment ids" >> beam.Create(fragment_ids)
            | "Spread fragments" >> beam.Reshuffle()
            | "Read fragment" >> beam.FlatMap(self._read_fragment)
        )

    def _dataset(self) -> lance.LanceDataset:
        return lance.dataset(self._uri, version=self._version, storage_options=self._storage_options)

    def _read_fragment(self, fragment_id: int):
        dataset = self._dataset()
        present = set(dataset.schema.names)
        wanted = ["id", "label", "image_uri", "image_stat", "image_digest", *self._fields,
                  *[f"{e}_fp" for e in self._encoders]]
        columns = list(dict.fromkeys(c for c in wanted if c in present))
        for batch in fragment(dataset, fragment_id).to_batches(columns=columns):
            for row in batch.to_pylist():
                yield row["id"], pack({
                    "fragment": fragment_id,
                    "row": row_digest(row.get("label"), row.get("image_uri"),
                                      {name: row.get(name) for name in self._fields}),
                    "image_uri": row.get("image_uri"),
                    "image_stat": row.get("image_stat"),
                    "image_digest": row.get("image_digest"),
                    "fingerprints": {e: row[f"{e}_fp"] for e in self._encoders if row.get(f"{e}_fp")},
                })


class CompareWithTable(beam.DoFn):
    """Per id: the catalog's items, the table's summary, a staged row, and the rejects of rows that failed before
    the compare (`held`). Outputs the item (main) with `stored`, `replaces` and `staged` set; `deletes` as
    (fragment, id), or `absent` ids where the run must not delete (transforms/lifecycle.py); and `rejects`:
    duplicate ids in the catalog, and the held rejects, `kept` where the table holds the id's row.

    The stored (or else staged) image digest is reused when the image's path and stat are unchanged, unless
    `rehash`. `unclean_reads`: the read's rejects without an id, any of which could have held a stored id.
    """

    def __init__(self, delete_missing: bool, rehash: bool):
        self._delete_missing = delete_missing
        self._rehash = rehash

    def process(self, joined, unclean_reads: int = 0):
        item_id, sides = joined
        items, stored = [unpack(i) for i in sides[ITEMS]], [unpack(s) for s in sides["table"]]
        held = [unpack(r) for r in sides.get(HELD) or ()]
        for reject in held:
            yield beam.pvalue.TaggedOutput(REJECTS, dict(reject, kept=bool(stored) and not items))
        if not items:
            if stored and not held:
                deletable = self._delete_missing and not unclean_reads
                yield beam.pvalue.TaggedOutput(DELETES if deletable else ABSENT, (stored[0]["fragment"], item_id))
            return
        # Which duplicate survives must not depend on worker order: keep the smallest input.
        items.sort(key=lambda it: (it.get("source") or "", it["image_uri"] or "", it["text"] or ""))
        item, duplicates = items[0], items[1:]
        for extra in duplicates:
            yield beam.pvalue.TaggedOutput(REJECTS, make_reject(
                item_id, "read", "DuplicateId", "another catalog row has the same id", extra.get("source")))
        staged = sides.get(STAGED_ROWS) or ()
        item["staged"] = unpack(staged[0]) if staged else None      # a row a run that died wrote (staging.py)
        item["stored"] = stored[0] if stored else None
        item["replaces"] = stored[0]["fragment"] if stored else None
        known = [found for found in (item["stored"], item["staged"]) if found and _same_file(item, found)]
        if known and not self._rehash:
            item["digests"]["image"] = known[0]["image_digest"]
        yield item


def _same_file(item: dict, known: dict) -> bool:
    return bool(item["image_stat"] is not None and known["image_digest"]
                and (known["image_uri"], known["image_stat"]) == (item["image_uri"], item["image_stat"]))


class DecideWork(beam.DoFn):
    """Fingerprint every encoder's input and decide what the item needs: nothing (`unchanged`), or a
    new row whose vectors are either kept from the table or encoded again.

    `encoders` maps encoder name to (encoder id, modality). `rewrite_all`: every row is written (a new schema);
    `keep_stored`: a stored vector whose fingerprint matches is kept (not with `run --reembed`); `earlier_ids`:
    per encoder, the id an earlier build made the stored fingerprints with for the same vectors, which match too.
    """

    def __init__(self, encoders: dict[str, tuple[str, str]], rewrite_all: bool, keep_stored: bool = True,
                 earlier_ids: dict[str, str] | None = None):
        self._encoders = encoders
        self._rewrite_all = rewrite_all
        self._keep_stored = keep_stored
        self._earlier = {name: (encoder_id, encoders[name][1]) for name, encoder_id in (earlier_ids or {}).items()}

    def process(self, item: dict):
        stored = item["stored"] or {"fingerprints": {}}
        keep = self._kept(item, stored)
        same_row = (stored.get("row") == row_digest(item["label"], item["image_uri"], item["fields"])
                    and stored.get("image_stat") == item["image_stat"])
        if not self._rewrite_all and same_row and len(keep) == len(self._encoders):
            yield beam.pvalue.TaggedOutput(UNCHANGED, item["id"])
            return
        yield dict(item, stored=None, keep=keep, recheck=self._recheck(item, stored, keep),
                   rewrite=self._rewrite_all or not same_row)

    def _kept(self, item: dict, stored: dict) -> list[str]:
        """The encoders whose stored vector is still right: their fingerprint is the stored one."""
        if not self._keep_stored:
            return []
        earlier = fingerprints(item, self._earlier)
        return sorted(name for name, fp in fingerprints(item, self._encoders).items()
                      if stored["fingerprints"].get(name) in (fp, earlier.get(name, fp)))

    def _recheck(self, item: dict, stored: dict, keep: list[str]) -> tuple[str, list[str]] | None:
        """For a picture whose stat changed, hashed only where it is decoded: the stored digest, and the encoders
        whose stored vectors it keeps should its bytes turn out to be those (fingerprint.with_image_digest)."""
        if not unhashed(item) or not stored.get("image_digest"):
            return None
        as_stored = dict(item, digests={**item["digests"], "image": stored["image_digest"]})
        return stored["image_digest"], sorted(set(self._kept(as_stored, stored)) - set(keep))


def compare_with_table(items, table_summaries, staged_rows, held, unclean_reads, delete_missing: bool,
                       rehash: bool):
    """Join items with stored summaries, staged rows and held rejects by id; returns the tagged outputs of
    CompareWithTable. `unclean_reads`: a side input, the count of read rejects without an id."""
    return (
        {ITEMS: items | "Key items by id" >> beam.Map(lambda item: (item["id"], pack(item))), "table": table_summaries,
         STAGED_ROWS: staged_rows, HELD: held}
        | "Join with table" >> beam.CoGroupByKey()
        | "Compare" >> beam.ParDo(CompareWithTable(delete_missing, rehash), unclean_reads).with_outputs(
            DELETES, ABSENT, REJECTS, main=ITEMS)
    )


def fragment(dataset: lance.LanceDataset, fragment_id: int) -> lance.LanceFragment:
    """A fragment of the version a stage read; its ids come from that version, so a missing one is a bug."""
    found = dataset.get_fragment(fragment_id)
    if found is None:
        raise RuntimeError(f"fragment {fragment_id} is not in version {dataset.version} of {dataset.uri}")
    return found
