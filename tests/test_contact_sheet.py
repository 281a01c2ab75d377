"""`query --html`: a self-contained contact sheet, rendered by headless Chromium with its images loaded."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipelines.cli import main

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking")
# Appended to a copy of the page: after load, the title lists each image's rendered pixel size.
PROBE = ("<script>addEventListener('load', () => { document.title = 'loaded:' + "
         "[...document.images].map(i => i.complete ? i.naturalWidth + 'x' + i.naturalHeight : 'pending').join(','); "
         "});</script>")


def render_in_chromium(page: Path) -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed; `make test` installs it (Debian package chromium)")
    probed = page.with_name("probed-" + page.name)
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    command = [chromium, *CHROMIUM_FLAGS, "--virtual-time-budget=10000", "--dump-dom", probed.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def test_contact_sheet_shows_the_result_images(multimodal_demo, tmp_path, capsys):
    page = tmp_path / "cat.html"
    args = ["query", "--uri", multimodal_demo.output.uri, "--table", "demo", "--text", "a cat",
            "--weights", "conse=1", "-k", "4", "--html", str(page)]
    assert main(args) == 0
    assert f"contact sheet: {page}" in capsys.readouterr().out
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["'](?!data:)""", html), "the page must not fetch anything"
    dom = render_in_chromium(page)
    title = re.search(r"<title>loaded:([^<]*)</title>", dom)
    assert title, dom[:500]
    sizes = title.group(1).split(",")
    assert len(sizes) == 4
    for size in sizes:
        width, height = (int(n) for n in size.split("x"))
        assert max(width, height) == 256 and min(width, height) > 0, sizes
    assert dom.index("1. chelsea") < dom.index("2. ")
    assert "Chelsea the cat" in dom and "animals" in dom


def test_contact_sheet_says_which_image_cannot_be_shown(multimodal_demo, tmp_path, capsys):
    images = Path(multimodal_demo.catalog.path).parent / "images"
    moved = images / "coffee.png"
    shutil.move(moved, tmp_path / "coffee.png")
    try:
        page = tmp_path / "coffee.html"
        assert main(["query", "--uri", multimodal_demo.output.uri, "--table", "demo", "--like", "coffee", "-k", "2",
                     "--html", str(page)]) == 0
    finally:
        shutil.move(tmp_path / "coffee.png", moved)
    html = page.read_text(encoding="utf-8")
    assert f'<div class="missing">cannot use image {moved}: ' in html and html.count("<img ") == 1
