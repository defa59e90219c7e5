"""Counseling evaluation (Counsel_eval.py): client statements in, judge verdicts and scores out.

Everything here is pure: reading statements (a JSONL/CSV/Parquet file, a `datasets` hub id or
local copy, or the patient turns of self-play records), the counseling principles, the judge-reply
parsers, the two-order pairwise arithmetic and the bootstrap intervals. The script does the calls.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path

from mentalarena.errors import InputError
from mentalarena.store.inputs import duplicate_id, json_lines, read_table
from mentalarena.selfplay.parsing import skip_scale, strip_emphasis

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
    field = text_field or next((f for f in TEXT_FIELDS if raw and f in raw[0][1]), None)
    if raw and field is None:
        raise InputError(f"{where}: row {raw[0][0]}: no client-statement field (looked for {', '.join(TEXT_FIELDS)}; "
                         "name yours with --text_field)")
    rows, seen, duplicates, ids = [], set(), 0, {}
    for number, item in raw:
        text = _text(item.get(field), "user", where, number, field)
        if text is None or not text.strip():
            raise InputError(f"{where}: row {number}: field {field!r} is missing or empty")
        if text.strip() in seen:  # preference sets hold each statement in several pairs
            duplicates += 1
            continue
        seen.add(text.strip())
        ident = str(item["id"]) if item.get("id") not in (None, "") else str(number)
        if ident in ids:
            raise duplicate_id(where, ids[ident], number, ident)
        ids[ident] = number
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
        for number, record in json_lines(name):
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
    for number, item in raw:
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


def _read_rows(source: str, split: str | None) -> tuple[list[tuple[int, dict]], str]:
    """(row number, row) pairs (mentalarena/store/inputs.py numbers a file's rows) and the source's name."""
    path = Path(source)
    suffix = path.suffix.lower()
    tables = (".jsonl", ".json", ".csv", ".parquet")
    if path.is_file() or (suffix in tables and path.is_dir()):  # a folder named like a file: one line
        if suffix not in tables:
            raise InputError(f"{path}: --data_file must be .jsonl, .json, .csv or .parquet "
                             "(or a folder / hub id that `datasets` reads)")
        return read_table(path), str(path)
    if suffix in tables and not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.exists() and (source.startswith(("/", "./", "../", "~")) or source.count("/") > 1):
        raise InputError(f"{path}: no such file or folder")  # only a hub id (org/name) is looked up
    return list(enumerate(_hub_rows(source, split), 1)), f"{source}" + (f" ({split})" if split else "")


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
# What the judge is told to end with is `Verdict: A|B|tie`; judges also write other labels, Markdown,
# a sentence after the letter, negations and articles. A person reads them; so does parse_verdict.
_LABEL = re.compile(r"\b(?:verdict|decision|winner|final\s+(?:answer|choice)|(?:preferred|better)\s+response)"
                    r"(?:\s*(?:[:=–—]|\bis\b|\bgoes\s+to\b)|\s+-|\s*$|\s+(?=(?:response\s+|assistant\s+)?(?:[ab]|tie)\b))",
                    re.I)
_BRACKETS = re.compile(r"\[\[\s*(a|b|c|tie)\s*\]\]", re.I)  # MT-bench style, C the tie
_TOKEN = re.compile(r"\[\[\s*(\w+)\s*\]\]|([A-Za-z]+(?:'[A-Za-z]+)?)|([.,;:!?()\-–—])")
_TIE_WORDS = {"tie", "tied", "draw", "equal", "equally", "neither"}  # "both" opens prose too often
_BRACKET_CHOICE = {"a": "A", "b": "B", "c": "tie", "tie": "tie"}
# A word before a choice (within its clause, a few words back) that turns it down: "not A", "B over A".
_NEGATORS = {"not", "no", "never", "nor", "over", "than", "instead", "versus", "vs", "unlike", "against", "without"}
_CLAUSE_BREAKS = {"but", "while", "whereas", "however", "though", "although", "yet", "so"}
# After "A", these make it the letter ("A is better", "A because ..."); another lower-case word makes
# it the article ("a slight edge to B").
_PREDICATES = {"is", "was", "wins", "won", "edges", "better", "clearly", "slightly", "because", "since", "as",
               "for", "with", "by", "and", "or", "but", "over", "than", "which", "remains", "seems", "does",
               "has", "offers", "gets", "takes", "comes", "would", "should", "will", "provides", "shows",
               "overall", "here", "again", "too", "nor"}
_BARE = re.compile(r"\W*(?:(?:response|assistant|option)\s+)?(a|b|tie|draw|equal|both)\W*", re.I)
_X = r"(?:(?i:response|assistant|option)\s+)?([AB])(?![\w'])"  # in free text only capitals name a response
_GOOD = (r"(?i:(?:(?:clearly|slightly|much|far|somewhat|definitely|marginally|overall|the|a|bit|little|way)\s+)*"
         r"(?:better|stronger|preferable|preferred|superior|best|winner|warmer|safer|more\s+(?:appropriate|helpful|"
         r"empathetic|effective|supportive|validating|skilled|therapeutic)))")
_PREFERENCES = [re.compile(p) for p in (
    rf"{_X}\s+(?i:is|was|seems|feels|looks|reads|would\s+be)\s+{_GOOD}",
    rf"(?i:prefer|preferred|choose|chose|pick|picked|go\s+with|went\s+with|select|favou?r|recommend|"
    rf"side\s+with|lean(?:ing)?\s+(?:towards?|to))\s+{_X}",
    rf"{_X}\s+(?i:wins|won|edges\s+(?:it|out)|comes\s+out\s+(?:ahead|on\s+top)|is\s+ahead|takes\s+it|"
    rf"has\s+the\s+edge|is\s+the\s+(?:clear\s+)?winner)",
    rf"(?i:edge|advantage|win|nod|preference|point)\s+(?i:(?:goes|go|went)\s+)?(?i:to|for)\s+{_X}",
    rf"(?i:winner|better\s+(?:one|response|choice)|stronger\s+(?:one|response))\s+(?i:here\s+)?(?i:is|would\s+be)\s+{_X}",
    rf"{_X}\s+(?i:over|rather\s+than|instead\s+of)\s+(?:(?i:response|assistant|option)\s+)?[AB](?![\w'])",
)]
_TIE_PHRASES = re.compile(r"\b(?:(?:it'?s|it\s+is|this\s+is|that'?s|call\s+it)\s+(?:a\s+)?(?:tie|draw)\b|"
                          r"(?:both|they)\s+(?:are\s+)?(?:equally\s+(?:good|strong|effective|helpful|appropriate)|tied)|"
                          r"neither\s+(?:response\s+|one\s+)?is\s+(?:clearly\s+)?better|no\s+clear\s+winner)", re.I)


def parse_verdict(reply: str) -> str | None:
    """"A", "B", "tie" or None (unreadable), read as a person reads the judge. Markdown is ignored and
    a line naming all of A, B and tie is the instruction echoed, never a verdict. Then, first that
    answers: the last labelled line ("Verdict: X", "Final verdict -", "Winner:", "### Verdict" with X
    below), its first choice that is neither negated ("not A", "B over A") nor the article ("a slight
    edge to B"); else the last [[A]]/[[B]]/[[C]]; else a bare last (or first) line; else one clear
    preference in the prose ("I prefer B", "B wins"; two different ones: unreadable)."""
    lines = [_plain_line(line) for line in strip_emphasis(reply or "").replace("’", "'").splitlines()]
    lines = [line for line in lines if line and not _is_echo(line)]
    # each reader: False when it finds nothing of its kind, else its answer (None: found but unreadable)
    for read in (_labelled_verdict, _bracket_verdict, _bare_verdict, _prose_verdict):
        found = read(lines)
        if found is not False:
            return found
    return None


def _plain_line(line: str) -> str:
    return re.sub(r"^\s*(?:#+|>+|[-+•]\s|\d+[.)]\s)\s*", "", line).strip()  # headings, quotes, list marks


def _is_echo(line: str) -> bool:
    """A labelled or bracketed line naming A, B and tie: the judge quoting its instruction."""
    names_tie = re.search(r"\b(?:tie|draw)\b|\[\[\s*c\s*\]\]", line, re.I)
    if not names_tie or not (_LABEL.search(line) or _BRACKETS.search(line)):
        return False
    return {"A", "B", "tie"} <= {c for c, negated in _choices(line) if not negated}


def _labelled_verdict(lines: list[str]):
    """The last label that is followed by a choice decides (its first one not turned down, else None)."""
    for i in range(len(lines) - 1, -1, -1):
        for label in reversed(list(_LABEL.finditer(lines[i]))):
            after = lines[i][label.end():]
            if not re.search(r"\w", after) and i + 1 < len(lines):
                after = lines[i + 1]  # "### Verdict" or "Verdict:" with the answer on the next line
            bare, named = _bare_verdict([after.strip()]), _choices(after)
            if bare:
                return bare  # "Verdict: Both"
            if named:
                return next((c for c, negated in named if not negated), None)
    return False


def _bracket_verdict(lines: list[str]):
    found = [b for line in lines for b in _BRACKETS.findall(line)]
    return _BRACKET_CHOICE[found[-1].lower()] if found else False


def _bare_verdict(lines: list[str]):
    """A line that is only the answer ("B", "Response A.", "__tie__"): the last line, else the first
    (not "A:", a speaker tag the small models write before their own text)."""
    for line in (lines[-1:] + lines[:1]) if lines else []:
        bare = _BARE.fullmatch(line)
        if bare and not line.endswith(":"):
            word = bare.group(1).lower()
            return word.upper() if word in ("a", "b") else "tie"
    return False


def _prose_verdict(lines: list[str]):
    picks = set()
    for line in lines:
        for pattern in _PREFERENCES:
            picks |= {m.group(1) for m in pattern.finditer(line) if not _negated(_clause_words(line[:m.start()]))}
        picks |= {"tie" for m in _TIE_PHRASES.finditer(line) if not _negated(_clause_words(line[:m.start()]))}
    return picks.pop() if len(picks) == 1 else None


def _choices(text: str) -> list[tuple[str, bool]]:
    """(choice, turned down) for every choice `text` names, in order; the article "a" is none."""
    out, clause = [], []
    tokens = _TOKEN.findall(text)
    for i, (bracket, word, mark) in enumerate(tokens):
        if mark or word.lower() in _CLAUSE_BREAKS:
            clause = []
            continue
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        choice = _BRACKET_CHOICE.get(bracket.lower()) if bracket else _choice_word(word, following)
        if choice:
            out.append((choice, _negated(clause) or _put_down(tokens[i + 1:i + 4])))
        clause.append(word.lower())
    return out


def _put_down(following: list[tuple[str, str, str]]) -> bool:
    """A choice whose own clause goes on to turn it down: "A is not better", "A isn't", "A is worse"."""
    words = [w.lower() for _, w, mark in itertools.takewhile(lambda t: not t[2], following)]
    if not words or (words[0] not in ("is", "was", "does", "seems", "would") and not words[0].endswith("n't")):
        return False
    return any(w in ("not", "never", "worse", "weaker") or w.endswith("n't") for w in words)


def _choice_word(word: str, following: str) -> str | None:
    low = word.lower()
    if low in _TIE_WORDS:
        return "tie"
    if low not in ("a", "b"):
        return None
    if low == "a" and following and (following.lower() in ("tie", "draw")
                                     or (following.islower() and following not in _PREDICATES)):
        return None  # the article: "a slight edge to B", "A tie"
    return low.upper()


def _clause_words(text: str) -> list[str]:
    """The words of the last clause of `text` (what a negation before a match could belong to)."""
    words = []
    for _, word, mark in _TOKEN.findall(text):
        words = [] if mark or word.lower() in _CLAUSE_BREAKS else words + [word.lower()]
    return words


def _negated(clause: list[str]) -> bool:
    return any(w in _NEGATORS or w.endswith("n't") for w in clause[-4:])


def parse_rubric(reply: str, principles: list[Principle]) -> dict[str, float | None]:
    """Principle key -> its score on 1-10 (the first number after the principle's key or title on a
    line, a scale written there skipped: "Empathy (1-10): 8" is 8; "7/10" and "7.5" read as 7 and
    7.5), None where missing or off the scale (0, 11, 85)."""
    out: dict[str, float | None] = {p.key: None for p in principles}
    for line in strip_emphasis(reply or "").splitlines():
        for p in principles:
            if out[p.key] is not None:
                continue
            for name in (p.key, p.title, p.key.replace("judgement", "judgment")):  # US spelling too
                after = _after_name(line, re.sub(r"[^a-z0-9]+", "", name.lower()))
                if after is None:
                    continue
                number = re.search(r"(?<![\d.])(\d{1,3}(?:\.\d+)?)", skip_scale(after))  # not "(1-10)"
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
