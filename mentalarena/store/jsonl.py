"""Crash-safe JSONL: each line is written whole and synced; a torn last line is repaired on read."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from mentalarena.errors import InputError
from mentalarena.store.files import append, truncate
from mentalarena.store.files import write_json_atomic  # noqa: F401  (its home is files.py; imported from here by older code)

log = logging.getLogger("mentalarena.store.jsonl")

# Characters that str.splitlines() (and many JSONL readers) take for line ends although JSON keeps
# them raw inside strings; the ASCII ones (\x0b, \x0c, \x1c-\x1e) json.dumps always escapes.
_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def dumps_line(row) -> str:
    """One JSONL line without its newline: UTF-8 text, the Unicode line breaks escaped."""
    return json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS)


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one row with a single write, then flush and fsync, so a kill leaves no half rows behind
    except possibly a torn final line, which `repair_torn_tail` removes."""
    append(path, (dumps_line(row) + "\n").encode("utf-8"))  # mentalarena/store/files.py: no link followed, full disk cut back


def read_jsonl(path: str | Path, allow_torn_tail: bool = False) -> list[dict]:
    """Rows of a JSONL file ([] if absent); any bad line is an error naming its number.

    A final line without its newline is a write cut short by a kill: with `allow_torn_tail` it is
    ignored (not removed: see `repair_torn_tail`), otherwise it is an error. Lines end at "\n" only:
    a string may hold U+2028, U+0085, ... raw (files of older runs, other tools)."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    complete = raw.rfind(b"\n") + 1
    if complete < len(raw) and not allow_torn_tail:
        line = raw.count(b"\n") + 1
        raise InputError(f"{path}: line {line} is incomplete")
    rows = []
    for number, line in enumerate(raw[:complete].decode("utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {number}: not valid JSON ({exc.msg})") from exc
    return rows


def repair_torn_tail(path: str | Path) -> int:
    """Cut off a final line without its newline (left by a kill); returns the bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    raw = path.read_bytes()
    complete = raw.rfind(b"\n") + 1
    if complete == len(raw):
        return 0
    log.warning("%s: removing an incomplete last line (%d bytes) left by an interrupted run",
                path, len(raw) - complete)
    truncate(path, complete)
    return len(raw) - complete
