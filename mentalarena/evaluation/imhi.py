"""IMHI (MentaLLaMA benchmark) scoring: the test CSVs, answer -> label rules, and the metrics.

Two rule sets turn a golden or a generated answer into a label id:
- `reference`: the reference `IMHI.py --rule_calculate` rules, kept on purpose for faithfulness: cut
  at the first "Reasoning:" (case-sensitive), lower-case, first keyword found as a substring wins.
  Where the reference would crash (a golden no gold keyword fits), the row is dropped and counted.
- `fixed`: one parser for goldens and responses that reads both the instruction wording ("This
  post shows ...") and the completion wording ("work."). Phrases are regexes with word boundaries,
  grouped in tiers: full label phrases first, then short keywords; inside a tier the earliest match
  in the text wins (the longest one at equal start). Where the label is stated, see `_fixed_label`.
Both give an unreadable response the dataset's default label and count it as out-of-domain (OOD).
The MentalBERT classifier labels are scored against goldens read by either set; `reference` there
means the gold keywords of `label_inference.py`, which differ from `--rule_calculate`'s.
Metrics come from `sklearn.metrics`, averaged as MentaLLaMA averages them.
"""
from __future__ import annotations

import csv
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sklearn.metrics import accuracy_score, f1_score

from mentalarena.errors import InputError
from mentalarena.store.files import atomic_file
from mentalarena.store.inputs import csv_rows

QUERY_COLUMN = "query"
GOLDEN_COLUMN = "gpt-3.5-turbo"
GENERATED_COLUMNS = ("goldens", "generated_text")
RULES = ("reference", "fixed")


@dataclass(frozen=True)
class DatasetRules:
    labels: tuple[str, ...]                     # label id -> name
    default: int                                # label of a response no rule reads (both rule sets)
    ref_response: tuple[tuple[str, int], ...]   # reference keywords for responses, checking order
    ref_gold: tuple[tuple[str, int], ...]       # reference keywords for goldens, checking order
    fixed: tuple[tuple[tuple[int, str], ...], ...]  # tiers of (label id, regex without \b)


@dataclass
class LabelResult:
    gold: list[int]
    pred: list[int]
    ood: int
    dropped: int


# ---------------------------------------------------------------- the rule table

