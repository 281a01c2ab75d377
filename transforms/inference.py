"""One encode stage per modality (image, then text), on Beam's RunInference.

Inputs shared by many items (the same photo, the same caption) are encoded once:
- Images are grouped by their input (fingerprint.input_key): the digest of their bytes, or for a picture
  whose stat changed, its file and stat. A shared picture is read, decoded and encoded once per run, on one
  worker: the group's first item stands for it, and the vectors are copied to the rest of the group in
  place. Only references cross the grouping: the image's bytes are read here, by the worker that decodes
  them, and a changed file is hashed here too, so a first run reads each picture once. Its digest decides
  what it needs: vectors the worker encoded last for the same bytes (a copy under another path), or, for
  bytes that did not change, the stored ones (`recheck`). A group is never a list: its items are unpacked
  one at a time as it is iterated (`Unpacked`), so a placeholder picture shared by millions of items streams through the
  worker as Dataflow pages the group's values from the shuffle. A picture is decoded once per size its
  encoders need (a JPEG straight at a reduced scale), and encoders on one network (`cnn` and `conse` on
  EfficientNet-Lite0) share its preparation and forward pass.
- Texts are not grouped: the text rides in the item already, and a text grouping after the image
  stage would carry every item's image vectors through a shuffle (before it, the image grouping would
  carry the text vectors). A worker encodes each distinct text of a batch once and remembers the
  vectors of the texts it saw last (`RECENT_INPUTS`), so a caption shared by a whole class (Food-101)
  is encoded about once per worker.

The network never waits for the CPU work: RunInference hands the handler large batches, which it cuts
into sub-batches of the encoders' `batch_size` (with `auto`, the fastest size measured on the worker's
device when the model loads, once per network and machine: the measure is kept in the derived cache).
Sub-batches are read, decoded and prepared (resized, tokenised) on other threads while the network embeds
the one before; PIL, tokenisers and torch release the GIL.

RunInference gives the rest: models loaded once per worker process and shared by its threads (or, with
an encoder's `large_model`/`model_copies`, served once per machine to its processes), and metrics.
Models load on the first batch, so a run with nothing to encode loads none (one whose changed pictures all
turn out to have their stored bytes still loads the image models, which size its sub-batches).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference

from transforms.derived import cached_value
from transforms.encoders.base import Encoder
from transforms.fingerprint import content_digest, has_input, input_key, unhashed, with_image_digest
from transforms.images import check_image
from transforms.items import ITEMS, REJECTS, failed, failed_like, pack, unpack
from transforms.storage import ImageReader

log = logging.getLogger(__name__)

ENCODE_ORDER = ("image", "text")         # the grouped stage first, so that its grouping carries no vectors
GROUPED_MODALITIES = frozenset({"image"})
RECENT_INPUTS = {"text": 50_000,         # per worker: about 75 MB of MiniLM vectors
                 "image": 10_000}        # about 70 MB of EfficientNet-Lite0, ConSE and color vectors
RUN_INFERENCE_BATCH = 512                # items per RunInference call; the network runs sub-batches of it
# What `batch_size: auto` tries, by modality and device. Each try holds that batch's activations: on a CPU,
# CNN batches over 16 were never the fastest (docs/benchmarks.md) and trying 32 costs 200 MB more.
AUTO_BATCH_SIZES = {"image": {"cpu": (4, 8, 16), "cuda": (32, 64, 128, 256, 512)},
                    "text": {"cpu": (16, 32, 64, 128), "cuda": (64, 128, 256, 512, 1024)}}
UNTIMED_BATCH_SIZE = 32                  # the sub-batch of encoders with no network to time (color)


class NonFiniteVector(ValueError):
    """An encoder returned NaN or infinite values for an input."""


def needs(item: dict, encoder: Encoder) -> bool:
    """Whether the item has this encoder's input, and has neither kept its vector from the table nor been
    given it yet, nor been left for a later run by the budget (budget.py)."""
    return (has_input(item, encoder.modality) and encoder.name not in item["keep"]
            and encoder.name not in item["vectors"] and encoder.name not in item["deferred"])


def read_input(modality: str, item: dict, reader: ImageReader) -> Any:
    """What a modality's encoders decode their inputs from: the item's text, or its picture's bytes (from this
    run's copy of a URL's image where it fetched one)."""
    if modality == "text":
        return item["text"]
    return reader.read(item["image_copy"] or item["image_uri"])


def prepared_ahead(pool: ThreadPoolExecutor, prepare: Callable[[list], Any], chunks: list[list],
                   ahead: int) -> Iterator:
    """prepare(chunk) for each chunk, in order, with up to `ahead` chunks prepared on the pool in advance:
    the caller runs the network on one chunk while the next ones are read, decoded and prepared."""
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.submit(prepare, chunk))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def remembered_batch_size(encoder: Encoder, model: Any) -> int | None:
    """`fastest_batch_size`, measured the first time this network runs at this precision on this kind of
    machine and kept in the derived cache: a nightly run with a few changed items would spend more time
    timing batch sizes than encoding."""
    key = json.dumps({"forward": repr(encoder.forward_key), "device": encoder.device,
                      "machine": _machine(encoder.device)})
    measured = []

    def measure() -> int | None:
        measured.append(encoder.name)
        return fastest_batch_size(encoder, model)

    best = cached_value("batch-size", key, measure)
    if not measured and best is not None:
        log.info("encoder %s: batch_size auto -> %s on %s (measured before on this machine)", encoder.name, best,
                 encoder.device)
    return best


def _machine(device: str) -> str:
    """What a measured batch size holds for: the accelerator's name, or the CPU's architecture and threads."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.get_num_threads()} threads"


