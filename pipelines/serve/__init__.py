"""`catalog-embed serve`: one table's search, items, thumbnails, versions and health reports over HTTP, and
a page at `/` to look at them (pipelines/page/index.html, plain HTML and JS: no build step).

Every answer is what the command line gives for the same request: the endpoints call the functions the
`query`, `versions` and health commands call. The service reads the table's latest version unless a request
names one, and notices a version a nightly run committed on the next request (a look at the table's latest
manifest); the table's models are loaded once, on the first query that needs each (transforms/encoders/query_models.py).

Safe by default: it binds to 127.0.0.1; uploads are checked as catalog images are; filters are structured
(field, operator, value) on the table's own columns, with values quoted, and raw SQL is taken only with
`--allow-sql-filter`; the image endpoint serves stored items' images only. A bad request is a 4xx with a
JSON `{"error": ...}`, never a traceback; a failure inside is a 500 with a log line.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.errors import QueryError
from pipelines.search import query as q
from transforms.encoders.query_models import loaded_models
from transforms.lance_sink import rows_by_id
from transforms.storage import ImageReader

log = logging.getLogger("catalog_embed.serve")
PAGE = Path(__file__).parent / "page" / "index.html"
MAX_UPLOAD_BYTES = 20_000_000
MAX_K = 200
THUMBNAIL_SIDE = 256
OPERATORS = ("=", "!=", "<", "<=", ">", ">=", "in")
HEALTH_REPORTS = ("duplicates", "outliers", "drift")


class BadRequest(ValueError):
    """A request the service cannot answer as asked: a 4xx with this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    version: Gauge
    models: Gauge

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry()
        return cls(registry,
                   Counter("catalog_embed_requests", "Requests answered", ["endpoint", "status"], registry=registry),
                   Histogram("catalog_embed_request_seconds", "Time to answer a request", ["endpoint"],
                             registry=registry, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)),
                   Gauge("catalog_embed_table_version", "The table version served by default", registry=registry),
                   Gauge("catalog_embed_models_loaded", "Query models loaded in this process", registry=registry))


class ServedTable:
    """The table at its latest version, opened again when a run commits a new one; other versions on request."""

    def __init__(self, uri: str, name: str):
        self.uri, self.name = uri, name
        self._lock = threading.Lock()
        self._latest = q.open_table(uri, name)

    def at(self, version: int | str | None = None) -> q.Table:
        if version is not None:
            return q.open_table(self.uri, self.name, version)
        with self._lock:
            if self._latest.handle.to_lance().latest_version != self._latest.handle.version:
                self._latest = q.open_table(self.uri, self.name)
            return self._latest


