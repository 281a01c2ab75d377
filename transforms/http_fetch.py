"""Images named by http(s) URL, fetched as a polite crawler fetches them (docs/catalogs.md, "Images by URL").

Each worker process holds one connection pool and its limits: at most `max_per_host` requests in flight
to one host and `max_per_worker` in all. A request that meets a 429, a 5xx, a timeout or a refused
connection is tried again after a wait (the server's `Retry-After`, else an exponential backoff with
jitter); redirects are followed up to a limit; a body over the byte cap is cut off and refused.

The stat of a URL's image is its validators, the `ETag` and `Last-Modified` the server gave with the
body. A night that knows them asks a conditional GET (`If-None-Match`, `If-Modified-Since`): an
unchanged image answers 304 with no body.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError, TimeoutError

from transforms.config import HttpSettings
from transforms.items import InputError

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
CHUNK = 1 << 16


def is_url(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


@dataclass(frozen=True)
class Fetched:
    body: bytes | None      # None: not modified since the validators asked with (304)
    validators: str         # the image's stat: its ETag and Last-Modified; "" when the server gives neither


def validators_of(headers) -> str:
    etag, modified = headers.get("ETag"), headers.get("Last-Modified")
    if not etag and not modified:
        return ""
    return f"etag={etag or ''};modified={modified or ''}"


def _conditional(validators: str) -> dict[str, str]:
    """The request headers that ask for the body only if it changed since `validators`."""
    if not validators.startswith("etag="):
        return {}
    etag, _, modified = validators.removeprefix("etag=").partition(";modified=")
    headers = {}
    if etag:
        headers["If-None-Match"] = etag
    if modified:
        headers["If-Modified-Since"] = modified
    return headers


class _Client:
    """One process's pool of connections and its limits, for one set of settings."""

    def __init__(self, settings: HttpSettings):
        self.settings = settings
        self.pool = urllib3.PoolManager(num_pools=256, maxsize=settings.max_per_host,
                                        headers={"User-Agent": settings.user_agent})
        self._in_flight = threading.BoundedSemaphore(settings.max_per_worker)
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, url: str) -> Iterator[None]:
        host = urlsplit(url).netloc
        with self._lock:
            per_host = self._hosts.setdefault(host, threading.BoundedSemaphore(self.settings.max_per_host))
        with per_host, self._in_flight:
            yield


_CLIENTS: dict[HttpSettings, _Client] = {}
_CLIENTS_LOCK = threading.Lock()


def _client(settings: HttpSettings) -> _Client:
    with _CLIENTS_LOCK:
        if settings not in _CLIENTS:
            _CLIENTS[settings] = _Client(settings)
        return _CLIENTS[settings]


def fetch(url: str, settings: HttpSettings, max_bytes: int, validators: str | None = None) -> Fetched:
    """The image at `url`, or None as its body when it has not changed since `validators`.
    Raises InputError when the server, after the retries, gives no image."""
    client = _client(settings)
    attempt = 0
    while True:
        try:
            with client.slot(url):        # the slot is not held while waiting to retry
                return _get(client, url, max_bytes, _conditional(validators or ""))
        except _Retry as retry:
            if attempt == settings.retries or retry.wait > settings.max_retry_after_s:
                raise retry.error from None
            time.sleep(retry.wait if retry.wait >= 0 else _backoff(settings, attempt))
            attempt += 1


class _Retry(Exception):
    """An answer worth asking again: after `wait` seconds (-1: the backoff's), unless it was the last try."""

    def __init__(self, error: InputError, wait: float = -1):
        self.error = error
        self.wait = wait


def _backoff(settings: HttpSettings, attempt: int) -> float:
    return settings.backoff_s * 2**attempt * random.uniform(0.5, 1.0)


def _get(client: _Client, url: str, max_bytes: int, headers: dict[str, str]) -> Fetched:
    settings = client.settings
    retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=settings.max_redirects,
                            raise_on_redirect=True, raise_on_status=False)
    timeout = urllib3.Timeout(connect=settings.connect_timeout_s, read=settings.read_timeout_s)
    try:
        response = client.pool.request("GET", url, headers=headers, retries=retries, timeout=timeout,
                                       preload_content=False)
    except MaxRetryError as err:
        raise _failure(url, err.reason) from err
    except HTTPError as err:
        raise _failure(url, err) from err
    answered = False
    try:
        fetched = _answer(url, response, max_bytes)
        answered = True
        return fetched
    except (TimeoutError, HTTPError) as err:
        raise _failure(url, err) from err
    finally:
        if not answered:      # a body left unread would be taken for the next answer on this connection
            response.close()
        response.release_conn()


def _failure(url: str, err: BaseException | None) -> Exception:
    """A failed request as a retry (timeouts, refused or dropped connections) or a final error."""
    if isinstance(err, urllib3.exceptions.ResponseError):       # redirected more than max_redirects times
        return InputError("TooManyRedirects", f"{url}: {err}")
    if isinstance(err, TimeoutError):
        return _Retry(InputError("Timeout", f"{url}: no answer in time ({err})"))
    return _Retry(InputError("ConnectionError", f"{url}: {err}"))


def _answer(url: str, response, max_bytes: int) -> Fetched:
    status = response.status
    if status == 304:
        return Fetched(None, validators_of(response.headers))
    if status in RETRIED_STATUSES:
        raise _Retry(InputError(f"HTTP{status}", f"{url} answered {status} {response.reason}"),
                     _retry_after(response.headers.get("Retry-After")))
    if status != 200:
        raise InputError(f"HTTP{status}", f"{url} answered {status} {response.reason}")
    kind = response.headers.get("Content-Type", "")
    if kind.startswith(("text/", "application/json")):
        raise InputError("NotAnImage", f"{url} answered with {kind.split(';')[0]}, not an image")
    size = response.headers.get("Content-Length")
    if size and size.isdigit() and int(size) > max_bytes:
        raise InputError("TooLarge", f"{url} is {int(size)} bytes, over run.max_image_bytes {max_bytes}")
    body = bytearray()
    for chunk in response.stream(CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise InputError("TooLarge", f"{url} sent over run.max_image_bytes {max_bytes} bytes")
    return Fetched(bytes(body), validators_of(response.headers))


def _retry_after(value: str | None) -> float:
    """Seconds the server asked to wait (a number, or an HTTP date); -1 when it did not say."""
    if not value:
        return -1
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return -1
    return max(0.0, when.timestamp() - time.time())