def fastest_batch_size(encoder: Encoder, model: Any) -> int | None:
    """The batch size at which the encoder's forward pass embeds the most inputs per second here, timed
    on sample inputs (the best of two passes after a warm-up at each size); None where it makes no
    difference."""
    candidates = AUTO_BATCH_SIZES[encoder.modality][encoder.device_type]
    inputs = encoder.sample_inputs(max(candidates))
    if inputs is None:
        return None
    rates = {}
    for size in candidates:
        prepared = encoder.prepare(model, inputs[:size])
        encoder.embed(model, prepared)          # the first pass at a shape builds its kernels
        seconds = []
        for _ in range(2):
            started = time.perf_counter()
            encoder.embed(model, prepared)
            seconds.append(time.perf_counter() - started)
        rates[size] = size / min(seconds)
    best = max(rates, key=lambda size: rates[size])
    log.info("encoder %s: batch_size auto -> %d on %s (inputs/s by batch size: %s)", encoder.name, best,
             encoder.device, ", ".join(f"{size}: {rate:.0f}" for size, rate in rates.items()))
    return best


class RecentVectors:
    """The vectors of the inputs a worker encoded last, by input digest: a bounded LRU."""

    def __init__(self, entries: int):
        self._entries = entries
        self._vectors: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def recall(self, key: str, wanted: set[str]) -> dict[str, np.ndarray] | None:
        with self._lock:
            found = self._vectors.get(key)
            if found is None or not wanted <= found.keys():
                return None
            self._vectors.move_to_end(key)
            return {name: found[name] for name in wanted}

    def remember(self, key: str, vectors: dict[str, np.ndarray]) -> None:
        if not self._entries:
            return
        with self._lock:
            self._vectors[key] = {**self._vectors.get(key, {}), **vectors}
            self._vectors.move_to_end(key)
            while len(self._vectors) > self._entries:
                self._vectors.popitem(last=False)


