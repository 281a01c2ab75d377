"""Table upkeep after each commit: compaction, indexes, and retention of old versions.

Nightly upserts leave many small fragments and deletion files behind; compaction rewrites them.
Retention: a run's tag (`run-<id>`) keeps its version queryable while it is younger than
`output.retain_days`, and the tags of the last `output.keep_runs` runs are kept whatever their age; older run
tags are removed. Tags a user made are never removed. Then versions older than the retention are removed,
except tagged ones, and with them the files no kept version uses.

Indexes, each made once and then refreshed (`optimize_indices` folds the new rows in):
- a scalar index on `id` (rows found by id) and on `label` and every pass-through field but free text,
  BITMAP for a field of at most BITMAP_MAX_VALUES distinct values and BTREE above, so that filtered searches
  count and find their rows through it (pipelines/search/query.py plans each search by that count). A field
  is judged once, when its index is made, on a sample of DISTINCT_SAMPLE rows: free text (mostly distinct
  values of several words: titles, descriptions) gets no index, as nobody filters on it by value;
- a full-text index on `embedded_text`, for `query --hybrid` and LanceDB's own full-text search;
- once the table has `output.index_min_rows` rows, a cosine IVF_HNSW_SQ index on `vector`. Folding new rows
  in adds a delta segment each night, which every search also reads; past MAX_DELTA_SEGMENTS the index is
  trained again on the table as it is (new kinds get their own partitions) and is one segment again.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
from datetime import datetime, timedelta
from typing import Any, Literal

import lance
import pyarrow as pa
import pyarrow.compute as pc

from transforms.config import OutputConfig
from transforms.lance_sink import TEXT_COLUMN
from transforms.table_commit import RUN_TAG_PREFIX, committed_by_a_run

log = logging.getLogger(__name__)
ID_INDEX = "id_idx"         # the scalar index on `id`, which finds rows by id (lance_sink.rows_by_id)
VECTOR_INDEX = "vector_idx"
TEXT_INDEX = f"{TEXT_COLUMN}_idx"
TRAINING_VECTORS = 16_384   # the index's training sample, whatever the table's size
MIN_SAMPLE_RATE = 40        # vectors per partition, enough for k-means to place each centroid
ScalarIndex = Literal["BTREE", "BITMAP"]
BITMAP_MAX_VALUES = 1_000   # Lance's bitmap index is for low-cardinality columns; a BTREE above
DISTINCT_SAMPLE = 20_000    # rows a field's values are judged on (what a night reads for it, whatever the table)
FREE_TEXT_WORDS = 3         # free text: the sample's median value has this many words or more ...
FREE_TEXT_DISTINCT = 0.5    # ... and more than this share of its values are distinct
# At 100k rows each delta segment added about 1.3 ms to a search (p50 41 -> 80 ms after 30 nights of 1% churn,
# recall unchanged); a rebuild costs what the first build did (docs/search.md): about once a week.
MAX_DELTA_SEGMENTS = 7
NOT_FILTERED = frozenset({"id", "image_uri", "image_stat", "image_digest", TEXT_COLUMN, "run_id"})


def maintain(uri: str, output: OutputConfig) -> tuple[list[str], dict]:
    """Run the upkeep; return what could not be done, and the indexes' state for the run's record. The
    run's version is committed before this, so a failed step is a warning for the run's record, never a
    failed run: the next run tries again."""
    _return_freed_heap()

    def latest() -> lance.LanceDataset:
        return lance.dataset(uri, storage_options=output.storage_options)

    state: dict = {}
    rebuilt: list[bool] = []
    steps = [("compaction", lambda: _compact(latest()))] if output.compact else []
    steps += [("index", lambda: rebuilt.append(_index(latest(), output.index_min_rows))),
              ("cleanup", lambda: _cleanup(latest(), output.retain_days, output.keep_runs)),
              ("index state", lambda: state.update(index_state(latest(), any(rebuilt))))]
    problems = []
    for step, action in steps:
        try:
            action()
        except (RuntimeError, OSError, ValueError) as err:
            log.warning("upkeep: %s skipped: %s", step, err)
            problems.append(f"{step} skipped: {str(err).splitlines()[0]}")
    return problems, state


def index_state(dataset: lance.LanceDataset, rebuilt: bool = False) -> dict:
    """Each index's rows indexed and segments, the rows the vector index does not cover yet, and whether this
    upkeep rebuilt it."""
    indices = {index.name: index for index in dataset.describe_indices()}
    state: dict[str, dict[str, Any]] = {name: {"type": index.index_type, "rows_indexed": index.num_rows_indexed,
                    "segments": len(index.segments)} for name, index in indices.items()}
    if VECTOR_INDEX in state:
        state[VECTOR_INDEX]["rows_unindexed"] = max(0, dataset.count_rows() - state[VECTOR_INDEX]["rows_indexed"])
        state[VECTOR_INDEX]["rebuilt"] = rebuilt
    return state


def _return_freed_heap() -> None:
    """Give the memory that the pipeline's stages freed back to the system before the index build
    loads the vector column (about 8 KiB a row): glibc would keep it for reuse, and the two would add
    up to the run's peak (2.86 -> 2.54 GiB at 100k items). Elsewhere than glibc, nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _compact(dataset: lance.LanceDataset) -> None:
    if len(dataset.get_fragments()) > 1:
        # Copying encoded pages instead of decoding and re-encoding rows: a third of the memory, twice as fast.
        metrics = dataset.optimize.compact_files(compaction_mode="try_binary_copy")
        log.info("compaction: %d fragments removed, %d added", metrics.fragments_removed, metrics.fragments_added)


