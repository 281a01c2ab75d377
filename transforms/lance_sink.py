"""The Lance sink: the table's schema, and workers writing fragments that one commit makes the run's version.

This is the distributed-write pattern of Lance (as Ray Data and Daft use it): data files are written
in parallel and stay invisible until a single commit references them (table_commit.py). Rows that the run
replaces or deletes get deletion files, also written by workers, one per stored fragment (lifecycle.py).
The commit puts new fragments and deletions in one transaction, so a run is exactly one new version, a
failure before it leaves the table as it was, and the commit step handles metadata per fragment, never per row.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone

import apache_beam as beam
import lance
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from lance.fragment import write_fragments

from transforms.fingerprint import has_input, written_fingerprints
from transforms.staging import stage_batch

log = logging.getLogger(__name__)

METADATA_KEY = b"catalog_embed"
EMBEDDING_FUNCTIONS_KEY = b"embedding_functions"     # LanceDB's own: how its search() embeds words for a column
TEXT_COLUMN = "embedded_text"                        # the text that the text encoders embedded, as they saw it
ID_LOOKUP_SLICE = 10_000
RESERVED_COLUMNS = ("id", "label", "image_uri", "image_stat", "image_digest", TEXT_COLUMN, "vector", "run_id",
                    "embedded_at")
REPLACED = "replaced"  # (fragment id, item id) of stored rows that a written row replaces


def dataset_uri(db_uri: str, table: str) -> str:
    """Where LanceDB keeps a table: `<db uri>/<table>.lance`, on local disk or an object store."""
    return f"{db_uri.rstrip('/')}/{table}.lance"


def table_schema(passthrough: Sequence[str], encoders: Sequence[dict], table_meta: dict,
                 embedding_functions: Sequence[dict] = ()) -> pa.Schema:
    """The table's explicit schema. `encoders` are dicts with at least `name` and `dim`. `embedding_functions`
    are LanceDB's entries (registered name and settings) of the columns its own search may embed words for."""
    columns = [pa.field("id", pa.string(), nullable=False)]
    columns += [pa.field(name, pa.string()) for name in passthrough if name not in RESERVED_COLUMNS]
    columns += [pa.field(name, pa.string())
                for name in ("label", "image_uri", "image_stat", "image_digest", TEXT_COLUMN)]
    columns += [pa.field(f"{e['name']}_vec", pa.list_(pa.float32(), e["dim"])) for e in encoders]
    columns.append(pa.field("vector", pa.list_(pa.float32(), sum(e["dim"] for e in encoders))))
    columns += [pa.field(f"{e['name']}_fp", pa.string()) for e in encoders]
    columns += [pa.field("run_id", pa.string()), pa.field("embedded_at", pa.timestamp("us", tz="UTC"))]
    metadata = {METADATA_KEY: json.dumps(table_meta, sort_keys=True).encode()}
    if embedding_functions:
        metadata[EMBEDDING_FUNCTIONS_KEY] = json.dumps(
            [dict(entry, source_column=TEXT_COLUMN) for entry in embedding_functions], sort_keys=True).encode()
    return pa.schema(columns, metadata=metadata)


def only_weights_differ(stored: pa.Schema, new: pa.Schema) -> bool:
    """Whether the two schemas are the same but for the encoders' weights: a night that rewrites one column."""
    def unweighted(schema: pa.Schema) -> pa.Schema:
        meta = table_metadata(schema)
        meta["encoders"] = [{k: v for k, v in e.items() if k != "weight"} for e in meta.get("encoders", [])]
        return schema.with_metadata({**(schema.metadata or {}),
                                     METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})

    return (not stored.equals(new, check_metadata=True)
            and unweighted(stored).equals(unweighted(new), check_metadata=True))