_YES_NO = (("yes", 1), ("no", 0))
_BINARY = DatasetRules(
    labels=("no", "yes"), default=0, ref_response=_YES_NO, ref_gold=_YES_NO,
    fixed=(
        # the statements of both golden wordings ("the poster does not suffer from ...", "the post
        # shows this risk", "this wellness dimension exists in the post"), negated forms included
        ((0, r"(?:does|do|is|are) not (?:suffer|show|exist)\w*|(?:doesn't|don't|isn't) (?:suffer|show|exist)\w*"),
         (1, r"suffers? from|is suffering|shows? this risk|exists? in (?:the|this) post")),
        ((1, "yes"),),  # before "no": reasoning text says "no friends", "no longer" far more often
        ((0, "no"),),
    ),
)
_SAD = DatasetRules(
    labels=("school", "financial problem", "family issues", "social relationships", "work",
            "health issues", "emotional turmoil", "everyday decision making", "other causes"),
    default=8,
    ref_response=(("school", 0), ("financial", 1), ("family", 2), ("social", 3), ("work", 4),
                  ("health", 5), ("emotional", 6), ("decision", 7), ("other", 8)),
    ref_gold=(("school", 0), ("financial problem", 1), ("family issues", 2),
              ("social relationships", 3), ("work", 4), ("health issues", 5),
              ("emotional turmoil", 6), ("everyday decision making", 7), ("other causes", 8)),
    fixed=(
        ((0, "school"), (1, "financial problems?"), (2, "family issues?"),
         (3, "social relationships?"), (4, "work"), (5, r"(?<!mental[ -])health issues?"),
         (6, "emotional turmoil|emotion turmoil"), (7, "everyday decision[- ]making"),
         (8, "other stress causes|other causes")),
        ((0, "homework|schoolwork|exams?"), (1, "financial|finances"), (2, "family"),
         (3, r"social(?![ -]media)|relationships?"), (4, "jobs?|workplace|workload"),
         (5, r"(?<!mental[ -])health"), (6, "emotional|emotions?"),
         (7, "decision[- ]making|decisions?"), (8, "other")),
    ),
)
_CAMS = DatasetRules(
    labels=("none", "bias or abuse", "jobs and career", "medication", "relationship", "alienation"),
    default=0,
    ref_response=(("none", 0), ("bias", 1), ("jobs", 2), ("medication", 3), ("relationship", 4),
                  ("alienation", 5)),
    ref_gold=(("none", 0), ("bias or abuse", 1), ("jobs and career", 2), ("medication", 3),
              ("relationship", 4), ("alienation", 5)),
    fixed=(
        ((0, "no causes of depression|none"), (1, "bias or abuse"), (2, "jobs? and careers?"),
         (3, "medications?"), (4, "relationships?"), (5, "alienation")),
        ((0, "no causes?"), (1, "bias|abuse"), (2, "jobs?|careers?"), (5, "alienated")),
    ),
)
_SWMH_KEYS = (("no mental", 0), ("suicide", 1), ("depression", 2), ("anxiety", 3), ("bipolar", 4))
_SWMH = DatasetRules(
    labels=("no mental disorders", "suicide", "depression", "anxiety", "bipolar disorder"),
    default=0, ref_response=_SWMH_KEYS, ref_gold=_SWMH_KEYS,
    fixed=(
        ((0, r"no mental(?: disorders?)?(?: symptoms)?"), (1, "suicide"), (2, "depression"),
         (3, "anxiety"), (4, "bipolar(?: disorder)?")),
        ((1, "suicidal"), (2, "depressed|depressive"), (3, "anxious")),
    ),
)
_TSID = DatasetRules(
    labels=("no mental disorders", "suicide or self-harm", "depression", "ptsd"),
    default=0,
    # the reference checks depression first, so "suicide ... depression" reads as depression
    ref_response=(("depression", 2), ("suicide", 1), ("ptsd", 3), ("no mental", 0)),
    ref_gold=(("depression", 2), ("suicide or self-harm", 1), ("ptsd", 3),
              ("no mental disorders", 0)),
    fixed=(
        ((1, "suicide or self-harm(?: tendency)?"), (0, r"no mental(?: disorders?)?"),
         (2, "depression"), (3, "ptsd|post-traumatic stress disorder")),
        ((1, "suicid(?:e|al)|self-harm"), (2, "depressed|depressive")),
    ),
)

# File-name stem -> rules. Irf (2 question variants) and MultiWD (6 dimensions) are pooled binary.
DATASETS: dict[str, DatasetRules] = {
    "CAMS": _CAMS, "DR": _BINARY, "dreaddit": _BINARY, "Irf": _BINARY, "loneliness": _BINARY,
    "MultiWD": _BINARY, "SAD": _SAD, "swmh": _SWMH, "t-sid": _TSID,
}

# MentalBERT classifier (`label_inference.py`, hub Tianlin668/<dataset>) output id -> rule label id.
_SAME = {i: i for i in range(2)}
CLASSIFIER_LABELS: dict[str, dict[int, int]] = {
    "CAMS": {i: i for i in range(6)}, "DR": _SAME, "dreaddit": _SAME, "Irf": _SAME,
    "loneliness": _SAME, "MultiWD": _SAME, "SAD": {i: i for i in range(9)},
    "swmh": {0: 2, 1: 1, 2: 3, 3: 4, 4: 0},  # depression, suicide, anxiety, bipolar, no mental
    "t-sid": {0: 2, 1: 1, 2: 3, 3: 0},       # depression, suicide, ptsd, control
}
# The gold keywords of `label_inference.py --calculate`, checking order: the classifier numbers of the
# MentaLLaMA paper read goldens with these, which differ from `--rule_calculate`'s (`ref_gold`): they fit
# the instruction wording ("no causes", "emotion turmoil"), so completion goldens "none" and
# "emotional turmoil" match nothing. Kept on purpose for faithfulness.
CLASSIFIER_GOLD: dict[str, tuple[tuple[str, int], ...]] = {
    "CAMS": (("no causes", 0), ("bias or abuse", 1), ("jobs and career", 2), ("medication", 3),
             ("relationship", 4), ("alienation", 5)),
    "DR": _YES_NO, "dreaddit": _YES_NO, "Irf": _YES_NO, "loneliness": _YES_NO, "MultiWD": _YES_NO,
    "SAD": (("school", 0), ("financial problem", 1), ("family issues", 2), ("social relationships", 3),
            ("work", 4), ("health issues", 5), ("emotion turmoil", 6), ("everyday decision making", 7),
            ("other", 8)),
    "swmh": _SWMH_KEYS,
    "t-sid": (("depression", 2), ("suicide or self-harm", 1), ("ptsd", 3), ("no mental", 0)),
}


