"""The Lance sink: workers write fragments, one commit step makes the run's table version.

This is the distributed-write pattern of Lance (as Ray Data and Daft use it): data files are written
in parallel and stay invisible until a single commit references them. Rows that the run replaces or
deletes get deletion files, also written by workers, one per stored fragment. The commit puts new
fragments and deletions in one transaction, so a run is exactly one new version, a failure before it
leaves the table as it was, and the commit step handles metadata per fragment, never per row.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

import apache_beam as beam
import lance
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from lance.commit import CommitConflictError
from lance.fragment import FragmentMetadata, write_fragments

from transforms.compare import fragment
from transforms.fingerprint import has_input, written_fingerprints
from transforms.staging import stage_batch

log = logging.getLogger(__name__)

METADATA_KEY = b"catalog_embed"
EMBEDDING_FUNCTIONS_KEY = b"embedding_functions"     # LanceDB's own: how its search() embeds words for a column
TEXT_COLUMN = "embedded_text"                        # the text that the text encoders embedded, as they saw it
COMMIT_LOCK_FILE = "_catalog_embed.lock"
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
    missing = np.array([vector is None for vector in vectors], dtype=bool)
    flat = np.concatenate([np.zeros(dim, np.float32) if vector is None else vector for vector in vectors])
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np.float32)), dim,
                                             mask=pa.array(missing) if missing.any() else None)


class WriteFragments(beam.DoFn):
    """Write a batch of items as Lance fragments; emit their metadata and counts for the commit step,
    and (tagged `replaced`) the stored rows they replace, for the deletion stage."""

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
                   "encoded": dict(Counter(name for item in items for name in item["encoded"])),
                   "encode_seconds": dict(sum((Counter(item["encode_seconds"]) for item in items), Counter()))}
        stage_batch(self._staging, written, items, self._inputs)
        yield written
        if not self._overwrite:
            for item in items:
                if item["replaces"] is not None:
                    yield beam.pvalue.TaggedOutput(REPLACED, (item["replaces"], item["id"]))


class DeleteRows(beam.DoFn):
    """Per stored fragment, a deletion file for the rows this run replaces or deletes: written by the
    workers, invisible until the commit references it. Emits (fragment id, new metadata or None when
    no row of the fragment is left)."""

    def __init__(self, uri: str, read_version: int, storage_options: dict[str, str] | None = None):
        self._uri = uri
        self._read_version = read_version
        self._storage_options = storage_options

    def setup(self):
        self._dataset = lance.dataset(self._uri, version=self._read_version, storage_options=self._storage_options)

    def process(self, fragment_ids: tuple[int, Iterable[str]]):
        fragment_id, ids = fragment_ids
        result = fragment(self._dataset, fragment_id).delete(id_in(sorted(ids)))
        yield fragment_id, None if result is None else json.dumps(result.to_json())


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


def run_tag(run_id: str) -> str:
    return f"run-{run_id}"


class ConcurrentRunError(RuntimeError):
    """Another run committed to the table after this run read it; this run commits nothing."""


def commit_run(uri: str, schema: pa.Schema, fragments: Sequence[str], deletions: Sequence[tuple[int, str | None]],
               run_id: str, read_version: int | None, overwrite: bool,
               storage_options: dict[str, str] | None = None) -> int:
    """Commit the run's fragments and deletion files as one new version, tag it, and return the version.

    `fragments` are the new fragments' metadata (JSON); `deletions` are (fragment id, its metadata with
    the new deletion file, or None to remove the fragment); `overwrite` replaces the whole table (its
    schema changed). A run with nothing to change tags the current version and creates none.
    Re-committing a run that already committed (a retried bundle) changes nothing: the version tagged
    with its run id must hold its fragments, else the id was used by another run.
    """
    dataset = open_dataset(uri, storage_options)
    current = dataset.version if dataset is not None else None
    if dataset is not None and run_tag(run_id) in dataset.tags.list():
        return _own_commit(dataset, run_id, fragments)
    if current != read_version:
        raise _moved(uri, read_version, current)
    if dataset is not None and not overwrite and not fragments and not deletions:
        dataset.tags.create(run_tag(run_id), dataset.version)
        return dataset.version
    new_fragments = [FragmentMetadata.from_json(raw) for raw in fragments]
    operation: lance.LanceOperation.BaseOperation
    if dataset is None or overwrite:
        operation = lance.LanceOperation.Overwrite(schema, new_fragments)
    else:
        operation = lance.LanceOperation.Update(
            removed_fragment_ids=[fid for fid, kept in deletions if kept is None],
            updated_fragments=[FragmentMetadata.from_json(kept) for _, kept in deletions if kept is not None],
            new_fragments=new_fragments)
    message = json.dumps({"run_id": run_id, "fragments": len(new_fragments), "with_deletions": len(deletions)})
    try:
        committed = lance.LanceDataset.commit(
            uri, operation, read_version=read_version, commit_message=message, max_retries=0,
            commit_lock=_expect_version(uri, read_version), storage_options=storage_options)
    except (OSError, CommitConflictError) as err:
        # Lance's own conflict check (a version landed since ours, touching our fragments) comes before our
        # lock is asked, and our lock's refusal comes back from Lance as an OSError: both mean the table moved.
        if isinstance(err, CommitConflictError) or "table moved" in str(err):
            now = open_dataset(uri, storage_options)
            raise _moved(uri, read_version, None if now is None else now.version) from err
        raise
    committed.tags.create(run_tag(run_id), committed.version)
    log.info("committed %s as version %d", uri, committed.version)
    return committed.version


def _own_commit(dataset: lance.LanceDataset, run_id: str, fragments: Sequence[str]) -> int:
    """The version this run committed before (a retry), recognised by its fragments' data files."""
    version = dataset.tags.list()[run_tag(run_id)]["version"]
    ours = {data.path for raw in fragments for data in FragmentMetadata.from_json(raw).files}
    stored = {data.path for fragment in dataset.checkout_version(version).get_fragments()
              for data in fragment.metadata.files}
    if not ours <= stored:
        raise ConcurrentRunError(f"run id {run_id} already tags version {version}, committed by another run; "
                                 "give each run its own --run-id")
    return version


