"""CSV catalogs as shop systems and spreadsheets export them (RFC 4180): quoted fields holding line breaks,
delimiters and quotes; other delimiters and encodings; a byte-order mark and CRLF line ends. Every row is
stored whole or is one reject with its line, and the counts add up, however the file is split."""

from __future__ import annotations

import csv
import io
import os
import random

import lancedb
import pytest
from apache_beam.pvalue import TaggedOutput

import transforms.csv_records as csv_records
from tests.conftest import COLOR_ONLY, PHOTOS, copy_photo, make_config, read_table, run
from transforms.config import CsvFormat, parse_config

FILLER = [{"id": f"f{i}", "title": f"Plain product {i}"} for i in range(40)]   # keeps rejects under 5%


def _catalog(tmp_path, rows: list[dict], encoding: str = "utf-8", delimiter: str = ",",
             terminator: str = "\n", prefix: bytes = b"") -> str:
    copy_photo(PHOTOS[0], tmp_path / "photo.jpg")
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["id", "title", "image"], delimiter=delimiter, lineterminator=terminator)
    writer.writeheader()
    writer.writerows(dict(row, image="photo.jpg") for row in rows)
    path = tmp_path / "catalog.csv"
    path.write_bytes(prefix + text.getvalue().encode(encoding))
    return str(path)


def _run(tmp_path, path: str, **csv_settings) -> tuple[dict, dict, list[dict]]:
    catalog = {"format": "manifest", "path": path, "text_fields": ["title"]}
    config = make_config(tmp_path, dict(catalog, csv=csv_settings) if csv_settings else catalog)
    summary = run(config)
    stored = {row["id"]: row["title"] for row in read_table(config).to_pylist()}
    name = f"{config.output.table}_rejects"
    written = lancedb.connect(config.output.uri).table_names()
    rejects = read_table(config, name).to_pylist() if name in written else []
    assert summary["read"] == summary["written"] + summary["rejected"]
    assert summary["rejected"] == len(rejects)
    return summary, stored, rejects


def test_quoted_line_breaks_delimiters_and_quotes_stay_in_their_field(tmp_path):
    rows = [{"id": "b1", "title": "line one\nline two"}, {"id": "b2", "title": "has, comma"},
            {"id": "b3", "title": 'the "best" mug'}]
    summary, stored, rejects = _run(tmp_path, _catalog(tmp_path, rows))
    assert stored == {row["id"]: row["title"] for row in rows}
    assert summary["read"] == summary["written"] == 3 and rejects == []


@pytest.mark.parametrize("terminator, prefix", [("\n", b""), ("\r\n", csv_records.BOM)])
def test_an_export_split_into_many_ranges_keeps_every_row_intact(tmp_path, monkeypatch, terminator, prefix):
    # Ranges of a few dozen bytes: every record boundary case (a range starting inside quotes, on a line
    # break, on a quote) happens many times over.
    monkeypatch.setattr(csv_records, "CHUNK_BYTES", 61)
    monkeypatch.setattr(csv_records, "TAIL_BYTES", 7)
    rng = random.Random(7)
    pieces = ["Organic cotton.", "Fits true to size,\nwash cold.", 'A "classic"; 12" wide.', "Line\r\nbreaks",
              "Café crème", ""]
    rows = [{"id": f"p{i}", "title": " ".join(rng.sample(pieces, 3)).strip()} for i in range(150)]
    summary, stored, rejects = _run(tmp_path, _catalog(tmp_path, rows, terminator=terminator, prefix=prefix))
    assert stored == {row["id"]: row["title"] for row in rows}
    assert summary["read"] == len(rows) and rejects == []


def test_an_unquoted_inch_mark_is_part_of_its_field_not_the_start_of_a_quote(tmp_path):
    """As shops export titles: an inch mark in an unquoted field. Python's csv module, pandas and Excel read
    every row; so must the job, or every row after it would vanish into one "quoted" field."""
    rows = [{"id": f"tv{i}", "title": f"Plain product {i}"} for i in range(28)]
    rows[2]["title"] = 'TV 55" 4K UHD'
    path = tmp_path / "catalog.csv"
    path.write_text("id,title,image\n" + "".join(f"{r['id']},{r['title']},photo.jpg\n" for r in rows))
    copy_photo(PHOTOS[0], tmp_path / "photo.jpg")
    summary, stored, rejects = _run(tmp_path, str(path))
    assert summary["read"] == summary["written"] == 28 and rejects == []
    assert stored == {row["id"]: row["title"] for row in rows}


PIECES = ("plain", 'TV 55" 4K', '"quoted"', '""', '"dou""bled"', '"a,b"', '"line\nbreak"', ' "spaced', 'x"y"z',
          '"', ",", "é", '"cr\r\nlf"', 'end"', '"closed"then')


