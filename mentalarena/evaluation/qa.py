"""Biomedical QA benchmarks (MedQA, MedMCQA, PubMedQA, MMLU) declared as data, and their two scorers.

Each benchmark is one `Benchmark` entry: where it lives on the hub, how a row of either schema (the
paper's files or the hub's) becomes a `QAItem`, and which prompt renders it; one loop loads them all.
`score_reference` is the reference code's rule R, quirks included; `extract_answer` is a robust
parser for the same outputs. Bad input is one `InputError` line naming the file, the row and the field.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from mentalarena.errors import InputError
from mentalarena.store.inputs import duplicate_id, read_table
from mentalarena.prompts import Prompts

DECISIONS = ("yes", "no", "maybe")
# Names that mean "the whole set" for MedMCQA; the last is the reference CLI's default --name.
NO_SUBJECT_FILTER = {"", "psychosis", "test/professional_psychology_test"}
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management",
    "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios",
    "nutrition", "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions",
)


@dataclass(frozen=True)
class QAItem:
    """One question, the same shape for every benchmark and either source schema."""

    id: str
    question: str
    options: dict[str, str]  # letter -> text; empty for PubMedQA
    gold: str  # a letter, or "yes"/"no"/"maybe"
    gold_text: str
    reference_target: str  # what rule R's substring branch compares against (see _choice_item)
    context: str = ""
    subject: str = ""


@dataclass
class _Row:
    """One raw row plus what its error messages and fallbacks need."""

    data: Mapping[str, Any]
    dataset: str
    source: str
    number: int  # 1-based, as named in messages (the line number for JSONL)
    index: int  # 0-based position, for ids of rows that have none
    cop_base: int
    subject: str = ""  # the subject a row without its own subject field belongs to

    def fail(self, name: str, problem: str) -> NoReturn:
        raise InputError(f"{self.source}: row {self.number}: field '{name}' {problem}")

    def get(self, *names: str) -> Any:
        """The first of `names` present (and not null); missing is an error naming the first."""
        for name in names:
            if self.data.get(name) is not None:
                return self.data[name]
        also = "".join(f" (or '{n}')" for n in names[1:])
        raise InputError(f"{self.source}: row {self.number}: field '{names[0]}'{also} is missing")

    def text(self, *names: str) -> str:
        value = self.get(*names)
        if not isinstance(value, str) or not value.strip():
            self.fail(_present(self, names), "must be a non-empty string")
        return value.strip()

    def ident(self) -> str:
        for name in ("id", "pubid"):
            if self.data.get(name) not in (None, ""):
                return str(self.data[name])
        return f"{self.dataset}-{self.index}"


def _present(row: _Row, names: Iterable[str]) -> str:
    return next(n for n in names if row.data.get(n) is not None)


def _option_text(row: _Row, name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        row.fail(name, f"must be a string, got {type(value).__name__}")
    return str(value).strip()


def _as_int(row: _Row, name: str) -> int:
    value = row.get(name)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        row.fail(name, f"must be an integer, got {value!r}")
    return value


# ---------------------------------------------------------------- row converters (both schemas)

def _choice_options(row: _Row) -> dict[str, str]:
    """`options` {letter: text} (paper's files, MedQA hub) or `choices` [text, ...] (MMLU hub)."""
    options = row.get("options", "choices")
    if isinstance(options, list) and options:
        return {chr(65 + i): _option_text(row, "choices", t) for i, t in enumerate(options)}
    if not isinstance(options, dict) or not options:
        row.fail(_present(row, ("options", "choices")), "must be a non-empty object of letter -> text")
    return {str(k).strip(): _option_text(row, f"options.{k}", v) for k, v in options.items()}


def _choice_gold(row: _Row, options: dict[str, str]) -> str:
    if row.data.get("answer_idx") is None and "choices" in row.data:
        answer = _as_int(row, "answer")  # MMLU hub: an index 0-3
        if not 0 <= answer < len(options):
            row.fail("answer", f"is {answer}, outside 0-{len(options) - 1}")
        return chr(65 + answer)
    gold = row.text("answer_idx")
    if gold not in options:
        row.fail("answer_idx", f"is {gold!r}, not one of the option letters {', '.join(options)}")
    return gold


def _choice_item(row: _Row) -> QAItem:
    """MedQA and MMLU: the paper's files and GBaker/MedQA-USMLE-4-options share one schema."""
    options = _choice_options(row)
    gold = _choice_gold(row, options)
    answer = row.data.get("answer")
    gold_text = answer.strip() if isinstance(answer, str) and answer.strip() else options[gold]
    return QAItem(row.ident(), row.text("question"), options, gold, gold_text,
                  reference_target=gold_text, subject=str(row.data.get("subject") or row.subject))


def _medmcqa_item(row: _Row) -> QAItem:
    options = {letter: _option_text(row, key, row.get(key))
               for letter, key in zip("ABCD", ("opa", "opb", "opc", "opd"))}
    cop, base = _as_int(row, "cop"), row.cop_base
    if not base <= cop <= base + 3:
        other = 1 - base
        hint = (f"; if this set numbers options from {other} ({'the hub' if other == 0 else 'the paper'}"
                f"'s way), use cop_base={other}" if other <= cop <= other + 3 else " (no gold answer)")
        row.fail("cop", f"is {cop}, outside {base}-{base + 3} for cop_base={base}{hint}")
    gold = "ABCD"[cop - base]
    # Faithful: the reference's MedMCQA rule R compares substrings against the gold LETTER, not its text.
    return QAItem(row.ident(), row.text("question"), options, gold, options[gold],
                  reference_target=gold, subject=str(row.data.get("subject_name") or ""))


def _pubmedqa_contexts(row: _Row) -> str:
    """Paper's file: `CONTEXTS` list; hub: `context: {contexts: [...], ...}`."""
    value = row.data.get("CONTEXTS", row.data.get("context"))
    if isinstance(value, dict):
        value = value.get("contexts")
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if not isinstance(value, list):
        row.fail("CONTEXTS", f"must be a list of strings, got {type(value).__name__}")
    return "\n".join(str(part).strip() for part in value)


def _pubmedqa_item(row: _Row) -> QAItem:
    decision = row.get("final_decision")
    gold = decision.strip().lower() if isinstance(decision, str) else decision
    if gold not in DECISIONS:
        row.fail("final_decision", f"is {decision!r}, expected yes, no or maybe")
    return QAItem(row.ident(), row.text("QUESTION", "question"), {}, gold, gold,
                  reference_target=gold, context=_pubmedqa_contexts(row))


# ---------------------------------------------------------------- the benchmarks, as data

@dataclass(frozen=True)
class Benchmark:
    """A benchmark as data: where it lives, how a row becomes a QAItem, how it is prompted."""

    name: str
    hub_id: str
    hub_config: str | None  # MMLU: None, the subject is the config
    hub_split: str
    kind: str  # "choice" (letters) or "decision" (yes/no/maybe)
    template: str  # prompts/<template>.txt
    convert: Callable[[_Row], QAItem] = field(repr=False)
    name_role: str = "ignored"  # what --name means: "ignored", "filter" (subject_name), "config" (subset)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("MedQA", "GBaker/MedQA-USMLE-4-options", None, "test", "choice", "qa_choice",
              _choice_item),
    Benchmark("MedMCQA", "openlifescienceai/medmcqa", None, "validation", "choice", "qa_choice",
              _medmcqa_item, "filter"),
    Benchmark("PubMedQA", "qiaojin/PubMedQA", "pqa_labeled", "train", "decision", "qa_decision",
              _pubmedqa_item),
    Benchmark("MMLU", "cais/mmlu", None, "test", "choice", "qa_choice", _choice_item, "config"),
)}


