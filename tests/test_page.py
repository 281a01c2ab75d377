"""The page at `/`, driven in headless Chromium (Debian's, through Playwright): a typed query shows the expected
first result, a weight slider changes the order, a click asks for more like that item, and the duplicates tab
shows the groups. Screenshots of each go to the test's folder (docs/serve-page.png is one of them)."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

from pipelines.health.duplicates import find_duplicates
from pipelines.search import query as q
from pipelines.serve import create_app
from pipelines.serve.access import access_for
from tests.conftest import (
    DEMO_CATALOG,
    MULTIMODAL_ENCODERS,
    REUPLOADS,
    digikala_layout,
    food101_layout,
    make_config,
    run,
    with_reuploads,
    write_demo_rows,
)
from transforms.config import Config

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def shop(multimodal_demo, tmp_path_factory) -> Config:
    """The multimodal demo, copied, with four photos uploaded again (near-duplicates for the duplicates tab): the
    copy's run encodes only the new photos."""
    root = tmp_path_factory.mktemp("shop")
    source = Path(multimodal_demo.output.uri).parent
    shutil.copytree(source / "catalog", root / "catalog")
    shutil.copytree(source / "db", root / "db")
    manifest = root / "catalog" / Path(multimodal_demo.catalog.path).name
    write_demo_rows(manifest, with_reuploads(manifest))
    config = make_config(root, dict(DEMO_CATALOG, path=str(manifest)), MULTIMODAL_ENCODERS, table="demo")
    assert run(config, "reuploads")["encoded"]["image"] == len(REUPLOADS)
    return config


@pytest.fixture(scope="module")
def server(shop) -> Iterator[str]:
    with serving(create_app(shop.output.uri, "demo")) as url:
        yield url


@contextmanager
def serving(app) -> Iterator[str]:
    """The service on a free loopback port, in a thread of this process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not running.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    running.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed; `make test` installs it (Debian package chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


def _ids(page) -> list[str]:
    return page.eval_on_selector_all("#results .card", "cards => cards.map(card => card.dataset.id)")


def _screenshot(page, path) -> None:
    """Once every thumbnail has loaded."""
    page.wait_for_function("[...document.images].every(image => image.complete)")
    page.screenshot(path=str(path), full_page=True)


def _shown_after(page, action) -> list[str]:
    """The result ids the page shows once `action` has made it search again."""
    page.evaluate("document.getElementById('status').textContent = ''")
    action()
    page.wait_for_function("document.getElementById('status').textContent.includes('results for')")
    return _ids(page)


def test_the_page_searches_reweights_explores_and_shows_duplicates(server, browser, shop, tmp_path):
    table = q.open_table(shop.output.uri, "demo")
    queries = q.text_queries(table, "a cup of coffee")          # by the text encoder and conse
    expected = q.search(table, queries, 12, {"text": 0.4, "conse": 0.2})
    page = browser.new_page(viewport={"width": 390, "height": 844})      # a phone-sized screen
    page.goto(server)
    page.wait_for_selector("#weights input")

    page.fill("#text", "a cup of coffee")
    shown = _shown_after(page, lambda: page.press("#text", "Enter"))
    assert shown == [r["id"] for r in expected]
    assert "text=a+cup+of+coffee" in page.url              # the state is in the URL, to share
    _screenshot(page, tmp_path / "search.png")

    reweighted = q.search(table, queries, 12, {"text": 0.05, "conse": 1.0})
    page.eval_on_selector("#weights input[data-encoder=text]", "e => { e.value = '0.05' }")
    moved = _shown_after(page, lambda: page.eval_on_selector(
        "#weights input[data-encoder=conse]", "e => { e.value = '1'; e.dispatchEvent(new Event('change')) }"))
    assert moved == [r["id"] for r in reweighted] and moved != shown
    _screenshot(page, tmp_path / "reweighted.png")

    first = moved[0]
    liked = _shown_after(page, lambda: page.click(f"#results .card[data-id='{first}']"))
    weights = {"text": 0.05, "image": 0.3, "color": 0.1, "conse": 1.0}
    assert liked == [r["id"] for r in q.search(table, q.item_queries(table, first), 12, weights)]
    assert f"like={first}" in page.url
    _screenshot(page, tmp_path / "like.png")

    shared = browser.new_page()
    shared.goto(page.url)                                   # the shared link shows the same search
    shared.wait_for_function("document.getElementById('status').textContent.includes('results for')")
    assert _ids(shared) == liked

    page.click("nav button[data-tab=duplicates]")
    page.wait_for_function("document.getElementById('status').textContent.includes('near-duplicates')")
    groups = page.eval_on_selector_all("#results .group", "groups => groups.length")
    assert groups == len(find_duplicates(table)["groups"]) == len(REUPLOADS)
    _screenshot(page, tmp_path / "duplicates.png")


@pytest.mark.parametrize("layout", ["food101", "digikala"])
def test_ids_of_every_layout_open_in_the_page(layout, browser, tmp_path):
    """Ids with slashes (`apple_pie/1000`, `red/product_0`) through the duplicates tab, thumbnails, the item view
    and a "more like this" click; the Digikala service has a token, which the page asks for once."""
    if layout == "food101":
        catalog, train, test = food101_layout(tmp_path / "food-101")
        ids, access = train + test, None
    else:
        catalog, ids = digikala_layout(tmp_path / "digikala")
        (tmp_path / "token").write_text("s3cret")
        access = access_for("127.0.0.1", token_file=str(tmp_path / "token"))
    config = make_config(tmp_path, catalog)
    run(config)
    table = q.open_table(config.output.uri, "items")
    page = browser.new_page()
    prompts = []
    page.on("dialog", lambda dialog: prompts.append(dialog.message) or dialog.accept("s3cret"))
    app = create_app(config.output.uri, "items", **({"access": access} if access else {}))
    with serving(app) as url:
        page.goto(f"{url}/?tab=duplicates")
        page.wait_for_function("document.getElementById('status').textContent.includes('near-duplicates')")
        shown = _ids(page)
        groups = find_duplicates(table)["groups"]
        assert sorted(shown) == sorted(item for group in groups for item in group["ids"])
        if layout == "food101":         # each class's photo is in both splits
            assert len(groups) == 3 and "apple_pie/1000" in shown
        first = ids[0]
        liked = _shown_after(page, lambda: page.goto(f"{url}/?like={first}"))
        assert liked == [r["id"] for r in q.search(table, q.item_queries(table, first), 12)]
        page.wait_for_function("[...document.images].every(image => image.complete)")
        loaded = page.eval_on_selector_all("#results .card img", "images => images.map(i => i.naturalWidth > 0)")
        assert loaded and all(loaded)
        item = page.evaluate("id => fetch(`/api/items/${encodeURIComponent(id)}`).then(r => r.json())", first)
        assert item["id"] == first
    assert len(prompts) == (0 if access is None else 1)
