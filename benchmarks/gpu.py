"""The encoders' rates on whatever device this machine has: a GPU where there is one, else the CPU.

For each model, inputs per second of
- the network alone: prepared batches (decoded, resized, tokenised beforehand) at the batch size the job
  would use (`batch_size: auto`, measured on this device), after a warm-up;
- the whole job: `catalog-embed run` with that one encoder over a catalog of 640x480 JPEGs (or of titles),
  decoding on every core; marginal between a small and a large catalog, so that start-up cancels out.

Models: EfficientNet-Lite0 (the packaged `cnn`), an open_clip ViT-B/32 with random weights (its speed does
not depend on the weights' values; no CLIP weights can be downloaded here) and MiniLM (texts).

    python -m benchmarks.gpu --out out/bench.json
    python -m benchmarks.gpu --tiny        # a smoke test on any machine: a tiny CLIP, a few dozen inputs
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from benchmarks.photos import PHOTO_SIZE, write_catalog
from benchmarks.results import run_benchmark
from benchmarks.scale import make_photos

SIZES = {"photos": (400, 2000), "texts": (4000, 20000)}
TINY_SIZES = {"photos": (8, 64), "texts": (16, 256)}
TEXT_LENGTH_WORDS = 12       # a product title and a few words of description


def clip_folder(folder: Path, tiny: bool) -> str:
    """open_clip's ViT-B-32 (or, for a smoke test, a tiny CLIP) with random weights, as a local-dir model."""
    import open_clip
    import torch

    from demo.tiny_clip import save_tiny_clip

    if tiny:
        return save_tiny_clip(folder)[0]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("ViT-B-32")}))
    torch.manual_seed(0)
    torch.save(open_clip.create_model(f"local-dir:{folder}").state_dict(), folder / "open_clip_pytorch_model.bin")
    return f"local-dir:{folder}"


def network_rate(settings: dict, inputs: list) -> dict:
    """Inputs/s of the encoder's forward pass alone on prepared batches, and the batch size and device."""
    from transforms.config import EncoderConfig
    from transforms.encoders import build_encoder
    from transforms.inference import LazyModels

    encoder = build_encoder(EncoderConfig(name="model", **settings))
    size = LazyModels([encoder]).batch_size(["model"])
    model = encoder.load()
    decoded = [encoder.decode(source) for source in inputs]
    batches = [encoder.prepare(model, decoded[start:start + size]) for start in range(0, len(decoded), size)]
    encoder.embed(model, batches[0])
    started = time.perf_counter()
    for batch in batches:
        encoder.embed(model, batch)
    return {"network_per_s": round(len(decoded) / (time.perf_counter() - started), 1), "batch_size": size,
            "device": encoder.device, "precision": encoder.precision}


def job_rate(settings: dict, catalogs: dict[int, Path], root: Path) -> tuple[float | None, int]:
    """Inputs/s of the whole job with this one encoder, marginal between the catalogs, after a warm-up run (the
    model's first load and batch-size timing are a worker's, once, not the catalog's); None where the large
    catalog took no longer than the small one (tiny sizes: the difference is below the start-up's noise). And
    the inputs the large run encoded."""
    from pipelines.nightly import run_job
    from transforms.config import parse_config

    small, large = sorted(catalogs)
    seconds = {}
    for n, name in ((small, "warm-up"), (small, "small"), (large, "large")):
        config = {"catalog": {"format": "manifest", "path": str(catalogs[n]), "text_fields": ["title"]},
                  "encoders": {"model": settings}, "output": {"uri": str(root / name), "table": "bench"}}
        started = time.perf_counter()
        record = run_job(parse_config(config), f"bench-{name}", [])
        seconds[n] = time.perf_counter() - started
        assert record["encoded"]["model"] == n, record
    extra = seconds[large] - seconds[small]
    return (round((large - small) / extra, 1) if extra > 0 else None), record["encoded"]["model"]


def write_titles(folder: Path, count: int) -> Path:
    """A catalog of `count` distinct product titles, each its own text."""
    folder.mkdir(parents=True, exist_ok=True)
    with (Path(__file__).resolve().parent.parent / "demo" / "captions.csv").open(encoding="utf-8") as handle:
        words = " ".join(row["title"] for row in csv.DictReader(handle)).split()
    catalog = folder / "catalog.csv"
    with catalog.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "title"])
        for i in range(count):
            title = " ".join(words[(i * 7 + k) % len(words)] for k in range(TEXT_LENGTH_WORDS))
            writer.writerow([f"text-{i:06d}", f"{title} no. {i}"])
    return catalog


def models(root: Path, tiny: bool) -> list[tuple[str, str, dict]]:
    """(name, what it takes, encoder settings) of each model measured."""
    clip = clip_folder(root / "clip", tiny)
    return [("EfficientNet-Lite0", "photos", {"kind": "cnn"}),
            ("open_clip ViT-B/32, random" if not tiny else "open_clip tiny, random", "photos",
             {"kind": "open-clip", "model": clip}),
            ("MiniLM-L6", "texts", {"kind": "sentence-transformers"})]


def measure_all(args: argparse.Namespace, root: Path) -> tuple[str, dict, list[dict]]:
    sizes = TINY_SIZES if args.tiny else SIZES
    photos = make_photos(root / "photos", max(sizes["photos"]), seed=11, size=PHOTO_SIZE)
    catalogs = {"photos": {n: write_catalog(root / f"photos-{n}", photos[:n]) for n in sizes["photos"]},
                "texts": {n: write_titles(root / f"texts-{n}", n) for n in sizes["texts"]}}
    with catalogs["texts"][max(sizes["texts"])].open(encoding="utf-8") as handle:
        texts = [row["title"] for row in csv.DictReader(handle)]
    inputs = {"photos": [path.read_bytes() for path in photos], "texts": texts}
    rows = []
    for name, takes, settings in models(root, args.tiny):
        row = {"model": name, "inputs": takes, **network_rate(settings, inputs[takes])}
        row["job_per_s"], row["job_encoded"] = job_rate(settings, catalogs[takes], root / name.split()[0])
        row["job_over_network"] = row["job_per_s"] and round(row["job_per_s"] / row["network_per_s"], 2)
        rows.append(row)
    return "gpu" if not args.tiny else "gpu (tiny)", {"runs": rows}, rows


def main() -> None:
    parser = argparse.ArgumentParser(description="network and whole-job rates of the encoders on this device")
    parser.add_argument("--out", default="out/bench.json", help="the JSON results file (section 'gpu')")
    parser.add_argument("--tiny", action="store_true", help="a smoke test: a tiny CLIP and a few dozen inputs")
    run_benchmark(parser, None, measure_all)


if __name__ == "__main__":
    main()
