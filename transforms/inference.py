"""One encode stage per modality (image, then text), on Beam's RunInference.

Inputs shared by many items (the same photo, the same caption) are encoded once:
- Images are grouped by the digest of their bytes, so a shared picture is read, decoded and encoded
  once per run, on one worker: the group's first item stands for it, and the vectors are copied to
  the rest of the group in place. Only references cross the grouping: the image's bytes are read here,
  by the worker that decodes them. A picture is decoded once for all image encoders, and encoders on
  one network (`cnn` and `conse` on EfficientNet-Lite0) share its forward pass.
- Texts are not grouped: the text rides in the item already, and a text grouping after the image
  stage would carry every item's image vectors through a shuffle (before it, the image grouping would
  carry the text vectors). A worker encodes each distinct text of a batch once and remembers the
  vectors of the texts it saw last (`RECENT_TEXTS`), so a caption shared by a whole class (Food-101)
  is encoded about once per worker.

RunInference gives the rest: models loaded once per worker process and shared by its threads,
batches sized by the handler, and metrics. Models load on the first batch, so a run with nothing to
encode loads none.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference

from transforms.encoders import Encoder
from transforms.fingerprint import read_bytes
from transforms.images import decode_image
from transforms.items import ITEMS, REJECTS, make_reject, pack, reject_from_exception, unpack

log = logging.getLogger(__name__)

ENCODE_ORDER = ("image", "text")         # the grouped stage first, so that its grouping carries no vectors
GROUPED_MODALITIES = frozenset({"image"})
RECENT_TEXTS = 50_000                    # per worker: about 75 MB of MiniLM vectors


def needs(item: dict, encoder: Encoder) -> bool:
    """Whether the item has neither kept this encoder's vector from the table nor been given it yet."""
    return encoder.name not in item["keep"] and encoder.name not in item["vectors"]


def load_input(modality: str, item: dict) -> Any:
    """What a modality's encoders take: the item's text, or its picture decoded from the file."""
    if modality == "text":
        return item["text"]
    return decode_image(read_bytes(item["image_uri"]))


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
    """The encoders' models on this worker, each built on its first use, and the vectors it
    encoded last (an object, not a dict: Beam's model sharing holds it by weak reference)."""

    def __init__(self, encoders: Sequence[Encoder], remembered: int):
        self._encoders = {e.name: e for e in encoders}
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.recent = RecentVectors(remembered)

    def get(self, name: str) -> Any:
        with self._lock:
            if name not in self._models:
                encoder = self._encoders[name]
                log.info("loading encoder %s (%s) on %s", name, encoder.config.kind, encoder.device)
                self._models[name] = encoder.load()
            return self._models[name]


class ModalityModelHandler(ModelHandler[tuple, tuple, LazyModels]):
    """Encodes groups (input digest, items) with every encoder of one modality that they need.

    Returns (items, vectors by encoder name, the encoders run for them, reject) per group; the reject
    is None unless the group's input could not be read or decoded. Groups of a batch with the same
    digest are encoded once, and not at all when the worker remembers the digest's vectors.
    """

    def __init__(self, modality: str, encoders: Sequence[Encoder], remembered: int):
        super().__init__()
        self._modality = modality
        self._encoders = list(encoders)
        self._remembered = remembered

    def load_model(self) -> LazyModels:
        return LazyModels(self._encoders, self._remembered)

    def run_inference(self, batch: Sequence[tuple], model: LazyModels,
                      inference_args: dict | None = None) -> Iterable[tuple]:
        groups = list(batch)
        wanted: dict[str, set[str]] = {}      # digest -> the encoders that some item of the batch needs
        for key, items in groups:
            names = {e.name for e in self._encoders if any(needs(item, e) for item in items)}
            if names:
                wanted.setdefault(key, set()).update(names)
        recalled = {key: model.recent.recall(key, names) for key, names in wanted.items()}
        vectors, errors = self._encode(model, groups, {k: n for k, n in wanted.items() if recalled[k] is None})
        paid: set[str] = set()
        for key, items in groups:
            if key in errors:
                yield items, {}, [], reject_from_exception(items[0], "decode", errors[key])
            elif key in vectors:
                yield items, vectors[key], [] if key in paid else list(vectors[key]), None
                paid.add(key)
            else:
                yield items, recalled.get(key) or {}, [], None

    def _encode(self, model: LazyModels, groups: list[tuple], missing: dict[str, set[str]]) -> tuple[dict, dict]:
        """Read, decode and encode each missing input once: vectors by digest, and the errors of the
        inputs that could not be loaded."""
        firsts: dict[str, dict] = {}
        for key, items in groups:
            if key in missing:
                firsts.setdefault(key, items[0])
        keys, inputs, errors = [], [], {}
        for key, item in firsts.items():
            try:
                inputs.append(load_input(self._modality, item))
                keys.append(key)
            except (OSError, ValueError) as err:
                errors[key] = err
        vectors: dict[str, dict] = {key: {} for key in keys}
        shared_passes: dict[tuple, dict] = {}
        for encoder in self._encoders:
            chosen = [k for k, key in enumerate(keys) if encoder.name in missing[key]]
            if not chosen:
                continue
            passes = shared_passes.setdefault(tuple(chosen), {})
            for k, vector in zip(chosen, encoder.encode(model.get(encoder.name), [inputs[k] for k in chosen], passes),
                                 strict=True):
                vectors[keys[k]][encoder.name] = vector
        for key in keys:
            model.recent.remember(key, vectors[key])
        return vectors, errors

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": 1, "max_batch_size": min(e.config.batch_size for e in self._encoders)}

    def get_metrics_namespace(self) -> str:
        return f"catalog_embed_{self._modality}"


