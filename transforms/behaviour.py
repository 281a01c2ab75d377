"""Behaviour vectors: item2vec over the catalog's interaction log (`catalog.interactions`).

    read the log -> check each row (a malformed one is a reject) -> group by session -> order each
    session -> the sessions as files in the run's scratch folder -> train once, on one worker and every core
    of it, streaming the sessions from those files -> rotate the vectors onto the stored ones -> the vectors
    as a Lance dataset in the scratch folder -> each written batch looks its items up there by id

Items meet their vectors the way kept vectors do (reuse.py): looked up by id right before they are
written, so no vector crosses a shuffle or a side input. Training runs only when some item needs a
behaviour vector: a new item, new settings, or a new generation.

Generations: a log grows every night, and training it again moves every vector a little. Rewriting every
row for that would make every night a full rewrite, so the stored vectors stay for `retrain_days` (a
generation, named in the encoder id and each run's record); within it a grown log trains the vectors of the
items that need one, rotated onto the stored vectors (orthogonal Procrustes over the items both have), so
that a new item's cosines to the stored items mean what a full training's would. A new generation
re-embeds the whole column from the whole log (docs/behaviour.md, "Nightly").

The trainer reads the sessions as files, not as a side input: a runner need not hold or stream a log's worth
of side input to one worker. They are spilled to its local disk and replayed in the order of their ids, and
each session's events in the order of their `ts` (then item id), so that with `threads: 1` the same log trains
the same vectors whichever worker read which part of it; by default word2vec trains on every core of the
worker, whose threads race by design (the vectors then differ run to run by training noise, which the rotation
onto the stored vectors keeps out of the stored rows). A log without `ts` has sessions as sets, ordered by
item id.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import date, datetime
from typing import BinaryIO

import apache_beam as beam
import lance
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from transforms.config import INTERACTION_COLUMNS
from transforms.encoders.base import Encoder, l2_normalise
from transforms.encoders.item2vec import Item2VecEncoder
from transforms.inference import needs
from transforms.items import ITEMS, REJECTS, make_reject
from transforms.lance_sink import rows_by_id, vector_matrix
from transforms.readers import read_table_file

log = logging.getLogger(__name__)
STAGE = "interactions"          # the stage of the log's rejects in `<table>_rejects`
SPILL_BUCKETS = 64              # the sessions are sorted a bucket at a time: 1/64 of them in memory
# The most frequent trained items whose stored vectors the rotation is fitted on: a dim x dim fit needs far
# fewer, and frequent items' vectors move least between trainings.
ALIGN_ANCHORS = 10_000
# Anchors per dimension below which a rotation would fit the training's noise: a table with fewer rows is trained
# again whole every run (`generation`), and a training with fewer stored vectors says so.
ANCHORS_PER_DIM = 4


def generation(runs: Sequence[dict], encoder: Item2VecEncoder, run_id: str, today: date, rows: int) -> str:
    """The generation of `encoder`'s vectors this run writes: the last run's while it is younger than the
    encoder's `retrain_days`, else a new one, named by today's date, so that two tables first built on one day
    have the same fingerprints. Every run is a generation of its own (named by it too) with `retrain_days: 0`,
    and where the table holds rows, but too few to turn new vectors onto (ANCHORS_PER_DIM a dimension): a small
    table is trained again whole, which costs little."""
    last = next((run["interactions"].get("generations", {}).get(encoder.name) for run in reversed(runs)
                 if run["status"] != "failed" and run["interactions"].get("generations", {}).get(encoder.name)), None)
    if not encoder.retrain_days or 0 < rows < ANCHORS_PER_DIM * encoder.dim:
        return f"{today.isoformat()}/{run_id}"
    if last and (today - date.fromisoformat(last.split("/")[0])).days < encoder.retrain_days:
        return last
    return today.isoformat()


def with_generations(encoders: Sequence[Encoder], runs: Sequence[dict], run_id: str, today: date,
                     rows: int) -> tuple[Encoder, ...]:
    """The job's encoders, each item2vec one set to the generation this run writes (`rows`: the table's)."""
    return tuple(Item2VecEncoder(replace(e.config, options={**e.config.options,
                                                            "generation": generation(runs, e, run_id, today, rows)}))
                 if isinstance(e, Item2VecEncoder) else e for e in encoders)


def rotated_onto(ids: Sequence[str], vectors: np.ndarray, stored: dict[str, np.ndarray]) -> np.ndarray:
    """`vectors` turned by the rotation that best carries the items that `stored` (id -> unit vector) also
    has onto their stored vectors (orthogonal Procrustes: the SVD of the cross-covariance); as they are where
    fewer items than dimensions are shared (no rotation is determined)."""
    shared = [row for row, item in enumerate(ids) if item in stored]
    if len(shared) < vectors.shape[1]:
        return vectors
    target = np.stack([stored[ids[row]] for row in shared])
    u, _, vt = np.linalg.svd(vectors[shared].T @ target)
    return l2_normalise(vectors @ (u @ vt))


def event_time(value) -> float | None:
    """A `ts` as seconds: a number, an ISO 8601 string or a Parquet timestamp; None where there is none."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day).timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        return datetime.fromisoformat(str(value)).timestamp()


