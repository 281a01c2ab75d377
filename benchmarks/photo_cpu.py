"""Where a photo's CPU time goes, stage by stage, side by side with the build before.

On a GPU worker the network is nearly free: what bounds the photos a worker feeds is the CPU time each
photo needs around it. This part measures that time, in milliseconds of core time per 640x480 JPEG, for
the image stage with one `cnn` encoder (EfficientNet-Lite0, `precision` and `batch_size` auto):
- each step alone, in one process over the same photos: read, hash, check (the header), decode (at the
  encoder's DCT scale), prepare (resize, crop, batch) and the network (at the batch size the job uses);
- the whole job, `catalog-embed run` in a fresh process over 200 and over 2,000 photos: the marginal core
  time per photo of the process (every thread: Beam's, the decode threads, torch's), and its photos/s;
- by difference: outside the network (the job less the network), and the job's own cost with what its
  threads burn while they wait (the job less every step).

Each build runs in fresh processes on the same photos: this tree, and the build before (`--before`, a commit
checked out in a git worktree), so that the two columns compare on one machine in one run. A shared machine's
neighbours only ever add time: the network's passes are timed REPEATS times and each job run JOB_REPEATS times,
and the least of each is kept.

    python -m benchmarks.photo_cpu --out out/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.photos import PHOTO_SIZE, write_catalog
from benchmarks.results import marginal_rate, run_benchmark
from benchmarks.scale import make_photos

BEFORE = "e6e434a"          # main before one read per photo and the cropped resize (issue 39)
STEPS = ("read", "hash", "check", "decode", "prepare", "network")
REPEATS, JOB_REPEATS = 3, 2
SIZES, STEP_PHOTOS = (200, 2000), 1000     # catalogs of the job; photos the steps are timed on
HERE = Path(__file__).resolve().parent.parent


def steps(catalog: str) -> dict:
    """Core milliseconds per photo of each step alone, as the job's image stage runs them."""
    import csv

    from transforms.config import EncoderConfig, RunConfig
    from transforms.encoders import build_encoder
    from transforms.fingerprint import content_digest
    from transforms.images import check_image
    from transforms.inference import LazyModels
    from transforms.storage import read_bytes

    with open(catalog, newline="", encoding="utf-8") as handle:
        paths = [row["image"] for row in csv.DictReader(handle)]
    encoder = build_encoder(EncoderConfig(name="image", kind="cnn"))
    size = LazyModels([encoder]).batch_size(["image"])
    model = encoder.load()
    spent: dict[str, float] = {}

    def timed(step: str, work):
        started = time.process_time()
        done = work()
        spent[step] = (time.process_time() - started) * 1000 / len(paths)
        return done

    datas = timed("read", lambda: [read_bytes(path) for path in paths])
    timed("hash", lambda: [content_digest(data) for data in datas])
    timed("check", lambda: [check_image(data, RunConfig.max_pixels) for data in datas])
    pictures = timed("decode", lambda: [encoder.decode(data) for data in datas])
    batches = timed("prepare", lambda: [encoder.prepare(model, pictures[start:start + size])
                                        for start in range(0, len(pictures), size)])
    encoder.embed(model, batches[0])                # the first pass at a shape builds its kernels
    passes = []
    for _ in range(REPEATS):
        wall = time.perf_counter()
        timed("network", lambda: [encoder.embed(model, batch) for batch in batches])
        passes.append((spent["network"], time.perf_counter() - wall))
    spent["network"] = min(cpu for cpu, _ in passes)
    return {"ms": spent, "batch_size": size, "network_per_s": len(paths) / min(wall for _, wall in passes)}


def core_seconds(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """Core seconds (user and system, every thread) and wall seconds of a command, and what it printed."""
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=dict(os.environ, PYTHONPATH=str(cwd)), capture_output=True,
                          text=True, check=False)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return cpu, wall, done.stdout


def one_build(tree: Path, catalogs: dict[int, Path], root: Path, name: str) -> dict:
    """The steps and the whole job of the build in `tree`, in fresh processes."""
    script = str(HERE / "benchmarks" / "photo_cpu.py")      # this file, on the other build's modules
    _, _, printed = core_seconds([sys.executable, script, "--one", str(catalogs[STEP_PHOTOS])], tree)
    measured = json.loads(printed.strip().splitlines()[-1])
    cpu, wall = {}, {}
    for n in SIZES:
        runs = []
        for _ in range(JOB_REPEATS):
            db = root / f"db-{name}-{n}"
            shutil.rmtree(db, ignore_errors=True)
            runs.append(core_seconds([sys.executable, "-m", "benchmarks.photos", "--one", "pipeline",
                                      str(catalogs[n]), str(db)], tree)[:2])
        cpu[n], wall[n] = min(cpu for cpu, _ in runs), min(wall for _, wall in runs)
    small, large = min(SIZES), max(SIZES)
    ms = dict(measured["ms"])
    ms["job"] = (cpu[large] - cpu[small]) * 1000 / (large - small)
    ms["outside_network"] = ms["job"] - ms["network"]
    ms["job_own_and_waiting"] = ms["job"] - sum(ms[step] for step in STEPS)
    rate = marginal_rate(wall)["items_per_s"]
    return {"build": name, "ms_per_photo": {k: round(v, 2) for k, v in ms.items()}, "photos_per_s": rate,
            "network_per_s": round(measured["network_per_s"], 1), "batch_size": measured["batch_size"],
            "over_network": round(rate / measured["network_per_s"], 2)}


def worktree(commit: str, folder: Path) -> Path | None:
    """The build at `commit`, checked out beside this one; None where this tree has no such commit."""
    found = subprocess.run(["git", "worktree", "add", "--detach", str(folder), commit], cwd=HERE,
                           capture_output=True, text=True, check=False)
    return folder if found.returncode == 0 else None


def one(catalog: str) -> None:
    print(json.dumps(steps(catalog)))


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU time per photo by stage, against the build before")
    parser.add_argument("--out", default="out/bench.json", help="the JSON results file (section 'photo cpu')")
    parser.add_argument("--before", default=BEFORE, help="the commit to compare with (default: %(default)s)")
    parser.add_argument("--one", nargs=1, metavar="CATALOG", help=argparse.SUPPRESS)
    run_benchmark(parser, one, measure_all)


def measure_all(args: argparse.Namespace, root: Path) -> tuple[str, dict, list[dict]]:
    photos = make_photos(root / "photos", max(SIZES), seed=3, size=PHOTO_SIZE)
    catalogs = {n: write_catalog(root / f"catalog-{n}", photos[:n]) for n in (*SIZES, STEP_PHOTOS)}
    builds = [one_build(HERE, catalogs, root, "now")]
    before = worktree(args.before, root / "before")
    try:
        if before is not None:
            builds.insert(0, one_build(before, catalogs, root, f"before ({args.before})"))
    finally:
        if before is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=HERE, check=False)
    rows = [{"stage": stage, **{build["build"]: build["ms_per_photo"][stage] for build in builds}}
            for stage in builds[-1]["ms_per_photo"]]
    rows += [{"stage": key, **{build["build"]: build[key] for build in builds}}
             for key in ("photos_per_s", "network_per_s", "over_network", "batch_size")]
    return "photo cpu", {"builds": builds, "photo_size": list(PHOTO_SIZE)}, rows


if __name__ == "__main__":
    main()
