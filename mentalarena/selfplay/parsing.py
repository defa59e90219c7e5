"""Parsers for the judge's free-text replies: group choice, health score, treatment extraction.

Pure functions, no I/O. Where the project's robust rule differs from the reference code, a
`*_reference` twin reproduces the reference behaviour so runs can be compared.
"""
from __future__ import annotations

import re

EXTRACTION_KEYS = ("treatment", "explain_t", "medicine", "explain_m")

_INTEGER = re.compile(r"\d+")


def first_integer(text: str) -> int | None:
    """The first run of digits in `text` as an int (signs and decimals ignored), or None."""
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


# ---------------------------------------------------------------- principle group choice

def parse_group_number(text: str, n_groups: int) -> int | None:
    """The first integer in `text` that names a group (1..n_groups), or None.

    Out-of-range integers are skipped rather than ending the search: in "Group 10 is close, but
    group 3 fits best" with 5 groups, 10 cannot be an answer, 3 can. The reference code took the
    first integer only and crashed when there was none; the caller decides the fallback.
    """
    for match in _INTEGER.finditer(text):
        value = int(match.group())
        if 1 <= value <= n_groups:
            return value
    return None


# ---------------------------------------------------------------- plain text, stated scales

# Markdown emphasis and code marks; an underscore only at a word's edge ("__7__", not "1_0").
_EMPHASIS = re.compile(r"[*`]+|(?<!\w)_+|_+(?!\w)")
_RANGE = r"\d{1,3}\s*(?:-|–|—|to)\s*\d{1,3}"
_SCALE_CORE = (rf"(?:{_RANGE}|out\s+of\s+\d+|max(?:imum)?\s+\d+|\d+\s*-?\s*point"
               r"|[01]\s*(?:=|is|means)\s*[^()\[\]\d]{1,30}?\b10\b)")  # "(1 = unsafe, 10 = safe)"
# A scale written next to a rating, so its numbers are not read as the rating: "(1-10)", "[0-10]",
# "(out of 10)", "(scale 1 to 10)", "on a scale of 1-10", "on a 10-point scale", "from 1 to 10",
# "out of 10", "/10", and its ends echoed from the prompt ("where 1 is bad and 10 is good", "1 = worst").
# A bare "from X to Y" counts only as 0/1 to 10 ("improved from 4 to 7" is no scale).
_SCALE = re.compile(
    rf"[(\[][^()\[\]\d]{{0,24}}{_SCALE_CORE}[^()\[\]\d]{{0,16}}[)\]]"
    rf"|(?:\bon\s+)?(?:\ba\s+)?\bscale\s+(?:of\s+|from\s+)?{_RANGE}"
    rf"|(?:\bon\s+)?(?:\ba\s+)?(?:{_RANGE}|\d+\s*-?\s*point)\s+scale\b"
    r"|\bfrom\s+[01]\s*(?:-|–|—|to)\s*10\b|\bout\s+of\s+10\b|/\s*10\b"
    r"|\b(?:0|1|10)\s*(?:is|=|being|means)\s+(?:the\s+)?(?:very\s+)?(?:bad|good|worst|best|poor|excellent|lowest|highest)\b",
    re.IGNORECASE)


def strip_emphasis(text: str) -> str:
    """`text` without Markdown bold/italic/code marks ("**8**", "__B__", "`Verdict: A`")."""
    return _EMPHASIS.sub("", text)


def skip_scale(text: str) -> str:
    """`text` with every stated scale blanked out, so only the rating's own number is left."""
    return _SCALE.sub(" ", text)


# ---------------------------------------------------------------- health score

SCORE_SCALE = (1, 10)  # the judge is asked for a health rating from 1 to 10
# The first number (a sign kept, so "-2" is off the scale), with what follows it: "%" or "percent"
# and a fraction of another scale ("4/5", "7 out of 5") are no rating on 1-10.
_RATING = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)(?!\w)(\s*(?:%|percent\b|/|out\s+of\b))?", re.IGNORECASE)


