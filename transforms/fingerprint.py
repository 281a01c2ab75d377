"""What each item's inputs are, found as cheaply as the last run allows.

An input's digest is sha256 over its exact bytes (the text's UTF-8, the image file's content). An
encoder's fingerprint is sha256 over its encoder id and that digest: equal fingerprints mean equal
vectors, so they drive both the incremental skip (unchanged since the last run) and the in-run
deduplication (the same caption or photo on many items).

Images are checked the way make and rsync check files: `InspectInputs` only stats each image (size
and modification time, or what the object store reports). Where the stat and the path equal the
table's, the stored digest is reused and the file is never opened. A new or changed stat is read once,
where it is decoded: the image stage hashes the bytes it decodes (inference.py), so a first run reads
each picture once, and a file whose stat changed but whose bytes did not keeps its stored vectors
(`recheck`, set by the compare's DecideWork). `run --rehash` reads and hashes every image here, before
the decisions: a file rewritten with the same size and modification time is otherwise taken as
unchanged, and only the bytes can say whether its row is.

Images named by http(s) URL are not asked anything at inspection: `HashImages` asks the server a
conditional GET with the validators stored for the same URL, so an unchanged image costs one request and
no body, and a changed or new one costs one body, which is hashed and kept in the run's scratch folder
(`image_copy`) for the encode stage to decode instead of downloading it again. With
`catalog.immutable_urls`, a URL's stat is the URL itself: an unchanged URL sends no request at all.
HashImages reads the images it must in batches, their reads and requests in flight together
(http.max_per_worker a process).

Before it is hashed, an image's input is known by its path and stat (`input_key`): items that share a
picture file are encoded once, and copies of one picture under other paths once per worker (the image
stage remembers the vectors of the digests it encoded last).
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from transforms.http_fetch import is_url
from transforms.images import check_image
from transforms.items import HELD, REJECTS, failed, pack, reject_from_exception
from transforms.storage import ImageReader, file_stat

ABSENT = "absent"   # the digest of an input the item does not have: no text, no image reference
IMMUTABLE_URL = "immutable-url"   # the stat of an image URL under catalog.immutable_urls: the URL says it all
ASK_SERVER = "?"    # a URL's stat until HashImages asks the server: never equal to a stored one
HASH_BATCH = 512    # images read together: a few stragglers (retries) hold up a batch, not the run


def has_input(item: dict, modality: str) -> bool:
    return item["digests"].get(modality) != ABSENT


def content_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(encoder_id: str, digest: str) -> str:
    return hashlib.sha256(f"{encoder_id}\0{digest}".encode()).hexdigest()


def fingerprints(item: dict, inputs: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Each encoder's fingerprint of the item, from its input digests; none yet for a picture still to be
    hashed where it is decoded. `inputs` maps encoder name to (encoder id, modality). Derived where needed,
    so that items do not carry them through shuffles."""
    return {name: fingerprint(encoder_id, item["digests"][modality])
            for name, (encoder_id, modality) in inputs.items() if modality in item["digests"]}


def written_fingerprints(item: dict, inputs: dict[str, tuple[str, str]]) -> dict[str, str | None]:
    """The fingerprints its row holds: none for an encoder the budget left for later, so the next run takes it up."""
    found = fingerprints(item, inputs)
    return {name: None if name in item["deferred"] else found[name] for name in inputs}


def unhashed(item: dict) -> bool:
    """Whether the item's picture is still to be read: it is hashed where it is decoded."""
    return item["image_stat"] is not None and "image" not in item["digests"]


def input_key(item: dict, modality: str) -> str:
    """What identifies the item's input for this modality: its digest, or for a picture still to be hashed
    its path and stat (one read and one decode for every item that names that file)."""
    if modality == "image" and unhashed(item):
        return f"file:{item['image_stat']}:{item['image_uri']}"
    return item["digests"][modality]


def with_image_digest(item: dict, digest: str) -> dict:
    """The item once its picture is hashed: where the bytes are those its stored row was made from, it keeps
    the stored vectors its `recheck` names, as it would have had the stat not changed (and the budget, which
    counted them as work, leaves nothing of them for later)."""
    recheck = item["recheck"]
    kept = set(recheck[1]) if recheck and recheck[0] == digest else set()
    return dict(item, digests={**item["digests"], "image": digest}, keep=sorted({*item["keep"], *kept}),
                deferred=[name for name in item["deferred"] if name not in kept], recheck=None)


