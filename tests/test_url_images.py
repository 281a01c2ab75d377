"""Images named by http(s) URL, from a local stand-in for a CDN (demo/image_server.py): fetched once, with
retries, limits and rejects that name the HTTP status; unchanged nights fetch no body, and with
`catalog.immutable_urls` send no request."""

from __future__ import annotations

import csv

import lancedb
import numpy as np
import pytest

from demo.image_server import ImageServer
from tests.conftest import COLOR_ONLY, PHOTOS, make_config, photo, read_table, run
from transforms.config import ConfigError, HttpSettings
from transforms.http_fetch import fetch

GOOD = ["img", "img", "img", "img", "flaky", "busy", "moved"]     # a kind of path per stored item
BAD = {"missing": "HTTP404", "slow": "Timeout", "huge": "TooLarge", "page": "NotAnImage"}
HTTP = {"retries": 1, "backoff_s": 0.05, "read_timeout_s": 2.0, "connect_timeout_s": 5}   # generous: CI is busy
RUN = {"max_image_bytes": 2_000_000, "max_reject_ratio": 0.5}


def _paths() -> dict[str, str]:
    """Item id -> the path of its image on the server; each item its own photo."""
    paths = {f"{kind}-{i}": f"/{kind}/{PHOTOS[i]}" for i, kind in enumerate(GOOD)}
    paths.update({f"{kind}-{i}": f"/{kind}/{PHOTOS[i]}" for i, kind in enumerate(BAD)})
    return paths


def _config(tmp_path, server: ImageServer, folder: str = "urls", **catalog):
    root = tmp_path / folder
    root.mkdir(exist_ok=True)
    with (root / "catalog.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "title", "image"])
        writer.writerows([item, f"product {item}", server.url(path)] for item, path in _paths().items())
    catalog = {"format": "manifest", "path": str(root / "catalog.csv"), "text_fields": ["title"], "http": HTTP,
               **catalog}
    return make_config(root, catalog, COLOR_ONLY, run=RUN)


def _photo_bodies(server: ImageServer) -> int:
    """Photo bodies sent for stored items (a slow answer's body goes out after the client gave up)."""
    return sum(count for path, count in server.bodies.items() if not path.startswith("/slow/"))


def _rejects(config) -> dict[str, tuple[str, str]]:
    rows = read_table(config, f"{config.output.table}_rejects").to_pylist()
    return {row["id"]: (row["stage"], row["error"]) for row in rows if row["run_id"] == rows[-1]["run_id"]}


@pytest.fixture(scope="module")
def server():
    with ImageServer({name: photo(name).read_bytes() for name in PHOTOS}, slow_s=5.0) as served:
        yield served


def test_url_images_are_fetched_once_retried_and_rejected_by_status(tmp_path, server):
    config = _config(tmp_path, server)
    summary = run(config)

    assert (summary["read"], summary["written"], summary["rejected"]) == (11, 7, 4)
    assert _rejects(config) == {f"{kind}-{i}": ("load", error) for i, (kind, error) in enumerate(BAD.items())}
    # One body per photo: the encode stage decodes the run's copy, not a second download.
    good = {path for item, path in _paths().items() if not item.startswith(tuple(BAD))}
    assert {path: server.bodies[path] for path in good if not path.startswith("/moved")} == {
        path: 1 for path in good if not path.startswith("/moved")}
    assert server.bodies[f"/img/{PHOTOS[GOOD.index('moved')]}"] == 1       # where the redirect led
    busy = server.times[f"/busy/{PHOTOS[GOOD.index('busy')]}"]
    assert len(busy) == 2 and busy[1] - busy[0] >= 0.95                   # Retry-After: 1 was honoured
    assert server.requests[f"/flaky/{PHOTOS[GOOD.index('flaky')]}"] == 2
    assert server.requests[_paths()["slow-1"]] == HTTP["retries"] + 1

    # The vectors are those of the same photos read from files.
    files = tmp_path / "files"
    files.mkdir()
    with (files / "catalog.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image"])
        writer.writerows([f"{kind}-{i}", str(photo(PHOTOS[i]))] for i, kind in enumerate(GOOD))
    reference = make_config(files, {"format": "manifest", "path": str(files / "catalog.csv")}, COLOR_ONLY)
    run(reference)
    stored = read_table(config)
    assert stored["id"].to_pylist() == read_table(reference)["id"].to_pylist()
    np.testing.assert_allclose(np.stack(stored["color_vec"].to_numpy(zero_copy_only=False)),
                               np.stack(read_table(reference)["color_vec"].to_numpy(zero_copy_only=False)),
                               atol=1e-6)
    assert all(uri.startswith("http://127.0.0.1:") for uri in stored["image_uri"].to_pylist())