class CheckInteraction(beam.DoFn):
    """A log row to (session id, (ts, item id)); a row without both ids or with an unreadable `ts` is a reject."""

    def process(self, row: dict):
        session, item = (str(row.get(name) or "").strip() for name in INTERACTION_COLUMNS)
        source = f"{row.get('_source')}: session {session!r}, item {item!r}"
        if not session or not item:
            missing = " and ".join(n for n, v in zip(INTERACTION_COLUMNS, (session, item), strict=True) if not v)
            yield beam.pvalue.TaggedOutput(REJECTS, make_reject(item or None, STAGE, "MalformedRow",
                                                                f"the row has no {missing}", source))
            return
        try:
            ts = event_time(row.get("ts"))
        except (TypeError, ValueError, OverflowError):
            yield beam.pvalue.TaggedOutput(REJECTS, make_reject(item, STAGE, "BadTimestamp",
                                                                f"ts {row.get('ts')!r} is not a time", source))
            return
        yield session, (ts, item)


def ordered_session(events: Sequence[tuple[float | None, str]]) -> list[str]:
    """A session's items in time order (then by id), repeats in a row counted once."""
    items: list[str] = []
    for _, item in sorted(events, key=lambda event: (event[0] is None, event[0] or 0.0, event[1])):
        if not items or items[-1] != item:
            items.append(item)
    return items


class ReadSessions(beam.PTransform):
    """The log's sessions that pair items, as (session id, [item ids]); tagged `rejects` and `rows` (the
    count of rows read, for the run's record). With `only_if`, the log is read only when its one value
    is truthy (some item needs a behaviour vector): a run that trains nothing reads nothing."""

    def __init__(self, path: str, only_if=None):
        super().__init__()
        self._path = path
        self._only_if = only_if

    def expand(self, pbegin):
        rows, parse_rejects = read_table_file(pbegin, self._path, STAGE, only_if=self._only_if)
        checked = rows | "Check interactions" >> beam.ParDo(CheckInteraction()).with_outputs(REJECTS, main=ITEMS)
        sessions = (
            checked[ITEMS]
            | "Group sessions" >> beam.GroupByKey()
            | "Order sessions" >> beam.MapTuple(lambda session, events: (session, ordered_session(list(events))))
            # A session with one item pairs it with nothing: it would only train noise.
            | "Sessions that pair items" >> beam.Filter(lambda session: len(set(session[1])) > 1)
        )
        rejects = (
            (parse_rejects | "As interaction rejects" >> beam.Map(lambda reject: dict(reject, stage=STAGE)),
             checked[REJECTS])
            | "Interaction rejects" >> beam.Flatten()
        )
        read = (
            (rows, parse_rejects)
            | "Interaction rows" >> beam.Flatten()
            | "Count interaction rows" >> beam.combiners.Count.Globally()
        )
        return {ITEMS: sessions, REJECTS: rejects, "rows": read}


class WriteSessionFiles(beam.DoFn):
    """Sessions to JSON-lines files of [session id, item ids] in `folder`, a file per bundle that has any (an
    object store takes no empty multipart upload), streamed as they come; emits each file's path. A retried
    bundle writes a file of its own, and only the paths of bundles that succeeded reach the trainer."""

    def __init__(self, folder: str):
        self._folder = folder
        self._path: str | None = None
        self._handle: BinaryIO | None = None

    def process(self, session: tuple[str, list[str]]):
        if self._handle is None:
            self._path = FileSystems.join(self._folder, f"sessions-{uuid.uuid4().hex}.jsonl")
            self._handle = FileSystems.create(self._path)
        self._handle.write((json.dumps(list(session)) + "\n").encode())

    def finish_bundle(self):
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            yield GlobalWindows.windowed_value(self._path)     # this batch pipeline's sessions: the global window