def _expect_version(uri: str, read_version: int | None):
    """A commit lock that lets the commit through only if it creates the version after ours.

    Lance would otherwise rebase a commit made from a stale version over a newer one, and two runs
    adding the same new id would both land. Lance calls the lock around its manifest write, and two
    runs that read the same version ask for the same one: under a lock on the table's folder, the
    first records the version it wrote, and the second finds it taken.
    """
    expected = (read_version or 0) + 1

    @contextlib.contextmanager
    def lock(version: int):
        with _table_lock(uri) as last_committed:
            if version != expected or last_committed.read() >= version:
                raise CommitConflictError(f"table moved: this run would create version {version}, not {expected}",
                                          retryable=False)
            yield
            last_committed.write(version)

    return lock


class _LastCommitted:
    """The version the last run wrote, kept in the lock file (Lance cannot be asked from inside its commit)."""

    def __init__(self, handle):
        self._handle = handle

    def read(self) -> int:
        self._handle.seek(0)
        return int(self._handle.read().strip() or 0)

    def write(self, version: int) -> None:
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(str(version))
        self._handle.flush()


@contextlib.contextmanager
def _table_lock(uri: str):
    """An exclusive lock on a local table's folder, released when the process ends however it ends. An
    object store has no such lock: there the scheduler must not start a table's runs side by side
    (docs/operations.md, "Run it every night"), and Lance's own atomic commit keeps versions from being overwritten."""
    if "://" in uri:
        yield _NothingKept()
        return
    os.makedirs(uri, exist_ok=True)
    with open(os.path.join(uri, COMMIT_LOCK_FILE), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield _LastCommitted(handle)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _NothingKept:
    def read(self) -> int:
        return 0

    def write(self, version: int) -> None:
        pass


def _moved(uri: str, read_version: int | None, current: int | None) -> ConcurrentRunError:
    return ConcurrentRunError(
        f"table moved: {uri} changed during this run (read at version {read_version}, now {current}): another "
        "run committed first. Nothing was committed; run again to embed against the new version.")


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
