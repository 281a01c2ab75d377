"""`catalog-embed serve` on the demo table: every endpoint answers as the command line does, a new version is
seen by the next request, bad requests get a 4xx and leave it serving."""

from __future__ import annotations

import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.cli import main
from pipelines.serve import create_app
from tests.conftest import COLOR_ONLY, captioned_catalog, make_config, photo, run, write_catalog


def cli_json(capsys, *args: str):
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def served(demo_run):
    config, _ = demo_run
    with TestClient(create_app(config.output.uri, "demo")) as client:
        yield config, client


def test_searches_answer_as_query_json_does(served, capsys):
    config, client = served
    table = ("--uri", config.output.uri, "--table", "demo")
    some_id = cli_json(capsys, "query", *table, "--text", "a cup of coffee")[0]["id"]
    cases = [
        ({"text": "a cup of coffee"}, ["--text", "a cup of coffee"]),
        ({"like": some_id, "k": 5}, ["--like", some_id, "-k", "5"]),
        ({"text": "a ginger cat", "weights": {"text": 1, "image": 0}}, ["--text", "a ginger cat", "--weights",
                                                                         "text=1,image=0"]),
        ({"text": "food", "filters": [{"field": "category", "op": "=", "value": "food"}]},
         ["--text", "food", "--where", "`category` = 'food'"]),
        ({"text": "a rocket", "hybrid": True}, ["--text", "a rocket", "--hybrid"]),
    ]
    for asked, args in cases:
        answer = client.post("/api/search", json=asked)
        assert answer.status_code == 200, answer.text
        assert answer.json() == cli_json(capsys, "query", *table, *args), asked
    picture = photo("coffee.png")
    answer = client.post("/api/search", files={"image": ("coffee.png", picture.read_bytes(), "image/png")},
                         data={"k": "4"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == cli_json(capsys, "query", *table, "--image", str(picture), "-k", "4")


def test_items_images_versions_and_reports_answer_as_the_commands_do(served, capsys):
    config, client = served
    table = ("--uri", config.output.uri, "--table", "demo")
    first = cli_json(capsys, "query", *table, "--text", "a cup of coffee", "-k", "1")[0]
    item = client.get(f"/api/items/{first['id']}").json()
    assert {key: item[key] for key in first if key != "score"} == {k: v for k, v in first.items() if k != "score"}
    image = client.get(f"/api/items/{first['id']}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert "max-age" in image.headers["cache-control"] and image.headers["etag"]
    assert max(Image.open(io.BytesIO(image.content)).size) <= 256
    assert client.get(f"/api/items/{first['id']}/image", headers={"if-none-match": image.headers["etag"]}
                      ).status_code == 304
    assert client.get("/api/versions").json() == json.loads(json.dumps(cli_json(capsys, "versions", *table),
                                                                       default=str))
    assert client.get("/api/health/duplicates").json() == cli_json(capsys, "duplicates", *table)
    # This table has no text and image encoder in one space: its outliers are the isolated items.
    assert client.get("/api/health/outliers").json() == cli_json(capsys, "outliers", *table, "--isolated")
    assert client.get("/healthz").json()["status"] == "ok"
    metrics = client.get("/metrics").text
    assert "catalog_embed_requests_total" in metrics and "catalog_embed_table_version" in metrics
    assert "/api/search" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "<title>catalog-embed</title>" in page.text


def test_a_version_a_run_commits_is_seen_by_the_next_request(tmp_path, capsys):
    folder, rows = captioned_catalog(tmp_path)
    config = make_config(tmp_path, {"format": "manifest", "path": str(folder / "catalog.csv")}, COLOR_ONLY,
                         output={"max_delete_ratio": 0.5})      # one item of six goes
    run(config, "r1")
    with TestClient(create_app(config.output.uri, "items")) as client:
        before = client.get("/healthz").json()["version"]
        assert client.get(f"/api/items/{rows[-1]['id']}").status_code == 200
        write_catalog(folder, rows[:-1])
        run(config, "r2")
        assert client.get("/healthz").json()["version"] > before
        assert client.get(f"/api/items/{rows[-1]['id']}").status_code == 404
        drift = client.get("/api/health/drift")
        assert drift.status_code == 200 and drift.json()["removed"] == 1
        assert drift.json() == cli_json(capsys, "drift", "--uri", config.output.uri, "--table", "items")


def _huge_png() -> bytes:
    """A picture of 12,000 x 9,000 pixels (over run.max_pixels, 100M) in a few kilobytes: one bit a pixel, all white."""
    out = io.BytesIO()
    Image.new("1", (12_000, 9_000), 1).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize(("request_kwargs", "status", "message"), [
    ({"files": {"image": ("x.png", b"not an image at all", "image/png")}}, 400, "cannot use image"),
    ({"files": {"image": ("x.png", b"\0" * 20_000_001, "image/png")}}, 413, "over 20,000,000 bytes"),
    ({"json": {"text": "x", "filters": [{"field": "price; DROP", "op": "=", "value": "1"}]}}, 400, "unknown field"),
    ({"json": {"text": "x", "filters": [{"field": "category", "op": "LIKE", "value": "1"}]}}, 400, "unknown operator"),
    ({"json": {"text": "x", "where": "1 = 1"}}, 403, "--allow-sql-filter"),
    ({"json": {"like": "no-such-item"}}, 404, "no item with id"),
    ({"json": {"text": "x", "k": 0}}, 400, "k must be"),
    ({"json": {"text": "x", "weights": {"nope": 1}}}, 400, "weights name nope"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not JSON"),
])
def test_bad_searches_get_a_4xx_and_leave_it_serving(served, request_kwargs, status, message):
    _, client = served
    answer = client.post("/api/search", **request_kwargs)
    assert answer.status_code == status and message in answer.json()["error"], answer.text
    assert client.get("/healthz").status_code == 200


def test_quotes_in_filter_values_are_values_and_paths_are_not_images(served):
    _, client = served
    quoted = client.post("/api/search", json={"text": "x", "filters": [
        {"field": "category", "op": "=", "value": "food' OR '1'='1"}]})
    assert quoted.status_code == 200 and quoted.json() == []
    for path in ("/api/items/..%2F..%2Fetc%2Fpasswd/image", "/api/items/%2Fetc%2Fpasswd/image",
                 "/api/items/no-such-item", "/api/health/nope"):
        answer = client.get(path)
        assert answer.status_code == 404 and "error" in answer.json(), path
    assert client.get("/healthz").status_code == 200


def test_an_oversize_picture_is_refused_by_its_pixels(served):
    _, client = served
    answer = client.post("/api/search", files={"image": ("big.png", _huge_png(), "image/png")})
    assert answer.status_code == 400 and "pixels" in answer.json()["error"], answer.text


def test_the_cli_serves_on_loopback_by_default():
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["serve", "--uri", "db", "--table", "t"])
    assert (args.host, args.port, args.allow_sql_filter) == ("127.0.0.1", 8080, False)
