"""What each item's inputs are, found as cheaply as the last run allows.

An input's digest is sha256 over its exact bytes (the text's UTF-8, the image file's content). An
encoder's fingerprint is sha256 over its encoder id and that digest: equal fingerprints mean equal
vectors, so they drive both the incremental skip (unchanged since the last run) and the in-run
deduplication (the same caption or photo on many items).

Images are checked the way make and rsync check files: `InspectInputs` only stats each image (size
and modification time, or what the object store reports). Where the stat and the path equal the
table's, the stored digest is reused and the file is never opened; only new or changed stats are
read and hashed by `HashImages`, after the compare. `run --rehash` hashes every image: a file
rewritten with the same size and modification time is otherwise taken as unchanged.
"""

from __future__ import annotations

import hashlib

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.images import check_image
from transforms.items import REJECTS, reject_from_exception
from transforms.storage import file_stat, read_bytes

ABSENT = "absent"   # the digest of an input the item does not have: no text, no image reference


def has_input(item: dict, modality: str) -> bool:
    return item["digests"].get(modality) != ABSENT


def content_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(encoder_id: str, digest: str) -> str:
    return hashlib.sha256(f"{encoder_id}\0{digest}".encode()).hexdigest()


def fingerprints(item: dict, inputs: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Each encoder's fingerprint of the item, from its input digests. `inputs` maps encoder name to
    (encoder id, modality). Derived where needed, so that items do not carry them through shuffles."""
    return {name: fingerprint(encoder_id, item["digests"][modality]) for name, (encoder_id, modality) in inputs.items()}


class InspectInputs(beam.DoFn):
    """Digest each item's text and id, and stat its image: no image is opened here.

    `modalities` are those the config's encoders take ("text", "image", "behaviour"). An item without a
    text or an image reference is missing that modality (its digest is `ABSENT`, and it gets no vector
    from those encoders); an item with none of the inputs is a reject. A broken image reference is one too.
    """

    def __init__(self, modalities: frozenset[str]):
        self._modalities = modalities

    def process(self, item: dict):
        digests = item["digests"]
        try:
            if "text" in self._modalities:
                digests["text"] = content_digest(item["text"].encode("utf-8")) if item["text"] else ABSENT
            if "image" in self._modalities:
                if item["image_uri"]:
                    item["image_stat"] = file_stat(item["image_uri"])
                else:
                    digests["image"] = ABSENT
            if "behaviour" in self._modalities:
                digests["behaviour"] = content_digest(item["id"].encode("utf-8"))
            if all(digests.get(m) == ABSENT for m in self._modalities):
                raise ValueError("the item has none of the inputs its encoders take: "
                                 + ", ".join(sorted(self._modalities)))
        except (OSError, ValueError) as err:
            yield beam.pvalue.TaggedOutput(REJECTS, reject_from_exception(item, "load", err))
            return
        yield item


class HashImages(beam.DoFn):
    """Read, check and digest the images whose digest the table could not vouch for."""

    def __init__(self, max_pixels: int):
        self._max_pixels = max_pixels
        self._hashed = Metrics.counter("catalog_embed", "images_hashed")
        self._bytes = Metrics.counter("catalog_embed", "image_bytes_hashed")

    def process(self, item: dict):
        if item["image_stat"] is None or "image" in item["digests"]:
            yield item
            return
        try:
            data = read_bytes(item["image_uri"])
            check_image(data, self._max_pixels)
        except (OSError, ValueError) as err:
            yield beam.pvalue.TaggedOutput(REJECTS, reject_from_exception(item, "load", err))
            return
        item["digests"]["image"] = content_digest(data)
        self._hashed.inc()
        self._bytes.inc(len(data))
        yield item
