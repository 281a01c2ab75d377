"""Queries from a cold process: what a model derives is computed once and cached (and a bad cache entry is
built again, never used), and query encoders run exported networks, with the torch models' vectors,
importing no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CAPTIONS, PHOTOS, open_photo, photo
from transforms import derived
from transforms.config import EncoderConfig
from transforms.encoders import build_encoder


def _encoder(kind: str, **options):
    return build_encoder(EncoderConfig(name=kind, kind=kind, device="cpu", precision="fp32", options=options))


def test_text_queries_through_the_export_equal_the_torch_model():
    encoder = _encoder("sentence-transformers")
    texts = [*CAPTIONS, "  A ROCKET on its pad  ", "café au lait", " ".join(["long description"] * 300)]
    exported = encoder.text_queries(texts)
    torch_vectors = encoder.encode_text(encoder.load_text_model(), texts)
    assert encoder.exported(encoder._export) is not None
    np.testing.assert_allclose(exported, torch_vectors, atol=1e-5)


@pytest.mark.parametrize("kind", ["cnn", "conse"])
def test_image_queries_through_the_export_equal_the_torch_model(kind):
    encoder = _encoder(kind)
    pictures = [open_photo(photo(name), encoder.decode_side) for name in PHOTOS]
    pictures.append(Image.fromarray(np.full((90, 400, 3), 200, np.uint8)))       # a wide, plain one
    exported = encoder.image_queries(pictures)
    torch_vectors = encoder.encode(encoder.load(), pictures)
    np.testing.assert_allclose(exported, torch_vectors, atol=1e-4)


def test_a_derived_value_is_computed_once_and_a_corrupt_or_foreign_entry_is_built_again():
    made = []

    def compute():
        made.append(1)
        return np.arange(12, dtype=np.float32).reshape(3, 4)

    first = derived.cached_array("probe", "key-1", compute)
    again = derived.cached_array("probe", "key-1", compute)
    assert len(made) == 1 and np.array_equal(first, again)
    folder = next(derived.cache_folder().glob("probe-*"))
    (folder / "array.npy").write_bytes(b"\x93NUMPY garbage")                    # corrupt
    assert np.array_equal(derived.cached_array("probe", "key-1", compute), first) and len(made) == 2
    entry = json.loads((folder / derived.ENTRY).read_text())
    (folder / derived.ENTRY).write_text(json.dumps(dict(entry, key="another model")))   # foreign
    assert np.array_equal(derived.cached_array("probe", "key-1", compute), first) and len(made) == 3
    assert derived.cached_array("probe", "key-1", compute) is not None and len(made) == 3


def test_conse_class_vectors_are_computed_once_per_text_model_and_settings(monkeypatch):
    from transforms.encoders import conse

    calls = []
    real = conse.class_sentences
    monkeypatch.setattr(conse, "class_sentences", lambda settings: calls.append(1) or real(settings))
    first = _encoder("conse", top_t=5).class_vectors()
    second = _encoder("conse", top_t=7).class_vectors()          # another mix of the same classes
    other = _encoder("conse", class_definitions=False).class_vectors()
    assert np.array_equal(first, second) and not np.allclose(first, other)
    assert first.shape == (1000, 384) and np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    assert len(calls) <= 2                        # at most once per text setting; none if already cached


@pytest.mark.parametrize("query", [["--text", "a cup of coffee"], ["--image", "IMAGE"], ["--like", "coffee"]])
def test_a_query_process_imports_no_torch(multimodal_demo, query):
    config = multimodal_demo
    query = [photo("coffee.png").as_posix() if arg == "IMAGE" else arg for arg in query]
    args = ["query", "--uri", config.output.uri, "--table", "demo", *query, "-k", "1", "--json"]
    script = ("import json, sys; from pipelines.cli import main; code = main(sys.argv[1:]); "
              "libraries = ('sentence_transformers', 'transformers', 'timm'); print(json.dumps({'code': code, "
              "'torch': 'torch' in sys.modules, 'libraries': [m for m in libraries if m in sys.modules]}))")
    for _ in range(2):        # the first may export the networks (with torch); the next one is a cold query
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600)
    results, loaded = json.loads(done.stdout.splitlines()[0]), json.loads(done.stdout.splitlines()[-1])
    assert loaded == {"code": 0, "torch": False, "libraries": []}, done.stderr
    assert results[0]["id"] == "coffee"
