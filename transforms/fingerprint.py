"""Load each item's inputs once and fingerprint them per encoder.

A fingerprint is sha256 over the encoder id and the exact input (the text's UTF-8 bytes, the image
file's bytes). Equal fingerprints mean equal vectors, so they drive both the incremental skip
(unchanged since the last run) and the in-run deduplication (the same caption on many items).
"""

from __future__ import annotations

import hashlib

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.images import check_image
from transforms.items import REJECTS, reject_from_exception


def fingerprint(encoder_id: str, data: bytes) -> str:
    digest = hashlib.sha256(encoder_id.encode("utf-8"))
    digest.update(b"\0")
    digest.update(data)
    return digest.hexdigest()


def read_bytes(uri: str) -> bytes:
    with FileSystems.open(uri) as handle:
        return handle.read()


class LoadInputs(beam.DoFn):
    """Read the image once, check the text, and fingerprint every encoder's input.

    `encoders` maps encoder name to (encoder id, modality), modality being "text" or "image".
    """

    def __init__(self, encoders: dict[str, tuple[str, str]], max_pixels: int):
        self._encoders = encoders
        self._max_pixels = max_pixels
        self._needs_image = any(modality == "image" for _, modality in encoders.values())
        self._needs_text = any(modality == "text" for _, modality in encoders.values())
        self._loaded = Metrics.counter("catalog_embed", "items_loaded")

    def process(self, item: dict):
        try:
            inputs = {"text": self._text_input(item), "image": self._image_input(item)}
        except (OSError, ValueError) as err:
            yield beam.pvalue.TaggedOutput(REJECTS, reject_from_exception(item, "load", err))
            return
        item["image_bytes"] = inputs["image"]
        item["fingerprints"] = {
            name: fingerprint(encoder_id, inputs[modality])
            for name, (encoder_id, modality) in self._encoders.items()
        }
        self._loaded.inc()
        yield item

    def _text_input(self, item: dict) -> bytes | None:
        if not self._needs_text:
            return None
        if not item["text"]:
            raise ValueError("the item has no text in its text fields")
        return item["text"].encode("utf-8")

    def _image_input(self, item: dict) -> bytes | None:
        if not self._needs_image:
            return None
        if not item["image_uri"]:
            raise FileNotFoundError("the item has no image reference")
        data = read_bytes(item["image_uri"])
        check_image(data, self._max_pixels)
        return data
