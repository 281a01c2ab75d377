"""Find the launcher's own folders in what it hands its workers: a pipeline proto, a Dataflow job file,
pipeline options. Pickled DoFns travel compressed and base64-encoded inside them, so each such run is
decoded and searched too.

One kind of path is not a fact a worker acts on: the source file of a function that was pickled by value
(a lambda), which Python records in its code (`co_filename`, and `__file__` among its globals) and shows
only in tracebacks. Beam's own lambdas carry the launcher's site-packages that way. Those are passed over;
any other path under the launcher's folders is reported.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import os
import re
import site
import sys
import tempfile
import zlib
from collections.abc import Collection, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENCODED = re.compile(rb"[A-Za-z0-9+/]{64,}={0,2}")
PATH_CHARACTERS = re.compile(rb"[A-Za-z0-9._/+-]*")
INSIDE_A_PATH = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._/+-:")


def launcher_folders() -> list[str]:
    """The folders only the launcher has: the working directory, the temp folder, the source tree, the
    interpreter's prefix and site-packages."""
    folders = {os.getcwd(), tempfile.gettempdir(), str(REPO), sys.prefix, *site.getsitepackages()}
    return sorted(folders, key=len, reverse=True)


def launcher_paths(blob: bytes, allowed: Collection[str] = ()) -> list[str]:
    """The paths under the launcher's folders that `blob` holds, in it or in any compressed run inside it,
    except the source files that pickled code names, and the `allowed` ones (the launcher's own options
    to itself, such as where it writes the job file)."""
    sources = {os.path.realpath(getattr(module, "__file__", None) or "") for module in list(sys.modules.values())}
    found = set()
    for part in decoded(blob):
        for folder in launcher_folders():
            for match in re.finditer(re.escape(folder.encode()), part):
                if match.start() and part[match.start() - 1] in INSIDE_A_PATH:
                    continue            # the same letters inside another path or a URI (gs://bucket/tmp)
                end = PATH_CHARACTERS.match(part, match.start()).end()
                text = part[match.start():end].decode("utf-8", "replace")
                if text not in allowed and not (text.endswith(".py") and os.path.realpath(text) in sources):
                    found.add(text)
    return sorted(found)


def decoded(blob: bytes) -> Iterator[bytes]:
    yield blob
    for run in ENCODED.findall(blob):
        try:
            raw = base64.b64decode(run)
        except (binascii.Error, ValueError):
            continue
        for decompress in (bz2.decompress, zlib.decompress):
            try:
                yield from decoded(decompress(raw))
            except (OSError, ValueError, zlib.error):
                continue
