"""CSV as Python's `csv.reader` reads it (RFC 4180 and the exports shops really write), read in parallel.

A quoted field may hold delimiters, doubled quotes and line breaks, so a file is split at record
boundaries, never at line breaks. A record ends at a line break (`\\n` or `\\r`) outside quotes. Whether a
byte is inside quotes follows `csv.reader`'s rules, not the parity of the quotes before it: a quote opens
a quoted field only at a field's start (after a delimiter or a line break, or at the file's start); inside
one, a doubled quote is a quote and a single one closes it; anywhere else a quote is a plain character
(`TV 55" 4K` is one unquoted field). So the quote state changes only at runs of consecutive quotes, and
each run does one of three things to it, which a byte scan finds for all runs at once:
- a run of odd length at a field's start flips the state (it opens a field, or closes one whose last
  character was the delimiter or line break before it);
- a run of odd length elsewhere leaves the state outside quotes (it closes a field, or is plain text);
- a run of even length changes nothing (doubled quotes, an empty quoted field, or plain text).

The file is read as byte ranges of CHUNK_BYTES, twice. A range owns the quote runs that start in it.
The first pass sums up what each range's runs do to the state (whether one resets it, and how many flips
follow) and counts its line breaks; the second parses the records that start in each range, knowing from
the sums of the ranges before it whether it starts inside quotes and at which line. Only (path, offset,
count) tuples cross the groupings. The encodings are those that keep the quote, the delimiter and the line
break as their ASCII bytes: UTF-8, cp1252, latin-1 (not UTF-16).
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
TAIL_BYTES = 1 << 20        # read past a range's end, doubling, until its last record (or quote run) ends
NEWLINE, RETURN = 0x0A, 0x0D
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


@dataclass(frozen=True)
class QuoteEffect:
    """What a range's quote runs do to the quote state: reset it to outside (or not), then flip it `flips`
    times (mod 2). Two effects compose, so ranges can be summed up apart and placed in order."""

    resets: bool = False
    flips: int = 0

    def after(self, in_quotes: bool) -> bool:
        return bool((0 if self.resets else int(in_quotes)) ^ self.flips)

    def then(self, later: QuoteEffect) -> QuoteEffect:
        return later if later.resets else QuoteEffect(self.resets, self.flips ^ later.flips)


@dataclass(frozen=True)
class QuoteRuns:
    """The quote runs of a stretch of bytes that it owns: where each starts and the state after it."""

    starts: np.ndarray
    ends: np.ndarray
    resets: np.ndarray
    flips: np.ndarray

    def effect(self) -> QuoteEffect:
        if not len(self.starts):
            return QuoteEffect()
        reset_at = np.flatnonzero(self.resets)
        after = reset_at[-1] + 1 if len(reset_at) else 0
        return QuoteEffect(bool(len(reset_at)), int(self.flips[after:].sum() % 2))

    def states_after(self, in_quotes: bool) -> np.ndarray:
        """The quote state after each run, from `in_quotes` before the first."""
        flips = np.cumsum(self.flips)
        last_reset = np.maximum.accumulate(np.where(self.resets, np.arange(len(self.starts)), -1))
        since_reset = flips - np.where(last_reset >= 0, flips[np.maximum(last_reset, 0)], 0)
        return (np.where(last_reset >= 0, 0, int(in_quotes)) + since_reset) % 2 == 1


def quote_runs(data: bytes, fmt: CsvFormat, owned_from: int, at_file_start: bool) -> QuoteRuns:
    """The runs of quotes in `data` that start at or after `owned_from`. At the file's start (`at_file_start`,
    after a byte-order mark) a run starts a field; elsewhere the byte before it says."""
    buffer = np.frombuffer(data, np.uint8)
    head = len(BOM) if at_file_start and data.startswith(BOM) else 0
    quotes = np.flatnonzero(buffer == quote_byte(fmt))       # a run of quotes: consecutive positions
    cuts = np.flatnonzero(np.diff(quotes) != 1) + 1
    first, last = np.concatenate(([0], cuts)), np.concatenate((cuts, [len(quotes)]))
    starts, ends = (quotes[first], quotes[last - 1] + 1) if len(quotes) else (quotes, quotes)
    owned = starts >= owned_from
    starts, ends = starts[owned], ends[owned]
    before = buffer[np.maximum(starts - 1, 0)]
    field_start = ((before == fmt.delimiter.encode(fmt.encoding)[0]) | (before == NEWLINE) | (before == RETURN)
                   | ((starts == head) & at_file_start))
    odd = (ends - starts) % 2 == 1
    return QuoteRuns(starts, ends, odd & ~field_start, odd & field_start)


def record_ends(data: bytes, fmt: CsvFormat, in_quotes: bool, owned_from: int = 0,
                at_file_start: bool = True) -> np.ndarray:
    """The offsets in `data` of the line breaks that end records, given the quote state before the first quote
    run it owns (`quote_runs`)."""
    buffer = np.frombuffer(data, np.uint8)
    breaks = np.flatnonzero((buffer == NEWLINE) | (buffer == RETURN))
    runs = quote_runs(data, fmt, owned_from, at_file_start)
    if not len(runs.starts):
        return breaks[:0] if in_quotes else breaks
    before = np.searchsorted(runs.starts, breaks) - 1         # the last run before each line break
    states = runs.states_after(in_quotes)
    inside = np.where(before >= 0, states[np.maximum(before, 0)], in_quotes)
    return breaks[~inside]


def quote_byte(fmt: CsvFormat) -> int:
    return fmt.quotechar.encode(fmt.encoding)[0]


def ranges(path: str, size: int) -> list[Range]:
    return [Range(path, i, start, min(size, start + CHUNK_BYTES))
            for i, start in enumerate(range(0, max(size, 1), CHUNK_BYTES))]


def read_bytes(path: str, start: int, length: int) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        handle.seek(start)
        return handle.read(length)


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
        ends = record_ends(data, fmt, False)
        if len(ends) or len(data) < length:
            first = data[: ends[0] if len(ends) else len(data)].removeprefix(BOM)
            return next(csv.reader([decoded(first, fmt.encoding)], delimiter=fmt.delimiter, quotechar=fmt.quotechar))
        length *= 2


def _owned_bytes(part: Range, fmt: CsvFormat) -> tuple[bytes, int]:
    """The range's bytes from the one before it (which says whether its first quote run starts a field) to
    past the end of the last quote run that starts in it; and the offset of the range's start in them."""
    first = max(part.start - 1, 0)
    length = part.end - first + 4096
    while True:
        data = read_bytes(part.path, first, length)
        unfinished = len(data) == length and data[-1:] == bytes([quote_byte(fmt)])
        if not unfinished:
            return data, part.start - first
        length *= 2


