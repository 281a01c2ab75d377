"""Shared helpers: catalogs built in their real layouts from real photos, and job runs."""

from __future__ import annotations

import csv
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import boto3
import lancedb
import pyarrow as pa
import pytest
import skimage.data
import sklearn.datasets
from PIL import Image

from demo.build_catalog import build as build_demo_catalog
from demo.reuploads import reupload
from demo.tiny_clip import save_tiny_clip
from pipelines.nightly import run_job
from tests.servers import S3Server, environment, s3_server
from transforms.config import Config, parse_config

PHOTO_DIRS = (Path(skimage.data.__file__).parent, Path(sklearn.datasets.__file__).parent / "images")
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "china.jpg", "flower.jpg",
          "motorcycle_left.png", "retina.jpg")
COLOR_ONLY = {"color": {"kind": "color"}}
with (Path(__file__).parent.parent / "demo" / "captions.csv").open(encoding="utf-8") as _captions:
    DEMO_PHOTOS = sum(1 for _ in csv.DictReader(_captions))     # the demo catalog's items
# fp32, so that the stored vectors can be held to the reference libraries' own to 1e-4.
ALL_ENCODERS = {
    "text": {"kind": "sentence-transformers", "weight": 0.5, "batch_size": 8, "precision": "fp32"},
    "image": {"kind": "cnn", "model": "efficientnet-lite0", "weight": 0.4, "batch_size": 4, "precision": "fp32"},
    "color": {"kind": "color", "weight": 0.1},
}
MULTIMODAL_ENCODERS = {
    "text": {"kind": "sentence-transformers", "weight": 0.4},
    "image": {"kind": "cnn", "weight": 0.3, "batch_size": 8},
    "color": {"kind": "color", "weight": 0.1},
    "conse": {"kind": "conse", "top_t": 10, "weight": 0.2, "batch_size": 8},
}
CAPTIONS = ["a ginger cat", "a cup of coffee", "an astronaut", "a rocket", "a temple roof", "a pink flower"]
BUCKET = "catalog-embed"      # the local S3 server's bucket
DEMO_CATALOG = {"format": "manifest", "text_fields": ["title", "description"], "label_field": "category",
                "fields": ["category"]}


def readme_gpu_command() -> list[str]:
    """The Dataflow GPU command line of docs/clusters.md, as a user copies it."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "clusters.md").read_text()
    section = page[page.index("## Dataflow GPU workers"):]
    start = section.index("```sh") + len("```sh")
    return shlex.split(section[start:section.index("```", start)].replace("\\\n", " "))


@pytest.fixture(scope="session", autouse=True)
def derived_cache(tmp_path_factory) -> Iterator[Path]:
    """The tests' own cache of derived model data (transforms/derived.py), empty at the start of a session."""
    folder = tmp_path_factory.mktemp("derived-cache")
    with environment(CATALOG_EMBED_CACHE=str(folder)):
        yield folder


def photo(name: str) -> Path:
    return next(d / name for d in PHOTO_DIRS if (d / name).exists())


def open_photo(path: Path | str, min_side: int | None = None) -> Image.Image:
    """A photo in RGB as PIL opens it; with `min_side`, a JPEG at the DCT scale that keeps both sides at
    least that long (PIL's draft): the reference pixels of an encoder with that `decode_side`."""
    image = Image.open(path)
    if min_side:
        image.draft(None, (min_side, min_side))
    return image.convert("RGB")


def copy_photo(name: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(photo(name), dest)
    return dest


FOOD101_CLASSES = {"apple_pie": "Apple pie", "baby_back_ribs": "Baby back ribs", "bibimbap": "Bibimbap"}


def food101_layout(root: Path) -> tuple[dict, list[str], list[str]]:
    """Food-101 as its archive lays it out (images/<class>/<n>.jpg; meta/classes.txt, labels.txt, train.txt and
    test.txt), with one photo per class, in both splits (so each class's two items are duplicates): the catalog's
    config, the train ids and the test ids."""
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "classes.txt").write_text("\n".join(FOOD101_CLASSES) + "\n")
    (root / "meta" / "labels.txt").write_text("\n".join(FOOD101_CLASSES.values()) + "\n")
    train, test = [], []
    for i, (cls, name) in enumerate(zip(FOOD101_CLASSES, PHOTOS, strict=False)):
        for n, split in ((1000 + i, train), (2000 + i, test)):
            copy_photo(name, root / "images" / cls / f"{n}.jpg")
            split.append(f"{cls}/{n}")
    (root / "meta" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "meta" / "test.txt").write_text("\n".join(test) + "\n")
    return {"format": "food101", "path": str(root), "text_fields": ["name"], "fields": ["split"]}, train, test


