"""`POST /api/search` and `GET /api/table`: a search as the command line's `query` runs it (`query.answer`),
from a JSON body or a multipart form with a picture, every part of it bounded."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from pipelines.search import query as q
from pipelines.serve.access import MAX_JSON_BYTES, MAX_UPLOAD_BYTES
from pipelines.serve.state import ServedTable
from transforms.interaction_log import UserIndex
from transforms.storage import file_stat

MAX_K = 200
MAX_TEXT_CHARS = 2_000          # text, an item id or a user; the text encoders read far less (MiniLM: 256 tokens)
MAX_FILTERS = 16
MAX_FILTER_VALUES = 100         # in an `in` filter's list
OPERATORS = ("=", "!=", "<", "<=", ">", ">=", "in")


class BadRequest(ValueError):
    """A request the service cannot answer as asked: a 4xx with this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def router(served: ServedTable, allow_sql_filter: bool) -> APIRouter:
    api = APIRouter()

    @api.get("/api/table")
    def describe(version: int | None = None, tag: str | None = None) -> dict:
        """The table's encoders and weights and the fields a filter may name, for the page."""
        opened = served.at(version_asked(version, tag))
        encoders = opened.encoders()
        return {"table": served.name, "version": opened.handle.version, "weights": opened.stored_weights,
                "fields": filter_fields(opened), "by_text": [e.name for e in encoders if e.queries_by_text],
                "by_image": [e.name for e in encoders if e.modality == "image"]}

    @api.post("/api/search")
    async def search(request: Request) -> list[dict]:
        """Text, an uploaded image (multipart field `image`), an item id (`like`) or a `user`; `weights`,
        `filters` ([{field, op, value}]), `k`, `version` or `tag`, `hybrid`. JSON, or a multipart form whose
        fields hold the same values (JSON for weights and filters). Returns `query --json`'s results."""
        asked, image = await _search_request(request)
        # The search itself runs on the worker threads, as FastAPI runs plain endpoints: not on the event loop.
        return await run_in_threadpool(run_search, served, asked, image, allow_sql_filter)

    return api


def run_search(served: ServedTable, asked: dict, image: bytes | None, allow_sql_filter: bool) -> list[dict]:
    table = served.at(version_asked(asked.get("version"), asked.get("tag")))
    k = asked.get("k", 10)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise BadRequest(f"k must be a whole number from 1 to {MAX_K}")
    words = {name: asked.get(name) or None for name in ("text", "like", "user")}     # a form's empty field: none
    for name, value in words.items():
        if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT_CHARS):
            raise BadRequest(f"{name} is text of at most {MAX_TEXT_CHARS:,} characters")
    if image is not None and len(image) > MAX_UPLOAD_BYTES:
        raise BadRequest(f"the image is over {MAX_UPLOAD_BYTES:,} bytes", 413)

    def items_of(log: str, user: str) -> list[str]:
        # By the log's size and time: a log that grew since is indexed again, as `query --user` reads it anew.
        return served.users.get((log, file_stat(log)), lambda: UserIndex(log)).items(user)

    found = q.answer(table, q.Asked(k, words["text"], words["like"], words["user"], image, "the upload",
                                    _weights(asked.get("weights"), table), _where(asked, table, allow_sql_filter),
                                    bool(asked.get("hybrid"))), items_of)
    return found.results


def filter_fields(table: q.Table) -> list[str]:
    """The columns a structured filter may name: the pass-through fields and the label."""
    return [f.name for f in table.handle.schema if q.is_shown(f.name) and f.name not in ("id", "image_uri")]


def structured_filter(filters: list[dict], fields: list[str]) -> str | None:
    """[{field, op, value}] as a LanceDB filter, ANDed: fields checked against the table's, values quoted."""
    if len(filters) > MAX_FILTERS:
        raise BadRequest(f"at most {MAX_FILTERS} filters")
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
        if len(values) > MAX_FILTER_VALUES or any(len(str(v)) > MAX_TEXT_CHARS for v in values):
            raise BadRequest(f"a filter takes at most {MAX_FILTER_VALUES} values of {MAX_TEXT_CHARS:,} characters")
        literal = ", ".join(_quoted(v) for v in literals)
        parts.append(f"`{field}` IN ({literal})" if op == "in" else f"`{field}` {op} {literal}")
    return " AND ".join(parts) or None


def version_asked(version: Any, tag: Any) -> int | str | None:
    """A version number or a tag, checked: a number from 0 below 2**63, a tag a name."""
    if version is not None and tag:
        raise BadRequest("give a version or a tag, not both")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or not 0 <= version < 2**63):
        raise BadRequest("version is a version number; a tag is given as tag")
    if tag and (not isinstance(tag, str) or len(tag) > MAX_TEXT_CHARS):
        raise BadRequest("tag is a tag's name")
    return version if version is not None else tag or None


def _quoted(value: str | int | float) -> str:
    return "'" + str(value).replace("'", "''") + "'"


async def _search_request(request: Request) -> tuple[dict, bytes | None]:
    """The search's fields and its uploaded image, from JSON or a multipart form."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=16, max_part_size=MAX_JSON_BYTES)
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
    except (ValueError, RecursionError) as err:
        raise BadRequest("the body is not JSON (or a multipart form)") from err
    if not isinstance(asked, dict):
        raise BadRequest("the body is a JSON object")
    return asked, None


def _json_field(key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise BadRequest(f"the form field {key} is not JSON") from err


def _where(asked: dict, table: q.Table, allow_sql_filter: bool) -> str | None:
    filters = asked.get("filters") or []
    if not isinstance(filters, list):
        raise BadRequest("filters is a list of {field, op, value}")
    structured = structured_filter(filters, filter_fields(table))
    sql = asked.get("where")
    if sql and not allow_sql_filter:
        raise BadRequest("a raw SQL filter (where) needs the server started with --allow-sql-filter; "
                         "use filters: [{field, op, value}]", 403)
    if sql and (not isinstance(sql, str) or len(sql) > MAX_TEXT_CHARS):
        raise BadRequest(f"where is text of at most {MAX_TEXT_CHARS:,} characters")
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
