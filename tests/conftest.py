"""Shared helpers: catalogs built in their real layouts from real photos, and job runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import lancedb
import pyarrow as pa
import pytest
import skimage.data
import sklearn.datasets

from demo.build_catalog import build as build_demo_catalog
from pipelines.config import Config, parse_config
from pipelines.nightly import run_job

PHOTO_DIRS = (Path(skimage.data.__file__).parent, Path(sklearn.datasets.__file__).parent / "images")
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "china.jpg", "flower.jpg",
          "motorcycle_left.png", "retina.jpg")
COLOR_ONLY = {"color": {"kind": "color"}}
ALL_ENCODERS = {
    "text": {"kind": "sentence-transformers", "weight": 0.5, "batch_size": 8},
    "image": {"kind": "cnn", "model": "efficientnet-lite0", "weight": 0.4, "batch_size": 4},
    "color": {"kind": "color", "weight": 0.1},
}


def photo(name: str) -> Path:
    return next(d / name for d in PHOTO_DIRS if (d / name).exists())


def copy_photo(name: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(photo(name), dest)
    return dest


def make_config(tmp_path: Path, catalog: dict, encoders: dict | None = None, table: str = "items") -> Config:
    raw = {"catalog": catalog, "encoders": encoders or COLOR_ONLY,
           "output": {"uri": str(tmp_path / "db"), "table": table}}
    return parse_config(raw)


def run(config: Config, run_id: str = "r1", beam_args: tuple[str, ...] = (), reembed: bool = False) -> dict:
    return run_job(config, run_id, list(beam_args), reembed=reembed)


def read_table(config: Config, name: str | None = None) -> pa.Table:
    db = lancedb.connect(config.output.uri)
    return db.open_table(name or config.output.table).to_arrow().sort_by("id")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Config, dict]:
    """The demo catalog (real photos, real captions) embedded with all three encoders, once."""
    root = tmp_path_factory.mktemp("demo")
    manifest = build_demo_catalog(root / "catalog")
    config = make_config(root, {
        "format": "manifest", "path": str(manifest), "text_fields": ["title", "description"],
        "label_field": "category", "fields": ["category"],
    }, ALL_ENCODERS, table="demo")
    return config, run(config)