class LazyModels:
    """The encoders' models on a worker, each built on its first use, and their batch sizes.

    With `large_model` or `model_copies`, Beam serves this object from a process of its own and the
    stage calls it through a proxy: the stage only calls its methods, with arguments and results that
    pickle (prepared batches in, vectors out), and keeps its threads and recent vectors itself.
    """

    def __init__(self, encoders: Sequence[Encoder]):
        self._encoders = {e.name: e for e in encoders}
        self._models: dict[str, Any] = {}
        self._batch_sizes: dict[tuple, int | None] = {}
        self._lock = threading.Lock()

    def _model(self, name: str) -> Any:
        with self._lock:
            if name not in self._models:
                encoder = self._encoders[name]
                started = time.perf_counter()
                self._models[name] = encoder.load()
                log.info("loaded encoder %s (%s) on %s in %.1fs", name, encoder.config.kind, encoder.device,
                         time.perf_counter() - started)
            return self._models[name]

    def prepare(self, name: str, inputs: list) -> Any:
        """Prepare with the encoder's model at hand (a tokeniser); encoders that need none prepare in the stage."""
        return self._encoders[name].prepare(self._model(name), inputs)

    def embed(self, jobs: list[tuple[str, tuple, Any]]) -> list[np.ndarray]:
        """Vectors for (encoder name, positions, prepared batch) jobs of one sub-batch; encoders on one
        network share its forward pass over the same positions."""
        memos: dict[tuple, dict] = {}
        return [self._encoders[name].embed(self._model(name), prepared, memos.setdefault(chosen, {}))
                for name, chosen, prepared in jobs]

    def batch_size(self, names: Iterable[str]) -> int:
        """The sub-batch the stage runs these encoders at: the smallest of their sizes, `auto` ones measured
        once per network on this worker."""
        sizes = []
        for name in names:
            encoder = self._encoders[name]
            if isinstance(encoder.config.batch_size, int):
                sizes.append(encoder.config.batch_size)
                continue
            model = self._model(name)
            with self._lock:
                if encoder.forward_key not in self._batch_sizes:
                    self._batch_sizes[encoder.forward_key] = remembered_batch_size(encoder, model)
                size = self._batch_sizes[encoder.forward_key]
                if size:
                    sizes.append(size)
        return min(sizes, default=UNTIMED_BATCH_SIZE)


class StageThreads:
    """A worker process's part of a stage, beside the model wherever that is served: the threads that
    prepare sub-batches ahead and the vectors encoded last."""

    def __init__(self, encoders: Sequence[Encoder], remembered: int):
        on_gpu = any(e.device_type == "cuda" for e in encoders)
        # On a CPU the network needs the cores: one thread prepares ahead. On a GPU, all but one do.
        self.threads = max(1, (os.cpu_count() or 2) - 1) if on_gpu else 1
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="prepare")
        self.recent = RecentVectors(remembered)


# A process's StageThreads by stage: Beam deserialises a copy of the handler for each DoFn instance
# (one per harness thread), and they all share one pool and one memory of recent vectors, as they share
# the model. A stage's entry goes when its last handler copy does.
_STAGES: weakref.WeakValueDictionary[str, StageThreads] = weakref.WeakValueDictionary()
_STAGES_LOCK = threading.Lock()


class Wanted:
    """The encoders a group's items need, learnt in one streaming pass on the bundle's thread (Beam pages a large
    group's values through state that only that thread may read): those the items need whatever their picture's
    bytes, and per stored digest of a picture still to be hashed (`recheck`), those they need unless the bytes
    are that digest's. Past RECHECKS stored digests in one group, an item's encoders count as needed whatever
    the bytes: it keeps its stored vectors all the same (fingerprint.with_image_digest), at the cost of a pass."""

    RECHECKS = 8

    def __init__(self, encoders: Sequence[Encoder]):
        self._encoders = encoders
        self.always: set[str] = set()
        self.unless: dict[str, set[str]] = {}

    def add(self, items: Iterable[dict]) -> None:
        for item in items:
            needed = {e.name for e in self._encoders if needs(item, e)}
            recheck = item["recheck"]
            kept = needed & set(recheck[1]) if recheck else set()
            if kept and (recheck[0] in self.unless or len(self.unless) < self.RECHECKS):
                self.unless.setdefault(recheck[0], set()).update(kept)
                needed -= kept
            self.always |= needed
            if len(self.always) == len(self._encoders):
                return                      # every encoder is needed: the rest of the group cannot add one

    def names(self, digest: str | None = None) -> set[str]:
        """The encoders needed once the picture's digest is known (or before: every one that may be)."""
        return self.always.union(*(names for stored, names in self.unless.items() if stored != digest))


