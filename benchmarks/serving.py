"""`catalog-embed serve` under a bounded load from loopback, on a 1,000,000-row table written as the job writes it.

The table has the job's layout with two real encoders in its metadata (all-MiniLM-L6-v2 for text, the color
histogram for pictures), so that the service encodes real text and image queries, and clustered synthetic
vectors (benchmarks/query.py), indexed by the job's upkeep. The service runs as `catalog-embed serve` in its
own process; clients on threads of this one send a fixed number of requests, from 1 and from 8 at once:
`like` (a random stored item), text and image queries, each without and with a filter that keeps 1% of the
rows. Reported: requests per second, p50 and p99 latency, and the serving process's memory; beside them, the
p50 of the same `like` searches called in this process (`search()`), the floor a service can approach.
Then the mixed load: 8 clients sending `like`, text and picture searches in turn, alone, and again with a
health report (duplicates, outliers) every fourth request; each report's first request (computed), and the
searches' p50 and p99 in both.

    python -m benchmarks.serving --rows 1000000 --out out/bench.json
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.query import Catalog, synthetic_table
from benchmarks.results import save_section
from demo.photos import photo_path
from pipelines.report import print_results

REQUESTS = {1: 100, 8: 400}       # requests per case, by concurrent clients
MIXED_SEARCHES, HEALTH_SHARE, HEALTH = 600, 4, ("duplicates", "outliers")     # a health request in every 4
FILTER = [{"field": "group100", "op": "=", "value": "7"}]
WORDS = ("red dress", "running shoes", "a cup of coffee", "leather wallet", "desk lamp", "wool scarf", "sunglasses")
PICTURES = [("skimage", "coffee.png"), ("skimage", "chelsea.png"), ("skimage", "rocket.jpg"),
            ("sklearn", "flower.jpg")]


def described_encoders() -> list[dict]:
    """The text and color encoders as the job would describe them in the table's metadata."""
    from pipelines.nightly import describe_encoders
    from transforms.config import parse_config
    from transforms.encoders import build_encoders

    config = parse_config({"catalog": {"format": "manifest", "path": __file__, "text_fields": ["title"]},
                           "encoders": {"text": {"kind": "sentence-transformers"}, "color": {"kind": "color"}},
                           "output": {"uri": "unused", "table": "shop"}})
    return describe_encoders(build_encoders(config.encoders), config.normalised_weights())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: bytes, content_type: str) -> float:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"content-type": content_type, "x-catalog-embed": "bench"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as answer:
        answer.read()
    return time.perf_counter() - started


