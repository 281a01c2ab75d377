"""One commit per table version on every store, and each run's commit exactly once.

How two runs that read the same version are kept from both committing, on local disk, `s3://` and `gs://`:
- The store creates each version's manifest atomically. Lance writes `_versions/<n>.manifest` with a
  conditional put (S3's `If-None-Match: *`, GCS's `ifGenerationMatch=0`, create-if-absent on a local
  disk), so of two commits of version n+1 exactly one is written.
- Lance would still rebase the loser onto the winner's version when their changes do not overlap (two
  runs that only add rows), and both would land. So a run's commit names every fragment of the version it
  read, changed or not: any commit since then touched one of them, and Lance's conflict check refuses the
  commit instead of rebasing it. A new table, a new schema or an emptied table is a strict Overwrite (no
  retries), which only ever creates the version after the one read.
- The run's id and a nonce made when it was planned ride in the commit itself (its transaction
  properties). A retried bundle, or a commit whose answer was lost after the store wrote it (a 503 on the
  way back), finds its own version and tags it, instead of committing twice or calling a live version failed.

Side tables (`<table>_rejects`) take a run's fragments the same way, once: a retry finds them there by their
data files and adds nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import lance
import pyarrow as pa
from lance.commit import CommitConflictError
from lance.fragment import FragmentMetadata

from transforms.lance_sink import open_dataset

log = logging.getLogger(__name__)
RUN_PROPERTY = "catalog_embed.run"     # the transaction property that names the run that committed a version
RUN_TAG_PREFIX = "run-"                # each run tags its version run-<run id>
SIDE_TABLE_ATTEMPTS = 20               # appends to a side table that other runs' appends may overtake
# What a commit's failure can be: Lance's conflict error, or what it raises for a store that answered with an error.
COMMIT_FAILURES = (CommitConflictError, OSError, RuntimeError, ValueError)


class ConcurrentRunError(RuntimeError):
    """Another run committed to the table after this run read it; this run commits nothing."""


@dataclass(frozen=True)
class TableChange:
    """What one run changes in its table, committed as one version."""

    schema: pa.Schema
    new_fragments: Sequence[str] = ()                       # JSON metadata of the fragments the workers wrote
    removals: Sequence[tuple[int, str | None]] = ()         # stored fragment -> its metadata with a new deletion
                                                            # file, or None when none of its rows stays
    overwrite: bool = False                                 # a new schema: the new fragments are the whole table
    reweigh: bool = False                                   # new weights: every stored fragment's `vector` column
                                                            # is new (removals), and the schema's metadata

    def is_empty(self) -> bool:
        return not (self.overwrite or self.new_fragments or self.removals)


@dataclass(frozen=True)
class RunIdentity:
    """A run's id, and a nonce made when it was planned: tells its commit from another that reused the id."""

    run_id: str
    nonce: str

    @property
    def tag(self) -> str:
        return run_tag(self.run_id)

    def property(self) -> str:
        return json.dumps({"run_id": self.run_id, "nonce": self.nonce}, sort_keys=True)


def run_tag(run_id: str) -> str:
    return f"{RUN_TAG_PREFIX}{run_id}"


def commit_change(uri: str, change: TableChange, run: RunIdentity, read_version: int | None,
                  storage_options: dict[str, str] | None = None) -> int:
    """Commit the run's change as the version after `read_version`, tag it `run-<id>`, and return it; a run
    with nothing to change tags the version it read. Raises ConcurrentRunError when the table moved."""
    dataset = open_dataset(uri, storage_options)
    if dataset is not None:
        tagged = dataset.tags.list().get(run.tag)
        if change.is_empty() and read_version is not None and tagged and tagged["version"] == read_version:
            return read_version                  # a retry of a run that changed nothing: it tagged what it read
        own = own_version(dataset, run, read_version)
        if own is not None:                      # a retry: the commit landed before
            return _tagged(dataset, run, own)
        if dataset.version != read_version:
            raise _moved(uri, read_version, dataset.version)
        if change.is_empty():
            return _tagged(dataset, run, dataset.version)
    elif read_version is not None:
        raise _moved(uri, read_version, None)
    transaction = lance.Transaction(read_version=read_version or 0, operation=_operation(dataset, change),
                                    transaction_properties={RUN_PROPERTY: run.property()})
    try:
        committed = lance.LanceDataset.commit(uri, transaction, max_retries=0, storage_options=storage_options)
    except COMMIT_FAILURES as err:
        now = open_dataset(uri, storage_options)
        own = None if now is None else own_version(now, run, read_version)
        if now is not None and own is not None:
            log.info("the commit of %s landed though its answer did not (%s)", uri, err)
            return _tagged(now, run, own)
        if now is not None and now.version != read_version or isinstance(err, CommitConflictError):
            raise _moved(uri, read_version, None if now is None else now.version) from err
        raise
    log.info("committed %s as version %d", uri, committed.version)
    return _tagged(committed, run, committed.version)