@dataclass
class Input:
    """One input of a RunInference batch (a text, a digest's picture, or a picture file still to be hashed):
    the item that stands for it, the encoders its items need, and what encoding it gave."""

    first: dict
    wanted: Wanted
    names: set[str] = field(default_factory=set)
    hashed_here: bool = False
    digest: str | None = None                   # of a picture hashed here
    size: int = 0                               # its bytes
    vectors: dict | None = None                 # by encoder name, once known
    encoded: bool = False                       # whether its vectors are from a forward pass of this batch
    error: tuple[str, Exception] | None = None  # (stage, error) where it could not be read or decoded
    follows: str | None = None                  # the input of the batch with the same bytes that it copies


class Leaders:
    """The pictures hashed in one batch, by digest: a copy under another path follows the first, whose
    sub-batch may still be on another thread, instead of being decoded and encoded again."""

    def __init__(self):
        self._first: dict[str, tuple[str, set[str]]] = {}
        self._lock = threading.Lock()

    def follow(self, digest: str, key: str, names: set[str]) -> str | None:
        """The key of the input this one copies, or None if it leads (or needs encoders the leader does not)."""
        with self._lock:
            leader, led = self._first.setdefault(digest, (key, names))
        return leader if leader != key and names <= led else None


NOTHING = Input({}, Wanted(()))     # what a group that needs nothing of the stage gets


