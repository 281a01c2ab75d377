"""Similarity search over a table the job wrote.

The table's metadata names its encoders, so a query encodes its text or image with exactly the
models that embedded the items. Scores are dot products of unit vectors: cosine similarity for a
per-encoder column, and the weighted sum of per-encoder cosines for the combined `vector`.
"""

from __future__ import annotations

from dataclasses import dataclass

import lancedb
import numpy as np

from pipelines.config import EncoderConfig, RunConfig
from transforms.encoders import Encoder, build_encoder
from transforms.fingerprint import read_bytes
from transforms.images import check_image
from transforms.lance_sink import table_metadata

HIDDEN_COLUMNS = ("vector", "_distance", "run_id", "embedded_at")


class QueryError(ValueError):
    """A query that cannot be answered, said in one line."""


@dataclass
class Table:
    """An opened table with the encoders described in its metadata."""

    handle: lancedb.table.Table
    meta: dict

    @property
    def encoders(self) -> list[dict]:
        return self.meta["encoders"]

    def encoder(self, modality: str) -> tuple[dict, Encoder]:
        for described in self.encoders:
            encoder = _rebuild(described)
            if encoder.modality == modality and described["kind"] != "color":
                return described, encoder
        raise QueryError(f"the table has no {modality} encoder")


def open_table(uri: str, name: str, version: int | str | None = None) -> Table:
    """Open a table, at its latest version or at a version number or tag (time travel)."""
    db = lancedb.connect(uri)
    if name not in db.table_names():
        raise QueryError(f"no table '{name}' under {uri}")
    handle = db.open_table(name)
    if version is not None:
        try:
            handle.checkout(version)
        except (ValueError, RuntimeError, OSError) as err:
            raise QueryError(f"table '{name}' has no version or tag {version!r}") from err
    meta = table_metadata(handle.schema)
    if not meta:
        raise QueryError(f"table '{name}' was not written by catalog-embed (no encoder metadata)")
    return Table(handle, meta)


def search(table: Table, vector: np.ndarray, column: str, k: int) -> list[dict]:
    rows = (
        table.handle.search(np.asarray(vector, dtype=np.float32), vector_column_name=column)
        .distance_type("dot")
        .limit(k)
        .to_arrow()
        .to_pylist()
    )
    return [_result(row) for row in rows]


def like(table: Table, item_id: str, k: int) -> list[dict]:
    """Items most similar to a stored item by the combined vector; the item itself comes first."""
    escaped = item_id.replace("'", "''")
    found = table.handle.search().where(f"id = '{escaped}'").select(["vector"]).limit(1).to_list()
    if not found:
        raise QueryError(f"no item with id '{item_id}'")
    return search(table, np.asarray(found[0]["vector"]), "vector", k)


def by_text(table: Table, text: str, k: int) -> list[dict]:
    described, encoder = table.encoder("text")
    vector = encoder.encode(encoder.load(), [text])[0]
    return search(table, vector, f"{described['name']}_vec", k)


def by_image(table: Table, path: str, k: int) -> list[dict]:
    described, encoder = table.encoder("image")
    data = read_bytes(path)
    check_image(data, RunConfig().max_pixels)
    image = encoder.prepare({"image_bytes": data})
    vector = encoder.encode(encoder.load(), [image])[0]
    return search(table, vector, f"{described['name']}_vec", k)


def _rebuild(described: dict) -> Encoder:
    cfg = described["config"]
    return build_encoder(EncoderConfig(
        name=described["name"], kind=cfg["kind"], model=cfg["model"], weights_file=cfg["weights_file"],
        pretrained=cfg["pretrained"], device="auto", options=cfg["options"]))


def _result(row: dict) -> dict:
    # LanceDB's dot distance is 1 - dot; give users a score where higher is more similar.
    out = {"id": row["id"], "score": round(1.0 - float(row["_distance"]), 6)}
    out.update({k: v for k, v in row.items() if k not in HIDDEN_COLUMNS and k != "id"
                and not k.endswith("_vec") and not k.endswith("_fp")})
    return out
