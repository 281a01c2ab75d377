"""Table upkeep after each commit: compaction, old-version cleanup and indexes.

Nightly upserts leave many small fragments and deletion files behind; compaction rewrites them.
Versions older than the retention are removed, except tagged ones (each run's `run-<id>` tag keeps
its version queryable until the tag is deleted). Once the table is large enough for an ANN index to
pay off, `vector` gets a cosine IVF index and `id` a scalar index; later runs fold new rows in.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
from datetime import timedelta

import lance

log = logging.getLogger(__name__)
ID_INDEX = "id_idx"         # the scalar index on `id`, which finds rows by id (lance_sink.rows_by_id)
TRAINING_VECTORS = 16_384   # the index's training sample, whatever the table's size
MIN_SAMPLE_RATE = 40        # vectors per partition, enough for k-means to place each centroid


def maintain(uri: str, retain_days: float, index_min_rows: int, compact: bool,
             storage_options: dict[str, str] | None = None) -> list[str]:
    """Run the upkeep; return what could not be done. The run's version is committed before this, so
    a failed step is a warning for the run's record, never a failed run: the next run tries again."""
    _return_freed_heap()

    def latest() -> lance.LanceDataset:
        return lance.dataset(uri, storage_options=storage_options)

    steps = [("compaction", lambda: _compact(latest()))] if compact else []
    steps += [("index", lambda: _index_when_large(latest(), index_min_rows)),
              ("cleanup", lambda: _cleanup(latest(), retain_days))]
    problems = []
    for step, action in steps:
        try:
            action()
        except (RuntimeError, OSError, ValueError) as err:
            log.warning("upkeep: %s skipped: %s", step, err)
            problems.append(f"{step} skipped: {str(err).splitlines()[0]}")
    return problems


def _return_freed_heap() -> None:
    """Give the memory that the pipeline's stages freed back to the system before the index build
    loads the vector column (about 8 KiB a row): glibc would keep it for reuse, and the two would add
    up to the run's peak (2.86 -> 2.54 GiB at 100k items, README "Benchmark"). Elsewhere than glibc, nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _compact(dataset: lance.LanceDataset) -> None:
    if len(dataset.get_fragments()) > 1:
        # Copying encoded pages instead of decoding and re-encoding rows: a third of the memory, twice as fast.
        metrics = dataset.optimize.compact_files(compaction_mode="try_binary_copy")
        log.info("compaction: %d fragments removed, %d added", metrics.fragments_removed, metrics.fragments_added)


def _index_when_large(dataset: lance.LanceDataset, index_min_rows: int) -> None:
    rows = dataset.count_rows()
    if rows >= index_min_rows:
        _index(dataset, rows)


def _cleanup(dataset: lance.LanceDataset, retain_days: float) -> None:
    stats = dataset.cleanup_old_versions(
        older_than=timedelta(days=retain_days), error_if_tagged_old_versions=False)
    if stats.old_versions:
        log.info("cleanup: %d old versions removed", stats.old_versions)


def _index(dataset: lance.LanceDataset, rows: int) -> None:
    names = {index.name for index in dataset.describe_indices()}
    if {"vector_idx", ID_INDEX} <= names:
        dataset.optimize.optimize_indices()
        return
    partitions = max(1, int(math.sqrt(rows)))
    # Lance trains on 256 vectors per partition by default: on 100k rows that is nearly all of them, in memory.
    sample_rate = max(MIN_SAMPLE_RATE, TRAINING_VECTORS // partitions)
    dataset.create_index("vector", "IVF_HNSW_SQ", name="vector_idx", metric="cosine", num_partitions=partitions,
                         sample_rate=sample_rate)
    dataset.create_scalar_index("id", "BTREE", name=ID_INDEX)
    log.info("indexed %d rows: vector (IVF_HNSW_SQ, cosine, %d partitions) and id (BTREE)", rows, partitions)
