"""Who may ask the service what: checked on every request before any route runs, as an ASGI middleware.

- **Host.** A page on another site can point a name it owns at 127.0.0.1 (DNS rebinding) and read the
  answers, since to the browser they are its own. The service answers only Host names it knows: the bound
  host, `localhost`, `127.0.0.1`, `[::1]` and `--allowed-host` names. An IP address is always taken: no page
  can rebind a name to it, since the browser sends the address itself.
- **A token** (a bearer token, or the session cookie the page gets for it), required beyond loopback unless
  `--no-auth`. `/healthz`, the page itself and the token's exchange for a cookie stay open.
- **Cross-site requests.** A form on another site can POST a multipart body or text without asking first;
  a POST here needs a JSON body or the `X-Catalog-Embed` header, which such a form cannot send, and one whose
  `Origin` is not this service's own is refused. A request a browser marks cross-site (`Sec-Fetch-Site`) is
  refused unless it opens a page (a shared link): another site's `<img>` cannot start a health report.
- **Body size**, counted while the body streams: a Content-Length over the limit, or the bytes once they
  pass it, get a 413 before the rest is read.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("catalog_embed.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_VARIABLE = "CATALOG_EMBED_TOKEN"
COOKIE = "catalog_embed_session"
CUSTOM_HEADER = "x-catalog-embed"
OPEN_PATHS = ("/", "/healthz", "/api/session")
MAX_JSON_BYTES = 64 * 1024                      # a search, a filter list, a token: far less
MAX_UPLOAD_BYTES = 20_000_000                   # a query picture
MAX_FORM_BYTES = MAX_UPLOAD_BYTES + MAX_JSON_BYTES
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Access:
    """The Host names answered (`*`: any) and the token, if one is needed."""

    hosts: frozenset[str]
    token: str | None = None

    @property
    def cookie_value(self) -> str:
        """What the session cookie holds: a digest of the token, so that the cookie is not the token itself."""
        return hmac.new((self.token or "").encode(), b"catalog-embed session", hashlib.sha256).hexdigest()


def access_for(bound: str, allowed_hosts: Sequence[str] = (), token_file: str | None = None,
               no_auth: bool = False) -> Access:
    """The service's access rules, or a ValueError that says what is missing: bound beyond loopback, the
    service needs a token (a file, or the CATALOG_EMBED_TOKEN variable) or `--no-auth`."""
    token = Path(token_file).read_text().strip() if token_file else os.environ.get(TOKEN_VARIABLE, "").strip()
    if token_file and not token:
        raise ValueError(f"the token file {token_file} is empty")
    if not token and not no_auth and bound.strip("[]") not in LOOPBACK:
        raise ValueError(f"serving on {bound}, beyond this machine, needs a token: --token-file FILE or the "
                         f"{TOKEN_VARIABLE} variable (sent as 'Authorization: Bearer TOKEN'), or --no-auth to "
                         "serve without one")
    if no_auth and token:
        raise ValueError("--no-auth and a token are both given; give one")
    hosts = frozenset({bound.strip("[]").lower(), *LOOPBACK, *(_host_name(h) for h in allowed_hosts)})
    return Access(hosts, token or None)


class Guard:
    """The ASGI middleware that applies `Access` and the body limits to every HTTP request."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        try:
            self._check(scope, headers)
            limit = MAX_FORM_BYTES if headers.get("content-type", "").startswith("multipart/") else MAX_JSON_BYTES
            if int(headers.get("content-length") or 0) > limit:
                raise Refused(413, f"the body is over {limit:,} bytes")
        except Refused as refused:
            log.info("refused %s %s: %s", scope["method"], scope["path"], refused)
            return await _refuse(send, refused)
        except ValueError:
            return await _refuse(send, Refused(400, "the Content-Length is not a number"))
        await self.app(scope, _limited(receive, limit), send)

    def _check(self, scope, headers: dict[str, str]) -> None:
        if not self._known_host(headers.get("host", "")):
            raise Refused(403, "this service does not answer for that Host; start it with --allowed-host NAME")
        if headers.get("sec-fetch-site") == "cross-site" and not _opens_a_page(scope, headers):
            raise Refused(403, "a cross-site request")
        if scope["method"] in UNSAFE_METHODS:
            _same_origin(headers)
        if self.access.token and scope["path"] not in OPEN_PATHS and not self._authorised(headers):
            raise Refused(401, "this service needs its token: 'Authorization: Bearer TOKEN'")

    def _known_host(self, host: str) -> bool:
        name = _host_name(host)
        if "*" in self.access.hosts or name in self.access.hosts:
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    def _authorised(self, headers: dict[str, str]) -> bool:
        bearer = headers.get("authorization", "")
        if bearer.lower().startswith("bearer ") and same_secret(bearer[7:].strip(), self.access.token):
            return True
        cookies = dict(part.strip().partition("=")[::2] for part in headers.get("cookie", "").split(";"))
        return same_secret(cookies.get(COOKIE, ""), self.access.cookie_value)


def same_secret(given: str, secret: str | None) -> bool:
    """A comparison in constant time, of any text (compare_digest takes only ASCII strings)."""
    return secret is not None and hmac.compare_digest(given.encode(), secret.encode())


def _host_name(host: str) -> str:
    """A Host header's name, lower case, without its port or an IPv6 address's brackets; '' if it is not one."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.index("]")] if "]" in host else ""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return "" if any(c in name for c in "@/\\ ") else name


def _opens_a_page(scope, headers: dict[str, str]) -> bool:
    return scope["method"] == "GET" and headers.get("sec-fetch-mode") == "navigate" \
        and headers.get("sec-fetch-dest", "document") == "document"


def _same_origin(headers: dict[str, str]) -> None:
    """Refuse a state-changing request a page on another site could send without the browser asking first."""
    origin = headers.get("origin")
    if origin and origin != "null":
        try:
            netloc = urlsplit(origin).netloc.lower()
        except ValueError:
            netloc = ""
        if netloc != headers.get("host", "").lower():
            raise Refused(403, f"a request from another site ({origin[:100]})")
    json_body = headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
    if not json_body and CUSTOM_HEADER not in headers:
        raise Refused(403, f"a POST here has a JSON body or the {CUSTOM_HEADER} header (a form on another "
                           "site can send neither)")


def _limited(receive, limit: int):
    seen = 0

    async def counted():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise Refused(413, f"the body is over {limit:,} bytes")
        return message

    return counted


async def _refuse(send, refused: Refused) -> None:
    body = json.dumps({"error": str(refused)}).encode()
    await send({"type": "http.response.start", "status": refused.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