def _split_as_the_job_does(path: str, fmt) -> tuple[list[str], list[dict], int]:
    """The header, rows and reject count of the job's two passes over the file's ranges (transforms/csv_records)."""
    counted = [found for part in csv_records.ranges(path, os.path.getsize(path))
               for _, found in csv_records.CountRange(fmt).process(part)]
    header, rows, rejects = csv_records.csv_header(path, fmt), [], 0
    for part in csv_records.placed_ranges((path, counted)):
        for out in csv_records.ParseRange(header, fmt).process(part):
            if isinstance(out, TaggedOutput):
                rejects += 1
            else:
                rows.append({k: v for k, v in out.items() if k != "_source"})
    return header, rows, rejects


def _as_csv_reader_reads(path: str) -> tuple[list[str], list[dict], int]:
    """The same file read by Python's csv module, a blank line being no row."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        records = [r for r in csv.reader(handle) if len(r) > 1 or any(cell.strip() for cell in r)]
    header, body = records[0], records[1:]
    good = [dict(zip(header, r, strict=True)) for r in body if len(r) == len(header)]
    return header, good, len(body) - len(good)


@pytest.mark.parametrize("seed", range(4))
def test_the_split_agrees_with_pythons_csv_reader_at_any_range_size(tmp_path, monkeypatch, seed):
    """Random exports of quoted and unquoted quotes, delimiters, CR/LF and line breaks in quotes, split into
    ranges from 1 byte to 1 MiB (and tails that must grow): the job reads the rows `csv.reader` reads."""
    rng = random.Random(seed)
    monkeypatch.setattr(csv_records, "TAIL_BYTES", 3)
    for trial in range(60):
        columns = rng.randint(1, 4)
        lines = [",".join(f"c{i}" for i in range(columns))]
        lines += [",".join("".join(rng.choice(PIECES) for _ in range(rng.randint(0, 3))) for _ in range(columns))
                  for _ in range(rng.randint(0, 10))]
        terminator = rng.choice(["\n", "\r\n"])
        path = tmp_path / f"export-{trial}.csv"
        path.write_bytes((csv_records.BOM if trial % 5 == 0 else b"")
                         + (terminator.join(lines) + rng.choice(["", terminator])).encode())
        expected = _as_csv_reader_reads(str(path))
        for chunk in (1, 2, 3, 5, 13, 64, 1 << 20):
            monkeypatch.setattr(csv_records, "CHUNK_BYTES", chunk)
            assert _split_as_the_job_does(str(path), CsvFormat()) == expected, (chunk, path.read_bytes())


def test_a_cp1252_export_with_semicolons_is_read_as_what_it_is(tmp_path):
    rows = [{"id": "latte", "title": "Café crème au lait – 12 × 200 ml"}, *FILLER]
    path = _catalog(tmp_path, rows, encoding="cp1252", delimiter=";")
    _, stored, rejects = _run(tmp_path, path, encoding="cp1252", delimiter=";")
    assert stored["latte"] == "Café crème au lait – 12 × 200 ml" and rejects == []


def test_a_wrong_encoding_gives_rejects_that_name_it_never_mojibake(tmp_path):
    rows = [{"id": "latte", "title": "Café crème au lait"}, *FILLER]
    as_utf8 = tmp_path / "utf8"
    as_utf8.mkdir()
    _, stored, rejects = _run(as_utf8, _catalog(as_utf8, rows), encoding="cp1252")
    assert "latte" not in stored and len(stored) == len(FILLER)
    [reject] = rejects
    assert reject["error"] == "EncodingMismatch" and "not cp1252" in reject["message"]
    as_cp1252 = tmp_path / "cp1252"
    as_cp1252.mkdir()
    _, stored, rejects = _run(as_cp1252, _catalog(as_cp1252, rows, encoding="cp1252"))
    [reject] = rejects
    assert "latte" not in stored and reject["error"] == "InvalidEncoding"
    assert "utf-8" in reject["message"] and "catalog.csv.encoding" in reject["message"]


def test_a_malformed_row_is_one_reject_with_its_line(tmp_path):
    path = _catalog(tmp_path, [{"id": "m1", "title": "two\nlines"}, *FILLER])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('bad,row,with,too many cells\nlast,"Last one",photo.jpg\n')
    summary, stored, rejects = _run(tmp_path, path)
    [reject] = rejects
    bad_line = 1 + 2 + len(FILLER) + 1          # the header, m1's two lines, the filler, then the bad row
    assert reject["error"] == "MalformedRow" and f"catalog.csv:{bad_line}: bad,row" in reject["input_ref"]
    assert stored["m1"] == "two\nlines" and stored["last"] == "Last one"
    assert summary["read"] == len(FILLER) + 3


@pytest.mark.parametrize("settings, message", [({"encoding": "utf-16"}, "single ASCII bytes"),
                                               ({"delimiter": "||"}, "one character"),
                                               ({"encoding": "klingon"}, "not an encoding")])
def test_csv_settings_are_checked_before_the_run(tmp_path, settings, message):
    path = _catalog(tmp_path, FILLER)
    raw = {"catalog": {"format": "manifest", "path": path, "text_fields": ["title"], "csv": settings},
           "encoders": COLOR_ONLY, "output": {"uri": str(tmp_path / "db"), "table": "items"}}
    with pytest.raises(ValueError, match=message):
        parse_config(raw)
