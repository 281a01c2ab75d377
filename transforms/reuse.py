"""Fetch the stored vectors that an item written again keeps (a new caption on the same photo keeps
its image vectors), from the table at the version the run started from.

Only items that are written again and keep something are looked up, one query per written batch, by
id (through the `id` index on large tables), right before they are written: stored vectors never
cross a shuffle, and an unchanged item's vectors are never read at all.
"""

from __future__ import annotations

import apache_beam as beam
import lance

from transforms.lance_sink import rows_by_id, vector_matrix


class FetchKeptVectors(beam.DoFn):
    """Batches of items in, the same batches out, with every kept vector filled in."""

    def __init__(self, uri: str, read_version: int | None, storage_options: dict[str, str] | None = None):
        self._uri = uri
        self._read_version = read_version
        self._storage_options = storage_options

    def setup(self):
        # A new table has nothing to keep.
        self._dataset = None if self._read_version is None else lance.dataset(
            self._uri, version=self._read_version, storage_options=self._storage_options)

    def process(self, items: list[dict]):
        keeping = [item for item in items if item["keep"]]
        found = self._kept_vectors(keeping) if keeping else {}
        yield [dict(item, vectors={**item["vectors"], **found[item["id"]]}) if item["id"] in found else item
               for item in items]

    def _kept_vectors(self, items: list[dict]) -> dict[str, dict]:
        """Per item id, the stored vectors it keeps."""
        assert self._dataset is not None, "only items of a stored table have vectors to keep"
        names = sorted({name for item in items for name in item["keep"]})
        found = rows_by_id(self._dataset, [item["id"] for item in items], ["id", *[f"{n}_vec" for n in names]])
        position = {item_id: i for i, item_id in enumerate(found["id"].to_pylist())}
        vectors = {name: vector_matrix(found[f"{name}_vec"]) for name in names}
        stored = {name: found[f"{name}_vec"].is_valid().to_numpy(zero_copy_only=False) for name in names}
        kept = {}
        for item in items:
            if item["id"] not in position:
                raise LookupError(f"item {item['id']!r} is not in version {self._read_version} of {self._uri}")
            row = position[item["id"]]
            # A kept null stays missing: the item still has no input for that encoder.
            kept[item["id"]] = {name: vectors[name][row].copy() for name in item["keep"] if stored[name][row]}
        return kept