def read_sessions(files: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """(session id, item ids) from session files, on any filesystem Beam reads."""
    for path in files:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            for line in handle:
                session, items = json.loads(line)
                yield session, items


class SpilledSessions:
    """The sessions on local disk in the order of their ids, to replay once per training pass: a
    re-iterable corpus that holds one bucket of sessions in memory while it is written."""

    def __init__(self, sessions, folder: str):
        self.count = 0
        buckets = [open(os.path.join(folder, f"bucket-{b}.jsonl"), "w", encoding="utf-8")  # noqa: SIM115
                   for b in range(SPILL_BUCKETS)]
        for session, items in sessions:
            buckets[zlib.crc32(session.encode()) % SPILL_BUCKETS].write(json.dumps([session, items]) + "\n")
            self.count += 1
        for handle in buckets:
            handle.close()
        self._path = os.path.join(folder, "sessions.jsonl")
        with open(self._path, "w", encoding="utf-8") as out:
            for handle in buckets:
                with open(handle.name, encoding="utf-8") as bucket:
                    for _, items in sorted(json.loads(line) for line in bucket):
                        out.write(json.dumps(items) + "\n")
                os.remove(handle.name)

    def __iter__(self) -> Iterator[list[str]]:
        with open(self._path, encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)


class TrainItem2Vec(beam.DoFn):
    """Once per run, on one worker: train each item2vec encoder on the sessions (read from the files that the
    pipeline wrote them to, JSON lines of [session id, item ids]), rotate its vectors onto those the table holds
    (`table`: its uri and the version the run read, None for a new table), and write them to
    `<scratch>/<encoder>.lance`. Emits, per encoder, where they are (None when no item needed them, and nothing
    was trained) and the counts for the run's record."""

    def __init__(self, encoders: Sequence[Item2VecEncoder], scratch: str, storage_options: dict[str, str] | None,
                 table: tuple[str, int] | None = None):
        self._encoders = list(encoders)
        self._scratch = scratch
        self._storage_options = storage_options
        self._table = table

    def process(self, _trigger, files: list[str], needed: int):
        if not needed:
            for encoder in self._encoders:
                yield {"encoder": encoder.name, "uri": None, "sessions": 0, "items": 0, "needed": 0,
                       "generation": encoder.generation}
            return
        with tempfile.TemporaryDirectory(prefix="item2vec-") as folder:
            corpus = SpilledSessions(read_sessions(files), folder)
            for encoder in self._encoders:
                stored = self._stored_column(encoder)
                threads = encoder.threads(turned=stored is not None)
                log.info("training %s (item2vec %s) on %d sessions, for %d items, %d threads", encoder.name,
                         encoder.settings, corpus.count, needed, threads)
                ids, vectors = encoder.train(corpus, threads)
                if not ids:
                    log.warning("%s: no item of the interaction log pairs with another; no behaviour vectors",
                                encoder.name)
                if stored is not None:
                    vectors = self._turned(encoder, ids, vectors, stored)
                yield {"encoder": encoder.name, "uri": self._write(encoder, ids, vectors) if ids else None,
                       "sessions": corpus.count, "items": len(ids), "needed": needed, "generation": encoder.generation}

    def _stored_column(self, encoder: Encoder) -> lance.LanceDataset | None:
        """The table at the version the run read, where it has this encoder's column at its dimension."""
        if self._table is None:
            return None
        dataset = lance.dataset(self._table[0], version=self._table[1], storage_options=self._storage_options)
        column = f"{encoder.name}_vec"
        if column not in dataset.schema.names or dataset.schema.field(column).type.list_size != encoder.dim:
            return None
        return dataset

    def _turned(self, encoder: Encoder, ids: list[str], vectors: np.ndarray, dataset: lance.LanceDataset):
        """The new vectors turned onto the stored vectors of the most frequent items (ALIGN_ANCHORS), with how
        well they fit in the log."""
        column = f"{encoder.name}_vec"
        found = rows_by_id(dataset, ids[:ALIGN_ANCHORS], ["id", column])
        valid = found[column].is_valid().to_numpy(zero_copy_only=False)
        matrix = vector_matrix(found[column])
        stored = {item: matrix[row] for row, item in enumerate(found["id"].to_pylist()) if valid[row]}
        turned = rotated_onto(ids, vectors, stored)
        shared = [row for row, item in enumerate(ids) if item in stored]
        fit = float(np.mean([turned[row] @ stored[ids[row]] for row in shared])) if shared else float("nan")
        (log.info if len(shared) >= ANCHORS_PER_DIM * encoder.dim else log.warning)(
            "%s: new vectors turned onto %d stored ones (mean cosine after: %.3f)", encoder.name, len(shared), fit)
        return turned

    def _write(self, encoder: Encoder, ids: list[str], vectors) -> str:
        # A name of its own per attempt: a retried or duplicate training must not rewrite what batches read.
        uri = f"{self._scratch.rstrip('/')}/{encoder.name}-{uuid.uuid4().hex[:12]}.lance"
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), encoder.dim)
        data = pa.table({"id": pa.array(ids, pa.string()), "vector": column})
        lance.write_dataset(data, uri, mode="overwrite", storage_options=self._storage_options).create_scalar_index(
            "id", "BTREE")
        return uri


