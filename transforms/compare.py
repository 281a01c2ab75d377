"""Compare the catalog with the table: what is new, changed, unchanged or gone.

The table's rows are read per fragment on the workers, at the version the run started from, and
joined to the catalog's items by id. An item keeps every stored vector whose fingerprint still
matches, so only changed inputs reach the encoders; an item whose inputs and fields all match is
unchanged and is not written again. Ids only in the table are deleted (or kept, by config).
"""

from __future__ import annotations

import apache_beam as beam
import lance
import numpy as np

from transforms.items import ITEMS, REJECTS, make_reject

UNCHANGED = "unchanged"
DELETES = "deletes"
ROW_KEYS = ("label", "image_uri")


class ReadTableRows(beam.PTransform):
    """The stored (id, row) pairs of one table version, one fragment per work item."""

    def __init__(self, uri: str, version: int, encoders: list[str], fields: list[str]):
        super().__init__()
        self._uri = uri
        self._version = version
        self._encoders = encoders
        self._fields = fields

    def expand(self, pbegin):
        fragment_ids = [f.fragment_id for f in lance.dataset(self._uri, version=self._version).get_fragments()]
        return (
            pbegin
            | "Fragment ids" >> beam.Create(fragment_ids)
            | "Spread fragments" >> beam.Reshuffle()
            | "Read fragment" >> beam.FlatMap(self._read_fragment)
        )

    def _read_fragment(self, fragment_id: int):
        dataset = lance.dataset(self._uri, version=self._version)
        present = set(dataset.schema.names)
        columns = ["id", *[c for c in (*ROW_KEYS, *self._fields) if c in present]]
        columns += [c for e in self._encoders for c in (f"{e}_fp", f"{e}_vec") if c in present]
        for batch in dataset.get_fragment(fragment_id).to_batches(columns=columns):
            for row in batch.to_pylist():
                yield row["id"], _stored_row(row, self._encoders, self._fields)


def _stored_row(row: dict, encoders: list[str], fields: list[str]) -> dict:
    return {
        **{key: row.get(key) for key in ROW_KEYS},
        "fields": {name: row.get(name) for name in fields},
        "fingerprints": {e: row[f"{e}_fp"] for e in encoders if row.get(f"{e}_fp")},
        "vectors": {e: np.asarray(row[f"{e}_vec"], np.float32) for e in encoders if row.get(f"{e}_vec") is not None},
    }


class CompareWithTable(beam.DoFn):
    """Per id: the catalog's items and the table's row. Outputs items to write (main), `unchanged`
    ids, `deletes` ids and `rejects` (duplicate ids in the catalog)."""

    def __init__(self, delete_missing: bool, rewrite_all: bool):
        self._delete_missing = delete_missing
        self._rewrite_all = rewrite_all

    def process(self, joined):
        item_id, sides = joined
        items, stored = list(sides[ITEMS]), list(sides["table"])
        if not items:
            if self._delete_missing:
                yield beam.pvalue.TaggedOutput(DELETES, item_id)
            return
        # Which duplicate survives must not depend on worker order: keep the smallest input.
        items.sort(key=lambda it: (it.get("source") or "", sorted(it["fingerprints"].items())))
        item, duplicates = items[0], items[1:]
        for extra in duplicates:
            yield beam.pvalue.TaggedOutput(REJECTS, make_reject(
                item_id, "read", "DuplicateId", "another catalog row has the same id", extra.get("source")))
        if not stored:
            yield item
            return
        row = stored[0]
        reused = {name: row["vectors"][name] for name, fp in item["fingerprints"].items()
                  if row["fingerprints"].get(name) == fp and name in row["vectors"]}
        same_row = all(item[key] == row[key] for key in ROW_KEYS) and item["fields"] == row["fields"]
        if not self._rewrite_all and same_row and len(reused) == len(item["fingerprints"]):
            yield beam.pvalue.TaggedOutput(UNCHANGED, item_id)
            return
        item["vectors"] = dict(reused)
        yield item


def compare_with_table(items, table_rows, delete_missing: bool, rewrite_all: bool):
    """Join items with stored rows by id; returns the tagged outputs of CompareWithTable."""
    return (
        {ITEMS: items | "Key items by id" >> beam.Map(lambda item: (item["id"], item)), "table": table_rows}
        | "Join with table" >> beam.CoGroupByKey()
        | "Compare" >> beam.ParDo(CompareWithTable(delete_missing, rewrite_all))
        .with_outputs(UNCHANGED, DELETES, REJECTS, main=ITEMS)
    )
