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
from lance.fragment import write_fragments

from transforms.combine import combine
from transforms.compare import fragment
from transforms.encoders.base import without_data
from transforms.items import HELD, pack
from transforms.lance_sink import table_metadata, vector_array, vector_matrix

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

    On a night that appends (the schema unchanged) it writes a deletion file; on a night that rewrites for a
    new schema it writes the fragment's other rows in the new schema instead (`carried`): each encoder whose
    id is unchanged keeps its vector and fingerprint, a new or changed one has nulls (the next run encodes
    it), and the combined vector is made again with the new weights. Emits {fragment, removed, kept (the
    fragment's metadata with its deletion file, or None when no row of it stays)} or {fragment, removed,
    carried (fragments' metadata), rows}.
    """

    def __init__(self, uri: str, read_version: int, new_schema: pa.Schema | None,
                 encoder_ids: Mapping[str, str], weights: Mapping[str, float], dims: Mapping[str, int],
                 storage_options: dict[str, str] | None = None):
        self._uri = uri
        self._read_version = read_version
        self._new_schema = new_schema           # None: deletion files (no new schema)
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
            after = 0 if kept is None else _live_rows(kept)
            yield {"fragment": fragment_id, "removed": before - after,
                   "kept": None if kept is None else json.dumps(kept.to_json())}
            return
        carried, rows = self._carry(stored, ids)
        yield {"fragment": fragment_id, "removed": before - rows, "carried": carried, "rows": rows}

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
        stored = {e["name"]: without_data(e["id"]) for e in table_metadata(self._dataset.schema).get("encoders", [])}
        return {name for name, encoder_id in self._encoder_ids.items() if stored.get(name) == without_data(encoder_id)}


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
    vectors = {name: (vector_matrix(rows[f"{name}_vec"]), rows[f"{name}_vec"].is_valid().to_numpy(
        zero_copy_only=False)) for name in kept_encoders}
    combined = [_combined({name: matrix[row] for name, (matrix, valid) in vectors.items() if valid[row]},
                          weights, dims) for row in range(rows.num_rows)]
    columns = []
    for field in schema:
        dropped = encoder_columns.get(field.name) not in (None, *kept_encoders)
        if field.name == "vector":
            columns.append(vector_array(combined, field.type.list_size))
        elif dropped or field.name not in rows.schema.names:
            columns.append(pa.nulls(rows.num_rows, field.type))
        else:
            columns.append(rows[field.name].cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _combined(vectors: dict[str, np.ndarray], weights: Mapping[str, float], dims: Mapping[str, int]):
    try:
        return combine(vectors, weights, list(dims), dims)
    except ValueError:      # no vector from any weighted encoder left: the row stays, found by id and filters
        return None