class ModalityModelHandler(ModelHandler[tuple, tuple, LazyModels]):
    """Encodes groups (input digest, items) with every encoder of one modality that they need.

    Returns (items, vectors by encoder name, the encoders run for them, reject, seconds, digest) per group;
    the reject is None unless the group's input could not be read or decoded, the digest None unless its
    picture was hashed here. Groups of a batch with the same input are encoded once, and not at all when
    the worker remembers the vectors of its digest.
    """

    def __init__(self, modality: str, encoders: Sequence[Encoder], remembered: int, reader: ImageReader):
        super().__init__()
        self._modality = modality
        self._encoders = list(encoders)
        self._remembered = remembered
        self._reader = reader
        self._stage_key = uuid.uuid4().hex             # the same in every copy of this stage's handler
        self._stage: StageThreads | None = None
        self._hashed = Metrics.counter("catalog_embed", "images_hashed")
        self._hashed_bytes = Metrics.counter("catalog_embed", "image_bytes_hashed")

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _stage=None)      # threads stay in the process that made them

    def load_model(self) -> LazyModels:
        return LazyModels(self._encoders)

    def share_model_across_processes(self) -> bool:
        return any(e.config.large_model or e.config.model_copies > 1 for e in self._encoders)

    def model_copies(self) -> int:
        return max(e.config.model_copies for e in self._encoders)

    def _threads(self) -> StageThreads:
        with _STAGES_LOCK:
            if self._stage is None:
                self._stage = _STAGES.get(self._stage_key) or StageThreads(self._encoders, self._remembered)
                _STAGES[self._stage_key] = self._stage
            return self._stage

    def run_inference(self, batch: Sequence[tuple], model: LazyModels,
                      inference_args: dict | None = None) -> Iterable[tuple]:
        groups = list(batch)
        inputs: dict[str, Input] = {}
        for key, items in groups:
            first = next(iter(items))
            found = inputs.setdefault(key, Input(first, Wanted(self._encoders)))
            found.wanted.add(items)
            found.names = found.wanted.names()
            # A picture still to be hashed is read even where nothing is to be encoded (the budget deferred it):
            # its bytes say whether its row keeps its stored vectors, or is a reject.
            found.hashed_here = self._modality == "image" and unhashed(first)
        inputs = {key: found for key, found in inputs.items() if found.names or found.hashed_here}
        stage = self._threads()
        for key, found in inputs.items():
            if not found.hashed_here:
                found.vectors = stage.recent.recall(key, found.names)
        started = time.perf_counter()
        encoded = self._encode(model, stage, {key: found for key, found in inputs.items() if found.vectors is None})
        share = (time.perf_counter() - started) / max(encoded, 1)    # each encoded input's part of the time
        for found in inputs.values():
            if found.digest is not None:            # counted here: Beam's metrics count on the bundle's thread
                self._hashed.inc()
                self._hashed_bytes.inc(found.size)
            if found.follows is not None:
                leader = inputs[found.follows]
                found.error, given = leader.error, leader.vectors or {}
                found.vectors = None if leader.error else {name: given[name] for name in found.names}
        paid: set[str] = set()
        for key, items in groups:
            found = inputs.get(key, NOTHING)
            if found.error is not None:
                yield items, {}, [], failed(found.first, *found.error), 0.0, None
                continue
            vectors = found.vectors or {}
            ran = [] if key in paid or not found.encoded else list(vectors)
            paid.add(key)
            yield items, vectors, ran, None, share if ran else 0.0, found.digest

    def _encode(self, model: LazyModels, stage: StageThreads, inputs: dict[str, Input]) -> int:
        """Encode each input once, in sub-batches whose inputs are read, hashed, decoded and prepared on the
        stage's threads while the network runs; fills in each input's vectors (or error, or digest) and returns
        how many were encoded."""
        keys = list(inputs)
        if not keys:
            return 0
        if self._modality == "text":   # similar lengths in a sub-batch pad less (as SentenceTransformer.encode)
            keys.sort(key=lambda key: -len(inputs[key].first["text"]))
        size = model.batch_size(sorted(set().union(*(found.names for found in inputs.values()))))
        chunks = [keys[start:start + size] for start in range(0, len(keys), size)]
        encoded, leaders = 0, Leaders()
        for done, jobs in prepared_ahead(stage.pool, lambda chunk: self._prepare(model, stage, chunk, inputs, leaders),
                                         chunks, stage.threads + 1):
            found: dict[str, dict] = {key: {} for key in done}
            for (name, chosen, _), embedded in zip(jobs, model.embed(jobs), strict=True):
                for k, vector in zip(chosen, embedded, strict=True):
                    found[done[k]][name] = vector
            for key, vectors in found.items():
                inputs[key].vectors, inputs[key].encoded = vectors, True
                stage.recent.remember(inputs[key].digest or key, vectors)
            encoded += len(done)
        return encoded

    def _prepare(self, model: LazyModels, stage: StageThreads, chunk: list[str], inputs: dict[str, Input],
                 leaders: Leaders) -> tuple[list[str], list[tuple]]:
        """Read and decode a sub-batch's inputs, once per decoding, and prepare them once per preparation:
        the inputs to encode, and (encoder name, their positions, prepared batch) for each encoder. A picture
        read for the first time is hashed and checked first; it is not decoded at all where the worker
        remembers its vectors, its items keep the stored ones, or it copies another input of the batch (`leaders`).
        Inputs that fail get their error."""
        decoded: dict[str, dict] = {}
        for key in chunk:
            found = inputs[key]
            try:
                source = read_input(self._modality, found.first, self._reader)
                if found.hashed_here and not self._hash(key, found, source, stage, leaders):
                    continue
            except (OSError, ValueError) as err:
                found.error = ("load", err)
                continue
            try:
                decoded[key] = {}
                for encoder in self._encoders:
                    if encoder.name in found.names and encoder.decode_side not in decoded[key]:
                        decoded[key][encoder.decode_side] = encoder.decode(source)
            except (OSError, ValueError) as err:
                found.error = ("decode", err)
                del decoded[key]
        done = list(decoded)
        jobs, prepared = [], {}
        for encoder in self._encoders:
            chosen = tuple(k for k, key in enumerate(done) if encoder.name in inputs[key].names)
            if chosen:
                shared = (encoder.decode_side, encoder.prepare_key, chosen)
                if shared not in prepared:
                    pictures = [decoded[done[k]][encoder.decode_side] for k in chosen]
                    prepared[shared] = (model.prepare(encoder.name, pictures) if encoder.prepares_with_model
                                        else encoder.prepare(None, pictures))
                jobs.append((encoder.name, chosen, prepared[shared]))
        return done, jobs

    def _hash(self, key: str, found: Input, data: bytes, stage: StageThreads, leaders: Leaders) -> bool:
        """Check and digest a picture read for the first time, and settle what its items need once its bytes
        are known: whether it must still be decoded and encoded."""
        check_image(data, self._reader.max_pixels)
        found.digest, found.size = content_digest(data), len(data)
        found.names = found.wanted.names(found.digest)
        found.vectors = stage.recent.recall(found.digest, found.names) if found.names else {}
        if found.vectors is None:
            found.follows = leaders.follow(found.digest, key, found.names)
        return found.vectors is None and found.follows is None

    def get_num_bytes(self, batch: Sequence[tuple]) -> int:
        """The batch's size for RunInference's metrics, in groups: Beam's default pickles the whole batch (every
        item of every group) to weigh it."""
        return len(batch)

    def batch_elements_kwargs(self) -> dict[str, Any]:
        # Fixed, large batches: the sub-batches that the network runs at are cut inside (`_encode`), where
        # the next ones are prepared while it runs. Beam's adaptive sizing would keep batches small here.
        return {"min_batch_size": RUN_INFERENCE_BATCH, "max_batch_size": RUN_INFERENCE_BATCH}

    def get_metrics_namespace(self) -> str:
        return f"catalog_embed_{self._modality}"


