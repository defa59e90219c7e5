"""Counseling evaluation (Counsel_eval.py): client statements in, judge verdicts and scores out.

Everything here is pure: reading statements (a JSONL/CSV/Parquet file, a `datasets` hub id or
local copy, or the patient turns of self-play records), the counseling principles, the judge-reply
parsers, the two-order pairwise arithmetic and the bootstrap intervals. The script does the calls.
"""
from __future__ import annotations

import csv
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .jsonl import read_jsonl

# The client's words are read from the first of these fields a row has (or --text_field).
TEXT_FIELDS = ("statement", "question", "prompt", "client", "input", "query")
# Patient turns of self-play records that are free client speech (not reactions to a proposed
# treatment or medicine, nor the review of a diagnosis).
RECORD_STEPS = re.compile(r"(opening|dialogue\.\d+|decode\.\d+)\.patient")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1", "y"), ("false", "no", "0", "n", "")


# ---------------------------------------------------------------------------------- statements
def load_statements(source: str, *, split: str | None = None, text_field: str | None = None,
                    baseline_field: str | None = None, limit: int | None = None) -> tuple[list[dict], dict]:
    """(rows, notes): one row per distinct client statement, in file order:
    {"row", "id", "key", "statement", "risk", "condition", "severity"[, "baseline"]}.
    `source` is a .jsonl/.json/.csv/.parquet file, or a folder / hub id read by `datasets`."""
    raw, where = _read_rows(source, split)
    field = text_field or next((f for f in TEXT_FIELDS if raw and f in raw[0]), None)
    if raw and field is None:
        raise InputError(f"{where}: row 1: no client-statement field (looked for {', '.join(TEXT_FIELDS)}; "
                         "name yours with --text_field)")
    rows, seen, duplicates, ids = [], set(), 0, set()
    for number, item in enumerate(raw, 1):
        text = _text(item.get(field), "user", where, number, field)
        if text is None or not text.strip():
            raise InputError(f"{where}: row {number}: field {field!r} is missing or empty")
        if text.strip() in seen:  # preference sets hold each statement in several pairs
            duplicates += 1
            continue
        seen.add(text.strip())
        ident = str(item["id"]) if item.get("id") not in (None, "") else str(number)
        if ident in ids:
            raise InputError(f"{where}: row {number}: field 'id' repeats {ident!r}")
        ids.add(ident)
        row = {"row": len(rows), "id": ident, "key": row_key(ident, text), "statement": text.strip(),
               "risk": _flag(item.get("risk"), where, number),
               "condition": _plain(item.get("condition")), "severity": _plain(item.get("severity"))}
        if baseline_field and item.get(baseline_field) not in (None, ""):
            row["baseline"] = _text(item[baseline_field], "assistant", where, number, baseline_field)
        rows.append(row)
        if limit and len(rows) >= int(limit):
            break
    if not rows:
        raise InputError(f"{where}: no client statements")
    return rows, {"source": where, "text_field": field, "duplicates_dropped": duplicates}


def load_record_turns(files: list[str], limit: int | None = None) -> tuple[list[dict], dict]:
    """The patient's free-speech turns of self-play records (arena_med.py output), one row each, id
    `<patient_id>/<sample>/<step>`. Records without a transcript (the reference's six fields) have none."""
    rows, without, seen = [], 0, set()
    for name in files:
        for number, record in enumerate(read_jsonl(name), 1):
            if not isinstance(record, dict):
                raise InputError(f"{name}: line {number}: not a JSON object")
            turns = record.get("transcript")
            if not isinstance(turns, list):
                without += 1
                continue
            for turn in turns:
                text = (turn.get("reply") or "").strip() if isinstance(turn, dict) else ""
                if not text or turn.get("speaker") != "patient" or not RECORD_STEPS.fullmatch(str(turn.get("step"))):
                    continue
                if text in seen:
                    continue
                seen.add(text)
                ident = f"{record.get('patient_id', number)}/{record.get('sample', 0)}/{turn['step']}"
                rows.append({"row": len(rows), "id": ident, "key": row_key(ident, text), "statement": text,
                             "risk": False, "condition": None, "severity": None})
                if limit and len(rows) >= int(limit):
                    return rows, {"source": ",".join(files), "records_without_transcript": without}
    if not rows:
        raise InputError(f"{','.join(files)}: no patient turns found ({without} records without a transcript: "
                         "the reference's six-field records carry none; use records written by arena_med.py)")
    return rows, {"source": ",".join(files), "records_without_transcript": without}


