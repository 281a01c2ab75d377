"""The soak: many nights of a small shop's catalog changing at random, on a local disk and on moto's S3 behind a
fault-injecting proxy, with kills and racing runs. After every night the table is held to what docs/safety.md
promises; after a final clean night it must equal a fresh run's, vector for vector.

Each night changes the catalog at random: new items, edited titles (some with inch marks in unquoted fields, as
shops export them), deleted items, broken and missing images, repaired ones; some nights grow the session log
(a new behaviour generation, every row written) or change a weight. Some nights are killed with SIGKILL at a random
moment (the launcher with its workers, or one worker), and some start a second run at once. The job runs as a
scheduler runs it: `catalog-embed run` in its own process, on 1 or 2 worker processes.

    python -m tests.soak --nights 30 --stores local,s3        # make soak
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import lance
import numpy as np
import yaml
from PIL import Image

from tests.conftest import photo
from tests.fault_proxy import FaultProxy
from tests.servers import environment, s3_server
from transforms.commit import settle
from transforms.lance_sink import dataset_uri, table_metadata, vector_matrix
from transforms.run_log import read_runs

PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "china.jpg", "flower.jpg",
          "motorcycle_left.png", "retina.jpg")
WORDS = ("red", "navy", "linen", "wool", "mug", "lamp", "scarf", "boot", "kettle", "vase", "clock", "towel")
BUCKET = "soak"
CLI = str(Path(sys.executable).parent / "catalog-embed")
RUN_SECONDS = 300               # a run that takes longer is stuck: a failure of the soak
ENCODERS = {
    "text": {"kind": "sentence-transformers", "precision": "fp32", "batch_size": 16, "weight": 0.5},
    "color": {"kind": "color", "weight": 0.3},
    # retrain_days 0: every night whose log grew trains it again and writes every row (behaviour.py)
    "behaviour": {"kind": "item2vec", "dim": 8, "epochs": 5, "seed": 1, "weight": 0.2, "retrain_days": 0},
}


@dataclass
class Item:
    title: str
    photo: str
    box: tuple[int, int, int, int]     # the crop of the photo that makes its picture its own
    image: str = "ok"                  # "ok", "broken" (bytes that are no picture) or "missing"


@dataclass
class Report:
    store: str
    nights: int = 0
    runs: int = 0
    kills: Counter = field(default_factory=Counter)
    races: int = 0
    committed: int = 0
    rows_lost: int = 0
    problems: list[str] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)
    requests: int = 0

    def line(self) -> str:
        faults = ", ".join(f"{kind} {n}" for kind, n in sorted(self.faults.items())) or "none"
        return (f"{self.store}: {self.nights} nights, {self.runs} runs ({self.committed} committed), kills "
                f"{sum(self.kills.values())} ({', '.join(f'{k} {n}' for k, n in sorted(self.kills.items())) or '-'}), "
                f"commits raced {self.races}, faults injected {sum(self.faults.values())} of {self.requests} "
                f"requests ({faults}), rows lost {self.rows_lost}, problems {len(self.problems)}")


class Shop:
    """The catalog a shop exports every night: a CSV written as shops write it, pictures, and a session log."""

    def __init__(self, folder: Path, rng: random.Random, photos: dict[str, Path]):
        self.folder = folder
        self.rng = rng
        self.photos = photos
        self.items: dict[str, Item] = {}
        self.sessions = 0
        self.next_id = 0
        (folder / "images").mkdir(parents=True, exist_ok=True)
        for _ in range(36):
            self.add()
        for _ in range(60):
            self.grow_log()

    def add(self) -> str:
        item_id = f"p{self.next_id:04d}"
        self.next_id += 1
        size = 64 + self.rng.randrange(64)
        box = (self.rng.randrange(100), self.rng.randrange(100))
        self.items[item_id] = Item(self._title(), self.rng.choice(PHOTOS), (*box, box[0] + size, box[1] + size))
        self._picture(item_id)
        return item_id

    def _title(self) -> str:
        title = " ".join(self.rng.sample(WORDS, 3))
        if self.rng.random() < 0.3:
            title = f'{title} {self.rng.randrange(10, 80)}" wide'          # an inch mark, left unquoted
        return title

    def _picture(self, item_id: str) -> None:
        item, path = self.items[item_id], self.folder / "images" / f"{item_id}.png"
        if item.image == "missing":
            path.unlink(missing_ok=True)
        elif item.image == "broken":
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
        else:
            with Image.open(self.photos[item.photo]) as photo:
                photo.convert("RGB").crop(item.box).save(path)

    def night(self) -> list[str]:
        """Change the catalog at random; what changed, in words."""
        done = []
        for _ in range(self.rng.randint(0, 3)):
            done.append(f"added {self.add()}")
        for item_id in self.rng.sample(sorted(self.items), self.rng.randint(0, 2)):
            self.items[item_id].title = self._title()
            done.append(f"edited {item_id}")
        if len(self.items) > 30 and self.rng.random() < 0.5:
            gone = self.rng.choice(sorted(self.items))
            del self.items[gone]
            (self.folder / "images" / f"{gone}.png").unlink(missing_ok=True)
            done.append(f"deleted {gone}")
        for item_id in self.rng.sample(sorted(self.items), self.rng.randint(0, 1)):
            self.items[item_id].image = self.rng.choice(["broken", "missing"])
            self._picture(item_id)
            done.append(f"{self.items[item_id].image} picture {item_id}")
        for item_id in [i for i, item in self.items.items() if item.image != "ok" and self.rng.random() < 0.5]:
            self.repair(item_id)
            done.append(f"repaired {item_id}")
        if self.rng.random() < 0.3:
            self.grow_log()
            done.append("grew the log")
        return done

    def repair(self, item_id: str) -> None:
        self.items[item_id].image = "ok"
        self._picture(item_id)

    def grow_log(self) -> None:
        ids = sorted(self.items)
        session = [self.rng.choice(ids) for _ in range(self.rng.randint(2, 4))]
        with (self.folder / "sessions.csv").open("a", encoding="utf-8") as handle:
            if self.sessions == 0:
                handle.write("session_id,item_id,ts\n")
            handle.writelines(f"s{self.sessions},{item},{1_700_000_000 + self.sessions * 10 + n}\n"
                              for n, item in enumerate(session))
        self.sessions += 1

    def export(self) -> None:
        """catalog.csv as shops write it: a field is quoted only when it holds a delimiter or a line break."""
        def cell(value: str) -> str:
            return '"' + value.replace('"', '""') + '"' if ("," in value or "\n" in value) else value

        lines = ["id,title,image"] + [",".join(cell(v) for v in (item_id, item.title, f"images/{item_id}.png"))
                                       for item_id, item in sorted(self.items.items())]
        (self.folder / "catalog.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


class Night:
    """The job as a scheduler runs it: a process per run, on 1 or 2 worker processes, killed when told."""

    def __init__(self, config: Path, beam_args: list[str], env: dict[str, str], logs: Path):
        self.config = config
        self.beam_args = beam_args
        self.env = env
        self.logs = logs

    def start(self, run_id: str, workers: int) -> subprocess.Popen:
        extra = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"] if workers == 2 else []
        log = (self.logs / f"{run_id}.log").open("w")
        return subprocess.Popen([CLI, "run", "--config", str(self.config), "--run-id", run_id, *self.beam_args,
                                 *extra], stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    @staticmethod
    def wait(process: subprocess.Popen) -> int:
        try:
            return process.wait(timeout=RUN_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise RuntimeError(f"a run took over {RUN_SECONDS} s") from None

    @staticmethod
    def kill(process: subprocess.Popen, rng: random.Random, target: str) -> None:
        time.sleep(rng.uniform(1.0, 25.0))
        if process.poll() is not None:
            return
        workers = _children(process.pid)
        if target == "a worker" and workers:
            os.kill(rng.choice(workers), signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=RUN_SECONDS)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def soak(store: str, nights: int, seed: int, folder: Path, fault_rate: float = 0.03,
         events: Sequence[str] = ()) -> Report:
    """`events`: what each night after the first does ("plain", "kill" or "race"), instead of drawing it."""
    rng = random.Random(seed)
    report = Report(store)
    shop = Shop(folder / "shop", rng, {name: photo(name) for name in PHOTOS})
    with _store(store, folder, fault_rate, seed) as (uri, beam_args, env, proxy, fresh_uri):
        config = _write_config(folder / "job.yaml", shop, uri, weight=0.5)
        night = Night(config, beam_args, env, folder)
        table = dataset_uri(uri, "shop")
        listed_before: dict[str, str] = {}
        for n in range(1, nights + 1):
            done = shop.night() if n > 1 else ["first export"]
            if n > 1 and rng.random() < 0.15:
                config = _write_config(folder / "job.yaml", shop, uri, weight=rng.choice([0.3, 0.5, 0.7]))
                done.append("new weights")
            shop.export()
            held = _ids(table)
            event = rng.choices(["plain", "kill", "race"], [0.6, 0.25, 0.15])[0] if n > 1 else "plain"
            if n > 1 and len(events) >= n - 1:
                event = events[n - 2]
            workers = rng.choice([1, 2])
            run_id = f"night-{n:02d}"
            if event == "kill":
                target = rng.choice(["the launcher", "a worker"]) if workers == 2 else "the launcher"
                night.kill(night.start(run_id, workers), rng, target)
                report.kills[target] += 1
            elif event == "race":
                racers = [night.start(f"{run_id}{side}", workers) for side in "ab"]
                codes = [night.wait(racer) for racer in racers]
                report.races += 1
                if sorted(codes) not in ([0, 1], [0, 0], [1, 3], [0, 3], [3, 3]):
                    report.problems.append(f"night {n}: racing runs exited {codes}")
            else:
                night.wait(night.start(run_id, workers))
            report.runs += 2 if event == "race" else 1
            _check(report, n, table, uri, held, listed_before, shop, done)
            listed_before = {item_id: item.title for item_id, item in shop.items.items()}
            report.nights = n
        for item_id in [i for i, item in shop.items.items() if item.image != "ok"]:
            shop.repair(item_id)
        shop.export()
        report.runs += _until_committed(night, "clean")
        _check(report, nights + 1, table, uri, _ids(table), listed_before, shop, ["the final clean night"])
        _equals_a_fresh_run(report, folder, shop, uri, fresh_uri, env, beam_args)
        report.committed = sum(1 for r in read_runs(uri, "shop") if r["status"] in ("committed", "unchanged"))
        if proxy is not None:
            report.faults, report.requests = proxy.injected, proxy.requests
    return report


@contextlib.contextmanager
def _store(store: str, folder: Path, fault_rate: float, seed: int) -> Iterator[tuple]:
    """(table uri, Beam options, the runs' environment, the proxy, a uri for the fresh run)."""
    if store == "local":
        yield str(folder / "db"), [], dict(os.environ), None, str(folder / "fresh")
        return
    with s3_server(folder) as server:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        with FaultProxy(server.endpoint, fault_rate, seed) as proxy, environment(AWS_ENDPOINT_URL=proxy.url):
            beam_args = [f"--s3_endpoint_url={proxy.url}", f"--temp_location=s3://{BUCKET}/tmp"]
            yield f"s3://{BUCKET}/db", beam_args, dict(os.environ), proxy, f"s3://{BUCKET}/fresh"


def _write_config(path: Path, shop: Shop, uri: str, weight: float) -> Path:
    encoders = json.loads(json.dumps(ENCODERS))
    encoders["text"]["weight"] = weight
    config = {"catalog": {"format": "manifest", "path": str(shop.folder / "catalog.csv"), "text_fields": ["title"],
                          "interactions": str(shop.folder / "sessions.csv")},
              "encoders": encoders,
              # Deleting one of ~36 items a night is within the default max_delete_ratio (10%).
              "output": {"uri": uri, "table": "shop", "retain_days": 0, "write_batch_rows": 16},
              "run": {"max_reject_ratio": 0.2, "warn_reject_ratio": 0.2, "warn_drift": 2}}
    path.write_text(yaml.safe_dump(config))
    return path


def _ids(table: str) -> list[str]:
    with contextlib.suppress(ValueError):
        return lance.dataset(table).to_table(columns=["id"])["id"].to_pylist()
    return []


def _check(report: Report, n: int, table: str, uri: str, held: list[str], listed_before: dict[str, str],
           shop: Shop, done: list[str]) -> None:
    """After a night: a version a run committed, ids unique, nothing lost, counts that match the table."""
    def problem(what: str) -> None:
        report.problems.append(f"night {n} ({'; '.join(done)}): {what}")

    dataset = lance.dataset(table)
    ids = dataset.to_table(columns=["id"])["id"].to_pylist()
    if len(ids) != len(set(ids)):
        problem(f"ids appear twice: {sorted(i for i, c in Counter(ids).items() if c > 1)}")
    # A record a killed run left `committing` is read as the next run will settle it: committed, with the rows of
    # the version, if the table holds its commit.
    runs = [settle(r, table, "killed") for r in read_runs(uri, "shop")]
    committed = [r for r in runs if r["status"] in ("committed", "unchanged") and r["table_version"] is not None]
    last = max(committed, key=lambda r: r["table_version"])
    at_commit = lance.dataset(table, version=last["table_version"]).to_table(columns=["id"])["id"].to_pylist()
    if sorted(at_commit) != sorted(ids):
        problem(f"the table's rows are not those version {last['table_version']} committed")
    lost = [item_id for item_id in held if item_id in shop.items and item_id not in set(ids)]
    if lost:
        report.rows_lost += len(lost)
        problem(f"rows lost: {lost}")
    for record in (r for r in runs if r["run_id"].startswith(f"night-{n:02d}") and r["status"] == "committed"):
        rows = lance.dataset(table, version=record["table_version"]).count_rows()
        if record["rows_after"] != rows or rows != record["rows_before"] - record["deleted"] + record["added"]:
            problem(f"run {record['run_id']} counted {record['rows_before']} - {record['deleted']} + "
                    f"{record['added']} = {record['rows_after']} rows; version {record['table_version']} has {rows}")
        if record["read"] != (record["written"] + record["unchanged"] + record["kept"] + record["rejected"]
                              + record["deferred"]):
            problem(f"run {record['run_id']}'s counts of the catalog's rows do not add up: {record}")


def _until_committed(night: Night, run_id: str, tries: int = 3) -> int:
    """Run a night as a scheduler retries one: a run the store's injected faults failed (exit 1, nothing
    committed, as docs/safety.md says) runs again under a new id. The runs it took."""
    for attempt in range(1, tries + 1):
        if night.wait(night.start(run_id if attempt == 1 else f"{run_id}-{attempt}", 1)) in (0, 3):
            return attempt
    return tries


def _exists(table_uri: str) -> bool:
    try:
        lance.dataset(table_uri)
        return True
    except ValueError:
        return False


def _equals_a_fresh_run(report: Report, folder: Path, shop: Shop, uri: str, fresh_uri: str, env: dict,
                        beam_args: list[str]) -> None:
    config = yaml.safe_load((folder / "job.yaml").read_text())
    config["output"]["uri"] = fresh_uri
    (folder / "fresh.yaml").write_text(yaml.safe_dump(config))
    fresh = Night(folder / "fresh.yaml", beam_args, env, folder)
    _until_committed(fresh, "fresh")
    if not _exists(dataset_uri(fresh_uri, "shop")):
        report.problems.append("the fresh run committed nothing in 3 tries")
        return
    ours, theirs = (lance.dataset(dataset_uri(at, "shop")).to_table().sort_by("id") for at in (uri, fresh_uri))
    if ours["id"].to_pylist() != theirs["id"].to_pylist():
        extra, missing = (sorted(set(a["id"].to_pylist()) - set(b["id"].to_pylist())) for a, b in
                          ((ours, theirs), (theirs, ours)))
        report.problems.append(f"after the clean night, the table's ids differ from a fresh run's: only in the "
                               f"table {extra}, only in the fresh run {missing}")
        return
    # Behaviour vectors are turned onto the stored ones each generation (transforms/behaviour.py): the table's equal
    # a fresh run's up to one rotation, which carries the behaviour part of `vector` too; their fingerprints name
    # another generation.
    u, _, vt = np.linalg.svd(vector_matrix(theirs["behaviour_vec"]).T @ vector_matrix(ours["behaviour_vec"]))
    rotation = u @ vt
    meta = table_metadata(ours.schema)
    dims = {e["name"]: e["dim"] for e in meta["encoders"]}
    start = sum(dims[name] for name in meta["order"][:meta["order"].index("behaviour")])
    for name in ours.schema.names:
        if name.endswith("_vec") or name == "vector":
            a, b = (vector_matrix(t[name]) for t in (ours, theirs))
            if name == "behaviour_vec":
                b = b @ rotation
            elif name == "vector":
                b = b.copy()
                b[:, start:start + len(rotation)] = b[:, start:start + len(rotation)] @ rotation
            if not ours[name].is_null().equals(theirs[name].is_null()) or not np.allclose(a, b, atol=1e-4):
                report.problems.append(f"after the clean night, {name} differs from a fresh run's by up to "
                                       f"{np.abs(a - b).max():.2g}")
        elif name not in ("run_id", "embedded_at", "behaviour_fp") and not ours[name].equals(theirs[name]):
            report.problems.append(f"after the clean night, column {name} differs from a fresh run's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=30)
    parser.add_argument("--stores", default="local,s3")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--folder", default="out/soak")
    args = parser.parse_args()
    reports = []
    for store in args.stores.split(","):
        folder = Path(args.folder) / store
        if folder.exists():
            subprocess.run(["rm", "-rf", str(folder)], check=True)
        folder.mkdir(parents=True)
        reports.append(soak(store, args.nights, args.seed, folder.resolve()))
        print(reports[-1].line(), flush=True)
        for problem in reports[-1].problems:
            print(f"  {problem}", flush=True)
    sys.exit(1 if any(r.problems or r.rows_lost for r in reports) else 0)


if __name__ == "__main__":
    main()
