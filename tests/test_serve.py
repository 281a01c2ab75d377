"""`catalog-embed serve` on the demo table: every endpoint answers as the command line does, a new version is
seen by the next request, bad requests get a 4xx and leave it serving."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.cli import main
from pipelines.serve import create_app, reports_api
from pipelines.serve.access import MAX_FORM_BYTES, MAX_JSON_BYTES, TOKEN_VARIABLE, access_for
from tests.conftest import COLOR_ONLY, captioned_catalog, make_config, photo, run, write_catalog
from transforms.interaction_log import UserIndex, items_of_user

LOCAL = "http://127.0.0.1"          # a Host the service answers on loopback (TestClient's own is `testserver`)
SAME_SITE = {"x-catalog-embed": "test"}     # as the page sends: multipart uploads need it


def cli_json(capsys, *args: str):
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def served(demo_run):
    config, _ = demo_run
    with TestClient(create_app(config.output.uri, "demo"), base_url=LOCAL, headers=SAME_SITE) as client:
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


def _served_version(client, after: int) -> int:
    """The version /healthz names once it is past `after`: the service looks for new ones on a timer."""
    deadline = time.monotonic() + 10
    while (version := client.get("/healthz").json()["version"]) <= after and time.monotonic() < deadline:
        time.sleep(0.05)
    return version


def test_a_version_a_run_commits_is_served_within_the_refresh(tmp_path, capsys):
    folder, rows = captioned_catalog(tmp_path)
    config = make_config(tmp_path, {"format": "manifest", "path": str(folder / "catalog.csv")}, COLOR_ONLY,
                         output={"max_delete_ratio": 0.5})      # one item of six goes
    run(config, "r1")
    app = create_app(config.output.uri, "items", refresh_s=0.05)
    with TestClient(app, base_url=LOCAL, headers=SAME_SITE) as client:
        before = client.get("/healthz").json()["version"]
        assert client.get(f"/api/items/{rows[-1]['id']}").status_code == 200
        write_catalog(folder, rows[:-1])
        run(config, "r2")
        assert _served_version(client, before) > before
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


def test_a_foreign_host_is_refused_and_an_ip_address_is_not(served):
    """DNS rebinding: a page of rebind.example, its name pointed at 127.0.0.1, sends its own Host."""
    _, client = served
    for host in ("rebind.example", "rebind.example:8080", "localhost.rebind.example"):
        answer = client.get("/api/versions", headers={"host": host})
        assert answer.status_code == 403 and "--allowed-host" in answer.json()["error"], host
    for host in ("127.0.0.1:8080", "localhost", "[::1]:8080", "10.1.2.3"):
        assert client.get("/api/versions", headers={"host": host}).status_code == 200, host
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(("headers", "kwargs"), [
    ({}, {"files": {"image": ("x.png", b"x", "image/png")}}),                    # a cross-site form's upload
    ({"content-type": "text/plain"}, {"content": b'{"text": "a cat"}'}),          # a form's enctype=text/plain
    ({"content-type": "application/x-www-form-urlencoded"}, {"content": b"text=a+cat"}),
    ({"content-type": "application/json", "origin": "https://evil.example"}, {"content": b'{"text": "a cat"}'}),
    ({"content-type": "application/json", "sec-fetch-site": "cross-site"}, {"content": b'{"text": "a cat"}'}),
])
def test_a_cross_site_post_is_refused(demo_run, headers, kwargs):
    config, _ = demo_run
    with TestClient(create_app(config.output.uri, "demo"), base_url=LOCAL) as client:
        answer = client.post("/api/search", headers=headers, **kwargs)
        assert answer.status_code == 403, answer.text
        assert client.get("/healthz").status_code == 200


def test_beyond_loopback_a_token_is_needed(demo_run, tmp_path, monkeypatch):
    config, _ = demo_run
    monkeypatch.delenv(TOKEN_VARIABLE, raising=False)
    with pytest.raises(ValueError, match="needs a token"):
        access_for("0.0.0.0")
    assert main(["serve", "--uri", config.output.uri, "--table", "demo", "--host", "0.0.0.0"]) == 2
    assert access_for("0.0.0.0", no_auth=True).token is None
    (tmp_path / "token").write_text("s3cret\n")
    access = access_for("0.0.0.0", ["shop.example"], str(tmp_path / "token"))
    with TestClient(create_app(config.output.uri, "demo", access=access), base_url="http://shop.example") as client:
        assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
        for path in ("/api/versions", "/metrics", "/api/table", "/api/items/x", "/openapi.json"):
            assert client.get(path).status_code == 401, path
        assert client.get("/api/versions", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/versions", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/api/session", json={"token": "wrong"}).status_code == 401
        assert client.post("/api/session", json={"token": "s3cret"}).status_code == 200   # the page's cookie
        assert client.get("/api/versions").status_code == 200 and client.get("/metrics").status_code == 200


async def _streamed(app, path: str, chunks: int, chunk: bytes, content_type: str, head: bytes = b"") -> tuple[int, int]:
    """POST `head` then `chunks` chunks without a Content-Length straight to the ASGI app: its status and the
    chunks it read."""
    read, started = 0, {}

    async def receive():
        nonlocal read
        read += 1
        return {"type": "http.request", "body": head + chunk if read == 1 else chunk, "more_body": read < chunks}

    async def send(message):
        if message["type"] == "http.response.start":
            started["status"] = message["status"]

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", content_type.encode()),
                         (b"x-catalog-embed", b"test")], "scheme": "http", "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 5000), "http_version": "1.1", "root_path": ""}
    await app(scope, receive, send)
    return started["status"], read


def test_a_body_over_its_limit_is_refused_before_it_is_read(demo_run):
    config, _ = demo_run
    app = create_app(config.output.uri, "demo")
    chunk = b"x" * 16_384
    status, read = asyncio.run(_streamed(app, "/api/search", 10_000, chunk, "application/json"))    # 164 MB
    assert status == 413 and read * len(chunk) <= MAX_JSON_BYTES + len(chunk)
    upload = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
    status, read = asyncio.run(_streamed(app, "/api/search", 10_000, chunk, "multipart/form-data; boundary=b",
                                         upload))
    assert status == 413 and read * len(chunk) <= MAX_FORM_BYTES + len(chunk)
    with TestClient(app, base_url=LOCAL) as client:
        told = client.post("/api/search", content=b"{}", headers={"content-type": "application/json",
                                                                   "content-length": "999999999"})
        assert told.status_code == 413 and client.get("/healthz").status_code == 200


@pytest.mark.parametrize(("asked", "message"), [
    ({"text": "x" * 2_001}, "at most 2,000 characters"),
    ({"like": ["a list"]}, "like is text"),
    ({"text": "x", "filters": [{"field": "category", "op": "=", "value": "food"}] * 17}, "at most 16 filters"),
    ({"text": "x", "filters": [{"field": "category", "op": "in", "value": ["a"] * 101}]}, "at most 100 values"),
    ({"text": "x", "k": 201}, "k must be"),
    ({"text": "x", "k": True}, "k must be"),
])
def test_bounds_on_what_a_search_asks(served, asked, message):
    _, client = served
    answer = client.post("/api/search", json=asked)
    assert answer.status_code == 400 and message in answer.json()["error"], answer.text
    assert client.get("/api/health/outliers", params={"k": 1_000_000}).status_code == 400
    assert client.get("/healthz").status_code == 200


def test_a_health_report_is_computed_once_per_version(tmp_path, monkeypatch):
    folder, rows = captioned_catalog(tmp_path)
    config = make_config(tmp_path, {"format": "manifest", "path": str(folder / "catalog.csv")}, COLOR_ONLY)
    run(config, "r1")
    computed = []
    real = reports_api.health_report
    monkeypatch.setattr(reports_api, "health_report", lambda *args: computed.append(args[2]) or real(*args))
    with TestClient(create_app(config.output.uri, "items", refresh_s=0.05), base_url=LOCAL) as client:
        first = client.get("/api/health/duplicates").json()
        with ThreadPoolExecutor(4) as pool:         # at once: one computes, the others wait for it
            answers = list(pool.map(lambda _: client.get("/api/health/duplicates").json(), range(8)))
        assert answers == [first] * 8 and computed == ["duplicates"]
        before = client.get("/healthz").json()["version"]
        write_catalog(folder, rows + [dict(rows[0], id="copy-of-0")])
        run(config, "r2")
        _served_version(client, before)
        after = client.get("/api/health/duplicates").json()
        assert computed == ["duplicates"] * 2 and ["copy-of-0", rows[0]["id"]] in [sorted(g["ids"]) for g in after]
        assert client.get("/api/health/duplicates", params={"version": before}).json() == first
        assert computed == ["duplicates"] * 2


def test_a_users_items_come_from_an_index_of_the_log(tmp_path):
    """UserIndex answers as the scan does, on a log as shops write it: padded ids, empty cells, users of many
    sessions, a user id with no items."""
    log = tmp_path / "log.csv"
    rng = random.Random(1)
    with log.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["session_id", "item_id", "user_id"])
        for n in range(5_000):
            writer.writerow([f"s{n // 4}", rng.choice(["", f"i{rng.randrange(300)}", f" i{rng.randrange(300)} "]),
                             rng.choice(["", f"u{rng.randrange(50)}", f" u{rng.randrange(50)}"])])
    index = UserIndex(str(log))
    for user in [f"u{k}" for k in range(55)] + [" u3 ", "", "nobody"]:
        assert index.items(user) == items_of_user(str(log), user), user


@pytest.mark.parametrize(("method", "path", "body"), [
    ("get", "/api/items/x?version=-1", None),
    ("get", "/api/health/duplicates?version=-1", None),
    ("get", f"/api/health/duplicates?version={2**70}", None),
    ("post", "/api/search", {"text": "x", "version": 1.5}),
    ("post", "/api/search", {"text": "x", "version": True}),
    ("post", "/api/search", {"text": "x", "tag": ["a"]}),
    ("post", "/api/search", {"text": "x", "version": 999_999}),
    ("post", "/api/search", "[" * 40_000),                     # deep, and under the body's limit
])
def test_bad_versions_and_deep_bodies_are_a_4xx(served, method, path, body):
    _, client = served
    if isinstance(body, str):
        answer = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        answer = getattr(client, method)(path, **({"json": body} if body is not None else {}))
    assert 400 <= answer.status_code < 500 and "error" in answer.json(), answer.text
    assert client.get("/healthz").status_code == 200


def test_another_sites_page_cannot_start_a_report_but_a_shared_link_opens(served):
    _, client = served
    embedded = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors", "sec-fetch-dest": "image"}
    assert client.get("/api/health/outliers?k=7", headers=embedded).status_code == 403
    link = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate", "sec-fetch-dest": "document"}
    assert client.get("/?text=a+cat", headers=link).status_code == 200


def test_an_id_that_ends_in_image_is_an_item_when_encoded(tmp_path):
    folder, rows = captioned_catalog(tmp_path)
    rows[0]["id"], rows[1]["id"] = "red", "red/image"
    write_catalog(folder, rows)
    config = make_config(tmp_path, {"format": "manifest", "path": str(folder / "catalog.csv")}, COLOR_ONLY)
    run(config)
    with TestClient(create_app(config.output.uri, "items"), base_url=LOCAL) as client:
        assert client.get("/api/items/red%2Fimage").json()["id"] == "red/image"
        assert client.get("/api/items/red/image").headers["content-type"] == "image/jpeg"
        assert client.get("/api/items/red%2Fimage/image").headers["content-type"] == "image/jpeg"
