"""The open-clip encoder, run for real on a tiny random-initialised CLIP saved as a local checkpoint."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch

from demo.tiny_clip import TINY_CLIP
from pipelines.search.query import open_table, search, text_queries
from pipelines.search.zero_shot import classify
from tests.conftest import copy_photo, make_config, open_photo, photo, read_table, run
from transforms.config import ConfigError, EncoderConfig
from transforms.encoders import build_encoder

CAPTIONS = {"chelsea.png": "a ginger cat", "coffee.png": "a cup of coffee", "rocket.jpg": "a rocket on its pad",
            "astronaut.png": "an astronaut", "motorcycle_left.png": "a red motorcycle", "flower.jpg": "a flower"}


def decode_side(tiny_clip) -> int:
    """The side the encoder decodes JPEGs to at least: the reference decodes them the same way."""
    return build_encoder(EncoderConfig(name="clip", kind="open-clip", model=tiny_clip[0])).decode_side


@pytest.fixture(scope="module")
def clip_table(tiny_clip, tmp_path_factory):
    """Six photos with captions, embedded by both towers in a 2-worker run (the local stand-in for a cluster)."""
    model, *_ = tiny_clip
    root = tmp_path_factory.mktemp("clip-catalog")
    lines = ["id,caption,image"] + [f"{n.split('.')[0]},{caption},images/{n}" for n, caption in CAPTIONS.items()]
    for name in CAPTIONS:
        copy_photo(name, root / "images" / name)
    (root / "catalog.csv").write_text("\n".join(lines) + "\n")
    encoders = {"clip": {"kind": "open-clip", "model": model, "batch_size": 4, "weight": 0.7},
                "clip_text": {"kind": "open-clip", "model": model, "input": "text", "batch_size": 4, "weight": 0.3}}
    config = make_config(root, {"format": "manifest", "path": str(root / "catalog.csv"), "text_fields": ["caption"]},
                         encoders)
    summary = run(config, beam_args=("--direct_num_workers=2", "--direct_running_mode=multi_processing"))
    assert summary["encoded"] == {"clip": 6, "clip_text": 6}
    return config


def reference_vectors(tiny_clip, images=None, texts=None) -> np.ndarray:
    _, reference, preprocess, tokenizer = tiny_clip
    with torch.no_grad():
        if images is not None:
            features = reference.encode_image(torch.stack([preprocess(image) for image in images]))
        else:
            features = reference.encode_text(tokenizer(texts))
    return torch.nn.functional.normalize(features, dim=-1).numpy()


@pytest.fixture(scope="module")
def tiny_clip_by_name(tiny_clip, tmp_path_factory) -> dict:
    """The same model as an architecture name plus a training-style checkpoint file (`{"state_dict": ...}`)."""
    folder = tmp_path_factory.mktemp("tiny-clip-by-name")
    (folder / "Tiny-CLIP-Test.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "Tiny-CLIP-Test.json")
    torch.save({"epoch": 3, "state_dict": tiny_clip[1].state_dict()}, folder / "epoch_3.pt")
    return {"model": "Tiny-CLIP-Test", "pretrained": str(folder / "epoch_3.pt")}


@pytest.mark.parametrize("form", ["local-dir", "name and checkpoint file"])
def test_reloaded_checkpoint_is_the_saved_model(tiny_clip, tiny_clip_by_name, form):
    model, reference, *_ = tiny_clip
    settings = {"model": model} if form == "local-dir" else tiny_clip_by_name
    loaded = build_encoder(EncoderConfig(name="clip", kind="open-clip", device="cpu", **settings)).load().network
    saved = reference.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(tensor, saved[key]) for key, tensor in loaded.state_dict().items())


def test_batched_image_and_text_vectors_equal_the_reference_model(tiny_clip, clip_table):
    table = read_table(clip_table)
    names = {name.split(".")[0]: name for name in CAPTIONS}
    images = [open_photo(photo(names[i]), decode_side(tiny_clip)) for i in table["id"].to_pylist()]
    texts = [CAPTIONS[names[i]] for i in table["id"].to_pylist()]
    stored_images = np.stack(table["clip_vec"].to_numpy(zero_copy_only=False))
    stored_texts = np.stack(table["clip_text_vec"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(stored_images, reference_vectors(tiny_clip, images=images), atol=1e-5)
    np.testing.assert_allclose(stored_texts, reference_vectors(tiny_clip, texts=texts), atol=1e-5)


def test_text_query_searches_images_in_clip_space(tiny_clip, clip_table):
    opened = open_table(clip_table.output.uri, "items")
    results = search(opened, text_queries(opened, "a cat"), 6, weights={"clip": 1.0})
    query = reference_vectors(tiny_clip, texts=["a cat"])[0]
    stored = {r["id"]: np.asarray(r["clip_vec"]) for r in opened.handle.to_arrow().to_pylist()}
    assert [r["id"] for r in results] == sorted(stored, key=lambda i: -float(stored[i] @ query))
    for result in results:
        assert result["score"] == pytest.approx(float(stored[result["id"]] @ query), abs=1e-4)


def test_zero_shot_classify_returns_a_distribution(tiny_clip, clip_table):
    opened = open_table(clip_table.output.uri, "items")
    labels = ["cat", "coffee", "rocket"]
    results = classify(opened, [str(photo("chelsea.png")), str(photo("retina.jpg"))], labels,
                       templates=["a photo of a {}."], encoder_name="clip")
    _, reference, *_ = tiny_clip
    label_vectors = reference_vectors(tiny_clip, texts=[f"a photo of a {label}." for label in labels])
    images = [open_photo(photo(name), decode_side(tiny_clip)) for name in ("chelsea.png", "retina.jpg")]
    logits = reference.logit_scale.exp().item() * reference_vectors(tiny_clip, images=images) @ label_vectors.T
    expected = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    for result, row in zip(results, expected, strict=True):
        assert sum(result["probabilities"].values()) == pytest.approx(1.0)
        assert [result["probabilities"][label] for label in labels] == pytest.approx(row.tolist(), abs=1e-5)


@pytest.mark.parametrize(("settings", "message"), [
    ({"model": "ViT-B-32"}, "pretrained is required"),
    ({"model": "ViT-B-32", "pretrained": "/no/such/checkpoint.pt"}, "neither a checkpoint file nor a tag of ViT-B-32"),
    ({"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}, "needs a download and this machine has no internet"),
    ({"model": "No-Such-Net", "pretrained": "x"}, "is not an open_clip architecture"),
    ({"model": "local-dir:/no/such/folder"}, "no open_clip_config.json in /no/such/folder"),
])
def test_open_clip_config_errors(settings, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=message):
        _ = build_encoder(EncoderConfig(name="clip", kind="open-clip", **settings)).encoder_id


def test_a_folder_without_weights_is_a_config_error(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    with pytest.raises(ConfigError, match="no weights"):
        _ = build_encoder(EncoderConfig(name="clip", kind="open-clip", model=f"local-dir:{tmp_path}")).encoder_id
