"""Zero-shot labels: an image's probabilities over label names, through a multimodal encoder.

Each label is embedded by the encoder's text side through prompt templates (their mean, as CLIP's
authors do), and an image's cosines to the labels, times the model's temperature, are soft-maxed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipelines.errors import QueryError
from pipelines.search.query import Table, load_query_image
from transforms.encoders.base import Encoder, l2_normalise

DEFAULT_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.", "an image of {}.")


def label_name(label: str) -> str:
    """The words for a label: Food-101's `apple_pie` is "apple pie"."""
    return " ".join(label.replace("_", " ").split())


def multimodal_encoder(table: Table, name: str | None = None) -> Encoder:
    """The table's encoder that puts images and text in one space (`conse`, `open-clip`)."""
    found = {e.name: e for e in table.encoders() if e.text_to_image}
    if not found:
        raise QueryError("the table has no encoder that puts images and text in one space (kind conse or open-clip)")
    if name is None and len(found) > 1:
        raise QueryError(f"the table has several multimodal encoders ({', '.join(found)}); choose one with --encoder")
    if name is not None and name not in found:
        raise QueryError(f"--encoder '{name}' is not a multimodal encoder of the table; use one of: {', '.join(found)}")
    return found[name or next(iter(found))]


def label_vectors(encoder: Encoder, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    prompts = [template.format(label_name(label)) for label in labels for template in templates]
    vectors = encoder.text_queries(prompts).reshape(len(labels), len(templates), -1)
    return l2_normalise(vectors.mean(axis=1))


def label_probabilities(image_vectors: np.ndarray, labels: np.ndarray, scale: float) -> np.ndarray:
    """(n images, n labels) probabilities: softmax over labels of scale * cosine."""
    logits = scale * (image_vectors @ labels.T)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def classify(table: Table, paths: Sequence[str], labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
             encoder_name: str | None = None) -> list[dict]:
    """Each image's label probabilities, most likely first."""
    labels = list(dict.fromkeys(label.strip() for label in labels if label.strip()))
    if len(labels) < 2:
        raise QueryError("--labels needs at least two different labels, e.g. \"cat,dog\"")
    encoder = multimodal_encoder(table, encoder_name)
    vectors = encoder.image_queries([load_query_image(path, encoder.decode_side) for path in paths])
    probabilities = label_probabilities(vectors, label_vectors(encoder, labels, templates), encoder.logit_scale())
    results = []
    for path, row in zip(paths, probabilities, strict=True):
        ranked = sorted(zip(labels, row.tolist(), strict=True), key=lambda pair: -pair[1])
        results.append({"image": path, "label": ranked[0][0], "probabilities": dict(ranked)})
    return results
