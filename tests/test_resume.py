"""A run killed part-way is resumed by the next run of the same config: what reached storage is committed, not
encoded again, and the table equals an uninterrupted run's. Staged work that can no longer be committed is
removed."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import boto3
import numpy as np
import pytest
import yaml

from tests.conftest import BUCKET, read_table, run
from transforms import commit
from transforms.config import load_config
from transforms.lance_sink import dataset_uri, open_dataset

ITEMS, BATCH = 2000, 100
TITLES = 20_000
TWO_WORKERS = ("--direct_num_workers=2", "--direct_running_mode=multi_processing")
COLORS = ("red", "navy", "olive", "ivory", "teal", "amber", "plum", "slate")
THINGS = ("mug", "scarf", "lamp", "boot", "chair", "kettle", "jacket", "vase", "towel", "clock")


def _catalog(folder: Path, table: str = "shop", extra: dict | None = None, uri: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["id,title"] + [f"p{i:04d},{COLORS[i % 8]} {THINGS[i // 8 % 10]} no. {i} in size {i % 7}"
                            for i in range(ITEMS)]
    (folder / "catalog.csv").write_text("\n".join(lines) + "\n")
    config = {"catalog": {"format": "manifest", "path": str(folder / "catalog.csv"), "text_fields": ["title"],
                          **(extra or {})},
              "encoders": {"text": {"kind": "sentence-transformers", "batch_size": 32, "precision": "fp32"}},
              "output": {"uri": uri or str(folder / "db"), "table": table, "write_batch_rows": BATCH}}
    (folder / "job.yaml").write_text(yaml.safe_dump(config))
    return folder / "job.yaml"


def _staged_batches(scratch: Path | str) -> list[str]:
    """The batches staged under a scratch root: a local folder (`<table folder>/db/_catalog_embed_scratch` unless
    --temp_location says otherwise), or an s3:// prefix."""
    if isinstance(scratch, str):
        bucket, _, prefix = scratch.removeprefix("s3://").partition("/")
        listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
        return [found["Key"] for found in listed if found["Key"].endswith(".fragments.json")]
    return [str(path) for path in scratch.glob("catalog-embed-*-staging-*/*/*.fragments.json")]


def _local_scratch(folder: Path) -> Path:
    return folder / "db" / "_catalog_embed_scratch"