def create_app(uri: str, table: str, allow_sql_filter: bool = False) -> FastAPI:
    served = ServedTable(uri, table)
    metrics = Metrics.create()
    app = FastAPI(title="catalog-embed", description=f"Search over the table '{table}' under {uri}.")

    @app.middleware("http")
    async def measured(request: Request, call_next):
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:   # noqa: BLE001 - logged with its traceback, answered as a 500 without one
            log.exception("%s %s failed", request.method, request.url.path)
            response = JSONResponse({"error": "internal error; see the service's log"}, status_code=500)
        # By route, not by path: ids in paths would make a metric per item.
        route = request.scope.get("route")
        endpoint = route.path if route is not None else "unmatched"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, err: BadRequest):
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError):
        problem = err.errors()[0]
        where = ".".join(str(part) for part in problem.get("loc", ()))
        return JSONResponse({"error": f"{where}: {problem.get('msg', 'invalid')}"}, status_code=400)

    @app.exception_handler(QueryError)
    async def query_error(_request: Request, err: QueryError):
        return JSONResponse({"error": str(err)}, status_code=404 if str(err).startswith("no item with id") else 400)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "table": table, "version": served.at().handle.version}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        metrics.version.set(served.at().handle.version)
        metrics.models.set(loaded_models())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/table")
    def describe(version: int | None = None, tag: str | None = None) -> dict:
        """The table's encoders and weights and the fields a filter may name, for the page."""
        opened = served.at(_version(version, tag))
        encoders = opened.encoders()
        return {"table": table, "version": opened.handle.version, "weights": opened.stored_weights,
                "fields": filter_fields(opened), "by_text": [e.name for e in encoders if e.queries_by_text],
                "by_image": [e.name for e in encoders if e.modality == "image"]}

    @app.post("/api/search")
    async def search(request: Request) -> list[dict]:
        """Text, an uploaded image (multipart field `image`), an item id (`like`) or a `user`; `weights`,
        `filters` ([{field, op, value}]), `k`, `version` or `tag`, `hybrid`. JSON, or a multipart form whose
        fields hold the same values (JSON for weights and filters). Returns `query --json`'s results."""
        asked, image = await _search_request(request)
        # The search itself runs on the worker threads, as FastAPI runs plain endpoints: not on the event loop.
        return await run_in_threadpool(run_search, served, asked, image, allow_sql_filter)

    @app.get("/api/items/{item_id}")
    def item(item_id: str, version: int | None = None, tag: str | None = None) -> dict:
        found = q.items_by_id(served.at(_version(version, tag)), [item_id])
        if item_id not in found:
            raise BadRequest(f"no item with id '{item_id}'", 404)
        return found[item_id]

    @app.get("/api/items/{item_id}/image")
    def thumbnail(item_id: str, request: Request) -> Response:
        stored = rows_by_id(served.at().handle.to_lance(), [item_id], ["id", "image_uri", "image_digest"]).to_pylist()
        if not stored:
            raise BadRequest(f"no item with id '{item_id}'", 404)
        if not stored[0]["image_uri"]:
            raise BadRequest(f"item '{item_id}' has no image", 404)
        etag = f'"{stored[0]["image_digest"] or item_id}"'
        headers = {"Cache-Control": "public, max-age=86400", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(_thumbnail(stored[0]["image_uri"]), media_type="image/jpeg", headers=headers)

    @app.get("/api/versions")
    def versions() -> Any:
        from pipelines.versions import history

        return json.loads(json.dumps(history(uri, table), default=str))

    @app.get("/api/health/{report}")
    def health(report: str, version: int | None = None, tag: str | None = None, k: int = 20,
               isolated: bool | None = None) -> Any:
        """The report's `--json`. Outliers: captions that disagree with their pictures where the table has a text
        and an image encoder in one space, else (or with `isolated=true`) the items farthest from the rest."""
        if report not in HEALTH_REPORTS:
            raise BadRequest(f"no report '{report}'; there are {', '.join(HEALTH_REPORTS)}", 404)
        data = health_report(served, report, _version(version, tag), k, isolated)
        return json.loads(json.dumps(data, default=str))

    return app


def filter_fields(table: q.Table) -> list[str]:
    """The columns a structured filter may name: the pass-through fields and the label."""
    return [f.name for f in table.handle.schema if q.is_shown(f.name) and f.name not in ("id", "image_uri")]


def structured_filter(filters: list[dict], fields: list[str]) -> str | None:
    """[{field, op, value}] as a LanceDB filter, ANDed: fields checked against the table's, values quoted."""
    parts = []
    for condition in filters:
        if not isinstance(condition, dict):
            raise BadRequest("each filter is an object: {field, op, value}")
        field, op, value = condition.get("field"), condition.get("op", "="), condition.get("value")
        if field not in fields:
            raise BadRequest(f"unknown field {field!r} in a filter; the fields are {', '.join(fields)}")
        if op not in OPERATORS:
            raise BadRequest(f"unknown operator {op!r} in a filter; the operators are {', '.join(OPERATORS)}")
        values = value if isinstance(value, list) else [value]
        literals = [v for v in values if isinstance(v, str | int | float) and not isinstance(v, bool)]
        if not values or len(literals) != len(values):
            raise BadRequest(f"the filter on {field!r} needs a value (text or number, or a list of them for 'in')")
        literal = ", ".join(_quoted(v) for v in literals)
        parts.append(f"`{field}` IN ({literal})" if op == "in" else f"`{field}` {op} {literal}")
    return " AND ".join(parts) or None


def _quoted(value: str | int | float) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def run_search(served: ServedTable, asked: dict, image: bytes | None, allow_sql_filter: bool) -> list[dict]:
    table = served.at(_version(asked.get("version"), asked.get("tag")))
    k = asked.get("k", 10)
    if not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise BadRequest(f"k must be a whole number from 1 to {MAX_K}")
    where = _where(asked, table, allow_sql_filter)
    given = [name for name in ("text", "like", "user") if asked.get(name)] + (["image"] if image else [])
    if len(given) != 1:
        raise BadRequest("give one of text, image, like or user")
    if asked.get("hybrid") and given != ["text"]:
        raise BadRequest("hybrid is for text")
    owned: list[str] = []
    if given == ["text"]:
        queries = q.text_queries(table, str(asked["text"]))
    elif given == ["like"]:
        queries = q.item_queries(table, str(asked["like"]))
    elif given == ["user"]:
        queries, owned = q.user_queries(table, str(asked["user"]))
    else:
        queries = q.image_queries_of(table, _upload(image))
    weights = _weights(asked.get("weights"), table)
    if asked.get("hybrid"):
        return q.hybrid_search(table, str(asked["text"]), queries, k, weights, where)
    return q.search(table, queries, k, weights, where, owned)


def health_report(served: ServedTable, report: str, version: int | str | None, k: int,
                  isolated: bool | None = None) -> Any:
    from pipelines.health.drift import previous_run_version
    from pipelines.health.outliers import DEFAULT_NEIGHBOURS, caption_pair
    from pipelines.health.reports import drift_report, duplicates_report, outliers_report
    from transforms.lance_sink import dataset_uri
    from transforms.vector_columns import COMBINED

    table = served.at(version)
    if report == "duplicates":
        return duplicates_report(table, None, None).data
    if report == "outliers":
        if isolated is None:
            try:
                caption_pair(table)
                isolated = False
            except QueryError:
                isolated = True
        return outliers_report(table, None, k, isolated, COMBINED, DEFAULT_NEIGHBOURS).data
    to = table.handle.version
    before = previous_run_version(served.uri, served.name, to)
    return drift_report(table, dataset_uri(served.uri, served.name), str(before), str(to)).data


async def _search_request(request: Request) -> tuple[dict, bytes | None]:
    """The search's fields and its uploaded image, from JSON or a multipart form."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_part_size=MAX_UPLOAD_BYTES)
        upload = form.get("image")
        image = await upload.read(MAX_UPLOAD_BYTES + 1) if isinstance(upload, UploadFile) else None
        asked: dict[str, Any] = {key: value for key, value in form.items() if key != "image"}
        for key in ("weights", "filters", "k", "version", "hybrid"):
            value = asked.get(key)
            if isinstance(value, str) and value:
                asked[key] = _json_field(key, value)
        return asked, image
    try:
        asked = await request.json()
    except ValueError as err:
        raise BadRequest("the body is not JSON (or a multipart form)") from err
    if not isinstance(asked, dict):
        raise BadRequest("the body is a JSON object")
    return asked, None


def _json_field(key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        raise BadRequest(f"the form field {key} is not JSON") from err


def _upload(data: bytes | None) -> bytes:
    if data is None or len(data) > MAX_UPLOAD_BYTES:
        raise BadRequest(f"the image is over {MAX_UPLOAD_BYTES:,} bytes", 413)
    return data


def _where(asked: dict, table: q.Table, allow_sql_filter: bool) -> str | None:
    filters = asked.get("filters") or []
    if not isinstance(filters, list):
        raise BadRequest("filters is a list of {field, op, value}")
    structured = structured_filter(filters, filter_fields(table))
    sql = asked.get("where")
    if sql and not allow_sql_filter:
        raise BadRequest("a raw SQL filter (where) needs the server started with --allow-sql-filter; "
                         "use filters: [{field, op, value}]", 403)
    return " AND ".join(f"({part})" for part in (structured, sql) if part) or None


def _weights(weights: Any, table: q.Table) -> dict[str, float] | None:
    if weights is None or weights == {}:
        return None
    if not isinstance(weights, dict) or not all(isinstance(w, int | float) for w in weights.values()):
        raise BadRequest("weights is an object of encoder name to number")
    unknown = sorted(set(weights) - set(table.stored_weights))
    if unknown:
        raise BadRequest(f"weights name {', '.join(unknown)}; the table's encoders are "
                         f"{', '.join(table.stored_weights)}")
    return {name: float(w) for name, w in weights.items()}


def _version(version: int | str | None, tag: str | None) -> int | str | None:
    if version is not None and tag:
        raise BadRequest("give a version or a tag, not both")
    return version if version is not None else tag or None


def _thumbnail(image_uri: str) -> bytes:
    from PIL import Image

    from transforms.images import decode_image

    data = ImageReader().read(image_uri)
    image = decode_image(data, THUMBNAIL_SIDE)
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def serve(uri: str, table: str, host: str, port: int, allow_sql_filter: bool) -> None:
    import uvicorn

    app = create_app(uri, table, allow_sql_filter)
    log.info("serving table '%s' under %s on http://%s:%d/", table, uri, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