def _rules(dataset: str) -> DatasetRules:
    if dataset not in DATASETS:
        raise ValueError(f"unknown IMHI dataset {dataset!r} (known: {', '.join(DATASETS)})")
    return DATASETS[dataset]


def _compile(rules: DatasetRules) -> list[list[tuple[int, re.Pattern]]]:
    return [[(label, re.compile(rf"\b(?:{src})\b", re.IGNORECASE)) for label, src in tier]
            for tier in rules.fixed]


_FIXED = {name: _compile(rules) for name, rules in DATASETS.items()}


# ---------------------------------------------------------------- one text -> one label

def _reference_label(keywords: tuple[tuple[str, int], ...], text: str) -> int | None:
    part = text.split("Reasoning:")[0].lower()
    return next((label for key, label in keywords if key in part), None)


def _match(tiers: list[list[tuple[int, re.Pattern]]], text: str) -> int | None:
    """First tier with any match; in it the earliest match, the longest at equal start."""
    for tier in tiers:
        found = [(m.start(), -len(m.group()), label)
                 for label, pattern in tier if (m := pattern.search(text))]
        if found:
            return min(found)[2]
    return None


_REASONING = re.compile(r"reasoning\s*:", re.IGNORECASE)
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
# Words of a sentence that states the answer rather than discussing the post.
_STATEMENT_CUES = re.compile(
    r"\b(?:this post|the post|the poster|answer|label|therefore|thus|hence|so|in conclusion|"
    r"overall|conclude\w*|classif\w*|categor\w*)\b", re.IGNORECASE)


def _fixed_label(tiers: list[list[tuple[int, re.Pattern]]], text: str) -> int | None:
    """Where the label is stated: 1) the text before the first "Reasoning:" (any case), which is
    the whole text when there is none; 2) else the sentences with a statement cue ("this post
    shows", "the poster", "therefore", "answer", ...), last first, since a response that opens
    with "Reasoning:" ends with its conclusion; 3) else anywhere in the text."""
    label = _match(tiers, _REASONING.split(text, maxsplit=1)[0])
    if label is not None:
        return label
    for sentence in reversed(_SENTENCE_BREAK.split(text)):
        if _STATEMENT_CUES.search(sentence) and (label := _match(tiers, sentence)) is not None:
            return label
    return _match(tiers, text)


def response_label(dataset: str, text: str, rules: str = "fixed") -> int | None:
    """The label a response states under one rule set, None when it states none (OOD)."""
    if rules == "reference":
        return _reference_label(_rules(dataset).ref_response, text)
    return _fixed_label(_tiers(dataset, rules), text)


def gold_label(dataset: str, text: str, rules: str = "fixed") -> int | None:
    """The label of a golden answer, None when the rule set cannot read it."""
    if rules == "reference":
        return _reference_label(_rules(dataset).ref_gold, text)
    return _fixed_label(_tiers(dataset, rules), text)


def classifier_gold_label(dataset: str, text: str, rules: str = "fixed") -> int | None:
    """The label of a golden for the classifier scores: `reference` reads it as `label_inference.py`
    does (`CLASSIFIER_GOLD`), `fixed` as `gold_label`; None when the rule set cannot read it."""
    if rules == "reference":
        _rules(dataset)  # an unknown name fails as everywhere else
        return _reference_label(CLASSIFIER_GOLD[dataset], text)
    return gold_label(dataset, text, rules)


