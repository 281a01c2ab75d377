"""The item that flows through the pipeline, and the reject that replaces it when a stage fails.

An item is a plain dict of references and small values, so that it is cheap to shuffle on every
runner. It never carries image bytes or stored vectors:

    id, label, text, image_uri, fields   what the catalog row says
    image_stat                           the image file's size and modification time, or a URL's validators
    image_copy                           where this run keeps the bytes of a URL's image it fetched (fingerprint.py)
    digests {modality: hex}              sha256 of the text bytes and of the image file's bytes (the image's
                                         once it is read: fingerprint.unhashed)
    stored                               the table's summary of the same id, if any (compare.py)
    staged                               the row a run that died wrote for it, if any (staging.py)
    replaces                             the fragment of the table's row for the same id, if any (compare.py)
    rewrite                              whether its row is written whatever its vectors (new, changed, overwrite)
    keep [encoder]                       encoders whose stored vector is still right (fetched before writing)
    recheck (digest, [encoder])          a changed stat's picture, hashed where it is decoded: the encoders it
                                         keeps should its bytes be those of the stored digest (fingerprint.py)
    deferred [encoder]                   encoders the run's budget leaves for a later run (budget.py)
    vectors {encoder: ndarray}           filled by the encode stages and the fetch of kept vectors
    encoded [encoder]                    encoders whose forward pass this item paid for (for the counts)
    encode_seconds {encoder: s}          its share of the encode stage's time, where it paid (for the rates)

A reject is a dict with the columns of the `<table>_rejects` table.

Items and stored summaries cross each grouping packed into bytes by Beam's own coder (`pack`): a
runner encodes them there anyway, and local runners keep grouped values as objects, at about four
times the size of their bytes.
"""

from __future__ import annotations

import json
import math
import posixpath
from typing import Any

from apache_beam.coders import FastPrimitivesCoder

from transforms.config import CatalogConfig, column_name

REJECTS = "rejects"
ITEMS = "items"
HELD = "held"          # (id, packed reject) of a row that failed before the compare: its stored row is kept
_CODER = FastPrimitivesCoder()


def pack(value: dict) -> bytes:
    return _CODER.encode(value)


def unpack(data: bytes) -> dict:
    return _CODER.decode(data)


def make_reject(item_id: Any, stage: str, error: str, message: str, input_ref: str | None,
                kept: bool = False) -> dict:
    """A reject; `kept`: the table keeps the row it holds for this id (transforms/lifecycle.py)."""
    return {
        "id": None if item_id is None else str(item_id),
        "stage": stage,
        "error": error,
        "message": message[:1000],
        "input_ref": input_ref,
        "kept": kept,
    }


class InputError(OSError):
    """An input that could not be had; `error` names why in the rejects table (`HTTP404`, `Timeout`, `TooLarge`)."""

    def __init__(self, error: str, message: str):
        super().__init__(message)
        self.error = error


def reject_from_exception(item: dict, stage: str, err: BaseException) -> dict:
    error = err.error if isinstance(err, InputError) else type(err).__name__
    return make_reject(item.get("id"), stage, error, str(err), item.get("source"))


def has_stored_row(item: dict) -> bool:
    """Whether the table holds a row for the item's id (known once the compare has joined them)."""
    return item["replaces"] is not None


def failed(item: dict, stage: str, err: BaseException) -> dict:
    """The reject of an item that failed at `stage` after the compare: the table keeps its stored row, if any
    (transforms/lifecycle.py)."""
    return dict(reject_from_exception(item, stage, err), kept=has_stored_row(item))


def failed_like(item: dict, reject: dict) -> dict:
    """Another item's reject (the picture they share failed), as this item's."""
    return dict(reject, id=item["id"], input_ref=item.get("source"), kept=has_stored_row(item))


def make_item(row: dict, catalog: CatalogConfig, passthrough: tuple[str, ...], base_dir: str) -> dict:
    """Turn a reader's uniform row (id, image, label and the catalog's own fields) into an item. Fields may
    be paths into structs and lists (`field_value`): the text is every text field's pieces in order (a list
    field's elements are pieces of their own), joined by ". "; a pass-through list is stored as its elements
    joined by ", ", a struct as its JSON."""
    if isinstance(row["id"], list | tuple | dict):
        raise ValueError(f"the id field holds a {type(row['id']).__name__}, not one value")
    image = _clean(row.get("image"))
    return {
        "id": str(row["id"]).strip(),
        "label": _clean(row.get("label")),
        "text": ". ".join(piece for name in catalog.text_fields for piece in _pieces(field_value(row, name))),
        "image_uri": resolve_image_uri(image, base_dir) if image else None,
        "fields": {column_name(name): _stored(field_value(row, name)) for name in passthrough},
        "source": row.get("_source"),
        "image_stat": None,
        "image_copy": None,
        "digests": {},
        "stored": None,
        "staged": None,
        "replaces": None,
        "rewrite": False,
        "keep": [],
        "recheck": None,
        "deferred": [],
        "vectors": {},
        "encoded": [],
        "encode_seconds": {},
    }


class UnsafePath(ValueError):
    """A relative image path that points outside the catalog folder."""


def resolve_image_uri(image: str, base_dir: str) -> str:
    """Absolute paths and URIs stay as they are; relative ones resolve under the catalog folder and
    may not leave it (`../../etc/passwd`)."""
    if "://" in image or image.startswith("/"):
        return image
    # An object store's scheme and bucket (`s3://bucket/...`) stay as they are: normpath would fold their `//`.
    scheme, separator, folder = base_dir.partition("://")
    folder = "/" + (folder if separator else base_dir).strip("/")
    resolved = posixpath.normpath(posixpath.join(folder, image))
    if not resolved.startswith(folder.rstrip("/") + "/"):
        raise UnsafePath(f"the image path {image!r} leaves the catalog folder")
    return f"{scheme}:/{resolved}" if separator else resolved


def field_value(row: dict, name: str) -> Any:
    """The row's value of a field: a column of that name, else a path into its structs (`attributes.color`).
    Through a list, the path takes each element's value, in order (`variants.size`)."""
    if name in row or "." not in name:
        return row.get(name)
    value: Any = row
    for key in name.split("."):
        value = _step(value, key)
    return value


def first_value(value: Any) -> Any:
    """A single value for a field that must have one (an image: a gallery's first picture)."""
    while isinstance(value, list | tuple):
        value = next((element for element in value if _clean(element) is not None), None)
    return value


def _step(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return value.get(key)
    if isinstance(value, list | tuple):
        return [_step(element, key) for element in value]
    return None


def _pieces(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [piece for element in value for piece in _pieces(element)]
    text = _clean(value)
    return [text] if text else []


def _stored(value: Any) -> str | None:
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    if isinstance(value, list | tuple):
        return ", ".join(_pieces(value)) or None
    return _clean(value)


def _clean(value: Any) -> str | None:
    """Catalog values are stored as strings; missing values (None, NaN, '') become None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None
