"""Items as one self-contained HTML page: thumbnails embedded, ids, fields and scores, in sections
(a query's results; a report's groups), optionally after a table of numbers.

Nothing on the page is fetched: each thumbnail is a JPEG data URI, so the file can be mailed,
attached to a ticket or opened from an object store. An image that cannot be read any more says why.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from pipelines.search.query import load_query_image

THUMBNAIL_PIXELS = 256
HIDDEN_FIELDS = ("id", "score", "image_uri")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.2rem; } h2 { font-size: 1rem; margin: 1.2rem 0 .5rem; } .query { color: #555; margin-bottom: 1rem; }
table.numbers { border-collapse: collapse; font-size: .85rem; }
.numbers td, .numbers th { padding: .2rem .6rem; border-bottom: 1px solid #ddd; text-align: right; }
.numbers th:first-child, .numbers td:first-child { text-align: left; }
.sheet { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 1rem; }
figure { margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: .5rem; }
figure img { width: 100%; height: 200px; object-fit: contain; background: #f4f4f4; }
.missing { height: 200px; display: flex; align-items: center; justify-content: center; background: #f4f4f4;
           color: #a00; font-size: .8rem; text-align: center; }
figcaption { font-size: .8rem; } .id { font-weight: 600; } .score { float: right; font-variant-numeric: tabular-nums; }
dl { margin: .3rem 0 0; } dt { color: #777; float: left; clear: left; margin-right: .4rem; } dd { margin: 0; }
"""


def thumbnail(uri: str) -> str:
    """A JPEG data URI of the image at `uri`, at most THUMBNAIL_PIXELS on its long side."""
    image = load_query_image(uri)
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render(sections: Sequence[tuple[str, Sequence[dict]]], title: str, query: str,
           numbers: Sequence[dict] = ()) -> str:
    """`sections` are (heading, rows), each row an item with at least `id` (and `score`, `image_uri`, fields)."""
    body = _numbers(numbers) + "".join(
        (f"<h2>{html.escape(heading)}</h2>" if heading else "")
        + "<div class=\"sheet\">\n" + "\n".join(_card(rank, row) for rank, row in enumerate(rows, start=1)) + "\n</div>"
        for heading, rows in sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>"
            f"<div class=\"query\">{html.escape(query)}</div>\n{body}</body></html>\n")


def write(path: str, sections: Sequence[tuple[str, Sequence[dict]]], title: str, query: str,
          numbers: Sequence[dict] = ()) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render(sections, title, query, numbers))


def _numbers(rows: Sequence[dict]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(_number(v))}</td>" for v in row.values()) + "</tr>"
                    for row in rows)
    return f"<table class=\"numbers\"><tr>{head}</tr>{cells}</table>"


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _card(rank: int, row: dict) -> str:
    picture = _picture(row.get("image_uri"), row["id"])
    fields = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>"
                     for k, v in row.items() if k not in HIDDEN_FIELDS and v not in (None, ""))
    score = f"<span class=\"score\">{row['score']:.4f}</span>" if "score" in row else ""
    return (f"<figure>{picture}<figcaption><span class=\"id\">{rank}. {html.escape(row['id'])}</span>"
            f"{score}<dl>{fields}</dl></figcaption></figure>")


def _picture(uri: str | None, item_id: str) -> str:
    if not uri:
        return '<div class="missing">no image</div>'
    try:
        source = thumbnail(uri)
    except (OSError, ValueError) as err:
        return f'<div class="missing">{html.escape(str(err))}</div>'
    return f'<img src="{source}" alt="{html.escape(item_id)}" title="{html.escape(uri)}">'