def _tiers(dataset: str, rules: str) -> list[list[tuple[int, re.Pattern]]]:
    if rules not in RULES:
        raise ValueError(f"unknown rule set {rules!r} (known: {', '.join(RULES)})")
    _rules(dataset)
    return _FIXED[dataset]


# ---------------------------------------------------------------- lists of rows -> labels

def _label_rows(dataset: str, goldens: list[str], responses: list[str], rules: str) -> LabelResult:
    if len(goldens) != len(responses):
        raise ValueError(f"{dataset}: {len(goldens)} goldens but {len(responses)} responses")
    return _paired(dataset, [gold_label(dataset, g, rules) for g in goldens],
                   [response_label(dataset, r, rules) for r in responses], f"{rules} gold keyword")


def _paired(dataset: str, gold: list[int | None], pred: list[int | None], what: str) -> LabelResult:
    """Rows whose golden was read, an unread prediction given the default label. OOD is counted
    over every row, dropped ones included: the reference's swmh branch (the one that drops rather
    than crashes) counts them this way."""
    result, dropped_rows = LabelResult([], [], sum(p is None for p in pred), 0), []
    for row, (g, p) in enumerate(zip(gold, pred), start=1):
        if g is None:
            dropped_rows.append(row)
            continue
        result.gold.append(g)
        result.pred.append(_rules(dataset).default if p is None else p)
    result.dropped = len(dropped_rows)
    if dropped_rows:
        shown = ", ".join(map(str, dropped_rows[:5])) + (", ..." if len(dropped_rows) > 5 else "")
        warnings.warn(f"{dataset}: {len(dropped_rows)} golden(s) match no {what} "
                      f"(rows {shown}); dropped from both label lists", stacklevel=4)
    return result


def reference_labels(dataset: str, goldens: list[str], responses: list[str]) -> LabelResult:
    """The reference `--rule_calculate` labels. A golden matching no gold keyword (the instruction
    wordings "emotion turmoil", "other stress causes", "no causes of depression") made the reference
    misalign its lists and crash (swmh: drop the prediction); here the row is dropped and counted."""
    return _label_rows(dataset, goldens, responses, "reference")


def fixed_labels(dataset: str, goldens: list[str], responses: list[str]) -> LabelResult:
    """Labels from the fixed rules; a golden they cannot read is dropped and counted the same way."""
    return _label_rows(dataset, goldens, responses, "fixed")


# ---------------------------------------------------------------- metrics