def load_baseline_file(path: str, field: str, rows: list[dict]) -> dict[str, str]:
    """Row key -> baseline response, from a JSONL/CSV/Parquet file with `field` (or `response`) and an
    `id` or the statement itself (a Counsel_eval samples file works as is)."""
    raw, where = _read_rows(path, None)
    by_id = {r["id"]: r["key"] for r in rows}
    by_text = {r["statement"]: r["key"] for r in rows}
    out = {}
    for number, item in enumerate(raw, 1):
        name = field if field in item else "response" if "response" in item else None
        if name is None:
            raise InputError(f"{where}: row {number}: no {field!r} or 'response' field")
        key = by_id.get(str(item.get("id"))) if item.get("id") not in (None, "") else None
        if key is None:
            text = next((item[f] for f in TEXT_FIELDS if f in item), None)
            key = by_text.get(_text(text, "user", where, number, "statement").strip()) if text else None
        response = _text(item[name], "assistant", where, number, name)
        if key is not None and response and response.strip():
            out.setdefault(key, response)
    return out


def row_key(ident: str, text: str) -> str:
    """The row's id plus a digest of its text: an edited statement is asked again, never mixed."""
    return f"{ident}:{hashlib.sha256(text.strip().encode()).hexdigest()[:12]}"


def digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _read_rows(source: str, split: str | None) -> tuple[list[dict], str]:
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in (".jsonl", ".json"):
            rows = read_jsonl(path) if suffix == ".jsonl" else _json_list(path)
        elif suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq
            rows = pq.read_table(path).to_pylist()
        else:
            raise InputError(f"{path}: --data_file must be .jsonl, .json, .csv or .parquet "
                             "(or a folder / hub id that `datasets` reads)")
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise InputError(f"{path}: row {number}: not an object")
        return rows, str(path)
    if suffix in (".jsonl", ".json", ".csv", ".parquet") and not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.exists() and (source.startswith(("/", "./", "../", "~")) or source.count("/") > 1):
        raise InputError(f"{path}: no such file or folder")  # only a hub id (org/name) is looked up
    return _hub_rows(source, split), f"{source}" + (f" ({split})" if split else "")


def _hub_rows(source: str, split: str | None) -> list[dict]:
    """A `datasets` folder or hub id; offline, a hub id must already be in the local cache."""
    import datasets
    try:
        found = datasets.load_dataset(source, split=split) if split else datasets.load_dataset(source)
    except Exception as exc:  # datasets raises many kinds; all mean "cannot read that source"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{source}: cannot be read as a dataset ({first}); give a local file or folder, "
                         "or a hub id already downloaded") from None
    if isinstance(found, datasets.DatasetDict):
        name = "test" if "test" in found else next(iter(found))
        found = found[name]
    return found.to_list()


def _json_list(path: Path) -> list:
    import json
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: a .json file must hold a list of objects")
    return data


