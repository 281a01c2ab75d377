"""CSV as RFC 4180 defines it, read in parallel.

A quoted field may hold delimiters, doubled quotes and line breaks, so a file is split at record
boundaries, never at line breaks. A record ends at a line break outside quotes, and whether a byte is
inside quotes is the parity of the quote characters before it in the file (a doubled quote inside a
quoted field adds two). So the file is read as byte ranges of CHUNK_BYTES, twice: the first pass counts
each range's quote characters and line breaks (a byte scan), and the second parses the records that start
in each range, knowing from the counts of the ranges before it whether it starts inside quotes and at
which line. Only (path, offset, count) tuples cross the groupings. The encodings are those that keep the
quote, the delimiter and the line break as their ASCII bytes: UTF-8, cp1252, latin-1 (not UTF-16).
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from transforms.config import CsvFormat
from transforms.items import ITEMS, REJECTS, make_reject

CHUNK_BYTES = 64 << 20      # a range per worker task: large enough that its counts cost nothing to group
TAIL_BYTES = 1 << 20        # read past a range's end, doubling, until its last record ends
NEWLINE = 0x0A
BOM = codecs.BOM_UTF8


@dataclass(frozen=True)
class Range:
    """Bytes [start, end) of a file, and what the first pass found before them."""

    path: str
    index: int
    start: int
    end: int
    in_quotes: bool = False
    line: int = 1              # the line number at `start`


def quote_byte(fmt: CsvFormat) -> int:
    return fmt.quotechar.encode(fmt.encoding)[0]


def ranges(path: str, size: int) -> list[Range]:
    return [Range(path, i, start, min(size, start + CHUNK_BYTES))
            for i, start in enumerate(range(0, max(size, 1), CHUNK_BYTES))]


def read_bytes(path: str, start: int, length: int) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        handle.seek(start)
        return handle.read(length)


def record_ends(data: bytes, quote: int, in_quotes: bool) -> np.ndarray:
    """The offsets in `data` of the line breaks that end records, given the quote state at its first byte."""
    buffer = np.frombuffer(data, np.uint8)
    quotes = np.flatnonzero(buffer == quote)
    newlines = np.flatnonzero(buffer == NEWLINE)
    quotes_before = np.searchsorted(quotes, newlines) + int(in_quotes)
    return newlines[quotes_before % 2 == 0]


class EncodingMismatch(ValueError):
    """Bytes that are valid UTF-8, read as a one-byte encoding: stored, they would be mojibake."""


def decoded(record: bytes, encoding: str) -> str:
    """The record's text. Non-ASCII bytes that also decode as UTF-8 under a one-byte encoding (cp1252,
    latin-1) are a UTF-8 file declared as another encoding: "CafÃ©" must never be stored as text."""
    text = record.decode(encoding)
    if record.isascii() or codecs.lookup(encoding).name == "utf-8":
        return text
    try:
        record.decode("utf-8")
    except UnicodeDecodeError:
        return text
    raise EncodingMismatch(f"these bytes are UTF-8, not {encoding}: set catalog.csv.encoding to utf-8")


def csv_header(path: str, fmt: CsvFormat | None = None) -> list[str]:
    """The file's first record: its column names."""
    fmt = fmt or CsvFormat()
    length = TAIL_BYTES
    while True:
        data = read_bytes(path, 0, length)
        ends = record_ends(data, quote_byte(fmt), False)
        if len(ends) or len(data) < length:
            first = data[: ends[0] if len(ends) else len(data)].removeprefix(BOM).removesuffix(b"\r")
            return next(csv.reader([decoded(first, fmt.encoding)], delimiter=fmt.delimiter, quotechar=fmt.quotechar))
        length *= 2


class CountRange(beam.DoFn):
    """First pass: a range's quote characters and line breaks, keyed by its file."""

    def __init__(self, fmt: CsvFormat):
        self._quote = bytes([quote_byte(fmt)])

    def process(self, part: Range) -> Iterator[tuple[str, tuple[Range, int, int]]]:
        data = read_bytes(part.path, part.start, part.end - part.start)
        yield part.path, (part, data.count(self._quote), data.count(b"\n"))


def placed_ranges(counted: tuple[str, list[tuple[Range, int, int]]]) -> Iterator[Range]:
    """Each range of a file with its quote state and line number at its start, from the counts before it."""
    _, parts = counted
    quotes, lines = 0, 1
    for part, part_quotes, part_lines in sorted(parts, key=lambda found: found[0].index):
        yield Range(part.path, part.index, part.start, part.end, quotes % 2 == 1, lines)
        quotes, lines = quotes + part_quotes, lines + part_lines