class InspectInputs(beam.DoFn):
    """Digest each item's text and id, and stat its image: no image is opened here.

    `modalities` are those the config's encoders take ("text", "image", "behaviour"). An item without a
    text or an image reference is missing that modality (its digest is `ABSENT`, and it gets no vector
    from those encoders); an item with none of the inputs is a reject. A broken image reference is one too.
    Rejects here are `held`, (id, packed reject): the compare keeps the table's row for the id.
    """

    def __init__(self, modalities: frozenset[str], immutable_urls: bool = False):
        self._modalities = modalities
        self._url_stat = IMMUTABLE_URL if immutable_urls else ASK_SERVER

    def process(self, item: dict):
        item = dict(item, digests=dict(item["digests"]))
        digests = item["digests"]
        try:
            if "text" in self._modalities:
                digests["text"] = content_digest(item["text"].encode("utf-8")) if item["text"] else ABSENT
            if "image" in self._modalities:
                if item["image_uri"]:
                    uri = item["image_uri"]
                    item["image_stat"] = self._url_stat if is_url(uri) else file_stat(uri)
                else:
                    digests["image"] = ABSENT
            if "behaviour" in self._modalities:
                digests["behaviour"] = content_digest(item["id"].encode("utf-8"))
            if all(digests.get(m) == ABSENT for m in self._modalities):
                raise ValueError("the item has none of the inputs its encoders take: "
                                 + ", ".join(sorted(self._modalities)))
        except (OSError, ValueError) as err:
            yield beam.pvalue.TaggedOutput(HELD, (item["id"], pack(reject_from_exception(item, "load", err))))
            return
        yield item


class HashImages(beam.DoFn):
    """Ask the servers of image URLs whether their pictures changed, and under `--rehash` read every image
    file: these are checked and digested, HASH_BATCH at a time, their reads and requests in flight together.
    Every other item passes straight on; a changed image file is hashed where it is decoded."""

    def __init__(self, reader: ImageReader, rehash: bool, copies: str):
        self._reader = reader
        self._rehash = rehash
        self._copies = copies       # the run's folder for the bytes of fetched URLs
        self._hashed = Metrics.counter("catalog_embed", "images_hashed")
        self._bytes = Metrics.counter("catalog_embed", "image_bytes_hashed")

    def start_bundle(self):
        self._waiting: list[dict] = []

    def process(self, item: dict):
        if not unhashed(item) or not (self._rehash or is_url(item["image_uri"])):
            yield item
            return
        self._waiting.append(dict(item, digests=dict(item["digests"])))     # filled in by the reading threads
        if len(self._waiting) >= HASH_BATCH:
            yield from self._hash_waiting()

    def finish_bundle(self):
        # Outputs of finish_bundle carry their window: this batch pipeline's items are in the global one.
        for output in self._hash_waiting():
            if isinstance(output, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
            else:
                yield GlobalWindows.windowed_value(output)

    def _hash_waiting(self):
        waiting, self._waiting = self._waiting, []
        errors = _pool(self._reader.http.max_per_worker).map(self._hash, waiting)
        for item, err in zip(waiting, errors, strict=True):
            if err is not None:
                yield beam.pvalue.TaggedOutput(REJECTS, failed(item, "load", err))
            else:
                yield item

    def _hash(self, item: dict) -> Exception | None:
        """Give the item its image digest (and a URL's stat and copy) in place; the error if it has none."""
        try:
            uri = item["image_uri"]
            if is_url(uri):
                data = self._fetch(item)
                if data is None:
                    return None
            else:
                data = self._reader.read(uri)
            check_image(data, self._reader.max_pixels)
        except (OSError, ValueError) as err:
            return err
        item["digests"]["image"] = digest = content_digest(data)
        if is_url(uri):
            item["image_copy"] = self._keep_copy(digest, data)
        self._hashed.inc()
        self._bytes.inc(len(data))
        return None

    def _fetch(self, item: dict) -> bytes | None:
        """The URL's body, or None when the server says the stored image is still current (304)."""
        stored = item["stored"] or {}
        current = stored.get("image_uri") == item["image_uri"] and stored.get("image_digest") and not self._rehash
        fetched = self._reader.fetch(item["image_uri"], stored.get("image_stat") if current else None)
        if fetched.body is None:
            item["digests"]["image"] = stored["image_digest"]
        if item["image_stat"] != IMMUTABLE_URL:
            item["image_stat"] = stored["image_stat"] if fetched.body is None else fetched.validators
        return fetched.body

    def _keep_copy(self, digest: str, data: bytes) -> str:
        path = FileSystems.join(self._copies, digest)
        with FileSystems.create(path) as handle:
            handle.write(data)
        return path


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    """One pool a process for the reads and requests of HashImages, shared by its harness threads."""
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="hash-images")
        return _POOLS[threads]
