"""`GET /api/items/{id}` and `GET /api/items/{id}/image`. Ids may hold slashes (Food-101's `apple_pie/0`,
Digikala's `red/123`): the page sends them percent-encoded, and the routes take the rest of the path, so an
id is whatever lies between `/api/items/` and the end (or `/image`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from pipelines.search import query as q
from pipelines.serve.search_api import BadRequest, version_asked
from pipelines.serve.state import ServedTable
from transforms.lance_sink import rows_by_id


def router(served: ServedTable) -> APIRouter:
    api = APIRouter()

    # Declared first: `{item_id:path}` alone would take `apple_pie/0/image` as an id.
    @api.get("/api/items/{item_id:path}/image")
    def thumbnail(item_id: str, request: Request, version: int | None = None, tag: str | None = None) -> Response:
        """The item's picture, at most 256 pixels a side, cached by the picture's content digest."""
        if not request.scope.get("raw_path", b"").endswith(b"/image"):    # `red%2Fimage`: an id ending in /image
            return item(f"{item_id}/image", version, tag)
        stored = rows_by_id(served.at().handle.to_lance(), [item_id], ["id", "image_uri", "image_digest"]).to_pylist()
        if not stored:
            raise BadRequest(f"no item with id '{item_id}'", 404)
        if not stored[0]["image_uri"]:
            raise BadRequest(f"item '{item_id}' has no image", 404)
        digest = stored[0]["image_digest"] or stored[0]["image_uri"]
        etag = f'"{digest}"'
        headers = {"Cache-Control": "private, max-age=86400", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        try:
            data = served.thumbnails.get(digest, stored[0]["image_uri"])
        except (OSError, ValueError) as err:
            raise BadRequest(f"the picture of item '{item_id}' cannot be read now: {err}", 502) from err
        return Response(data, media_type="image/jpeg", headers=headers)

    @api.get("/api/items/{item_id:path}")
    def item(item_id: str, version: int | None = None, tag: str | None = None) -> Any:
        found = q.items_by_id(served.at(version_asked(version, tag)), [item_id])
        if item_id not in found:
            raise BadRequest(f"no item with id '{item_id}'", 404)
        return found[item_id]

    return api