class AttachBehaviourVectors(beam.DoFn):
    """Batches of items in, the same batches out, each item that needs a behaviour vector given the one
    trained for it, if the log had it (an item no session paired stays without)."""

    def __init__(self, encoders: Sequence[Encoder], storage_options: dict[str, str] | None):
        self._encoders = list(encoders)
        self._storage_options = storage_options
        self._datasets: dict[str, lance.LanceDataset] = {}

    def process(self, items: list[dict], trained: list[dict]):
        for record in trained:
            encoder = next(e for e in self._encoders if e.name == record["encoder"])
            wanting = [item for item in items if needs(item, encoder)]
            if wanting and record["uri"]:
                found = self._found(encoder.name, self._dataset(record["uri"]), wanting)
                items = [dict(item, vectors={**item["vectors"], encoder.name: found[item["id"]]},
                              encoded=[*item["encoded"], encoder.name]) if item["id"] in found else item
                         for item in items]
        yield items

    def _dataset(self, uri: str) -> lance.LanceDataset:
        if uri not in self._datasets:
            self._datasets[uri] = lance.dataset(uri, storage_options=self._storage_options)
        return self._datasets[uri]

    @staticmethod
    def _found(name: str, dataset: lance.LanceDataset, items: list[dict]) -> dict:
        """The trained vectors of these items, by id (an item no session paired has none)."""
        found = rows_by_id(dataset, [item["id"] for item in items], ["id", "vector"])
        vectors = vector_matrix(found["vector"])
        return {item_id: vectors[row].copy() for row, item_id in enumerate(found["id"].to_pylist())}


def behaviour_vectors(pipeline: beam.Pipeline, path: str, encoders: Sequence[Encoder], items, scratch: str,
                      storage_options: dict[str, str] | None = None, table: tuple[str, int] | None = None):
    """The training step's records (a side input for the write batches and the commit), the log's
    rejects and the count of its rows. The vectors go to the scratch folder with the table's Lance settings;
    `table`: the table's uri and the version the run read, whose vectors the new ones are rotated onto."""
    behaviour = [e for e in encoders if isinstance(e, Item2VecEncoder)]
    needed = (
        items
        | "Items needing behaviour" >> beam.Filter(lambda item: any(needs(item, e) for e in behaviour))
        | "Count them" >> beam.combiners.Count.Globally()
    )
    sessions = pipeline | "Read interactions" >> ReadSessions(path, only_if=needed)
    files = (
        sessions[ITEMS]
        | "Write sessions" >> beam.ParDo(WriteSessionFiles(FileSystems.join(scratch, "sessions")))
        | "Session files" >> beam.combiners.ToList()
    )
    trained = (
        pipeline
        | "Train once" >> beam.Create([None])
        | "Train item2vec" >> beam.ParDo(TrainItem2Vec(behaviour, scratch, storage_options, table),
                                         files=beam.pvalue.AsSingleton(files), needed=beam.pvalue.AsSingleton(needed))
    )
    return trained, sessions[REJECTS], sessions["rows"]