def _cleanup(dataset: lance.LanceDataset, retain_days: float, keep_runs: int) -> None:
    for tag in expired_run_tags(dataset, retain_days, keep_runs):
        dataset.tags.delete(tag)
    stats = dataset.cleanup_old_versions(
        older_than=timedelta(days=retain_days), error_if_tagged_old_versions=False)
    if stats.old_versions:
        log.info("cleanup: %d old versions removed", stats.old_versions)


def expired_run_tags(dataset: lance.LanceDataset, retain_days: float, keep_runs: int) -> list[str]:
    """The run tags the retention lets go: older than `retain_days`, and not among the kept runs' tags."""
    timestamps = _version_times(dataset)
    runs = {name: info["version"] for name, info in dataset.tags.list().items() if is_run_tag(name)}
    kept = _kept_run_versions(dataset, set(runs.values()), keep_runs)
    oldest = datetime.now() - timedelta(days=retain_days)
    return sorted(name for name, version in runs.items()
                  if version not in kept and (version not in timestamps or timestamps[version] < oldest))


def _kept_run_versions(dataset: lance.LanceDataset, tagged: set[int], keep_runs: int) -> set[int]:
    """The versions of the last `keep_runs` runs that committed a change, and those tagged since by runs that
    changed nothing (they tag the version they read: the same content)."""
    commits = [version for version in sorted(tagged, reverse=True) if committed_by_a_run(dataset, version)]
    kept = commits[:keep_runs]
    return set(kept) | {version for version in tagged if kept and version > kept[0]}


def is_run_tag(name: str) -> bool:
    return name.startswith(RUN_TAG_PREFIX)


def _version_times(dataset: lance.LanceDataset) -> dict[int, datetime]:
    """When each version was made (Lance's local time, as datetime.now() reads it)."""
    times = {}
    for found in dataset.versions():
        version, made = found["version"], found["timestamp"]
        assert isinstance(version, int) and isinstance(made, datetime)
        times[version] = made
    return times


def why_kept(dataset: lance.LanceDataset, retain_days: float, keep_runs: int) -> dict[int, str]:
    """Per version, why the retention keeps it, or that the next upkeep lets it go."""
    oldest = datetime.now() - timedelta(days=retain_days)
    tags: dict[int, list[str]] = {}
    for name, info in dataset.tags.list().items():
        tags.setdefault(info["version"], []).append(name)
    expired = set(expired_run_tags(dataset, retain_days, keep_runs))
    last_runs = _kept_run_versions(dataset, {v for v, names in tags.items() if any(is_run_tag(n) for n in names)},
                                   keep_runs)
    reasons = {}
    for version, made in _version_times(dataset).items():
        names = tags.get(version, [])
        users = sorted(n for n in names if not is_run_tag(n))
        if version == dataset.version:
            reasons[version] = "the latest"
        elif users:
            reasons[version] = f"tag {users[0]} (a user's tag: kept until it is removed)"
        elif version in last_runs:
            reasons[version] = f"one of the last {keep_runs} runs (output.keep_runs)"
        elif made >= oldest:
            reasons[version] = f"younger than output.retain_days ({retain_days:g})"
        else:
            reasons[version] = "older than the retention: the next upkeep removes it"
        if any(n in expired for n in names) and version not in last_runs:
            reasons[version] += "; its run tag goes at the next upkeep"
    return reasons