def digikala_layout(root: Path) -> tuple[dict, list[str]]:
    """Digikala's color folders (<color>/<product>.jpg), four photos: the catalog's config and the ids."""
    ids = []
    for i, (color, name) in enumerate(zip(["red", "blue", "green", "red"], PHOTOS, strict=False)):
        copy_photo(name, root / color / f"product_{i}.jpg")
        ids.append(f"{color}/product_{i}")
    return {"format": "digikala", "path": str(root), "fields": ["color"]}, ids


def write_catalog(folder: Path, rows: list[dict]) -> Path:
    """A manifest catalog.csv (id, caption, image) in `folder`."""
    with (folder / "catalog.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "caption", "image"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "catalog.csv"


def captioned_catalog(root: Path) -> tuple[Path, list[dict]]:
    """Six real photos with captions, as a manifest under root/catalog; its folder and rows."""
    folder, rows = root / "catalog", []
    for i, (caption, name) in enumerate(zip(CAPTIONS, PHOTOS, strict=False)):
        copy_photo(name, folder / "images" / f"{i}.png")
        rows.append({"id": f"item-{i}", "caption": caption, "image": f"images/{i}.png"})
    write_catalog(folder, rows)
    return folder, rows


REUPLOADS = {"chelsea": "resized", "coffee": "recompressed", "rocket": "cropped", "astronaut": "all"}
DEMO_FIELDS = ["id", "title", "description", "category", "image"]


def demo_rows(manifest: Path) -> list[dict]:
    with manifest.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_demo_rows(manifest: Path, rows: list[dict]) -> None:
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=DEMO_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def with_reuploads(manifest: Path) -> list[dict]:
    rows = demo_rows(manifest)
    for row in list(rows):
        if row["id"] in REUPLOADS:
            variant = REUPLOADS[row["id"]]
            image = reupload(manifest.parent / row["image"], variant, manifest.parent / "images" / f"{row['id']}-2.jpg")
            rows.append(dict(row, id=f"{row['id']}-2", title=row["title"] + " (new photo)",
                             image=str(image.relative_to(manifest.parent))))
    return rows


def make_config(tmp_path: Path, catalog: dict, encoders: dict | None = None, table: str = "items",
                run: dict | None = None, output: dict | None = None) -> Config:
    raw = {"catalog": catalog, "encoders": encoders or COLOR_ONLY,
           "output": {"uri": str(tmp_path / "db"), "table": table, **(output or {})}, "run": run or {}}
    return parse_config(raw)


def run(config: Config, run_id: str = "r1", beam_args: tuple[str, ...] = (), reembed: bool = False,
        rehash: bool = False) -> dict:
    return run_job(config, run_id, list(beam_args), reembed=reembed, rehash=rehash)


def read_table(config: Config, name: str | None = None) -> pa.Table:
    db = lancedb.connect(config.output.uri)
    return db.open_table(name or config.output.table).to_arrow().sort_by("id")


def embed_demo(root: Path, encoders: dict) -> tuple[Config, dict]:
    """The demo catalog (real photos, real captions) built under `root` and embedded; the run's summary."""
    manifest = build_demo_catalog(root / "catalog")
    config = make_config(root, dict(DEMO_CATALOG, path=str(manifest)), encoders, table="demo")
    return config, run(config)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A random CLIP (the reference) and the folder its checkpoint was saved to: `local-dir:<folder>`."""
    import open_clip

    model, reference = save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    _, _, preprocess = open_clip.create_model_and_transforms(model)
    return model, reference, preprocess, open_clip.get_tokenizer(model)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Config, dict]:
    """The demo embedded with text, image and color encoders, once."""
    return embed_demo(tmp_path_factory.mktemp("demo"), ALL_ENCODERS)


@pytest.fixture(scope="session")
def multimodal_demo(tmp_path_factory) -> Config:
    """The demo embedded with the demo config's four encoders, conse included, once."""
    return embed_demo(tmp_path_factory.mktemp("multimodal"), MULTIMODAL_ENCODERS)[0]


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    """A local S3 server (moto's) with the bucket BUCKET, and the AWS environment pointing at it. It must
    refuse a second put of a key with `If-None-Match: *` (412): Lance's commits on s3:// rely on it."""
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="conditional-put-probe", Body=b"1", IfNoneMatch="*")
        with pytest.raises(client.exceptions.ClientError) as refused:
            client.put_object(Bucket=BUCKET, Key="conditional-put-probe", Body=b"2", IfNoneMatch="*")
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
        yield server