class ShareVectors(beam.DoFn):
    """Give each item of a group the vectors it needs; the group's first item carries the count of the
    forward passes made for the group, and their share of the stage's time."""

    def __init__(self, encoders: Sequence[Encoder]):
        self._encoders = list(encoders)
        self._counters = {e.name: Metrics.counter("catalog_embed", f"encoded_{e.name}") for e in encoders}

    def process(self, result: tuple):
        items, vectors, ran, reject, seconds, digest = result
        for position, item in enumerate(items):
            if reject is not None:
                yield beam.pvalue.TaggedOutput(REJECTS, failed_like(item, reject))
                continue
            if digest is not None:
                item = with_image_digest(item, digest)
            wanted = [e.name for e in self._encoders if needs(item, e)]
            broken = [name for name in wanted if not np.all(np.isfinite(vectors[name]))]
            if broken:
                yield beam.pvalue.TaggedOutput(REJECTS, failed(item, f"encode:{broken[0]}", NonFiniteVector(
                    "the encoder returned NaN or infinite values")))
                continue
            paid = ran if position == 0 else []
            for name in paid:
                self._counters[name].inc()
            yield dict(item, vectors={**item["vectors"], **{name: vectors[name] for name in wanted}},
                       encoded=[*item["encoded"], *paid],
                       encode_seconds={**item["encode_seconds"], **{name: seconds for name in paid}})


class Unpacked:
    """A group's packed items, unpacked one at a time each time it is iterated: never a list of them."""

    def __init__(self, packed: Iterable[bytes]):
        self._packed = packed

    def __iter__(self) -> Iterator[dict]:
        return (unpack(data) for data in self._packed)


def _input_key(item: dict, modality: str, encoders: Sequence[Encoder]) -> str:
    """Items that need this modality, or whose picture is still to be hashed, are keyed by their input. The
    others ride alone under their id, through the same stages: merging two branches after encoding would make
    local runners hold every new vector at once."""
    if any(needs(item, e) for e in encoders) or (modality == "image" and unhashed(item)):
        return input_key(item, modality)
    return f"id:{item['id']}"


class EncodeModality(beam.PTransform):
    """Give every item the vectors of one modality's encoders that it needs.

    Outputs tagged `items` and `rejects`.
    """

    def __init__(self, modality: str, encoders: Sequence[Encoder], reader: ImageReader):
        super().__init__()
        self._modality = modality
        self._encoders = [e for e in encoders if e.modality == modality]
        self._reader = reader

    def expand(self, items):
        encoders, modality = self._encoders, self._modality
        keyed = items | "Key by input" >> beam.Map(lambda item: (_input_key(item, modality, encoders), item))
        if modality in GROUPED_MODALITIES:
            groups = (
                keyed
                | "Pack" >> beam.MapTuple(lambda key, item: (key, pack(item)))
                | "Group equal inputs" >> beam.GroupByKey()
                | "Unpack" >> beam.MapTuple(lambda key, packed: (key, Unpacked(packed)))
            )
        else:
            groups = keyed | "One-item groups" >> beam.MapTuple(lambda key, item: (key, [item]))
        handler = ModalityModelHandler(modality, encoders, RECENT_INPUTS[modality], self._reader)
        encoded = (
            groups
            | "RunInference" >> RunInference(handler)
            | "Share vectors" >> beam.ParDo(ShareVectors(encoders)).with_outputs(REJECTS, main=ITEMS)
        )
        return {ITEMS: encoded[ITEMS], REJECTS: encoded[REJECTS]}