def _index(dataset: lance.LanceDataset, index_min_rows: int) -> bool:
    """Refresh the indexes there are, then make the missing ones (the vector index only once the table is
    large enough for it to pay off); True where the vector index was built again."""
    indexes = {index.name: index for index in dataset.describe_indices()}
    names = set(indexes)
    rows = dataset.count_rows()
    # A night of new weights rewrote the indexed column: Lance leaves the index covering none of it, and its
    # partitions were trained on the old vectors.
    stale = VECTOR_INDEX in indexes and indexes[VECTOR_INDEX].num_rows_indexed == 0 and rows > 0
    if names - {VECTOR_INDEX}:
        dataset.optimize.optimize_indices(index_names=sorted(names - {VECTOR_INDEX}))
    if VECTOR_INDEX in names and not stale:
        # New rows in a delta segment of their own: merging them into the last segment rebuilds it (412 s at
        # 1M rows for 10k new ones, against 2.6 s); MAX_DELTA_SEGMENTS bounds the segments.
        dataset.optimize.optimize_indices(index_names=[VECTOR_INDEX], num_indices_to_merge=0)
    if "id_idx" not in names:
        dataset.create_scalar_index("id", "BTREE", name=ID_INDEX)
    for column, kind in _filter_indexes(dataset, [c for c in _filter_columns(dataset) if f"{c}_idx" not in names]):
        dataset.create_scalar_index(column, kind, name=f"{column}_idx")
    if TEXT_COLUMN in dataset.schema.names and TEXT_INDEX not in names:
        dataset.create_scalar_index(TEXT_COLUMN, "INVERTED", name=TEXT_INDEX)
    segments = _vector_segments(dataset) if VECTOR_INDEX in names else 0
    if (VECTOR_INDEX not in names and rows >= index_min_rows) or stale or segments > 1 + MAX_DELTA_SEGMENTS:
        partitions = max(1, int(math.sqrt(rows)))
        # Lance trains on 256 vectors per partition by default: on 100k rows nearly all of them, in memory.
        sample_rate = max(MIN_SAMPLE_RATE, TRAINING_VECTORS // partitions)
        dataset.create_index("vector", "IVF_HNSW_SQ", name=VECTOR_INDEX, metric="cosine", replace=True,
                             num_partitions=partitions, sample_rate=sample_rate)
        log.info("indexed %d rows: vector (IVF_HNSW_SQ, cosine, %d partitions%s)", rows, partitions,
                 f"; it had {segments} segments" if segments else "")
        return bool(segments)
    return False


def _vector_segments(dataset: lance.LanceDataset) -> int:
    return next(len(index.segments) for index in dataset.describe_indices() if index.name == VECTOR_INDEX)


def _filter_columns(dataset: lance.LanceDataset) -> list[str]:
    """The columns a search may filter on: `label` and the pass-through fields."""
    return [field.name for field in dataset.schema if pa.types.is_string(field.type)
            and field.name not in NOT_FILTERED and not field.name.endswith("_fp")]


def _filter_indexes(dataset: lance.LanceDataset, columns: list[str]) -> list[tuple[str, ScalarIndex]]:
    """(column, index kind) for these columns, judged on one sample of rows; free text gets none."""
    if not columns:
        return []
    rows = dataset.count_rows()
    sample = (dataset.to_table(columns=columns) if rows <= DISTINCT_SAMPLE
              else dataset.sample(DISTINCT_SAMPLE, columns=columns))
    found: list[tuple[str, ScalarIndex]] = []
    for column in columns:
        values = sample[column].drop_null()
        distinct = pc.count_distinct(values).as_py()
        words = pc.list_value_length(pc.utf8_split_whitespace(values)) if len(values) else pa.array([0])
        if distinct > FREE_TEXT_DISTINCT * len(values) and pc.approximate_median(words).as_py() >= FREE_TEXT_WORDS:
            log.info("upkeep: %s looks like free text (%d distinct of %d sampled values): no scalar index", column,
                     distinct, len(values))
            continue
        found.append((column, "BITMAP" if distinct <= BITMAP_MAX_VALUES else "BTREE"))
    return found
