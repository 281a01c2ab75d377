"""Catalog readers: each real layout becomes a PCollection of items, split across workers.

Every reader turns its layout into uniform rows (`id`, `image`, `label` and the catalog's own
fields); `make_item` then does the rest the same way for all. The reads are splittable (CSV at record
boundaries, line-based text files, Parquet row groups, matched files); the compare's join by id then
spreads the items over the workers before the heavy stages, so they are not shuffled once more here.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import apache_beam as beam
from apache_beam import coders
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from transforms.config import CatalogConfig, CsvFormat
from transforms.csv_records import ReadCsv, csv_header
from transforms.items import ITEMS, REJECTS, field_value, first_value, make_item, make_reject

JSON_LINES = ("jsonl", "json", "ndjson")
FASHION_COLUMNS = (
    "id", "gender", "masterCategory", "subCategory", "articleType",
    "baseColour", "season", "year", "usage", "productDisplayName",
)


def read_small_text(path: str) -> str:
    """Read a small metadata file (a header line, a class list) at graph construction time."""
    with FileSystems.open(path) as handle:
        return handle.read().decode("utf-8")


class ParseLines(beam.DoFn):
    """Lines arrive as bytes so that one undecodable line is a reject, not a crashed read."""

    def __init__(self, source: str):
        self._source = source

    def process(self, raw: bytes):
        try:
            line = raw.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as err:
            yield self._reject("InvalidEncoding", f"not valid utf-8: {err}", raw.decode("utf-8", "replace"))
            return
        if line.strip():
            yield from self.parse(line)

    def parse(self, line: str):
        raise NotImplementedError

    def _reject(self, error: str, message: str, line: str, item_id: str | None = None):
        return beam.pvalue.TaggedOutput(REJECTS, make_reject(item_id, "read", error, message,
                                                             f"{self._source}: {line[:200]}"))


class ParseJsonLine(ParseLines):
    def parse(self, line: str):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield self._reject("MalformedRow", f"invalid JSON: {err}", line)
            return
        if not isinstance(row, dict):
            yield self._reject("MalformedRow", "a JSONL line must be an object", line)
            return
        yield dict(row, _source=self._source)


class ParseFood101Line(ParseLines):
    """`apple_pie/1005649` in meta/train.txt or meta/test.txt."""

    def __init__(self, source: str, split: str, human: dict[str, str]):
        super().__init__(source)
        self._split = split
        self._human = human

    def parse(self, line: str):
        item_id = line.strip()
        label = item_id.split("/", 1)[0]
        yield {"id": item_id, "label": label, "name": self._human.get(label, label.replace("_", " ")),
               "split": self._split, "image": f"images/{item_id}.jpg", "_source": self._source}


class ReadCatalog(beam.PTransform):
    """Read a catalog in any supported layout. Outputs tagged `items` and `rejects`."""

    def __init__(self, catalog: CatalogConfig, passthrough: tuple[str, ...]):
        super().__init__()
        self._catalog = catalog
        self._passthrough = passthrough

    def expand(self, pbegin):
        read = {
            "manifest": self._read_manifest,
            "food101": self._read_food101,
            "fashion": self._read_fashion,
            "digikala": self._read_digikala,
        }[self._catalog.format]
        rows, rejects = read(pbegin)
        base_dir = self._base_dir()
        items = (
            rows
            | "Rows to items" >> beam.ParDo(RowToItem(self._catalog, self._passthrough, base_dir))
            .with_outputs(REJECTS, main=ITEMS)
        )
        all_rejects = (rejects, items[REJECTS]) | "Read rejects" >> beam.Flatten()
        return {ITEMS: items[ITEMS], REJECTS: all_rejects}

    def _base_dir(self) -> str:
        """What relative image paths resolve against: the manifest's folder, or the layout's root."""
        path = self._catalog.path.rstrip("/")
        return posixpath.dirname(path) if self._catalog.format == "manifest" else path

    def _read_manifest(self, pbegin):
        rows, rejects = read_table_file(pbegin, self._catalog.path, "manifest", self._catalog.csv)
        names = {"id": self._catalog.id_field, "image": self._catalog.image_field,
                 "label": self._catalog.label_field}
        return rows | "Manifest columns" >> beam.Map(_rename_manifest_columns, names), rejects

    def _read_food101(self, pbegin):
        root = self._catalog.path.rstrip("/")
        classes = read_small_text(f"{root}/meta/classes.txt").split()
        names = [line.strip() for line in read_small_text(f"{root}/meta/labels.txt").splitlines() if line.strip()]
        human = dict(zip(classes, names, strict=True))
        rows, rejects = [], []
        for split in ("train", "test"):
            path = f"{root}/meta/{split}.txt"
            split_rows, split_rejects = read_lines(pbegin, path, ParseFood101Line(path, split, human),
                                                         f"{split} split", False)
            rows.append(split_rows)
            rejects.append(split_rejects)
        return rows | "Both splits" >> beam.Flatten(), rejects | "Both splits' rejects" >> beam.Flatten()

    def _read_fashion(self, pbegin):
        path = f"{self._catalog.path.rstrip('/')}/styles.csv"
        rows, rejects = read_csv(pbegin, path, "styles.csv", self._catalog.csv, overflow_column="productDisplayName")
        return rows | "Fashion image paths" >> beam.Map(_fashion_row, self._catalog.label_field), rejects

    def _read_digikala(self, pbegin):
        root = self._catalog.path.rstrip("/")
        rows = (
            pbegin
            | "Match color folders" >> fileio.MatchFiles(f"{root}/*/*")
            | "Digikala rows" >> beam.Map(lambda meta: _digikala_row(meta.path))
        )
        return rows, pbegin | "No digikala rejects" >> beam.Create([])


def read_lines(pbegin, path: str, parse: beam.DoFn, label: str, skip_header: bool, only_if=None):
    """(rows, rejects) of a line-based file (JSONL, Food-101's lists), split across workers. With `only_if`
    (a PCollection of one value), the file is read only when that value is truthy; otherwise nothing is read."""
    options: dict[str, Any] = {"skip_header_lines": 1 if skip_header else 0, "coder": coders.BytesCoder()}
    if only_if is None:
        lines = pbegin | f"Read {label}" >> beam.io.ReadFromText(path, **options)
    else:
        lines = _path_if(pbegin, path, label, only_if) | f"Read {label}" >> beam.io.ReadAllFromText(**options)
    parsed = lines | f"Parse {label}" >> beam.ParDo(parse).with_outputs(REJECTS, main=ITEMS)
    return parsed[ITEMS], parsed[REJECTS]


def read_csv(pbegin, path: str, label: str, fmt: CsvFormat, only_if=None, overflow_column: str | None = None):
    """(rows, rejects) of a CSV file, split across workers at record boundaries (transforms/csv_records.py);
    `only_if` as for `read_lines`."""
    if only_if is None:
        paths = pbegin | f"{label} path" >> beam.Create([path])
    else:
        paths = _path_if(pbegin, path, label, only_if)
    return paths | f"Read {label} CSV" >> ReadCsv(csv_header(path, fmt), fmt, overflow_column)


def read_table_file(pbegin, path: str, label: str, fmt: CsvFormat | None = None, only_if=None):
    """(rows, rejects) of a CSV, Parquet or JSONL file (by its extension), each row a dict of its columns
    and `_source`; `only_if` as for `read_lines`."""
    ext = path.lower().rsplit(".", 1)[-1]
    if ext == "parquet":
        if only_if is None:
            rows = pbegin | f"Read {label} parquet" >> beam.io.ReadFromParquet(path)
        else:
            rows = _path_if(pbegin, path, label, only_if) | f"Read {label} parquet" >> beam.io.ReadAllFromParquet()
        rows = rows | f"Tag {label} source" >> beam.Map(lambda row, src: dict(row, _source=src), path)
        return rows, pbegin | f"No {label} parse rejects" >> beam.Create([])
    if ext in JSON_LINES:
        return read_lines(pbegin, path, ParseJsonLine(path), label, False, only_if)
    return read_csv(pbegin, path, label, fmt or CsvFormat(), only_if)


def _path_if(pbegin, path: str, label: str, only_if):
    """`path` as a one-element PCollection, or an empty one when `only_if` holds a falsy value."""
    return (
        pbegin
        | f"{label} file" >> beam.Create([path])
        | f"{label} file if wanted" >> beam.Filter(lambda _, wanted: bool(wanted),
                                                   wanted=beam.pvalue.AsSingleton(only_if))
    )


class RowToItem(beam.DoFn):
    def __init__(self, catalog: CatalogConfig, passthrough: tuple[str, ...], base_dir: str):
        self._catalog = catalog
        self._passthrough = passthrough
        self._base_dir = base_dir

    def process(self, row: dict):
        if row.get("id") is None or not str(row["id"]).strip():
            yield beam.pvalue.TaggedOutput(REJECTS, make_reject(
                None, "read", "MissingId", "the row has no id", row.get("_source")))
            return
        try:
            yield make_item(row, self._catalog, self._passthrough, self._base_dir)
        except ValueError as err:
            # The id as make_item would have made it: the reject holds that id's stored row (lifecycle.py).
            item_id = None if isinstance(row["id"], list | tuple | dict) else str(row["id"]).strip()
            yield beam.pvalue.TaggedOutput(REJECTS, make_reject(
                item_id, "read", type(err).__name__, str(err), row.get("_source")))


def _rename_manifest_columns(row: dict, names: dict) -> dict:
    out = dict(row)
    for uniform, column in names.items():
        value = field_value(row, column) if column else None
        out[uniform] = value if uniform == "id" else first_value(value)    # a gallery: its first picture
    return out


def _fashion_row(row: dict, label_field: str | None) -> dict:
    return dict(row, image=f"images/{row['id'].strip()}.jpg", label=row.get(label_field) if label_field else None)


def _digikala_row(path: str) -> dict:
    color = posixpath.basename(posixpath.dirname(path))
    stem = posixpath.splitext(posixpath.basename(path))[0]
    return {"id": f"{color}/{stem}", "label": color, "color": color, "image": path, "_source": path}