class CountRange(beam.DoFn):
    """First pass: what a range's quote runs do to the quote state, and its line breaks, keyed by its file."""

    def __init__(self, fmt: CsvFormat):
        self._fmt = fmt

    def process(self, part: Range) -> Iterator[tuple[str, tuple[Range, QuoteEffect, int]]]:
        data, start = _owned_bytes(part, self._fmt)
        runs = quote_runs(data, self._fmt, start, part.start == 0)
        owned = runs.starts < start + part.end - part.start
        effect = QuoteRuns(runs.starts[owned], runs.ends[owned], runs.resets[owned], runs.flips[owned]).effect()
        yield part.path, (part, effect, data.count(b"\n", start, start + part.end - part.start))


def placed_ranges(counted: tuple[str, list[tuple[Range, QuoteEffect, int]]]) -> Iterator[Range]:
    """Each range of a file with its quote state and line number at its start, from the sums before it."""
    _, parts = counted
    in_quotes, lines = False, 1
    for part, effect, part_lines in sorted(parts, key=lambda found: found[0].index):
        yield Range(part.path, part.index, part.start, part.end, in_quotes, lines)
        in_quotes, lines = effect.after(in_quotes), lines + part_lines


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
        after = np.searchsorted(ends, owned)
        stops = np.where(after < len(ends), ends[np.minimum(after, max(len(ends) - 1, 0))], len(data))
        lines = line_at_first + np.searchsorted(newlines, owned)
        nonempty = stops > owned                # a CRLF's CR and LF end records: none lies between them
        for begin, stop, line in zip(owned[nonempty].tolist(), stops[nonempty].tolist(), lines[nonempty].tolist(),
                                     strict=True):
            yield from self._row(data[begin:stop], f"{part.path}:{line}")

    def _data(self, part: Range, first: int) -> tuple[bytes, np.ndarray]:
        """The bytes from `first` to the end of the range's last record, and the offsets of the record ends."""
        length = part.end - first + TAIL_BYTES
        while True:
            data = read_bytes(part.path, first, length)
            ends = record_ends(data, self._fmt, part.in_quotes, part.start - first, part.start == 0)
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
        try:
            cells = next(csv.reader([text], delimiter=self._fmt.delimiter, quotechar=self._fmt.quotechar), [])
        except csv.Error as err:
            yield _reject("MalformedRow", f"unreadable CSV: {err}", source, text)
            return
        if not any(cell.strip() for cell in cells) and len(cells) <= 1:     # a blank line is no row
            return
        width = len(self._columns)
        if len(cells) > width and self._overflow:
            cells = cells[: width - 1] + [self._fmt.delimiter.join(cells[width - 1 :])]
        if len(cells) != width:     # no id: a row of another width cannot say which of its cells is the id
            yield _reject("MalformedRow", f"expected {width} cells, found {len(cells)}", source, text)
            return
        yield dict(zip(self._columns, cells, strict=True), _source=source)


def _reject(error: str, message: str, source: str, text: str):
    return beam.pvalue.TaggedOutput(REJECTS, make_reject(None, "read", error, message, f"{source}: {text[:200]}"))


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