def _get(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as answer:
        answer.read()
    return time.perf_counter() - started


def _multipart(picture: bytes, fields: dict) -> tuple[bytes, str]:
    boundary = "catalog-embed-bench"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
             for key, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + picture + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def requests_of(kind: str, filtered: bool, ids: list[str], pictures: list[bytes], count: int) -> list[tuple]:
    rng = np.random.default_rng(len(kind) + filtered)
    out = []
    for n in range(count):
        asked: dict = {"k": 10, "filters": FILTER if filtered else []}
        if kind == "image":
            out.append(_multipart(pictures[n % len(pictures)], {"k": 10, "filters": json.dumps(asked["filters"])}))
            continue
        asked.update({"like": ids[rng.integers(len(ids))]} if kind == "like" else {"text": WORDS[n % len(WORDS)]})
        out.append((json.dumps(asked).encode(), "application/json"))
    return out


def measure_load(url: str, requests: list[tuple], clients: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        seconds = list(pool.map(lambda r: _post(url, *r), requests))
    wall = time.perf_counter() - started
    return {"requests": len(requests), "clients": clients, "rps": round(len(requests) / wall, 1),
            **_percentiles(seconds)}


def _percentiles(seconds: list[float]) -> dict:
    return {"p50_ms": round(1000 * statistics.median(seconds), 1),
            "p99_ms": round(1000 * float(np.percentile(seconds, 99)), 1)}


def mixed_load(url: str, ids: list[str], pictures: list[bytes]) -> dict:
    """Searches of every kind from 8 clients, alone and with health requests among them (HEALTH_SHARE)."""
    kinds = [requests_of(kind, False, ids, pictures, MIXED_SEARCHES) for kind in ("like", "text", "image")]
    searches = [("search", kinds[n % 3][n]) for n in range(MIXED_SEARCHES)]
    first = {report: round(_get(f"{url}/api/health/{report}"), 2) for report in HEALTH}
    mixed = []
    for n, search in enumerate(searches):
        mixed.append(search)
        if n % (HEALTH_SHARE - 1) == HEALTH_SHARE - 2:
            mixed.append(("health", HEALTH[n % len(HEALTH)]))

    def timed(request: tuple) -> tuple[str, float]:
        kind, asked = request
        return kind, _post(f"{url}/api/search", *asked) if kind == "search" else _get(f"{url}/api/health/{asked}")

    out = {"health first request s": first}
    for name, load in (("searches alone", searches), ("searches with health requests", mixed)):
        with ThreadPoolExecutor(8) as pool:
            found = list(pool.map(timed, load))
        for kind in ("search", "health"):
            seconds = [s for k, s in found if k == kind]
            if seconds:
                out[f"{name}: {kind}"] = {"requests": len(seconds), **_percentiles(seconds)}
        print(json.dumps({name: {k: v for k, v in out.items() if k.startswith(name)}}), flush=True)
    return out


def in_process_like(db: Path, ids: list[str], filtered: bool) -> float:
    """The p50 ms of the same `like` searches as function calls in this process."""
    from pipelines.search import query as q
    from pipelines.serve.search_api import structured_filter

    table = q.open_table(str(db), "shop")
    where = structured_filter(FILTER, ["group100"]) if filtered else None
    rng = np.random.default_rng(3)
    seconds = []
    for _ in range(REQUESTS[1]):
        started = time.perf_counter()
        q.search(table, q.item_queries(table, ids[rng.integers(len(ids))]), 10, None, where)
        seconds.append(time.perf_counter() - started)
    return round(1000 * statistics.median(seconds), 1)


def _memory_mib(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    field = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}
    return {"rss_mib": round(field["VmRSS"] / 1024), "peak_mib": round(field["VmHWM"] / 1024)}


def serve_and_measure(db: Path, rows: int) -> dict:
    import lance

    ids = lance.dataset(str(db / "shop.lance")).take(list(range(0, rows, max(1, rows // 1000))),
                                                     columns=["id"])["id"].to_pylist()
    pictures = [photo_path(*found).read_bytes() for found in PICTURES]
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("catalog-embed")), "serve", "--uri", str(db),
                               "--table", "shop", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=5).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the service did not start"
                time.sleep(0.2)
        rows = []
        for kind in ("like", "text", "image"):
            for filtered in (False, True):
                for r in requests_of(kind, filtered, ids, pictures, 8):      # warm: models loaded, caches filled
                    _post(f"{url}/api/search", *r)
                for clients, count in REQUESTS.items():
                    found = measure_load(f"{url}/api/search", requests_of(kind, filtered, ids, pictures, count),
                                         clients)
                    rows.append({"query": kind, "filter": "1%" if filtered else "", **found})
                    print(json.dumps(rows[-1]), flush=True)
        mixed = mixed_load(url, ids, pictures)
        memory = _memory_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    in_process = {"like": in_process_like(db, ids, False), "like, filter 1%": in_process_like(db, ids, True)}
    return {"rows": rows, "mixed": mixed, "server memory": memory, "in-process search() p50 ms": in_process}


def summarise(found: dict) -> dict:
    by = {(r["query"], r["filter"], r["clients"]): r for r in found["rows"]}
    like_one = by[("like", "", 1)]
    mixed = found["mixed"]
    alone, with_health = mixed["searches alone: search"], mixed["searches with health requests: search"]
    return {
        "mixed: search p99 with health / alone": round(with_health["p99_ms"] / alone["p99_ms"], 2),
        "mixed: search p50 with health / alone": round(with_health["p50_ms"] / alone["p50_ms"], 2),
        "mixed: health p50 / search p50": round(mixed["searches with health requests: health"]["p50_ms"]
                                                / with_health["p50_ms"], 2),
        "served like p50 / in-process p50": round(like_one["p50_ms"] / found["in-process search() p50 ms"]["like"], 2),
        **{f"{kind}{' filtered' if f else ''}: rps 8 clients / 1 client": round(
            by[(kind, f, 8)]["rps"] / by[(kind, f, 1)]["rps"], 2) for kind in ("like", "text", "image")
           for f in ("", "1%")},
        **{f"{kind}{' filtered' if f else ''}: p99 8 clients / p50 1 client": round(
            by[(kind, f, 8)]["p99_ms"] / by[(kind, f, 1)]["p50_ms"], 2) for kind in ("like", "text", "image")
           for f in ("", "1%")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", default="out/bench.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as scratch:
        db = Path(scratch) / "db"
        described = described_encoders()
        catalog = Catalog({e["name"]: e["dim"] for e in described}, described=described)
        started = time.perf_counter()
        synthetic_table(db, args.rows, catalog, "shop")
        written = round(time.perf_counter() - started)
        found = serve_and_measure(db, args.rows)
    found.update(rows_in_table=args.rows, table_written_and_indexed_s=written, summary=summarise(found))
    save_section(args.out, "serving", found)
    print_results(found["rows"])
    print(json.dumps({k: v for k, v in found.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
