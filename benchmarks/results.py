"""`out/bench.json` holds one section per benchmark, so that `make bench` leaves every result in one file.

Every benchmark has the same entry point (`run_benchmark`): the parent process builds the catalogs in
a scratch folder and, where a benchmark compares sides, starts one fresh process per measurement,
`python -m benchmarks.X --one ...`, so that no side inherits a model or a warm cache from another.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.report import print_results


def save_section(path: str, section: str, data: Any) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    if not isinstance(results, dict):       # a file from before the benchmarks had sections
        results = {}
    results[section] = data
    out.write_text(json.dumps(results, indent=2))


def run_command(argv: list[str]) -> tuple[str, float]:
    """A command's stdout and its wall time as a user sees it (interpreter, imports, model load and work)."""
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return done.stdout, time.perf_counter() - started


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM, its own address space's. `ru_maxrss` would report at
    least the parent's peak at the time of the fork, which Linux carries over through fork and exec."""
    return _proc_field("/proc/self/status", "VmHWM:") / 1024


def rchar_mib() -> float:
    """Every byte this process has read so far (files, pipes; libraries and weights too)."""
    return _proc_field("/proc/self/io", "rchar:") / 2**20


def _proc_field(path: str, name: str) -> int:
    return int(next(line.split()[1] for line in Path(path).read_text().splitlines() if line.startswith(name)))


def measure_in_fresh_process(module: str, *args: str) -> dict:
    """`python -m MODULE --one ARGS`: the JSON object it prints last, with the command's wall time."""
    stdout, seconds = run_command([sys.executable, "-m", module, "--one", *args])
    return dict(json.loads(stdout.strip().splitlines()[-1]), command_s=seconds)


def marginal_rate(seconds: dict[int, float]) -> dict:
    """Items/s between the smallest and largest catalog, so that fixed start-up cancels out, and that
    start-up: the small catalog's time less its items at the marginal rate."""
    small, large = min(seconds), max(seconds)
    rate = (large - small) / (seconds[large] - seconds[small])
    return {"items_per_s": round(rate, 1), "startup_s": round(seconds[small] - small / rate, 1),
            **{f"seconds_{n}": round(s, 1) for n, s in sorted(seconds.items())}}


def run_benchmark(parser: argparse.ArgumentParser, one: Callable[..., None] | None,
                  measure_all: Callable[[argparse.Namespace, Path], tuple[str, Any, list[dict]]]) -> None:
    """With `--one ARGS` (where `one` is given), measure one side in this process. Otherwise
    `measure_all(args, scratch folder)` returns (section, data, rows): the data is saved under the section of
    `--out`, the rows printed."""
    args = parser.parse_args()
    if one is not None and args.one:
        one(*args.one)
        return
    with tempfile.TemporaryDirectory() as scratch:
        section, data, rows = measure_all(args, Path(scratch))
    save_section(args.out, section, data)
    print_results(rows)
    if isinstance(data, dict) and "summary" in data:
        print(json.dumps(data["summary"], indent=2))
    print(f"results: {args.out}")
