"""`catalog-embed serve`: one table's search, items, thumbnails, versions and health reports over HTTP, and
a page at `/` to look at them (pipelines/page/index.html, plain HTML and JS: no build step).

Every answer is what the command line gives for the same request: the endpoints call the functions the
`query`, `versions` and health commands call. The service reads the table's latest version unless a request
names one, and looks for a version a nightly run committed every few seconds (state.py); the table's models
are loaded once, on the first query that needs each (transforms/encoders/query_models.py).

- access.py: who may ask (Host names, a token beyond loopback, no cross-site POSTs, bounded bodies);
- state.py: the served version, and what is computed once per version (reports, a log's users, thumbnails);
- search_api.py, items_api.py, reports_api.py: the routes.

A bad request is a 4xx with a JSON `{"error": ...}`, never a traceback; a failure inside is a 500 with a log
line (docs/search.md, "The service").
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.errors import QueryError
from pipelines.serve import items_api, reports_api, search_api
from pipelines.serve.access import COOKIE, LOOPBACK, Access, Guard, Refused, same_secret
from pipelines.serve.search_api import BadRequest
from pipelines.serve.state import REFRESH_SECONDS, ServedTable
from transforms.encoders.query_models import loaded_models

log = logging.getLogger("catalog_embed.serve")
PAGE = Path(__file__).parent.parent / "page" / "index.html"
ON_LOOPBACK = Access(frozenset(LOOPBACK))


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


def create_app(uri: str, table: str, allow_sql_filter: bool = False, access: Access = ON_LOOPBACK,
               refresh_s: float = REFRESH_SECONDS) -> FastAPI:
    served = ServedTable(uri, table, refresh_s)
    metrics = Metrics.create()

    @asynccontextmanager
    async def watching(_app: FastAPI) -> AsyncIterator[None]:
        served.start()
        yield
        served.stop()

    app = FastAPI(title="catalog-embed", description=f"Search over the table '{table}' under {uri}.",
                  lifespan=watching)
    _answer_errors(app)
    app.add_middleware(Measured, metrics=metrics)
    app.add_middleware(Guard, access=access)        # added last: it runs first, before any route or body read
    app.include_router(_service_router(served, metrics, access))
    app.include_router(search_api.router(served, allow_sql_filter))
    app.include_router(items_api.router(served))
    app.include_router(reports_api.router(served))
    return app


def _service_router(served: ServedTable, metrics: Metrics, access: Access):
    from fastapi import APIRouter

    api = APIRouter()

    @api.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    @api.get("/healthz")
    async def healthz() -> dict:        # on the event loop: it answers while every worker thread is busy
        return {"status": "ok", "table": served.name, "version": served.at().handle.version}

    @api.post("/api/session", include_in_schema=False)
    async def session(request: Request) -> Response:
        """The page's token, exchanged for a cookie that only this site's requests carry (SameSite=Strict)."""
        try:
            given = (await request.json()).get("token")
        except (ValueError, AttributeError, RecursionError) as err:
            raise BadRequest('the body is {"token": "..."}') from err
        if access.token and not (isinstance(given, str) and same_secret(given, access.token)):
            raise BadRequest("that is not this service's token", 401)
        answer = JSONResponse({"status": "ok"})
        if access.token:
            answer.set_cookie(COOKIE, access.cookie_value, httponly=True, samesite="strict")
        return answer

    @api.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        metrics.version.set(served.at().handle.version)
        metrics.models.set(loaded_models())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return api


class Measured:
    """Counts and times each request by route, and answers a failure inside as a 500 without a traceback. A
    plain ASGI middleware: the request's own `receive` reaches the route, so that a body refused while it streams
    (access.Guard) is answered by its handler."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), {}

        async def sent(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        except Exception:   # noqa: BLE001 - logged with its traceback, answered as a 500 without one
            log.exception("%s %s failed", scope["method"], scope["path"])
            if "code" not in status:
                await JSONResponse({"error": "internal error; see the service's log"}, status_code=500)(
                    scope, receive, sent)
        # By route, not by path: ids in paths would make a metric per item.
        route = scope.get("route")
        endpoint = route.path if route is not None else "unmatched"
        self.metrics.requests.labels(endpoint, str(status.get("code", 500))).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def _answer_errors(app: FastAPI) -> None:
    """Every error a request can meet, as a status and a JSON `{"error": ...}`."""

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, err: BadRequest):
        return error(err.status, str(err))

    @app.exception_handler(Refused)
    async def refused(_request: Request, err: Refused):
        return error(err.status, str(err))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):
        return error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError):
        problem = err.errors()[0]
        where = ".".join(str(part) for part in problem.get("loc", ()))
        return error(400, f"{where}: {problem.get('msg', 'invalid')}")

    @app.exception_handler(QueryError)
    async def query_error(_request: Request, err: QueryError):
        return error(404 if str(err).startswith("no item with id") else 400, str(err))


def serve(uri: str, table: str, host: str, port: int, allow_sql_filter: bool, access: Access) -> None:
    import uvicorn

    app = create_app(uri, table, allow_sql_filter, access)
    log.info("serving table '%s' under %s on http://%s:%d/%s", table, uri, host, port,
             "" if access.token else " (no token)")
    uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=False)


__all__ = ["Access", "create_app", "serve"]