def _killed_once_half_is_written(config: Path, scratch: Path | str, beam_args: Sequence[str] = TWO_WORKERS) -> None:
    """The run on 2 worker processes (the local stand-in for a cluster), SIGKILLed with its workers."""
    command = [str(Path(sys.executable).parent / "catalog-embed"), "run", "--config", str(config), "--run-id", "dead",
               *beam_args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(_staged_batches(scratch)) < ITEMS // BATCH // 2:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before half was written"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    config = load_config(str(_catalog(folder)))
    run(config, "whole")
    return read_table(config)


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_a_killed_first_run_is_resumed_not_encoded_again(tmp_path, uninterrupted, storage, request):
    if storage == "s3":
        s3 = request.getfixturevalue("s3")
        scratch = f"s3://{BUCKET}/resume/tmp"
        beam_args = (*TWO_WORKERS, f"--s3_endpoint_url={s3.endpoint}", f"--temp_location={scratch}")
        config_path = _catalog(tmp_path, uri=f"s3://{BUCKET}/resume/db")
    else:
        scratch, beam_args, config_path = _local_scratch(tmp_path), TWO_WORKERS, _catalog(tmp_path)
    _killed_once_half_is_written(config_path, scratch, beam_args)
    staged = len(_staged_batches(scratch))
    config = load_config(str(config_path))
    assert open_dataset(dataset_uri(config.output.uri, "shop")) is None        # nothing was committed

    summary = run(config, "again", beam_args)
    assert summary["status"] == "committed"
    assert summary["read"] == summary["written"] == ITEMS
    assert summary["resumed"] >= staged * BATCH >= ITEMS // 2
    assert summary["encoded"]["text"] <= 0.6 * ITEMS
    assert _staged_batches(scratch) == []                        # committed: the staging is gone

    table = read_table(config)
    assert table["id"].to_pylist() == uninterrupted["id"].to_pylist()
    for column in ("title", "embedded_text", "text_fp"):
        assert table[column].to_pylist() == uninterrupted[column].to_pylist(), column
    ours, whole = (np.stack(t["text_vec"].to_numpy(zero_copy_only=False)) for t in (table, uninterrupted))
    assert np.min(np.sum(ours * whole, axis=1)) >= 0.9999
    assert run(config, "unchanged")["unchanged"] == ITEMS


def test_a_staged_batch_that_cannot_be_read_is_encoded_again_not_committed(tmp_path, uninterrupted, monkeypatch):
    """A kill mid-write on a disk that tears files, or staged data files gone: the batch is dropped, not the run."""
    config = load_config(str(_catalog(tmp_path)))

    def dies(*args, **kwargs):
        raise RuntimeError("killed in the commit")

    monkeypatch.setattr(commit, "commit_change", dies)
    with pytest.raises(Exception, match="killed in the commit"):
        run(config, "dead")
    monkeypatch.undo()
    torn, *rest = sorted(_staged_batches(_local_scratch(tmp_path)))
    Path(torn).write_text('{"fragments": [')
    data = Path(config.output.uri) / "shop.lance" / "data"
    gone = json.loads(Path(rest[0]).read_text())["fragments"]
    for raw in gone:
        for data_file in json.loads(raw)["files"]:
            (data / data_file["path"]).unlink()
    summary = run(config, "again")
    assert summary["resumed"] == ITEMS - 2 * BATCH and summary["encoded"]["text"] == 2 * BATCH
    assert read_table(config)["text_fp"].to_pylist() == uninterrupted["text_fp"].to_pylist()


def test_staged_work_of_another_config_is_removed_and_never_committed(tmp_path, caplog):
    config_path = _catalog(tmp_path)
    _killed_once_half_is_written(config_path, _local_scratch(tmp_path))
    other = load_config(str(_catalog(tmp_path, extra={"fields": ["title"]})))      # another config hash
    with caplog.at_level(logging.INFO, logger="transforms.staging"):
        summary = run(other, "other")
    assert "removing staged work that cannot be committed" in caplog.text
    assert summary["resumed"] == 0 and summary["encoded"]["text"] == ITEMS
    assert summary["written"] == ITEMS and _staged_batches(_local_scratch(tmp_path)) == []


@pytest.mark.parametrize("storage", ["local", "s3"])
@pytest.mark.parametrize("dies_in", ["commit_change", "maintain"])
def test_a_run_that_dies_in_its_commit_or_upkeep_costs_no_forward_pass_again(tmp_path, uninterrupted, monkeypatch,
                                                                              dies_in, storage, request):
    """Dying in the commit leaves every batch staged for the next run; dying in the upkeep, after the commit,
    is a committed run whose upkeep the next run does. In this process, where the commit stage can be made
    to die."""
    if storage == "s3":
        s3 = request.getfixturevalue("s3")
        scratch = f"s3://{BUCKET}/dies-in-{dies_in}/tmp"
        beam_args = (f"--s3_endpoint_url={s3.endpoint}", f"--temp_location={scratch}")
        config = load_config(str(_catalog(tmp_path, uri=f"s3://{BUCKET}/dies-in-{dies_in}/db")))
    else:
        scratch, beam_args, config = _local_scratch(tmp_path), (), load_config(str(_catalog(tmp_path)))

    def dies(*args, **kwargs):
        raise RuntimeError(f"killed in {dies_in}")

    monkeypatch.setattr(commit, dies_in, dies)
    if dies_in == "commit_change":
        with pytest.raises(Exception, match=f"killed in {dies_in}"):
            run(config, "dead", beam_args)
    else:
        dead = run(config, "dead", beam_args)
        assert dead["status"] == "committed" and dead["upkeep"].startswith(f"failed: RuntimeError: killed in {dies_in}")
    monkeypatch.undo()
    summary = run(config, "again", beam_args)
    assert summary["encoded"]["text"] == 0 and summary["upkeep"] == "done"
    assert summary["resumed"] == (ITEMS if dies_in == "commit_change" else 0)
    assert summary["written"] + summary["unchanged"] == ITEMS and _staged_batches(scratch) == []
    table = read_table(config)
    assert table["text_fp"].to_pylist() == uninterrupted["text_fp"].to_pylist()


def test_a_kill_at_default_settings_loses_only_the_last_seconds_of_encoding(tmp_path):
    """20,000 unique titles, the text encoder, every setting at its default (batches of 4,096 rows, cut every
    output.stage_seconds): killed with SIGKILL at 65% of the encoding an uninterrupted run did (from its model
    load to its commit, read off its log), the next run encodes at most 60%. Before batches were cut by time and
    the encoders fused with the writes, it encoded all of them again: nothing reached storage before the last
    item was encoded. (The whole run is not the measure: on a fast machine its fixed start-up is most of it.)"""
    folder = tmp_path / "shop"
    folder.mkdir()
    lines = ["id,title"] + [f"d{i:05d},{COLORS[i % 8]} {THINGS[i // 8 % 10]} model {i} in size {i % 7}"
                            for i in range(TITLES)]
    (folder / "catalog.csv").write_text("\n".join(lines) + "\n")
    config = {"catalog": {"format": "manifest", "path": str(folder / "catalog.csv"), "text_fields": ["title"]},
              "encoders": {"text": {"kind": "sentence-transformers"}}}
    for name in ("whole", "cut"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(dict(config, output={"uri": str(tmp_path / name),
                                                                                   "table": "shop"})))
    command = [str(Path(sys.executable).parent / "catalog-embed"), "run", "--config"]
    started = time.time()
    log = subprocess.run([*command, str(tmp_path / "whole.yaml")], check=True, capture_output=True, text=True).stderr
    loaded, committed = (_logged_at(log, what) for what in ("loaded encoder", "committed"))

    process = subprocess.Popen([*command, str(tmp_path / "cut.yaml")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(loaded - started + 0.65 * (committed - loaded))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    summary = run(load_config(str(tmp_path / "cut.yaml")), "after-the-kill")
    assert summary["read"] == summary["written"] == TITLES
    assert summary["encoded"]["text"] <= 0.6 * TITLES, summary


def _logged_at(log: str, what: str) -> float:
    """When the run logged `what` first, as seconds since the epoch."""
    stamp = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) \w+ [^\n]*" + re.escape(what), log, re.MULTILINE)
    assert stamp, f"the run did not log {what!r}"
    return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