def table_metadata(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def items_to_arrow(items: Sequence[dict], schema: pa.Schema, run_id: str,
                   inputs: dict[str, tuple[str, str]]) -> pa.Table:
    """The rows of a batch; `inputs` maps encoder name to (encoder id, modality), for the fingerprints."""
    now = datetime.now(timezone.utc)
    item_fingerprints = [written_fingerprints(item, inputs) for item in items]
    columns = {}
    for field in schema:
        name = field.name
        if pa.types.is_fixed_size_list(field.type):
            key = "vector" if name == "vector" else name[: -len("_vec")]
            columns[name] = vector_array([item["vectors"].get(key) for item in items], field.type.list_size)
        elif name.endswith("_fp"):
            columns[name] = pa.array([found[name[:-3]] for found in item_fingerprints], pa.string())
        elif name == "run_id":
            columns[name] = pa.array([run_id] * len(items), pa.string())
        elif name == "embedded_at":
            columns[name] = pa.array([now] * len(items), field.type)
        elif name == "image_digest":
            columns[name] = pa.array([item["digests"].get("image") if has_input(item, "image") else None
                                      for item in items], pa.string())
        elif name in ("id", "label", "image_uri", "image_stat"):
            columns[name] = pa.array([item[name] for item in items], pa.string())
        elif name == TEXT_COLUMN:
            columns[name] = pa.array([item["text"] or None for item in items], pa.string())
        else:
            columns[name] = pa.array([item["fields"].get(name) for item in items], pa.string())
    return pa.table(columns, schema=schema)


def vector_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A FixedSizeList<float32> column as an (n, dim) array, the stored bits unchanged; null rows (no
    vector from that encoder) read as zeros, as their part of the combined vector is."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    values = column.values.slice(column.offset * dim, len(column) * dim)   # every row's slot, nulls included
    matrix = values.to_numpy(zero_copy_only=False).reshape(len(column), dim)
    if column.null_count:
        matrix = np.where(column.is_null().to_numpy(zero_copy_only=False)[:, None], np.float32(0), matrix)
    return matrix


def vector_array(vectors: Sequence[np.ndarray | None], dim: int) -> pa.FixedSizeListArray:
    """A FixedSizeList<float32, dim> column; None (an encoder the item has no input for) is null."""
    valid = np.array([vector is not None for vector in vectors], dtype=bool)
    matrix = np.stack([np.zeros(dim, np.float32) if vector is None else vector for vector in vectors]) if vectors \
        else np.zeros((0, dim), np.float32)
    return matrix_array(matrix, valid)


def matrix_array(matrix: np.ndarray, valid: np.ndarray) -> pa.FixedSizeListArray:
    """An (n, dim) matrix as a FixedSizeList<float32, dim> column, null where not `valid`."""
    flat = pa.array(np.ascontiguousarray(matrix, np.float32).ravel())
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1], mask=None if valid.all() else pa.array(~valid))


class WriteFragments(beam.DoFn):
    """Write a batch of items as Lance fragments; emit their metadata and counts for the commit step,
    and (tagged `replaced`) the stored rows they replace, for the removal stage (lifecycle.py)."""

    def __init__(self, uri: str, schema: pa.Schema, run_id: str, overwrite: bool, inputs: dict[str, tuple[str, str]],
                 staging: str, storage_options: dict[str, str] | None = None):
        self._uri = uri
        self._staging = staging        # where each written batch is recorded, for a run that resumes this one
        self._storage_options = storage_options
        self._schema = schema
        self._run_id = run_id
        self._inputs = inputs
        # Fragments for a new schema are checked against it, not against the table's current one.
        self._overwrite = overwrite
        self._written = Metrics.counter("catalog_embed", "items_written")

    def process(self, items: list[dict]):
        table = items_to_arrow(items, self._schema, self._run_id, self._inputs)
        mode = "overwrite" if self._overwrite else "append"
        fragments = write_fragments(table, self._uri, schema=self._schema, mode=mode,
                                    storage_options=self._storage_options)
        self._written.inc(len(items))
        written = {"fragments": [json.dumps(f.to_json()) for f in fragments], "rows": len(items),
                   "added": sum(1 for item in items if item["replaces"] is None),
                   "encoded": dict(Counter(name for item in items for name in item["encoded"])),
                   "encode_seconds": dict(sum((Counter(item["encode_seconds"]) for item in items), Counter()))}
        stage_batch(self._staging, written, items, self._inputs)
        yield written
        for item in items:
            if item["replaces"] is not None:
                yield beam.pvalue.TaggedOutput(REPLACED, (item["replaces"], item["id"]))


def open_dataset(uri: str, storage_options: dict[str, str] | None = None) -> lance.LanceDataset | None:
    """The table's latest version, or None if there is no table yet.

    Only "not found" means no table: any other error (an object store that is briefly unreachable) must
    fail the run, or the run would take the table for new and overwrite it.
    """
    try:
        return lance.dataset(uri, storage_options=storage_options)
    except ValueError as err:
        if "was not found" in str(err):
            return None
        raise


def rows_by_id(dataset: lance.LanceDataset, ids: Sequence[str], columns: Sequence[str]) -> pa.Table:
    """These ids' rows, by a filter on `id` in slices that keep each filter short. Large tables have
    the `id` index (maintain.py), which turns each slice into a few index lookups instead of a scan."""
    slices = [ids[i:i + ID_LOOKUP_SLICE] for i in range(0, len(ids), ID_LOOKUP_SLICE)]
    if not slices:
        return dataset.schema.empty_table().select(list(columns))
    return pa.concat_tables([dataset.to_table(columns=list(columns), filter=id_in(chunk)) for chunk in slices])


def id_in(ids: Sequence[str]) -> str:
    """A Lance filter that holds for these ids."""
    return "id IN (" + ", ".join("'" + i.replace("'", "''") + "'" for i in ids) + ")"
