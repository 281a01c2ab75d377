"""The row lifecycle: what a run does to each row, in one place (docs/safety.md has it as a table).

A catalog row ends the night as exactly one of:
    unchanged   its inputs and columns equal its stored row's: not written
    written     new (`added`), or changed: it replaces its stored row in the same commit
    kept        it failed at some stage (read with its id, stat, fetch, decode, encode, combine) and the table
                holds a row for its id: that row stays as it was, and a reject says why
    rejected    it failed and the table holds no row for its id (or the row had no id): not written; a reject
    deferred    the budget leaves it for a later run: its stored row as it was (nulls for a new encoder)
and a stored row whose id the catalog does not list is
    deleted     when the catalog was read cleanly (no read reject without an id, which could have held any id)
                and `output.on_missing` is delete
    absent      otherwise (on_missing: keep, or a read that rejected rows it could not name): it stays

So a stored row leaves the table only when a written row replaces it or it is deleted. `RemoveRows` takes
exactly those ids, per stored fragment; on a night that rewrites the table for a new schema it carries every
other stored row into the new version, so that such a night keeps what any other night keeps. The counts add
up twice, and the run's record holds both sides:
    read = written + unchanged + kept + rejected + deferred
    rows after = rows before - deleted + added
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence

import apache_beam as beam
import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance.fragment import FragmentMetadata, write_fragments

from transforms.combine import combine_rows
from transforms.compare import fragment
from transforms.encoders.base import same_vectors
from transforms.items import HELD, pack
from transforms.lance_sink import matrix_array, table_metadata, vector_matrix

CARRY_BATCH = 4096     # stored rows read at a time when a new-schema night carries them over


class SortReadRejects(beam.DoFn):
    """Read rejects that name their row's id are held for the compare (which keeps the stored row, if any);
    the others (a malformed line, a missing id) pass on, and each makes the read unclean: it might have
    held any id, so no id is deleted on that night."""

    def process(self, reject: dict):
        if reject["id"]:
            yield beam.pvalue.TaggedOutput(HELD, (reject["id"], pack(reject)))
        else:
            yield dict(reject, kept=False)


class RemoveRows(beam.DoFn):
    """Per stored fragment, the rows this run removes: those a written row replaces and those deleted.

    On a night that appends (the schema unchanged) it writes a deletion file. On a night whose only change of
    schema is the weights (`reweigh`) it also writes the fragment's combined vectors again, from its stored
    vectors, as a data file of the `vector` column alone (Lance's `update_columns`): one column rewritten, not
    every row. On a night that rewrites for a new schema it writes the fragment's other rows in the new schema
    instead (`carried`): each encoder whose id is unchanged keeps its vector and fingerprint, a new or changed
    one has nulls (the next run encodes it), and the combined vector is made again with the new weights. Emits
    {fragment, removed, kept (the fragment's metadata with its deletion file, or None when no row of it
    stays)} or {fragment, removed, carried (fragments' metadata), rows}.
    """

    def __init__(self, uri: str, read_version: int, new_schema: pa.Schema | None,
                 encoder_ids: Mapping[str, str], weights: Mapping[str, float], dims: Mapping[str, int],
                 storage_options: dict[str, str] | None = None, reweigh: bool = False):
        self._uri = uri
        self._read_version = read_version
        self._new_schema = new_schema           # None: deletion files (no new schema)
        self._reweigh = reweigh
        self._encoder_ids = dict(encoder_ids)
        self._weights = dict(weights)
        self._dims = dict(dims)
        self._storage_options = storage_options

    def setup(self):
        self._dataset = lance.dataset(self._uri, version=self._read_version, storage_options=self._storage_options)

    def process(self, fragment_ids: tuple[int, Iterable[str | None]]):
        fragment_id, leaving = fragment_ids
        ids = sorted({item_id for item_id in leaving if item_id is not None})
        stored = fragment(self._dataset, fragment_id)
        before = stored.count_rows()
        if self._new_schema is None:
            kept = stored.delete_rows(_offsets(stored, ids)) if ids else stored.metadata
            if self._reweigh:
                kept = self._reweighed(stored, kept) if kept is not None else self._emptied(stored)
            after = 0 if kept is None else _live_rows(kept)
            yield {"fragment": fragment_id, "removed": before - after,
                   "kept": None if kept is None else json.dumps(kept.to_json())}
            return
        carried, rows = self._carry(stored, ids)
        yield {"fragment": fragment_id, "removed": before - rows, "carried": carried, "rows": rows}

    def _reweighed(self, stored: lance.LanceFragment, kept: FragmentMetadata) -> FragmentMetadata:
        """The fragment as `kept` (its deletion file), with its `vector` column in a data file of its own, made
        from its stored vectors with the new weights."""
        schema = pa.schema([pa.field("_rowid", pa.uint64()), self._dataset.schema.field("vector")])

        reading = fragment(self._dataset, stored.fragment_id)   # another handle: update_columns holds `stored`

        def combined() -> Iterator[pa.RecordBatch]:     # a batch at a time: a compacted fragment holds ~1M rows
            for batch in reading.to_batches(columns=[f"{name}_vec" for name in self._dims], with_row_id=True,
                                           batch_size=CARRY_BATCH):
                rows = pa.Table.from_batches([batch])
                yield pa.record_batch([rows["_rowid"].combine_chunks(),
                                       combined_column(rows, self._dims, self._weights, self._dims)], schema=schema)

        updated, _ = stored.update_columns(pa.RecordBatchReader.from_batches(schema, combined()))
        return FragmentMetadata.from_json(json.dumps(dict(updated.to_json(),
                                                          deletion_file=kept.to_json()["deletion_file"])))

    def _emptied(self, stored: lance.LanceFragment) -> FragmentMetadata:
        """The fragment marked as having every row deleted. A night of new weights commits a Merge, and Lance
        refuses a Merge that leaves out a fragment it read; a fragment whose deletion count is its row count it
        drops from the version it commits, by that count alone. So no deletion file is written (Lance's own writer
        will not write one that deletes every row): the committed version names neither the fragment nor the file,
        which tests/test_incremental.py checks."""
        deletion = {"read_version": self._read_version, "id": 0, "file_type": "array",
                    "num_deleted_rows": stored.metadata.physical_rows, "base_id": None}
        return FragmentMetadata.from_json(json.dumps(dict(stored.metadata.to_json(), deletion_file=deletion)))

    def _carry(self, stored: lance.LanceFragment, leaving: Sequence[str]) -> tuple[list[str], int]:
        """Write the fragment's rows that stay in the new schema: their ids read first, then only those rows, so
        that a night that rewrites most rows itself reads little of what it replaces."""
        ids = stored.to_table(columns=["id"])["id"]
        staying = np.flatnonzero(~pc.is_in(ids, value_set=pa.array(leaving, pa.string())).to_numpy(
            zero_copy_only=False))
        if not len(staying):
            return [], 0
        kept_encoders = self._unchanged_encoders()
        reader = pa.RecordBatchReader.from_batches(self._new_schema, self._carried_batches(stored, staying,
                                                                                          kept_encoders))
        written = write_fragments(reader, self._uri, schema=self._new_schema, mode="overwrite",
                                  storage_options=self._storage_options)
        return [json.dumps(f.to_json()) for f in written], len(staying)

    def _carried_batches(self, stored: lance.LanceFragment, staying: np.ndarray,
                         kept_encoders: set[str]) -> Iterator[pa.RecordBatch]:
        for start in range(0, len(staying), CARRY_BATCH):
            rows = stored.take(staying[start:start + CARRY_BATCH].tolist())
            yield from in_new_schema(rows, self._new_schema, kept_encoders, self._weights, self._dims).to_batches()

    def _unchanged_encoders(self) -> set[str]:
        stored = {e["name"]: e["id"] for e in table_metadata(self._dataset.schema).get("encoders", [])}
        return {name for name, encoder_id in self._encoder_ids.items()
                if name in stored and same_vectors(stored[name], encoder_id)}


def _offsets(stored: lance.LanceFragment, ids: Sequence[str]) -> list[int]:
    """The physical offsets in the fragment of the rows with these ids: its ids are read once and matched in
    one vectorised pass, where a `id IN (...)` filter of a fragment's every replaced id would be parsed and
    evaluated as SQL. `delete_rows` (pylance's fragment API, pinned) then deletes exactly those rows."""
    rows = stored.to_table(columns=["id"], with_row_address=True)
    hit = pc.is_in(rows["id"], value_set=pa.array(ids, pa.string()))
    return (pc.filter(rows["_rowaddr"], hit).to_numpy() & 0xFFFFFFFF).tolist()


def _live_rows(metadata) -> int:
    deleted = metadata.deletion_file.num_deleted_rows if metadata.deletion_file else 0
    return metadata.physical_rows - deleted


def in_new_schema(rows: pa.Table, schema: pa.Schema, kept_encoders: set[str],
                  weights: Mapping[str, float], dims: Mapping[str, int]) -> pa.Table:
    """Stored rows as the new schema holds them: the columns it shares with theirs, the vectors and
    fingerprints of unchanged encoders, nulls for the rest, and the combined vector made again."""
    encoder_columns = {f"{name}_{part}": name for name in dims for part in ("vec", "fp")}
    columns = []
    for field in schema:
        dropped = encoder_columns.get(field.name) not in (None, *kept_encoders)
        if field.name == "vector":
            columns.append(combined_column(rows, kept_encoders, weights, dims))
        elif dropped or field.name not in rows.schema.names:
            columns.append(pa.nulls(rows.num_rows, field.type))
        else:
            columns.append(rows[field.name].cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def combined_column(rows: pa.Table, encoders: Iterable[str], weights: Mapping[str, float],
                    dims: Mapping[str, int]) -> pa.FixedSizeListArray:
    """Stored rows' combined vectors made again from their `encoders`' stored vectors with `weights`; null where
    a row has no vector from any weighted encoder (the row stays, found by id and filters)."""
    columns = {name: rows[f"{name}_vec"] for name in encoders}
    combined, valid = combine_rows({name: vector_matrix(column) for name, column in columns.items()},
                                   {name: column.is_valid().to_numpy(zero_copy_only=False)
                                    for name, column in columns.items()}, weights, list(dims), dims, rows.num_rows)
    return matrix_array(combined, valid)