def benchmark(dataset: str) -> Benchmark:
    if dataset not in BENCHMARKS:
        raise InputError(f"unknown dataset {dataset!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[dataset]


def mmlu_subject(name: str) -> str:
    """'college_medicine', 'college_medicine_test' and 'test/college_medicine_test' (the reference's
    form) all name the subject college_medicine."""
    subject = name.strip().lower().rsplit("/", 1)[-1].removesuffix(".jsonl").removesuffix("_test")
    if subject not in MMLU_SUBJECTS:
        raise InputError(f"unknown MMLU subset {name!r}; choose one of {', '.join(MMLU_SUBJECTS)}")
    return subject


# ---------------------------------------------------------------- loading

def find_ignoring_case(root: str | Path, relative: str) -> Path | None:
    """The file `root/relative` with every name below `root` matched regardless of case (the paper's
    data/ has MedQA/, MMLU/, ...), None when there is none. Two entries that differ only by case
    are refused rather than picked by listing order."""
    path = Path(root)
    for part in Path(relative).parts:
        if not path.is_dir():
            return None
        found = sorted(p for p in path.iterdir() if p.name.lower() == part.lower())
        if len(found) > 1:
            raise InputError(f"{' and '.join(map(str, found))} differ only by case; keep one of them")
        if not found:
            return None
        path = found[0]
    return path if path.is_file() else None


def _hub_rows(bench: Benchmark, subject: str, hub_loader: Callable | None) -> tuple[str, list]:
    config = subject if bench.name_role == "config" else bench.hub_config
    if bench.name_role == "config" and not config:
        raise InputError(f"{bench.name} from the hub needs a subset name; choose one of "
                         + ", ".join(MMLU_SUBJECTS))
    source = f"{bench.hub_id}{f' [{config}]' if config else ''} split {bench.hub_split}"
    if hub_loader is None:
        import datasets  # lazily: the local files need no hub client

        hub_loader = datasets.load_dataset
    try:
        table = hub_loader(bench.hub_id, config, split=bench.hub_split)
    except Exception as exc:  # network, auth, cache: one line, with the offline way out
        raise InputError(f"{source}: cannot load from the hub ({type(exc).__name__}: {exc}); "
                         "pass a local data file instead") from exc
    return source, list(enumerate(table, 1))


def _subject_filter(name: str | None) -> str | None:
    return None if name is None or name.strip().lower() in NO_SUBJECT_FILTER else name.strip()


def _keep_subject(dataset: str, numbered: list[tuple[int, int, Any]], source: str,
                  subject: str) -> list[tuple[int, int, Any]]:
    """MedMCQA --name: keep rows whose subject_name matches (case-insensitive, exact)."""
    found = {str(r["subject_name"]) for _, _, r in numbered
             if isinstance(r, Mapping) and r.get("subject_name")}
    kept = [(i, n, r) for i, n, r in numbered if isinstance(r, Mapping)
            and str(r.get("subject_name") or "").lower() == subject.lower()]
    if not kept:
        raise InputError(f"{source}: no {dataset} rows with subject_name {subject!r}; subjects "
                         f"here: {', '.join(sorted(found)) or 'none'}")
    return kept


def _unique_ids(items: list[QAItem], numbers: list[int], source: str) -> list[QAItem]:
    """A repeated id gets '#2', '#3', ...: the paper's files repeat whole rows (all are scored), and
    results are keyed by id. The same id on another question is refused: a resumed run would take
    the answers of one for the other."""
    seen: Counter[str] = Counter()
    first: dict[str, tuple[int, QAItem]] = {}
    out = []
    for item, number in zip(items, numbers):
        if item.id in first and first[item.id][1] != item:
            raise duplicate_id(source, first[item.id][0], number, item.id)
        first.setdefault(item.id, (number, item))
        seen[item.id] += 1
        count = seen[item.id]
        out.append(item if count == 1 else dataclasses.replace(item, id=f"{item.id}#{count}"))
    return out


def rows_to_items(dataset: str, rows: Iterable[Any], source: str, cop_base: int = 1,
                  name: str | None = None, row_numbers: Iterable[int] | None = None) -> list[QAItem]:
    """Convert raw rows of either schema; `name` filters MedMCQA subjects / labels the MMLU subset."""
    bench = benchmark(dataset)
    if cop_base not in (0, 1):
        raise InputError(f"cop_base must be 0 or 1, got {cop_base!r}")
    rows = list(rows)
    numbers = list(row_numbers) if row_numbers is not None else range(1, len(rows) + 1)
    numbered = [(index, number, row) for index, (number, row) in enumerate(zip(numbers, rows))]
    subject = mmlu_subject(name) if bench.name_role == "config" and name else ""
    if bench.name_role == "filter" and _subject_filter(name):
        numbered = _keep_subject(dataset, numbered, source, _subject_filter(name))
    items = []
    for index, number, row in numbered:
        if not isinstance(row, Mapping):
            raise InputError(f"{source}: row {number}: expected an object, got {type(row).__name__}")
        items.append(bench.convert(_Row(row, dataset, source, number, index, cop_base, subject)))
    return _unique_ids(items, [number for _, number, _ in numbered], source)


def load_items(dataset: str, name: str | None = None, data_file: str | Path | None = None,
               cop_base: int | None = None, hub_loader: Callable | None = None) -> list[QAItem]:
    """Items from `data_file` (.jsonl, .json list, .csv, .parquet) or, without one, from the hub.

    cop_base (MedMCQA): 1 for local files (the paper's), 0 for the hub, unless given."""
    bench = benchmark(dataset)
    if bench.name_role == "config":
        name = mmlu_subject(name) if name else _subject_from_file(data_file)
    if data_file is not None:
        path = Path(data_file)
        numbered, source, base = read_table(path), str(path), 1
    else:
        source, numbered = _hub_rows(bench, name or "", hub_loader)
        base = 0
    if not numbered:
        raise InputError(f"{source}: no rows")
    numbers, rows = zip(*numbered)
    return rows_to_items(dataset, rows, source, base if cop_base is None else cop_base, name, numbers)


def _subject_from_file(data_file: str | Path | None) -> str | None:
    """A local MMLU file named like the reference's (college_medicine_test.jsonl) gives its subject."""
    if data_file is None:
        return None
    stem = Path(data_file).stem.lower().removesuffix("_test")
    return stem if stem in MMLU_SUBJECTS else None


# ---------------------------------------------------------------- prompts and baseline

def render_prompt(item: QAItem, prompts: Prompts, with_context: bool = False) -> str:
    """`qa_choice` (slots question, options) for letter sets, `qa_decision` (question, context)."""
    if item.options:
        lines = "\n".join(f"{letter}. {text}" for letter, text in item.options.items())
        return prompts.render("qa_choice", question=item.question, options=lines)
    context = f"Context:\n{item.context}\n\n" if with_context and item.context else ""
    return prompts.render("qa_decision", question=item.question, context=context)


def majority_baseline(items: list[QAItem]) -> tuple[str, float]:
    """The most frequent gold label and its share; ties go to the label that sorts first."""
    if not items:
        raise ValueError("majority_baseline needs at least one item")
    counts = Counter(item.gold for item in items)
    label = min(counts, key=lambda g: (-counts[g], g))
    return label, counts[label] / len(items)


# ---------------------------------------------------------------- rule R (reference, faithful)

def score_reference(output: str, item: QAItem) -> bool:
    """The reference's rule R, quirks kept (see EVALUATION.md section A)."""
    out = output.strip()
    if not item.options:
        if "explanation." in out:  # case-sensitive, as in the reference
            out = out[out.find("explanation.") + len("explanation."):].strip()
        low = out.lower()
        return item.gold in low and not ("yes" in low and "no" in low)
    if "." in out or len(out) == 1:
        return out[0] == item.gold
    # Faithful: an empty output is a substring of any target, so the reference counts it correct.
    return out in item.reference_target or item.reference_target in out


# ---------------------------------------------------------------- robust answer extraction

# "answer is", "Answer:", "the correct option is:", "best choice -" ... then maybe "option"/"(".
_STATEMENT = re.compile(
    r"\b(?:answer\s*(?:is|would be|should be|will be|[:=-])"
    r"|(?:correct|right|best|final)\s+(?:answer|option|choice|letter)(?:\s*(?:is|would be|[:=-]))?)"
    r"\s*[:=-]?\s*(?:(?:option|choice|letter)\s*[:=-]?\s*)?",
    re.IGNORECASE)
_LEAD = re.compile(r"\s*[\"'“‘]?(?:(?:options?|choices?)\s*[:=-]?\s*)?", re.IGNORECASE)
_TOKEN = re.compile(r"([(\[]?)([A-Za-z])(?![\w'’]|-\w)")


def _letter_at(text: str, pos: int, letters: str, in_statement: bool) -> str | None:
    """The option letter that starts at `pos`, or None when that character is no letter token.

    A lower-case letter must be bracketed or followed by punctuation or the end ("(c)", "c."), so
    that the article in "the answer is a tumour" is not read as A. A leading "A" followed by a
    lower-case word or a number is the article ("A 45-year-old man ...")."""
    match = _TOKEN.match(text, pos)
    if not match or match[2].upper() not in letters:
        return None
    after = text[match.end():]
    if match[2].islower() and not (match[1] or re.match(r"\s*(?:[.):,;]|$)", after)):
        return None
    if not in_statement and match[2] == "A" and not match[1] and re.match(r"\s+[a-z0-9]", after):
        return None
    return match[2].upper()


def _stated_letter(text: str, letters: str) -> str | None:
    for match in _STATEMENT.finditer(text):
        letter = _letter_at(text, match.end(), letters, in_statement=True)
        if letter:
            return letter
    return None


def _norm(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(". ")


def _exact_text(text: str, options: dict[str, str]) -> str | None:
    """The option whose whole text the output is (first letter when two options share it). A bare
    letter is left to the letter rules, so "a" stays A even if some option reads "a"."""
    out = _norm(text)
    if len(out.strip("()[]")) < 2:
        return None
    return next((letter for letter, t in options.items() if _norm(t) == out), None)


def _letter_by_text(text: str, options: dict[str, str]) -> str | None:
    """The longest option text found in the output as whole words; ties go to the earliest in the
    output, then to the first letter."""
    out = _norm(text)
    found = []
    for letter, t in options.items():
        hit = re.search(rf"(?<!\w){re.escape(_norm(t))}(?!\w)", out) if _norm(t) else None
        if hit:
            found.append((-len(_norm(t)), hit.start(), letter))
    return min(found)[2] if found else None


def _lone_letter(text: str, letters: str) -> str | None:
    """A capital option letter standing alone somewhere ("I'd go with C"), when only one does."""
    seen = {m[1] for m in re.finditer(rf"(?<![\w'’-])([{letters}])(?![\w'’]|-\w)", text)
            if not (m[1] == "A" and re.match(r"\s+[a-z0-9]", text[m.end():]))}
    return seen.pop() if len(seen) == 1 else None


def _choice_answer(output: str, options: dict[str, str]) -> str | None:
    text = output.replace("*", "").replace("`", "").strip()  # markdown emphasis: "**C**"
    letters = "".join(re.escape(k) for k in options if len(k) == 1)
    if not text or not letters:
        return None
    return (_stated_letter(text, letters)
            or _exact_text(text, options)  # options like "A.Decrease in Km" or "b,c true a,d false"
            or _letter_at(text, _LEAD.match(text).end(), letters, in_statement=False)
            or _letter_by_text(text, options)
            or _lone_letter(text, letters))


def _decision_answer(output: str) -> str | None:
    text = output.replace("*", "")
    stated = re.search(r"\banswer\s*(?:is|would be|should be|[:=-])\s*[:=-]?\s*[\"'(]?(yes|no|maybe)\b",
                       text, re.IGNORECASE)
    first = stated or re.search(r"\b(yes|no|maybe)\b", text, re.IGNORECASE)
    return first[1].lower() if first else None


def extract_answer(output: str, item: QAItem) -> str | None:
    """The answer a model's output states: a letter for choice sets, yes/no/maybe for PubMedQA.

    Precedence for letters: an explicit statement ("The correct answer is D", "Answer: (c)"; the
    first one, since small models run on into new made-up questions) wins over a leading letter
    ("A. foo\\n\\nThe correct answer is: D. bar" gives D); then an output that is exactly one option's
    text; then the leading letter ("C", "(C)", "C) text", "Option C"); then the longest option text
    inside the output; then a single capital letter standing alone.
    For yes/no/maybe: an "answer is X" statement, else the first of the words. None when nothing
    is found."""
    return _choice_answer(output, item.options) if item.options else _decision_answer(output)
