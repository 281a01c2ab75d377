"""One encode stage per encoder, on Beam's RunInference.

RunInference gives what a batch embedding stage needs: the model loaded once per worker process
and shared by its threads, batching sized by the handler, and metrics. Its examples here are groups
of items that share one fingerprint for the encoder, so an input that appears on many items (the
same caption, the same photo) is encoded once per run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference

from transforms.encoders import Encoder
from transforms.items import ITEMS, REJECTS, make_reject, reject_from_exception

log = logging.getLogger(__name__)


class EncoderModelHandler(ModelHandler[list, list, Any]):
    """Encodes groups of items; returns each group with the vector set, or with a `reject` set."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self._encoder = encoder

    def load_model(self) -> Any:
        log.info("loading encoder %s (%s) on %s", self._encoder.name, self._encoder.config.kind, self._encoder.device)
        return self._encoder.load()

    def run_inference(self, batch: Sequence[list], model: Any, inference_args: dict | None = None) -> Iterable[list]:
        ready, inputs = [], []
        for group in batch:
            try:
                inputs.append(self._encoder.prepare(group[0]))
                ready.append(group)
            except (OSError, ValueError) as err:
                reject = reject_from_exception(group[0], f"encode:{self._encoder.name}", err)
                yield [dict(item, reject=dict(reject, id=item["id"])) for item in group]
        if not ready:
            return
        vectors = self._encoder.encode(model, inputs)
        for group, vector in zip(ready, vectors, strict=True):
            # The first item of a group carries the count of the forward pass; the rest reuse it.
            yield [self._with_vector(item, vector, computed=i == 0) for i, item in enumerate(group)]

    def _with_vector(self, item: dict, vector: np.ndarray, computed: bool) -> dict:
        if not np.all(np.isfinite(vector)):
            return dict(item, reject=make_reject(
                item["id"], f"encode:{self._encoder.name}", "NonFiniteVector",
                "the encoder returned NaN or infinite values", item.get("source")))
        name = self._encoder.name
        encoded = item.get("encoded", []) + ([name] if computed else [])
        return dict(item, vectors=dict(item["vectors"], **{name: vector}), encoded=encoded)

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": 1, "max_batch_size": self._encoder.config.batch_size}

    def get_metrics_namespace(self) -> str:
        return f"catalog_embed_{self._encoder.name}"


class EncodeWith(beam.PTransform):
    """Give every item the encoder's vector; items that already have it pass straight through.

    Outputs tagged `items` and `rejects`.
    """

    def __init__(self, encoder: Encoder):
        super().__init__()
        self._encoder = encoder

    def expand(self, items):
        name = self._encoder.name
        todo, done = items | "Needs encoding" >> beam.Partition(lambda item, _: int(name in item["vectors"]), 2)
        encoded = (
            todo
            | "Key by fingerprint" >> beam.Map(lambda item: (item["fingerprints"][name], item))
            | "Group equal inputs" >> beam.GroupByKey()
            | "Drop keys" >> beam.Map(lambda kv: list(kv[1]))
            | "RunInference" >> RunInference(EncoderModelHandler(self._encoder))
            | "Split rejects" >> beam.ParDo(SplitRejects(name)).with_outputs(REJECTS, main=ITEMS)
        )
        merged = (encoded[ITEMS], done) | "Merge unchanged" >> beam.Flatten()
        return {ITEMS: merged, REJECTS: encoded[REJECTS]}


class SplitRejects(beam.DoFn):
    def __init__(self, encoder_name: str):
        self._encoded = Metrics.counter("catalog_embed", f"encoded_{encoder_name}")
        self._unique = Metrics.counter("catalog_embed", f"encoded_unique_{encoder_name}")

    def process(self, group: list):
        self._unique.inc()
        for item in group:
            if "reject" in item:
                yield beam.pvalue.TaggedOutput(REJECTS, item["reject"])
            else:
                self._encoded.inc()
                yield item