def parse_score(text: str) -> int:
    """Health-state rating on 1-10, read as a person reads it; 0 (unscored) when there is none.

    A stated scale is skipped ("On a scale of 1 to 10, I'd say 7" is 7, "7/10" is 7); the first
    number left is the rating, decimals cut ("7.5" is 7). Off the scale (0, 11, 32, -2, "32 %",
    "4/5") is unscored: a "32" must not end a try-and-reflect search as if it were a top score.
    """
    match = _RATING.search(skip_scale(strip_emphasis(text or "")))
    if match is None or match.group(2):
        return 0
    value = float(match.group(1))
    return int(value) if SCORE_SCALE[0] <= value <= SCORE_SCALE[1] else 0


def parse_score_reference(text: str) -> int:
    """The reference rule: `int(text)` when that works, else the first integer, else 0.

    Kept faithful (--score_parser reference): "32" or "121" end the search as top scores,
    "On a scale of 1 to 10, 7" is 1, "-2" is -2 and "1_0" is 10 (int() takes a sign and
    digit-group underscores; the first-integer fallback takes neither).
    """
    try:
        return int(text)
    except ValueError:
        value = first_integer(text)
        return 0 if value is None else value


# ---------------------------------------------------------------- treatment extraction

# Leading list markers, quote marks and markdown headings: "- ", "* ", "1. ", "2) ", "> ", "### ".
_MARKER = re.compile(r"^(?:[-*•+>#]+\s*|\d+[.)]\s+)+")
# The text before the first colon of a line, when short enough to be a label ("Treatment plan:").
_HEADER = re.compile(r"^([^:：]{1,60})[:：]\s*(.*)$")
_LABEL_WORD = r"(?:treatments?|medicines?|medications?|explanations?)"
_DASH_LABEL = re.compile(rf"^({_LABEL_WORD})\s+[-–—]\s+(.*)$", re.IGNORECASE)
_BARE_LABEL = re.compile(rf"^({_LABEL_WORD})\.?$", re.IGNORECASE)
# The reference's output block writes "Explanation" without a colon, so a judge copying it may put
# the text on the same line: "Explanation It helps ...". Capitalised, at the start of a line only.
_WORD_LABEL = re.compile(r"^(Explanation)\s+(\S.*)$")
# Labels later in a line must be capitalised and followed by a colon: lower-case "medicine:" inside
# a sentence is prose, "... Explanation: ..." after a value is a second field on the same line.
_INLINE_LABEL = re.compile(
    r"(?<!\w)((?:T(?i:reatments?)|M(?i:edicines?|edications?)|E(?i:xplanations?)))\s*[:：]"
)
_MAX_HEADER_WORDS = 4


def _label_kind(header: str) -> str | None:
    """What a short header labels: treatment, medicine, explain_t, explain_m or explanation."""
    words = re.findall(r"[a-z]+", header.lower())
    if not words or len(words) > _MAX_HEADER_WORDS:
        return None
    names_treatment = any(w.startswith("treatment") for w in words)
    names_medicine = any(w.startswith(("medicine", "medication")) for w in words)
    if any(w.startswith("explanation") for w in words):
        # "Explanation for the medicine:" says which block it explains.
        if names_medicine != names_treatment:
            return "explain_m" if names_medicine else "explain_t"
        return "explanation"
    # Otherwise the last label word is the head noun: "Non-medication treatment:" is a treatment.
    for word in reversed(words):
        if word.startswith(("medicine", "medication")):
            return "medicine"
        if word.startswith("treatment"):
            return "treatment"
    return None


def _clean_line(line: str) -> str:
    line = line.replace("**", "").replace("__", "").strip()
    return _MARKER.sub("", line).strip()


def _clean_value(value: str) -> str:
    # Leftover single-character emphasis around a value: "*Treatment:* CBT" leaves "* CBT".
    return value.strip().strip("*_").strip()


