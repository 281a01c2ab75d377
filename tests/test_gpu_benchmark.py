"""`python -m benchmarks.gpu` runs on whatever device it finds: here, on the CPU at tiny sizes, every model's
network and whole job run for real (the job encodes every input) and the results file holds their rates. At
these sizes the job's marginal rate may be below the start-up's noise: the file says so with no rate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.gpu import TINY_SIZES

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_runs_every_model_on_this_device(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--tiny", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(out.read_text())["gpu (tiny)"]["runs"]
    assert [(run["model"], run["inputs"]) for run in runs] == [
        ("EfficientNet-Lite0", "photos"), ("open_clip tiny, random", "photos"), ("MiniLM-L6", "texts")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for run in runs:
        assert run["device"].startswith(device) and run["batch_size"] > 0
        assert run["network_per_s"] > 0 and run["job_encoded"] == TINY_SIZES[run["inputs"]][1], run
        assert run["job_per_s"] is None or run["job_per_s"] > 0, run
