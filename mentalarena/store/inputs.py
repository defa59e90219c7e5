"""The one place that opens a user's input file: text, JSON, JSONL, CSV and Parquet, with one rule set.

UTF-8 with or without a byte-order mark; any other encoding, a folder or a missing file is one
`InputError` line naming the file (and the line where that helps). A JSONL file's last line needs no
newline here: only outputs being resumed have torn tails (`jsonl.read_jsonl` handles those).
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import shlex
from pathlib import Path
from typing import Any

from mentalarena.errors import InputError

# csv refuses fields over 131072 characters by default; a long patient history or IMHI post is
# larger. 2**31 - 1 is the largest every platform's C long takes (sys.maxsize overflows on Windows).
CSV_FIELD_LIMIT = 2**31 - 1


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes; missing, a folder or unreadable is one line naming it."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read file ({err.strerror or err})") from None


def read_text(path: str | Path) -> str:
    """The file's text: UTF-8, a leading BOM (spreadsheet tools add one) dropped."""
    return decode_text(path, read_bytes(path))


def decode_text(path: str | Path, raw: bytes) -> str:
    """`raw` (read from `path`) as UTF-8 text; another encoding is one line saying where and what to do."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise InputError(f"{path}: UTF-16 text (Excel's \"Unicode text\"), not UTF-8: save it as UTF-8 "
                         f"(Excel: \"CSV UTF-8\") or convert it, e.g. {_iconv(path, 'utf-16')}")
    if b"\x00" in raw:  # valid UTF-8, but no text file holds NUL bytes
        raise InputError(f"{path}: {_position(raw, raw.index(0))}: a NUL byte: not a text file "
                         "(UTF-16 without a byte-order mark, or binary); save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: {_position(raw, err.start)}: not UTF-8 (byte 0x{raw[err.start]:02X}); "
                         f"{_guess(path, raw)}") from None


def _position(raw: bytes, at: int) -> str:
    """`line L, column C` of byte `at`; the column counts characters, as an editor shows them."""
    start = raw.rfind(b"\n", 0, at) + 1
    line = raw.count(b"\n", 0, at) + 1
    return f"line {line}, column {len(raw[start:at].decode('utf-8', errors='replace')) + 1}"


def _guess(path: str | Path, raw: bytes) -> str:
    try:
        raw.decode("cp1252")  # only 5 byte values are undefined in it: a clean decode is a strong hint
    except UnicodeDecodeError:
        return ("it is likely in an 8-bit code page (Latin-1, a DOS one, ...): convert it from that one, "
                f"e.g. {_iconv(path, 'latin1')}")
    return f"it looks like Windows-1252 (Latin-1): convert it, e.g. {_iconv(path, 'cp1252')}"


def _iconv(path: str | Path, encoding: str) -> str:
    path = Path(path)
    out = path.with_name(f"{path.stem}.utf8{path.suffix}")
    return f"iconv -f {encoding} -t utf-8 {shlex.quote(str(path))} > {shlex.quote(str(out))}"


# ---------------------------------------------------------------- JSON and JSONL

def parse_json(path: str | Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages aimed at people who wrote JSON."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean",
             int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def read_json(path: str | Path) -> Any:
    return parse_json(path, read_text(path))


def json_lines(path: str | Path, text: str | None = None) -> list[tuple[int, Any]]:
    """(line number, value) for every non-blank line of the file (or of `text`, read from it); a last
    line without its newline is read whole. Split on "\\n" only: a JSON string may hold U+2028 raw."""
    text = read_text(path) if text is None else text
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
    return rows


# ---------------------------------------------------------------- CSV

def csv_rows(path: str | Path, text: str | None = None) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """(header, [(line where the row starts, cells), ...]) of the file (or of `text`, read from it);
    rows whose cells are all blank are left out; an empty file has header None. Fields of any size."""
    text = read_text(path) if text is None else text
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": "\r\n" inside quotes is kept
    previous = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        header = next(reader, None)
        rows, line = [], reader.line_num + 1
        for cells in reader:
            start, line = line, reader.line_num + 1  # a quoted field may span lines
            if any(cell.strip() for cell in cells):
                rows.append((start, cells))
    except csv.Error as err:
        raise InputError(f"{path}: line {reader.line_num}: malformed CSV ({err})") from None
    finally:
        csv.field_size_limit(previous)
    return header, rows


# ---------------------------------------------------------------- tables

def read_table(path: str | Path) -> list[tuple[int, dict]]:
    """(row number, row) by suffix (.json, .csv, .parquet; anything else is JSONL): the line number in
    JSONL, the entry from 1 in a JSON list, the data row from 1 in CSV (after the header; a missing
    cell is None) and Parquet."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = list(enumerate(_parquet_rows(path), 1))
    elif suffix == ".csv":
        header, cells = csv_rows(path)
        rows = [(n, {name: row[i] if i < len(row) else None for i, name in enumerate(header or [])})
                for n, (_, row) in enumerate(cells, 1)]
    elif suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of rows, got {json_type(data)}")
        rows = list(enumerate(data, 1))
    else:
        rows = json_lines(path)
    for number, row in rows:
        if not isinstance(row, dict):
            raise InputError(f"{path}: row {number}: expected an object, got {json_type(row)}")
    return rows


def _parquet_rows(path: Path) -> list[dict]:
    if path.is_dir() or not path.exists():
        read_bytes(path)  # the same one line as every other file
    import pyarrow.parquet  # lazily: installed with `datasets`, needed for Parquet only

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow's ArrowInvalid, OSError, ...: all mean "not a Parquet file"
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(f"{path}: cannot be read as Parquet ({type(exc).__name__}: {first})") from None


def duplicate_id(where: str | Path, first: int, second: int, ident: str) -> InputError:
    """The one message for two rows that share an id: results keyed by id would mix them."""
    return InputError(f"{where}: rows {first} and {second} both have id {ident!r}")
