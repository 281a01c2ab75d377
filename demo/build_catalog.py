"""Build the demo catalog: the real photographs that ship inside scikit-image and scikit-learn,
copied into `<out>/images/`, with `<out>/catalog.csv` holding the captions from demo/captions.csv."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import skimage.data
import sklearn.datasets

PHOTO_FOLDERS = {
    "skimage": Path(skimage.data.__file__).parent,
    "sklearn": Path(sklearn.datasets.__file__).parent / "images",
}


def build(out: Path, captions: Path = Path(__file__).parent / "captions.csv") -> Path:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    with captions.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        source = PHOTO_FOLDERS[row["source"]] / row["file"]
        shutil.copyfile(source, images / row["file"])
    manifest = out / "catalog.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "title", "description", "category", "image"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"id": row["id"], "title": row["title"], "description": row["description"],
                             "category": row["category"], "image": f"images/{row['file']}"})
    return manifest


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "data/demo")))