class ShareVectors(beam.DoFn):
    """Give each item of a group the vectors it needs; the group's first item carries the count of the
    forward passes made for the group."""

    def __init__(self, encoders: Sequence[Encoder]):
        self._encoders = list(encoders)
        self._counters = {e.name: Metrics.counter("catalog_embed", f"encoded_{e.name}") for e in encoders}

    def process(self, result: tuple):
        items, vectors, ran, reject = result
        for position, item in enumerate(items):
            if reject is not None:
                yield beam.pvalue.TaggedOutput(REJECTS, dict(reject, id=item["id"], input_ref=item.get("source")))
                continue
            wanted = [e.name for e in self._encoders if needs(item, e)]
            broken = [name for name in wanted if not np.all(np.isfinite(vectors[name]))]
            if broken:
                yield beam.pvalue.TaggedOutput(REJECTS, make_reject(
                    item["id"], f"encode:{broken[0]}", "NonFiniteVector",
                    "the encoder returned NaN or infinite values", item.get("source")))
                continue
            item["vectors"].update((name, vectors[name]) for name in wanted)
            if position == 0:
                item["encoded"].extend(ran)
                for name in ran:
                    self._counters[name].inc()
            yield item


def _input_key(item: dict, modality: str, encoders: Sequence[Encoder]) -> str:
    """Items that need this modality are keyed by its input's digest. The others ride alone under their
    id, through the same stages: merging two branches after encoding would make local runners hold every
    new vector at once."""
    if any(needs(item, e) for e in encoders):
        return item["digests"][modality]
    return f"id:{item['id']}"


class EncodeModality(beam.PTransform):
    """Give every item the vectors of one modality's encoders that it needs.

    Outputs tagged `items` and `rejects`.
    """

    def __init__(self, modality: str, encoders: Sequence[Encoder]):
        super().__init__()
        self._modality = modality
        self._encoders = [e for e in encoders if e.modality == modality]

    def expand(self, items):
        encoders, modality = self._encoders, self._modality
        keyed = items | "Key by input" >> beam.Map(lambda item: (_input_key(item, modality, encoders), item))
        if modality in GROUPED_MODALITIES:
            groups = (
                keyed
                | "Pack" >> beam.MapTuple(lambda key, item: (key, pack(item)))
                | "Group equal inputs" >> beam.GroupByKey()
                | "Unpack" >> beam.MapTuple(lambda key, packed: (key, [unpack(data) for data in packed]))
            )
            remembered = 0
        else:
            groups = keyed | "One-item groups" >> beam.MapTuple(lambda key, item: (key, [item]))
            remembered = RECENT_TEXTS
        encoded = (
            groups
            | "RunInference" >> RunInference(ModalityModelHandler(modality, encoders, remembered))
            | "Share vectors" >> beam.ParDo(ShareVectors(encoders)).with_outputs(REJECTS, main=ITEMS)
        )
        return {ITEMS: encoded[ITEMS], REJECTS: encoded[REJECTS]}
