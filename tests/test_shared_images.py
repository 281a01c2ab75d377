"""A picture shared by many items (a "no image available" placeholder) is encoded once, and its group of items
streams through the image stage: no list of them is ever built on the worker."""

from __future__ import annotations

import csv
import threading
import tracemalloc

import pytest

from tests.conftest import copy_photo, make_config, read_table, run
from transforms.config import CatalogConfig, EncoderConfig
from transforms.encoders import build_encoder
from transforms.fingerprint import content_digest, input_key
from transforms.inference import ModalityModelHandler, ShareVectors, Unpacked
from transforms.items import make_item, pack, unpack
from transforms.storage import ImageReader

SHARING = 40_000


class BundleThreadOnly:
    """A group's values as Dataflow pages them from the shuffle: readable on the bundle's thread alone (Beam's
    state requests carry that thread's instruction id; the stage's decode threads have none)."""

    def __init__(self, values):
        self._values = values
        self._thread = threading.get_ident()

    def __iter__(self):
        assert threading.get_ident() == self._thread, "a group's values were read off the bundle's thread"
        return iter(self._values)


def test_a_placeholder_shared_by_many_items_is_encoded_once(tmp_path):
    placeholder = copy_photo("coffee.png", tmp_path / "catalog" / "images" / "no-image.png")
    own = copy_photo("chelsea.png", tmp_path / "catalog" / "images" / "cat.png")
    with (tmp_path / "catalog" / "catalog.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "caption", "image"])
        writer.writerows([f"item-{n}", f"item {n}", f"images/{placeholder.name}"] for n in range(300))
        writer.writerow(["cat", "a cat", f"images/{own.name}"])
    config = make_config(tmp_path, {"format": "manifest", "path": str(tmp_path / "catalog" / "catalog.csv"),
                                    "text_fields": ["caption"]})
    summary = run(config)
    assert summary["written"] == 301 and summary["encoded"] == {"color": 2}
    vectors = {row["id"]: row["color_vec"] for row in read_table(config).to_pylist()}
    assert all(vectors[f"item-{n}"] == vectors["item-0"] for n in range(300)) and vectors["cat"] != vectors["item-0"]


@pytest.mark.parametrize("night", ["hashed before", "first read", "touched"])
def test_the_image_stage_streams_a_shared_pictures_group(tmp_path, night):
    """The handler and the vectors' sharing iterate a group's packed items, unpacking one at a time: the traced
    peak of a 40,000-item group exceeds a 10-item group's (the picture's decode) by far less than the group's
    items take as a list. So too where the picture is hashed in the stage: on its first read, and once its file
    was touched (every item's stored vector is kept, which the stage learns only by reading all of them)."""
    photo = copy_photo("coffee.png", tmp_path / "no-image.png")
    catalog = CatalogConfig(format="manifest", path=str(tmp_path / "catalog.csv"), text_fields=["caption"])
    item = make_item({"id": "x", "caption": "placeholder", "image": str(photo)}, catalog, ("caption",), str(tmp_path))
    digest = content_digest(photo.read_bytes())
    item["digests"] = {"image": digest, "text": "t"} if night == "hashed before" else {"text": "t"}
    item["image_stat"] = "1:2.0"
    item["recheck"] = (digest, ["color"]) if night == "touched" else None
    key = input_key(item, "image")
    packed = [pack(dict(item, id=f"item-{n}", source=f"catalog.csv:{n}")) for n in range(SHARING)]
    encoder = build_encoder(EncoderConfig(name="color", kind="color"))
    handler = ModalityModelHandler("image", [encoder], 0, ImageReader())
    model = handler.load_model()
    share = ShareVectors([encoder])

    def traced_peak(group: list[bytes]) -> tuple[int, set]:
        """The group encoded and shared, its outputs consumed as they come: the traced peak, and what each got."""
        tracemalloc.start()
        given = {(out["digests"]["image"], out["vectors"]["color"].tobytes() if out["vectors"] else tuple(out["keep"]))
                 for result in handler.run_inference([(key, BundleThreadOnly(Unpacked(group)))], model)
                 for out in share.process(result)}
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak, given

    small, _ = traced_peak(packed[:10])
    large, given = traced_peak(packed)
    tracemalloc.start()
    as_list = [unpack(data) for data in packed]
    listed = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(as_list) == SHARING and len(given) == 1          # every item got the one picture's vector
    [(given_digest, vector_or_kept)] = given
    assert given_digest == digest and (vector_or_kept == ("color",)) == (night == "touched")
    assert large - small < 0.1 * listed, (large, small, listed)