def _text(value, role: str, where: str, number: int, field: str) -> str | None:
    """A text field; a chat list ([{"role", "content"}, ...]) gives its last `role` turn."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        turns = [m["content"] for m in value if m.get("role") == role]
        if turns and isinstance(turns[-1], str):
            return turns[-1]
    raise InputError(f"{where}: row {number}: field {field!r} is neither text nor a chat list with a {role} turn")


def _flag(value, where: str, number: int) -> bool:
    if isinstance(value, bool):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    word = str(value).strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise InputError(f"{where}: row {number}: field 'risk' must be true or false, not {value!r}")


def _plain(value) -> str | None:
    return None if value in (None, "") else str(value)


# ---------------------------------------------------------------------------------- principles
@dataclass(frozen=True)
class Principle:
    key: str
    title: str
    text: str


def read_principles(text: str, where: str) -> list[Principle]:
    """`key: Title. What a good response does.` one per line; `#` lines and blank lines skipped."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, colon, rest = line.partition(":")
        key = key.strip()
        if not colon or not re.fullmatch(r"[a-z][a-z0-9_]*", key) or not rest.strip():
            raise InputError(f"{where}: line {number}: expected 'key: Title. description' with a lower-case key")
        title = rest.strip().split(".")[0].strip()
        out.append(Principle(key, title, rest.strip()))
    if len({p.key for p in out}) != len(out) or not out:
        raise InputError(f"{where}: principles need distinct keys, at least one")
    return out


def principles_block(principles: list[Principle]) -> str:
    return "\n".join(f"- {p.key}: {p.text}" for p in principles)


# ---------------------------------------------------------------------------------- judge replies
_VERDICT = re.compile(r"verdict\W{0,6}(?:is\W{0,3})?(?:a\s+(?=tie|draw))?(?:response\s+|assistant\s+|option\s+)?"
                      r"(tie|draw|equal|equally|both|neither|a|b)\b", re.I)
_BRACKETS = re.compile(r"\[\[\s*(a|b|c|tie)\s*\]\]", re.I)
_BETTER = re.compile(r"(?:response|assistant)\s+([ab])\s+(?:is|was)\s+(?:clearly\s+|slightly\s+|much\s+)?"
                     r"(?:better|stronger|preferred|superior)|(?:prefer|choose|pick)\s+(?:response\s+|assistant\s+)?([ab])\b",
                     re.I)
_TIE_WORDS = ("tie", "draw", "equal", "equally", "both", "neither", "c")


def parse_verdict(reply: str) -> str | None:
    """"A", "B", "tie" or None (unreadable). The last `Verdict: X` wins (judges reason first and may
    quote the format); else the last [[A]]/[[B]]/[[C]]; else a bare answer; else one clear
    "Response X is better" / "I prefer X" (both letters named that way: unreadable)."""
    text = (reply or "").replace("*", "").replace("`", "")
    for pattern in (_VERDICT, _BRACKETS):
        found = pattern.findall(text)
        if found:
            word = found[-1].lower()
            return "tie" if word in _TIE_WORDS else word.upper()
    bare = re.fullmatch(r"\W*(?:response\s+)?(a|b|tie)\W*", text.strip(), re.I)
    if bare:
        return "tie" if bare.group(1).lower() == "tie" else bare.group(1).upper()
    named = {(a or b).upper() for a, b in _BETTER.findall(text)}
    return named.pop() if len(named) == 1 else None


def parse_rubric(reply: str, principles: list[Principle]) -> dict[str, float | None]:
    """Principle key -> its score on 1-10 (the first number after the principle's key or title on a
    line; "7/10" and "7.5" read as 7 and 7.5), None where missing or off the scale (0, 11, 85)."""
    out: dict[str, float | None] = {p.key: None for p in principles}
    for line in (reply or "").replace("*", "").splitlines():
        for p in principles:
            if out[p.key] is not None:
                continue
            for name in (p.key, p.title, p.key.replace("judgement", "judgment")):  # US spelling too
                after = _after_name(line, re.sub(r"[^a-z0-9]+", "", name.lower()))
                if after is None:
                    continue
                number = re.search(r"(?<![\d.])(\d{1,3}(?:\.\d+)?)", after)
                if number:
                    value = float(number.group(1))
                    out[p.key] = value if 1 <= value <= 10 else None
                break
    return out