def _operation(dataset: lance.LanceDataset | None, change: TableChange) -> lance.LanceOperation.BaseOperation:
    new = [FragmentMetadata.from_json(raw) for raw in change.new_fragments]
    stored = [] if dataset is None else dataset.get_fragments()
    if change.overwrite or not stored:
        return lance.LanceOperation.Overwrite(change.schema, new)
    removed = {fragment_id for fragment_id, kept in change.removals if kept is None}
    updated = {fragment_id: FragmentMetadata.from_json(kept) for fragment_id, kept in change.removals if kept}
    if change.reweigh:
        # The whole fragment list and the new schema in one Merge, which conflicts with any commit since the read.
        # It must name every fragment read: one whose rows all leave comes with every row deleted (lifecycle.py).
        return lance.LanceOperation.Merge([updated[f.fragment_id] for f in stored] + new, change.schema)
    # Every fragment read is named, changed or not: a commit since then that touched any is a conflict.
    return lance.LanceOperation.Update(
        removed_fragment_ids=sorted(removed), new_fragments=new,
        updated_fragments=[updated.get(f.fragment_id, f.metadata) for f in stored if f.fragment_id not in removed])


def own_version(dataset: lance.LanceDataset, run: RunIdentity, read_version: int | None) -> int | None:
    """The version this run committed after `read_version`, if it did. A tag of its id on a version it did not
    commit means another run used the id: refused, before anything is committed."""
    for version in range((read_version or 0) + 1, dataset.version + 1):
        if _committed_by(dataset, version) == run.property():
            return version
    tagged = dataset.tags.list().get(run.tag)
    if tagged is not None:
        raise ConcurrentRunError(f"run id {run.run_id} already tags version {tagged['version']}, committed by "
                                 "another run; give each run its own --run-id")
    return None


def committed_version(dataset: lance.LanceDataset, run_id: str, read_version: int | None) -> int | None:
    """The version run `run_id` committed after `read_version` (or tagged, when it changed nothing), whatever
    became of the run after: its tag, or else the commit that names it, which is then tagged (the run died
    before it could tag it)."""
    tagged = dataset.tags.list().get(run_tag(run_id))
    if tagged is not None:
        return tagged["version"]
    for version in range((read_version or 0) + 1, dataset.version + 1):
        committed = _committed_by(dataset, version)
        if committed is not None and json.loads(committed)["run_id"] == run_id:
            dataset.tags.create(run_tag(run_id), version)
            return version
    return None


def committed_by_a_run(dataset: lance.LanceDataset, version: int) -> bool:
    return _committed_by(dataset, version) is not None


def _committed_by(dataset: lance.LanceDataset, version: int) -> str | None:
    try:
        transaction = dataset.read_transaction(version)
    except TypeError:    # pylance 14 cannot bring some upkeep transactions (compaction's) into Python: never a run's
        return None
    except (OSError, ValueError):
        if version in {found["version"] for found in dataset.versions()}:
            raise                   # the store failed to answer: a run's commit must not be taken for absent
        return None                 # a version the retention removed since
    return None if transaction is None else (transaction.transaction_properties or {}).get(RUN_PROPERTY)


def _tagged(dataset: lance.LanceDataset, run: RunIdentity, version: int) -> int:
    tags = dataset.tags.list()
    if run.tag not in tags:
        dataset.tags.create(run.tag, version)
    elif tags[run.tag]["version"] != version:
        raise ConcurrentRunError(f"run id {run.run_id} already tags version {tags[run.tag]['version']}, committed "
                                 "by another run; give each run its own --run-id")
    return version


def _moved(uri: str, read_version: int | None, current: int | None) -> ConcurrentRunError:
    return ConcurrentRunError(
        f"table moved: {uri} changed during this run (read at version {read_version}, now {current}): another "
        "run committed first. Nothing was committed; run again to embed against the new version.")


def append_once(uri: str, schema: pa.Schema, fragments: Sequence[str],
                storage_options: dict[str, str] | None = None) -> None:
    """Append the fragments to a side table (creating it), once: when a retry finds their data files there it
    adds nothing, and of two appends from one version the later looks again."""
    new = [FragmentMetadata.from_json(raw) for raw in fragments]
    files = {data.path for fragment in new for data in fragment.files}
    for _ in range(SIDE_TABLE_ATTEMPTS):
        dataset = open_dataset(uri, storage_options)
        if dataset is not None and files & {data.path for f in dataset.get_fragments() for data in f.metadata.files}:
            return
        change = TableChange(schema, fragments, overwrite=dataset is None)
        transaction = lance.Transaction(read_version=0 if dataset is None else dataset.version,
                                        operation=_operation(dataset, change))
        try:
            lance.LanceDataset.commit(uri, transaction, max_retries=0, storage_options=storage_options)
            return
        except COMMIT_FAILURES as err:
            log.info("appending to %s again: %s", uri, str(err).splitlines()[0])
    raise ConcurrentRunError(f"could not append to {uri} in {SIDE_TABLE_ATTEMPTS} attempts: other runs kept "
                             "committing first")
