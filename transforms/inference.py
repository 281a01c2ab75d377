"""One encode stage per modality (text, image), on Beam's RunInference.

Items that need a modality encoded are grouped by the digest of that input, so an input shared by
many items (the same caption, the same photo) is read, decoded and encoded once per run: the group's
first item stands for it, and the vectors are copied to the rest of the group in place, without a
shuffle. A picture is decoded once for all image encoders, and encoders on one network (`cnn` and
`conse` on EfficientNet-Lite0) share its forward pass. Only references cross the grouping: the
image's bytes are read here, by the worker that decodes them.

RunInference gives the rest: models loaded once per worker process and shared by its threads,
batches sized by the handler, and metrics. Models load on the first batch, so a run with nothing to
encode loads none.
"""

from __future__ import annotations

import logging
import threading
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


def needs(item: dict, encoder: Encoder) -> bool:
    """Whether the item has neither kept this encoder's vector from the table nor been given it yet."""
    return encoder.name not in item["keep"] and encoder.name not in item["vectors"]


def load_input(modality: str, item: dict) -> Any:
    """What a modality's encoders take: the item's text, or its picture decoded from the file."""
    if modality == "text":
        return item["text"]
    return decode_image(read_bytes(item["image_uri"]))


class LazyModels:
    """The encoders' models on this worker, each built on its first use (an object, not a dict:
    Beam's model sharing holds it by weak reference)."""

    def __init__(self, encoders: Sequence[Encoder]):
        self._encoders = {e.name: e for e in encoders}
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Any:
        with self._lock:
            if name not in self._models:
                encoder = self._encoders[name]
                log.info("loading encoder %s (%s) on %s", name, encoder.config.kind, encoder.device)
                self._models[name] = encoder.load()
            return self._models[name]


class ModalityModelHandler(ModelHandler[tuple, tuple, LazyModels]):
    """Encodes groups (digest, items) with every encoder of one modality that the group needs.

    Returns (items, vectors by encoder name, reject) per group; the reject is None unless the group's
    input could not be read or decoded.
    """

    def __init__(self, modality: str, encoders: Sequence[Encoder]):
        super().__init__()
        self._modality = modality
        self._encoders = list(encoders)

    def load_model(self) -> LazyModels:
        return LazyModels(self._encoders)

    def run_inference(self, batch: Sequence[tuple], model: LazyModels,
                      inference_args: dict | None = None) -> Iterable[tuple]:
        inputs, groups = [], []
        for _, packed in batch:
            items = [unpack(data) for data in packed]
            if not any(needs(item, e) for item in items for e in self._encoders):
                yield items, {}, None          # items that pass through this stage untouched
                continue
            try:
                inputs.append(load_input(self._modality, items[0]))
                groups.append(items)
            except (OSError, ValueError) as err:
                yield items, {}, reject_from_exception(items[0], "decode", err)
        vectors: list[dict] = [{} for _ in groups]
        memos: dict[tuple, dict] = {}
        for encoder in self._encoders:
            wanted = [i for i, items in enumerate(groups) if any(needs(item, encoder) for item in items)]
            if not wanted:
                continue
            memo = memos.setdefault(tuple(wanted), {})
            encoded = encoder.encode(model.get(encoder.name), [inputs[i] for i in wanted], memo)
            for i, vector in zip(wanted, encoded, strict=True):
                vectors[i][encoder.name] = vector
        for items, found in zip(groups, vectors, strict=True):
            yield items, found, None

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
        items, vectors, reject = result
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
                item["encoded"].extend(vectors)
                for name in vectors:
                    self._counters[name].inc()
            yield item


def _group_key(item: dict, modality: str, encoders: Sequence[Encoder]) -> str:
    """Items that need this modality group by its input's digest. The others ride alone under their id,
    through the same stages: merging two branches after encoding would make local runners hold every
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
        encoded = (
            items
            | "Key by input" >> beam.Map(lambda item: (_group_key(item, modality, encoders), pack(item)))
            | "Group equal inputs" >> beam.GroupByKey()
            | "RunInference" >> RunInference(ModalityModelHandler(modality, encoders))
            | "Share vectors" >> beam.ParDo(ShareVectors(encoders)).with_outputs(REJECTS, main=ITEMS)
        )
        return {ITEMS: encoded[ITEMS], REJECTS: encoded[REJECTS]}