def _after_name(line: str, squashed_name: str) -> str | None:
    """The part of `line` after the (case-, space- and punctuation-blind) occurrence of the name."""
    letters = [(i, c.lower()) for i, c in enumerate(line) if c.isalnum()]
    joined = "".join(c for _, c in letters)
    at = joined.find(squashed_name)
    if at < 0:
        return None
    end = letters[at + len(squashed_name) - 1][0] + 1
    return line[end:]


# ---------------------------------------------------------------------------------- pairwise arithmetic
def order_score(verdict: str | None, model_position: str) -> float | None:
    """The model's score from one order: 1 win, 0.5 tie, 0 loss, None unreadable."""
    if verdict is None:
        return None
    return 0.5 if verdict == "tie" else float(verdict == model_position)


def combine_orders(model_first: str | None, baseline_first: str | None) -> dict:
    """One row's outcome from its two orders (model as A, then model as B). The row's score is the
    mean of the two order scores; a judge that names the same position both times (position bias)
    gives 0.5 and is counted `inconsistent`. A row with an unreadable verdict is unjudged."""
    first, second = order_score(model_first, "A"), order_score(baseline_first, "B")
    if first is None or second is None:
        return {"score": None, "outcome": "unjudged", "inconsistent": False}
    score = (first + second) / 2
    outcome = "win" if score > 0.5 else "loss" if score < 0.5 else "tie"
    inconsistent = model_first in ("A", "B") and model_first == baseline_first
    return {"score": score, "outcome": outcome, "inconsistent": inconsistent}


def win_rate(outcomes: list[dict], seed: int, n_boot: int) -> dict:
    """Win rate (%, ties half) over the judged rows, with its bootstrap 95% interval over rows."""
    scores = [o["score"] for o in outcomes if o["score"] is not None]
    counts = {k: sum(o["outcome"] == k for o in outcomes) for k in ("win", "tie", "loss", "unjudged")}
    summary = mean_ci([100 * s for s in scores], seed, n_boot)
    return {"n": len(outcomes), "judged": len(scores), "wins": counts["win"], "ties": counts["tie"],
            "losses": counts["loss"], "unjudged": counts["unjudged"],
            "inconsistent": sum(o["inconsistent"] for o in outcomes),
            "win_rate": summary["mean"], "ci95": summary["ci95"]}


# ---------------------------------------------------------------------------------- statistics
def mean_ci(values: list[float], seed: int, n_boot: int, level: float = 0.95) -> dict:
    """{"n", "mean", "ci95": [low, high]}: the percentile bootstrap over `values` (resampled with
    replacement `n_boot` times, numpy's generator seeded with `seed`); no values: mean None."""
    import numpy as np
    if not values:
        return {"n": 0, "mean": None, "ci95": None}
    data = np.asarray(values, dtype=float)
    means = np.random.default_rng(seed).choice(data, size=(int(n_boot), len(data)), replace=True).mean(axis=1) \
        if n_boot > 0 else np.array([data.mean()])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"n": len(data), "mean": round(float(data.mean()), 4), "ci95": [round(float(low), 4), round(float(high), 4)]}


def rubric_summary(scores: list[dict[str, float | None]], principles: list[Principle], seed: int, n_boot: int) -> dict:
    """Per principle: mean and interval over the rows where the judge gave it a score; `overall`:
    each row's mean over the principles it got, then the mean and interval of those."""
    out = {p.key: mean_ci([s[p.key] for s in scores if s.get(p.key) is not None], seed, n_boot) for p in principles}
    rows = [[s[p.key] for p in principles if s.get(p.key) is not None] for s in scores]
    out["overall"] = mean_ci([sum(r) / len(r) for r in rows if r], seed, n_boot)
    out["overall"]["complete_rows"] = sum(len(r) == len(principles) for r in rows)
    out["overall"]["rows"] = len(scores)
    return out