def _leading_label(line: str) -> tuple[str | None, str]:
    """(kind, rest of the line) when the line starts with a label, else (None, line)."""
    for pattern in (_HEADER, _DASH_LABEL, _WORD_LABEL):
        match = pattern.match(line)
        if match:
            kind = _label_kind(match.group(1))
            if kind:
                return kind, match.group(2)
    match = _BARE_LABEL.match(line)
    if match:
        return _label_kind(match.group(1)), ""
    return None, line


def _split_line(line: str) -> list[tuple[str | None, str]]:
    """The (kind, value) pieces of one cleaned line; kind None is plain text."""
    kind, rest = _leading_label(line)
    matches = list(_INLINE_LABEL.finditer(rest))
    ends = [m.start() for m in matches[1:]] + [len(rest)]
    pieces = [(kind, _clean_value(rest[: matches[0].start()] if matches else rest))]
    pieces += [(_label_kind(m.group(1)), _clean_value(rest[m.end():end])) for m, end in zip(matches, ends)]
    return [(k, v) for k, v in pieces if k or v]


def _target(kind: str, block: str | None, result: dict[str, str]) -> str:
    """The result key a label fills; a plain "Explanation" explains the latest labelled block."""
    if kind != "explanation":
        return kind
    if block:
        return block
    return "explain_t" if not result["explain_t"] else "explain_m"


# Only treatment/medicine labels open a block; explanations never redirect later explanations.
_BLOCK_OF = {"treatment": "explain_t", "medicine": "explain_m"}


def parse_extraction(text: str) -> dict[str, str]:
    """Treatment, medicine and their explanations from the judge's labelled lines.

    A value sits after its label on the same line or, when that is empty, on the next non-empty
    line. An "Explanation" belongs to the latest Treatment/Medicine label; before any such label
    the first goes to explain_t and the second to explain_m (the method's order rule). The first
    non-empty value of each key wins, so commentary repeating a label cannot overwrite it.
    Tolerates markdown bold, list markers, any case, "Medication" for Medicine, labels without a
    colon on their own line, and several labels on one line.
    """
    result = dict.fromkeys(EXTRACTION_KEYS, "")
    pending: str | None = None  # key still waiting for its value on a later line
    block: str | None = None  # explanation key of the latest treatment/medicine label
    for raw in text.splitlines():
        for kind, value in _split_line(_clean_line(raw)):
            if kind is None:
                key, pending = pending, None
            else:
                key = _target(kind, block, result)
                block = _BLOCK_OF.get(key, block)
                pending = None if value else key
            if key and value and not result[key]:
                result[key] = value
    return result


def parse_extraction_reference(text: str) -> dict[str, str]:
    """The reference code's parser, kept faithful, blind slicing included.

    "Treatment:" in a line takes line[11:] (or the next line when the line is at most 10 long);
    "Medicine:" takes line[10:] (next line when at most 9 long); "Explanation:" takes line[13:]
    (next line when at most 12 long) and fills explain_t while that is empty, else explain_m.
    A short label on the last line leaves treatment/medicine unchanged and gives an empty
    explanation. Later labels overwrite earlier values.
    """
    result = dict.fromkeys(EXTRACTION_KEYS, "")
    lines = text.strip().split("\n")
    for i, raw in enumerate(lines):
        line = raw.strip()
        has_next = i < len(lines) - 1
        if "Treatment:" in line:
            if len(line) > 10:
                result["treatment"] = line[11:].strip()
            elif has_next:
                result["treatment"] = lines[i + 1].strip()
        elif "Medicine:" in line:
            if len(line) > 9:
                result["medicine"] = line[10:].strip()
            elif has_next:
                result["medicine"] = lines[i + 1].strip()
        elif "Explanation:" in line:
            explain = ""
            if len(line) > 12:
                explain = line[13:].strip()
            elif has_next:
                explain = lines[i + 1].strip()
            result["explain_t" if not result["explain_t"] else "explain_m"] = explain
    return result