def metrics(gold: list[int], pred: list[int]) -> dict:
    """Accuracy and weighted / micro / macro F1 from `sklearn.metrics`, as the reference computes
    them (labels: those in either list), in percent rounded to 2 decimals like the reference."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        raise ValueError("nothing to score: the label lists are empty")
    # zero_division=0: the value sklearn's default ("warn") gives, without the warning
    values = {"accuracy": accuracy_score(gold, pred)} | {
        f"{average}_f1": f1_score(gold, pred, average=average, zero_division=0)
        for average in ("weighted", "micro", "macro")}
    return {name: round(float(value) * 100, 2) for name, value in values.items()}


def score(dataset: str, goldens: list[str], responses: list[str], rules: str = "fixed") -> dict:
    """Metrics of one dataset's responses under one rule set, with the OOD and dropped counts and
    `n`, the number of rows scored."""
    if rules not in RULES:
        raise ValueError(f"unknown rule set {rules!r} (known: {', '.join(RULES)})")
    labeler = reference_labels if rules == "reference" else fixed_labels
    result = labeler(dataset, goldens, responses)
    return {**metrics(result.gold, result.pred), "ood": result.ood, "dropped": result.dropped,
            "n": len(result.gold)}


def classifier_score(dataset: str, goldens: list[str], predicted: list[int], rules: str = "reference") -> dict:
    """Metrics of classifier labels (rule label ids, see `CLASSIFIER_LABELS`) against the goldens read
    by one rule set (`classifier_gold_label`); a golden it cannot read is dropped and counted, where
    `label_inference.py` misaligned its lists (swmh: dropped the prediction). The classifier always
    answers, so `ood` is 0."""
    if rules not in RULES:
        raise ValueError(f"unknown rule set {rules!r} (known: {', '.join(RULES)})")
    if len(goldens) != len(predicted):
        raise ValueError(f"{dataset}: {len(goldens)} goldens but {len(predicted)} predictions")
    what = "label_inference.py gold keyword" if rules == "reference" else "fixed gold rule"
    result = _paired(dataset, [classifier_gold_label(dataset, g, rules) for g in goldens], list(predicted), what)
    return {**metrics(result.gold, result.pred), "ood": result.ood, "dropped": result.dropped,
            "n": len(result.gold)}


def majority_baseline(dataset: str, goldens: list[str]) -> dict:
    """Always predicting the most frequent gold label (fixed parsing; ties: the smaller id)."""
    result = fixed_labels(dataset, goldens, goldens)
    if not result.gold:
        raise ValueError(f"{dataset}: no readable goldens for a majority baseline")
    counts = Counter(result.gold)
    label = max(sorted(counts), key=counts.__getitem__)
    n = len(result.gold)
    return {"label": label, "label_name": _rules(dataset).labels[label],
            "share": round(counts[label] / n * 100, 2),
            **metrics(result.gold, [label] * n), "n": n, "dropped": result.dropped}


# ---------------------------------------------------------------- files

def dataset_name(path: str | Path) -> str:
    """The dataset a CSV holds, from its file name as the reference does ("t-sid.csv" -> "t-sid");
    the case of the name is forgiven."""
    stem = Path(path).name.split(".")[0]
    known = {name.lower(): name for name in DATASETS}
    if stem.lower() not in known:
        raise InputError(f"{path}: unknown IMHI dataset {stem!r} in the file name "
                         f"(known: {', '.join(DATASETS)})")
    return known[stem.lower()]


def _read_rows(path: Path, columns: tuple[str, ...]) -> list[tuple[int, int, dict]]:
    """(row number from 1, line number, {column: text}) per non-blank data row."""
    header, found = csv_rows(path)
    if not header:
        raise InputError(f"{path}: the file is empty (expected columns {', '.join(columns)})")
    for column in columns:
        if column not in header:
            raise InputError(f'{path}: line 1 (header): column "{column}" is missing '
                             f"(found: {', '.join(header)})")
    index = {column: header.index(column) for column in columns}
    rows = [(number, start, {c: cells[i] if i < len(cells) else "" for c, i in index.items()})
            for number, (start, cells) in enumerate(found, 1)]
    if not rows:
        raise InputError(f"{path}: no data rows (only a header)")
    return rows


def _require(path: Path, row: int, line: int, cells: dict, column: str) -> str:
    if not cells[column].strip():
        raise InputError(f'{path}: row {row} (line {line}): column "{column}" is empty')
    return cells[column]


def read_imhi_csv(path: str | Path) -> list[dict]:
    """An IMHI test CSV as rows {"query", "golden"}; the golden is the `gpt-3.5-turbo` column."""
    path = Path(path)
    return [{"query": _require(path, row, line, cells, QUERY_COLUMN),
             "golden": _require(path, row, line, cells, GOLDEN_COLUMN)}
            for row, line, cells in _read_rows(path, (QUERY_COLUMN, GOLDEN_COLUMN))]


def read_generated_csv(path: str | Path) -> tuple[list[str], list[str]]:
    """A `goldens,generated_text` output CSV; an empty generated text (NaN in pandas) reads as ""."""
    path = Path(path)
    rows = _read_rows(path, GENERATED_COLUMNS)
    goldens = [_require(path, row, line, cells, "goldens") for row, line, cells in rows]
    return goldens, [cells["generated_text"] for _, _, cells in rows]


def write_generated_csv(path: str | Path, goldens: list[str], generated: list[str]) -> None:
    """Writes `goldens,generated_text` with plain CSV quoting (no escape character, so backslashes
    are not doubled as in the reference's `escapechar='\\\\'`); None is written as ""."""
    if len(goldens) != len(generated):
        raise ValueError(f"{len(goldens)} goldens but {len(generated)} generated texts")
    with atomic_file(path, "w", encoding="utf-8", newline="") as handle:  # whole or not at all: files.py
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(GENERATED_COLUMNS)
        writer.writerows(zip(goldens, ("" if text is None else text for text in generated)))
