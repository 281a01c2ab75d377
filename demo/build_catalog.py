"""Build the demo catalog: the real photographs that ship inside scikit-image and scikit-learn,
copied into `<out>/images/`, with `<out>/catalog.csv` holding the captions from demo/captions.csv.

`<out>/sessions.csv` is the shoppers' interaction log (user_id,session_id,item_id,ts) for the item2vec
encoder: sessions drawn from planted groups of items bought together, which their content alone does
not tell (the cat with the coffee cup), a few items never bought, and one malformed row.

`--night 2` builds the next night's export of the same catalog, with what health reports are for:
two photos re-uploaded as new listings, and two captions pasted onto each other's picture.

`--development-set` builds the set that ConSE's settings were chosen on: the photos demo/queries.csv
asks for, each captioned only "product photo" and labelled with its object (captions.csv's `label`).
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
from pathlib import Path

from demo.photos import photo_path
from demo.reuploads import reupload

NIGHT_TWO_REUPLOADS = {"chelsea": "resized", "coffee": "recompressed"}
NIGHT_TWO_SWAPPED = ("rocket", "flower")
FIELDS = ["id", "title", "description", "category", "image"]
BOUGHT_TOGETHER = {
    "space": ["astronaut", "rocket", "moon", "hubble"],
    "cafe": ["coffee", "chelsea", "china", "flower"],
    "outdoors": ["horse", "grass", "gravel", "motorcycle"],
    "print shop": ["camera", "page", "text", "color"],
    "lab": ["cell", "retina", "ihc"],
}   # brick, clock, coins, logo, grace_hopper and quokka are never bought: no behaviour vector
SESSIONS_PER_GROUP = 40
SHOPPERS_PER_GROUP = 10
DEMO_SHOPPER, DEMO_SHOPPER_SESSIONS = "ada", (["chelsea", "coffee"], ["rocket", "moon"])   # make demo asks for ada
DEMO = Path(__file__).parent


def build(out: Path, captions: Path = DEMO / "captions.csv", night: int = 1) -> Path:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    with captions.open(newline="", encoding="utf-8") as handle:
        rows = [{"id": row["id"], "title": row["title"], "description": row["description"],
                 "category": row["category"], "image": f"images/{row['file']}",
                 "source": photo_path(row["source"], row["file"])} for row in csv.DictReader(handle)]
    for row in rows:
        shutil.copyfile(row.pop("source"), out / row["image"])
    if night == 2:
        rows = _night_two(out, rows)
    write_sessions(out / "sessions.csv")
    manifest = out / "catalog.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def build_development_set(out: Path, captions: Path = DEMO / "captions.csv",
                          queries: Path = DEMO / "queries.csv") -> Path:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    with queries.open(newline="", encoding="utf-8") as handle:
        asked = {row["id"] for row in csv.DictReader(handle)}
    with captions.open(newline="", encoding="utf-8") as handle:
        photos = [row for row in csv.DictReader(handle) if row["id"] in asked]
    manifest = out / "catalog.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "title", "label", "image"])
        for photo in photos:
            shutil.copyfile(photo_path(photo["source"], photo["file"]), images / photo["file"])
            writer.writerow([photo["id"], "product photo", photo["label"], f"images/{photo['file']}"])
    return manifest


def write_sessions(path: Path, seed: int = 7) -> None:
    """Sessions of 2 to 4 items of one group, in time order, a shopper's sessions within one group; the
    demo's own shopper's; one row that lacks its item."""
    rng = random.Random(seed)
    rows, clock = [], 1_700_000_000
    for group, items in BOUGHT_TOGETHER.items():
        for n in range(SESSIONS_PER_GROUP):
            for item in rng.sample(items, rng.randint(2, min(4, len(items)))):
                clock += rng.randint(5, 300)
                rows.append((f"{group}-shopper-{n % SHOPPERS_PER_GROUP}", f"{group}-{n}", item, clock))
    for session, items in enumerate(DEMO_SHOPPER_SESSIONS):
        for item in items:
            clock += rng.randint(5, 300)
            rows.append((DEMO_SHOPPER, f"{DEMO_SHOPPER}-{session}", item, clock))
    rows.append(("", "broken-export", "", clock))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "session_id", "item_id", "ts"])
        writer.writerows(rows)


def _night_two(out: Path, rows: list[dict]) -> list[dict]:
    by_id = {row["id"]: row for row in rows}
    for item, variant in NIGHT_TWO_REUPLOADS.items():
        image = reupload(out / by_id[item]["image"], variant, out / "images" / f"{item}-{variant}.jpg")
        rows.append(dict(by_id[item], id=f"{item}-2", title=by_id[item]["title"] + ", new photo",
                         image=str(image.relative_to(out))))
    first, second = (by_id[item] for item in NIGHT_TWO_SWAPPED)
    for field in ("title", "description"):
        first[field], second[field] = second[field], first[field]
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", default="data/demo", help="the catalog's folder (default data/demo)")
    parser.add_argument("--night", type=int, choices=(1, 2), default=1, help="which night's export (default 1)")
    parser.add_argument("--development-set", action="store_true",
                        help="build ConSE's development set instead (neutral captions, a label per photo)")
    args = parser.parse_args()
    print(build_development_set(Path(args.out)) if args.development_set else build(Path(args.out), night=args.night))
