"""An item's files read where they lie (a local disk, s3://, gs://), through Beam's filesystems, with one
object store client per process; images named by http(s) URL through `http_fetch`.

Beam's S3 and GCS filesystems build a new client for each call: a boto3 session and client (160 ms
here) or a storage.Client, for every stat and every read. At a stat per image each night and a read per
new image, that was nearly all of a run's time on s3:// (the read stage: 4.5 items/s). Here a process
builds one client per object store, from the options that Beam's FileSystems holds (the run's on the
launcher and on every worker), and keeps it; a stat is the same size and time FileSystems.metadata gives.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from transforms.config import HttpSettings, RunConfig
from transforms.http_fetch import Fetched, fetch, is_url
from transforms.items import InputError

_STORES: dict[str, tuple[PipelineOptions, Any]] = {}   # scheme -> (the options it was built for, its client)
_STORES_LOCK = threading.Lock()
_DEFAULT_OPTIONS = PipelineOptions([])   # outside a pipeline: the object stores' standard environment
# Where each object store's status keeps the modification time, as Beam's own metadata() reads it.
MODIFIED = {"s3": "last_updated", "gs": "updated"}


def _store(uri: str) -> Any | None:
    """This process's S3IO or GcsIO for the uri's object store, built from the options FileSystems was
    given (set_options: by the launcher for its run, by each worker's harness); None for other filesystems."""
    scheme = uri.partition("://")[0] if "://" in uri else ""
    if scheme not in MODIFIED:
        return None
    options = FileSystems._pipeline_options or _DEFAULT_OPTIONS      # as Beam's own filesystems take them
    with _STORES_LOCK:
        built_for, store = _STORES.get(scheme, (None, None))
        if built_for is not options:
            store = _object_store(scheme, options)
            _STORES[scheme] = (options, store)
        return store


def _object_store(scheme: str, options: PipelineOptions) -> Any:
    if scheme == "s3":
        from apache_beam.io.aws.s3io import S3IO

        return S3IO(options=options)
    from apache_beam.io.gcp.gcsio import GcsIO

    return GcsIO(pipeline_options=options)


@dataclass(frozen=True)
class ImageReader:
    """How a run reads its pictures, wherever they lie, and the most bytes and pixels it takes of one."""

    http: HttpSettings = HttpSettings()
    max_bytes: int = RunConfig.max_image_bytes
    max_pixels: int = RunConfig.max_pixels

    def read(self, uri: str) -> bytes:
        if not is_url(uri):
            return read_bytes(uri, self.max_bytes)
        body = self.fetch(uri).body
        assert body is not None, "asked without validators, a server cannot answer 'not modified'"
        return body

    def fetch(self, url: str, validators: str | None = None) -> Fetched:
        """A URL's image, or no body when it has not changed since `validators` (http_fetch.fetch)."""
        return fetch(url, self.http, self.max_bytes, validators)


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    store = _store(uri)
    with store.open(uri, "rb") if store is not None else FileSystems.open(uri) as handle:
        data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise InputError("TooLarge", f"{uri} is over run.max_image_bytes {max_bytes} bytes")
    return data


def file_stat(uri: str) -> str:
    """Size and modification time as the filesystem reports them, without opening the file. Beam's S3 and GCS
    clients retry 5xx answers and timeouts with backoff first; what still fails is the item's reject (and its
    stored row is kept): FileNotFoundError where the store says there is no such object, InputError
    `StoreError` (access denied, expired credentials, a store that kept failing) otherwise."""
    store = _store(uri)
    try:
        if store is None:
            meta = FileSystems.get_filesystem(uri).metadata(uri)
            return f"{meta.size_in_bytes}:{meta.last_updated_in_seconds!r}"
        status = store._status(uri)
    except BeamIOError as err:
        raise FileNotFoundError(f"no image at {uri}") from err
    except Exception as err:  # noqa: BLE001 - as Beam's metadata(): any failure to stat is the item's reject
        if _not_found(err):
            raise FileNotFoundError(f"no image at {uri}") from err
        raise InputError("StoreError", f"could not stat {uri}: {type(err).__name__}: {err}") from err
    return f"{status['size']}:{float(status[MODIFIED[uri.partition('://')[0]]])!r}"


def _not_found(err: BaseException) -> bool:
    """An object store's "no such object" (S3's 404, GCS's NotFound), as opposed to its other failures."""
    return getattr(err, "code", None) in (404, "404") or type(err).__name__ in ("NotFound", "NoSuchKey")