class ParseRange(beam.DoFn):
    """Second pass: the records that start in a range, as rows of the header's columns (the header record
    itself left out), each with `_source` naming its file and line. A record of another width is a reject,
    unless the layout is known to have unquoted delimiters in its last column (Kaggle's styles.csv), which
    then keeps them."""

    def __init__(self, columns: list[str], fmt: CsvFormat, overflow_column: str | None = None):
        self._columns = columns
        self._fmt = fmt
        self._overflow = overflow_column is not None and overflow_column == columns[-1]

    def process(self, part: Range):
        # Read from the byte before the range: a record starts at the range's first byte if that byte ends one.
        first = max(part.start - 1, 0)
        data, ends = self._data(part, first)
        line_at_first = part.line - int(first < part.start and data[:1] == b"\n")
        newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == NEWLINE)
        starts = ends + 1       # a record starts after a record's end: the file's first, the header, never
        owned = starts[(starts >= part.start - first) & (starts < part.end - first)]
        for begin in owned.tolist():
            after = int(np.searchsorted(ends, begin))
            stop = int(ends[after]) if after < len(ends) else len(data)
            line = line_at_first + int(np.searchsorted(newlines, begin))
            yield from self._row(data[begin:stop].removesuffix(b"\r"), f"{part.path}:{line}")

    def _data(self, part: Range, first: int) -> tuple[bytes, np.ndarray]:
        """The bytes from `first` to the end of the range's last record, and the offsets of the record ends."""
        quote = quote_byte(self._fmt)
        length = part.end - first + TAIL_BYTES
        while True:
            data = read_bytes(part.path, first, length)
            in_quotes = part.in_quotes ^ (first < part.start and data[:1] == bytes([quote]))
            ends = record_ends(data, quote, in_quotes)
            if len(data) < length or (len(ends) and ends[-1] >= part.end - first - 1):
                return data, ends
            length *= 2

    def _row(self, record: bytes, source: str):
        try:
            text = decoded(record, self._fmt.encoding)
        except UnicodeDecodeError as err:
            yield _reject("InvalidEncoding", f"not valid {self._fmt.encoding} ({err.reason} at byte {err.start}): "
                          "set catalog.csv.encoding", source, record.decode(self._fmt.encoding, "replace"))
            return
        except EncodingMismatch as err:
            yield _reject("EncodingMismatch", str(err), source, record.decode("utf-8"))
            return
        if not text.strip():
            return
        try:
            cells = next(csv.reader([text], delimiter=self._fmt.delimiter, quotechar=self._fmt.quotechar))
        except csv.Error as err:
            yield _reject("MalformedRow", f"unreadable CSV: {err}", source, text)
            return
        width = len(self._columns)
        if len(cells) > width and self._overflow:
            cells = cells[: width - 1] + [self._fmt.delimiter.join(cells[width - 1 :])]
        if len(cells) != width:
            yield _reject("MalformedRow", f"expected {width} cells, found {len(cells)}", source, text,
                          cells[0] if cells else None)
            return
        yield dict(zip(self._columns, cells, strict=True), _source=source)


def _reject(error: str, message: str, source: str, text: str, item_id: str | None = None):
    return beam.pvalue.TaggedOutput(REJECTS, make_reject(item_id, "read", error, message, f"{source}: {text[:200]}"))


class ReadCsv(beam.PTransform):
    """(rows, rejects) of the CSV files in a PCollection of paths, split at record boundaries."""

    def __init__(self, columns: list[str], fmt: CsvFormat, overflow_column: str | None = None):
        super().__init__()
        self._parse = ParseRange(columns, fmt, overflow_column)
        self._count = CountRange(fmt)

    def expand(self, paths):
        parsed = (
            paths
            | "Byte ranges" >> beam.FlatMap(lambda path: ranges(path, FileSystems.match([path])[0]
                                                                .metadata_list[0].size_in_bytes))
            | "Spread the ranges" >> beam.Reshuffle()
            | "Count quotes and lines" >> beam.ParDo(self._count)
            | "By file" >> beam.GroupByKey()
            | "Place each range" >> beam.FlatMap(placed_ranges)
            | "Spread the placed ranges" >> beam.Reshuffle()
            | "Parse records" >> beam.ParDo(self._parse).with_outputs(REJECTS, main=ITEMS)
        )
        return parsed[ITEMS], parsed[REJECTS]
