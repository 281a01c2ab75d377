"""Upkeep that scales: each filter field is judged on a sample, once, when its index is made; free text gets no
scalar index; a field that already has one is not read again."""

from __future__ import annotations

import random

import lance
import pyarrow as pa

from transforms.config import OutputConfig
from transforms.maintain import DISTINCT_SAMPLE, maintain

ROWS = DISTINCT_SAMPLE + 10_000
WORDS = ["red", "cotton", "shirt", "slim", "fit", "linen", "blue", "dress", "wool", "coat", "summer", "sale"]


def shop_table(path: str) -> str:
    rng = random.Random(1)
    table = pa.table({
        "id": [f"item-{n}" for n in range(ROWS)],
        "sku": [f"SKU{n:07d}" for n in range(ROWS)],                                   # unique, one word
        "colour": [rng.choice(["red", "blue", "green", "black"]) for _ in range(ROWS)],  # four values
        "brand": [f"brand {n % 3000}" for n in range(ROWS)],                           # 3,000 values, two words
        "description": [" ".join(rng.choices(WORDS, k=8)) + f" no. {n}" for n in range(ROWS)],   # free text
    })
    lance.write_dataset(table, path)
    return path


def test_filter_fields_get_the_index_their_values_call_for_and_free_text_none(tmp_path):
    uri = shop_table(str(tmp_path / "shop.lance"))
    problems, _ = maintain(uri, OutputConfig(uri=str(tmp_path), table="shop", index_min_rows=10 * ROWS))
    assert problems == []
    kinds = {index.name: index.index_type for index in lance.dataset(uri).describe_indices()}
    assert kinds == {"id_idx": "BTree", "sku_idx": "BTree", "colour_idx": "Bitmap", "brand_idx": "BTree"}


def test_a_field_with_an_index_is_not_read_again(tmp_path, monkeypatch):
    uri = shop_table(str(tmp_path / "shop.lance"))
    output = OutputConfig(uri=str(tmp_path), table="shop", index_min_rows=10 * ROWS)
    maintain(uri, output)
    sampled: list[list[str]] = []
    original = lance.LanceDataset.sample

    def spy(self, num_rows, columns=None, **kwargs):
        sampled.append(list(columns or []))
        return original(self, num_rows, columns=columns, **kwargs)

    monkeypatch.setattr(lance.LanceDataset, "sample", spy)
    maintain(uri, output)
    assert sampled == [["description"]]         # free text has no index: judged again on a sample, and only it