def test_an_unchanged_night_fetches_no_body_and_a_changed_image_exactly_one(tmp_path, server):
    config = _config(tmp_path, server)
    run(config, "night-1")
    server.reset_counts()
    unchanged = run(config, "night-2")
    assert unchanged["unchanged"] == 7 and unchanged["written"] == 0
    assert _photo_bodies(server) == 0
    assert set(_rejects(config).values()) == {("load", error) for error in BAD.values()}    # retried, again

    before = {row["id"]: row["color_vec"] for row in read_table(config).to_pylist()}
    server.reset_counts()
    server.replace(PHOTOS[1], photo(PHOTOS[6]).read_bytes())
    changed = run(config, "night-3")
    assert _photo_bodies(server) == 1 and server.bodies[f"/img/{PHOTOS[1]}"] == 1
    assert changed["written"] == 1 and changed["unchanged"] == 6
    after = {row["id"]: row["color_vec"] for row in read_table(config).to_pylist()}
    assert [item for item in before if not np.allclose(before[item], after[item])] == ["img-1"]
    server.replace(PHOTOS[1], photo(PHOTOS[1]).read_bytes())


def test_immutable_urls_send_no_request_for_stored_images(tmp_path, server):
    config = _config(tmp_path, server, immutable_urls=True)
    run(config, "night-1")
    server.reset_counts()
    summary = run(config, "night-2")
    assert summary["unchanged"] == 7
    stored = set(lancedb.connect(config.output.uri).open_table(config.output.table).to_arrow()["image_uri"].to_pylist())
    assert {path for path in server.requests if server.url(path) in stored} == set()
    assert set(server.requests) == {path for item, path in _paths().items() if item.startswith(tuple(BAD))}


@pytest.mark.parametrize("http, message", [
    ({"retries": -1}, "catalog.http.retries must be a number of at least 0"),
    ({"max_per_host": 2.5}, "catalog.http.max_per_host must be a whole number"),
    ({"max_per_host": 0}, "catalog.http.max_per_host must be a number of at least"),
    ({"user_agent": " "}, "catalog.http.user_agent must be a non-empty string"),
    ({"retry": 3}, "catalog.http must be a mapping of: max_per_host"),
])
def test_http_settings_are_checked_before_any_work(tmp_path, http, message):
    catalog = {"format": "manifest", "path": str(tmp_path), "http": http}
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, catalog)


def test_an_answer_left_unread_does_not_poison_the_next_request(server):
    """A retried 503's body, left unread on a kept-alive connection, was once read as the next answer."""
    settings = HttpSettings(**HTTP)
    server.reset_counts()
    flaky, busy = f"/flaky/{PHOTOS[7]}", f"/busy/{PHOTOS[7]}"
    assert fetch(server.url(f"/img/{PHOTOS[7]}"), settings, 10**7).body == photo(PHOTOS[7]).read_bytes()
    assert fetch(server.url(flaky), settings, 10**7).body == photo(PHOTOS[7]).read_bytes()
    assert fetch(server.url(busy), settings, 10**7).body == photo(PHOTOS[7]).read_bytes()
    assert server.requests[flaky] == server.requests[busy] == 2
    assert server.times[busy][1] - server.times[busy][0] >= 0.95
