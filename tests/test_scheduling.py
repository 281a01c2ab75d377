"""What schedulers read: the dry run's plan and the run's record, each as one JSON line on stdout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import lance

from pipelines.cli import main
from tests.conftest import PHOTOS, copy_photo, write_catalog
from transforms.lance_sink import dataset_uri
from transforms.run_log import read_runs

ITEMS = 20


def _catalog(tmp_path):
    """20 captioned items over the real photos (each its own file), and a config with text and color."""
    folder, rows = tmp_path / "catalog", []
    for i in range(ITEMS):
        copy_photo(PHOTOS[i % len(PHOTOS)], folder / "images" / f"{i}.png")
        rows.append({"id": f"item-{i:02d}", "caption": f"photo {i} of the catalog", "image": f"images/{i}.png"})
    write_catalog(folder, rows)
    config = tmp_path / "job.yaml"
    config.write_text(f"catalog: {{format: manifest, path: {folder / 'catalog.csv'}, text_fields: [caption]}}\n"
                      "encoders: {text: {kind: sentence-transformers}, color: {kind: color}}\n"
                      f"output: {{uri: {tmp_path / 'db'}, table: items}}\n")
    return folder, rows, config


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_dry_run_reports_the_plan_and_writes_nothing(tmp_path, capsys):
    folder, rows, config = _catalog(tmp_path)
    assert main(["run", "--config", str(config), "--json"]) == 0
    record = _last_json(capsys)
    [stored] = read_runs(str(tmp_path / "db"), "items")
    assert record == json.loads(json.dumps(dict(stored, seconds=record["seconds"]), default=lambda v: v.isoformat()))
    assert (record["status"], record["written"]) == ("committed", ITEMS)
    assert record["encoded"] == {"text": ITEMS, "color": len(PHOTOS)}     # equal photo files are encoded once

    rows[3]["caption"] = "a new caption"                                  # a caption changes
    copy_photo(PHOTOS[7], folder / "images" / "5.png")                    # a photo changes
    del rows[9]                                                           # an item is deleted
    write_catalog(folder, rows)
    uri = dataset_uri(str(tmp_path / "db"), "items")
    version = lance.dataset(uri).version
    assert main(["run", "--config", str(config), "--dry-run", "--json"]) == 0
    plan = _last_json(capsys)
    assert (plan["new"], plan["changed"], plan["deleted"], plan["rejected"]) == (0, 2, 1, 0)
    assert plan["unchanged"] == ITEMS - 3 and plan["read"] == ITEMS - 1
    assert plan["changed_by_encoder"] == {"text": 1, "color": 1} and plan["encode"] == {"text": 1, "color": 1}
    assert lance.dataset(uri).version == version                          # the table did not move
    assert len(read_runs(str(tmp_path / "db"), "items")) == 1             # nor did its side tables
    assert main(["run", "--config", str(config), "--json"]) == 0
    assert _last_json(capsys)["encoded"] == plan["encode"]                # the plan was the run's work


def _command(*args: str) -> subprocess.CompletedProcess:
    """The console script as a scheduler runs it: a fresh process, no terminal."""
    script = Path(sys.executable).with_name("catalog-embed")
    return subprocess.run([str(script), *args], capture_output=True, text=True, check=False)


def test_logs_are_ours_only_unless_verbose_and_json_lines_on_request(tmp_path):
    _, _, config = _catalog(tmp_path)
    quiet = _command("run", "--config", str(config), "--log-format", "json", "--json")
    assert quiet.returncode == 0, quiet.stderr
    entries = [json.loads(line) for line in quiet.stderr.splitlines()]      # every line is one JSON object
    assert entries and {e["logger"].split(".")[0] for e in entries} <= {"pipelines", "transforms", "catalog_embed"}
    assert any("batch_size auto" in e["message"] for e in entries)
    [record] = quiet.stdout.splitlines()                                  # stdout is the one JSON line
    assert json.loads(record)["status"] == "committed"
    ours = re.compile(r"\d{4}-\d\d-\d\d \S+ (INFO|WARNING|ERROR) (pipelines|transforms|catalog_embed)[.:]")
    query = _command("query", "--uri", str(tmp_path / "db"), "--table", "items", "--text", "a photo", "-k", "2")
    assert query.returncode == 0 and "item-" in query.stdout
    # On a cold cache the query says it exports its network; nothing else speaks, and no export fails.
    assert all(ours.match(line) and " INFO " in line and "exporting its network" in line
               for line in query.stderr.splitlines()), query.stderr

    verbose = _command("run", "--config", str(config), "-v")
    assert verbose.returncode == 0
    libraries = [line for line in verbose.stderr.splitlines() if not ours.match(line)]
    assert libraries, verbose.stderr                                        # -v lets the libraries speak


def test_a_run_over_the_warning_level_of_rejects_commits_and_exits_3(tmp_path, capsys):
    folder, rows, config = _catalog(tmp_path)
    rows[0]["image"] = "images/missing.png"                                # 1 row of 20 rejected: 5%
    write_catalog(folder, rows)
    assert main(["run", "--config", str(config), "--json"]) == 3
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["status"] == "committed"
    assert "over run.warn_reject_ratio 1.0%" in err.strip().splitlines()[-1]
    config.write_text(config.read_text() + "run: {warn_reject_ratio: 0.05}\n")
    assert main(["run", "--config", str(config)]) == 0                     # at the level: no warning
