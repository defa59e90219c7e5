"""Self-play records -> preference pairs (chosen / rejected answers to one question) for DPO.

MentalArena's SFT keeps only the best candidate of each try-and-reflect search; the search also
learned which candidates the simulated patient fared worse with. Three kinds of pair come from one
record, each asked with exactly the question of the SFT pair of the same kind (`sft.Questions`,
same system text), so SFT and DPO share prompts:

- treatment / medication, from `treatment_search` / `medicine_search`: chosen = the best-scored try
  (the first of equals, as the search itself keeps), rejected = the worst-scored (the first of
  equals), kept when the score gap is at least `min_margin`. With `all_pairs`, every two tries whose
  gap is at least `min_margin`, the higher-scored one chosen, in try order. Tries whose judge reply
  held no score on the 1-10 scale (the search records 0) take part in no pair.
- diagnosis, from `diagnoses` (the two doctors' diagnoses the patient reviewed) and `illness` (the
  final illness named from the review): the diagnosis the final illness comes from is chosen. It is
  the one the illness names ("Doctor 1", "the second diagnosis") when it names exactly one; otherwise
  the one whose sentence embedding is closer to the illness, when the two cosine similarities differ
  by at least `diagnosis_margin`; otherwise the record gives no diagnosis pair ("unattributed").

Answers are the candidates' own words, stripped; a pair needs two non-empty, different answers.
Exact duplicates (same system, question, chosen and rejected) are dropped, first kept. Records
without any of these fields (the reference code's six-field records, or older runs) are counted, not
refused. Files may also hold pairs already converted (TRL's or OpenAI's preference rows), read back
as they are.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from mentalarena.errors import InputError
from mentalarena.store.inputs import json_lines
from mentalarena.prompts import Prompts
from mentalarena.training.sft import TEXT_ANSWER, TEXT_QUESTION, TEXT_SYSTEM, Questions, questions_of

KINDS = ("diagnosis", "treatment", "medication")
SEARCHES = {"treatment": "treatment_search", "medication": "medicine_search"}
SCALE = (1, 10)  # the judge's health-state scale; anything else is "no score"
FORMATS = ("trl", "trl_text", "openai")
# OpenAI's preference fine-tuning rows (fine-tuning "preference input"): one-turn, the input ends
# with the user's message, and each output is a single assistant message.
OPENAI_KEYS = {"input", "preferred_output", "non_preferred_output"}
OPENAI_INPUT_KEYS = {"messages", "tools", "parallel_tool_calls"}
OPENAI_INPUT_ROLES = {"system", "developer", "user", "assistant"}


@dataclass(frozen=True)
class PreferencePair:
    system: str
    question: str
    chosen: str
    rejected: str
    kind: str            # diagnosis | treatment | medication, or "unknown" for a row read back from a file
    margin: float | None = None  # score gap, or similarity gap for a diagnosis attributed by similarity
    source: str = ""     # "<file>: line N", where the pair came from

    def key(self) -> tuple[str, str, str, str]:
        return self.system, self.question, self.chosen, self.rejected


@dataclass
class PairReport:
    """What the pair builder read, made and dropped; printed by the scripts and kept with their outputs."""
    files: list[str]
    min_margin: float = 2.0
    all_pairs: bool = False
    records: int = 0                # self-play records read
    converted_rows: int = 0         # rows already in a preference format
    no_scores: int = 0              # records with no search and no diagnoses (reference code, older runs)
    searches: int = 0               # treatment and medicine searches read
    searches_without_scores: int = 0  # searches none of whose tries carries a score on the scale
    candidates: int = 0             # tries with a score on the scale
    unscored: int = 0               # tries without one (their judge reply held no usable number)
    single_candidate: int = 0       # searches with fewer than two scored tries (nothing to compare)
    dropped_margin: int = 0         # candidate pairs whose score gap is below min_margin
    dropped_empty: int = 0          # ... with an empty answer
    dropped_identical: int = 0      # ... whose two answers are the same text
    diagnosis_named: int = 0        # diagnosis pairs attributed by the illness naming a doctor
    diagnosis_similarity: int = 0   # ... by the closer sentence embedding
    diagnosis_unattributed: int = 0  # records whose final illness could be attributed to neither
    duplicates: int = 0
    pairs: int = 0                  # kept, after duplicates
    kinds: dict[str, int] = field(default_factory=dict)
    score_gaps: dict[str, int] = field(default_factory=dict)  # kept treatment/medication pairs by gap
    problems: list[str] = field(default_factory=list)  # records skipped, "<file>: line N: ..."

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in self.kinds.items()) or "none"
        text = (f"{self.records} records ({self.no_scores} without scores or diagnoses), "
                f"{self.converted_rows} converted rows; {self.searches} searches, {self.candidates} scored "
                f"candidates ({self.unscored} unscored, {self.single_candidate} searches with under two); "
                f"dropped: {self.dropped_margin} below margin {self.min_margin:g}, {self.dropped_empty} empty, "
                f"{self.dropped_identical} identical, {self.diagnosis_unattributed} diagnoses unattributed, "
                f"{self.duplicates} duplicates; {self.pairs} pairs ({kinds})")
        if self.problems:
            text += f"; {len(self.problems)} bad records skipped"
        return text

    def why_none(self) -> str:
        """Why a build gave no pairs, in one line for an error message."""
        if self.records and self.no_scores == self.records and not self.converted_rows:
            return (f"none of the {self.records} records carries try-and-reflect scores or diagnoses "
                    "(`treatment_search`, `medicine_search`, `diagnoses`): records of the reference code, or of "
                    "an older run, hold only the six SFT fields; run arena_med.py to get scored records")
        return self.summary()


# ---------------------------------------------------------------------------------- building
def check_options(min_margin: float, diagnosis_margin: float) -> None:
    if isinstance(min_margin, bool) or not isinstance(min_margin, (int, float)) or not min_margin > 0:
        raise InputError(f"--min_margin must be a positive number (a score gap on the 1-10 scale), not {min_margin!r}")
    if isinstance(diagnosis_margin, bool) or not isinstance(diagnosis_margin, (int, float)) \
            or not 0 <= diagnosis_margin < 2:
        raise InputError(f"--diagnosis_margin must be a cosine-similarity gap in [0, 2), not {diagnosis_margin!r}")


def load_preferences(paths: Sequence[str | Path] | str | Path, *, min_margin: float = 2.0, all_pairs: bool = False,
                     diagnosis: bool = True, diagnosis_margin: float = 0.05, encoder=None,
                     reference_glue: bool = False, prompts: Prompts | None = None,
                     questions: Questions | None = None) -> tuple[list[PreferencePair], PairReport]:
    """Pairs from JSONL files of self-play records or converted preference rows, detected row by row.

    `encoder`: anything with `similarity(a, b)`, or a model name / folder; None loads the bundled
    sentence encoder, and only when a diagnosis needs it. A record missing a field the builder needs
    is reported and skipped; a field of the wrong shape stops with file, line and field."""
    check_options(min_margin, diagnosis_margin)
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    asked = questions_of(questions, reference_glue, prompts)
    asked.check()  # a bad template fails here, not as a per-record problem
    report = PairReport(files=[str(p) for p in paths], min_margin=min_margin, all_pairs=all_pairs)
    builder = _Builder(report, asked, min_margin, all_pairs, diagnosis, diagnosis_margin, encoder)
    for path in paths:
        for number, row in json_lines(Path(path)):
            where = f"{path}: line {number}"
            try:
                kind = row_kind(row)
                if kind == "record":
                    builder.record(row, where)
                else:
                    report.converted_rows += 1
                    builder.keep(from_openai(row, where) if kind == "openai" else from_trl(row, where))
            except InputError as exc:
                message = str(exc)
                raise InputError(message if message.startswith(where) else f"{where}: {message}") from None
    report.pairs = len(builder.pairs)
    report.kinds = dict(Counter(p.kind for p in builder.pairs))
    report.score_gaps = {str(k): v for k, v in sorted(Counter(
        int(p.margin) for p in builder.pairs if p.kind in SEARCHES and p.margin is not None).items())}
    return builder.pairs, report


class _Builder:
    def __init__(self, report, questions, min_margin, all_pairs, diagnosis, diagnosis_margin, encoder):
        self.report, self.questions, self.min_margin, self.all_pairs = report, questions, min_margin, all_pairs
        self.diagnosis, self.diagnosis_margin = diagnosis, diagnosis_margin
        self._encoder = encoder
        self.system = questions.system()
        self.pairs: list[PreferencePair] = []
        self.seen: set[tuple[str, str, str, str]] = set()

    @property
    def encoder(self):
        if self._encoder is None or isinstance(self._encoder, str):
            from mentalarena.selfplay.similarity import Encoder
            self._encoder = Encoder(self._encoder)
        return self._encoder

    def keep(self, pair: PreferencePair) -> None:
        if pair.key() in self.seen:
            self.report.duplicates += 1
            return
        self.seen.add(pair.key())
        self.pairs.append(pair)

    def record(self, row: dict, where: str) -> None:
        report = self.report
        report.records += 1
        present = [name for name in ("diagnoses", *SEARCHES.values()) if name in row]
        if not present:
            report.no_scores += 1
            return
        if not isinstance(row.get("symptom"), str):
            report.problems.append(f'{where}: field "symptom" is '
                                   + ("missing" if "symptom" not in row else f"{type(row['symptom']).__name__}, not text"))
            return
        if "diagnoses" in row and self.diagnosis and "illness" not in row:  # missing: skipped, as documented
            report.problems.append(f'{where}: field "illness" is missing')
            return
        symptom = row["symptom"]
        if "diagnoses" in row and self.diagnosis:
            self.diagnosis_pair(row, symptom, where)
        for kind, name in SEARCHES.items():
            if name in row:
                self.search_pairs(kind, _search_tries(row[name], name), symptom, where)

    def candidate(self, kind: str, symptom: str, chosen: str, rejected: str, margin: float | None,
                  where: str) -> None:
        chosen, rejected = chosen.strip(), rejected.strip()
        if not chosen or not rejected:
            self.report.dropped_empty += 1
        elif chosen == rejected:
            self.report.dropped_identical += 1
        else:
            question = self.questions.ask(kind, symptom)
            self.keep(PreferencePair(self.system, question, chosen, rejected, kind, margin, where))

    def search_pairs(self, kind: str, tries: list[dict], symptom: str, where: str) -> None:
        report = self.report
        report.searches += 1
        scored = [t for t in tries if _on_scale(t.get("score"))]
        report.candidates += len(scored)
        report.unscored += len(tries) - len(scored)
        if not scored:
            report.searches_without_scores += 1
        if len(scored) < 2:
            report.single_candidate += 1
            return
        if self.all_pairs:
            options = [(a, b) if a["score"] >= b["score"] else (b, a)
                       for i, a in enumerate(scored) for b in scored[i + 1:] if a["score"] != b["score"]]
            options.sort(key=lambda ab: (scored.index(ab[0]), scored.index(ab[1])))
        else:  # max() and min() return the first of equals
            options = [(max(scored, key=lambda t: t["score"]), min(scored, key=lambda t: t["score"]))]
        for best, worst in options:
            gap = round(best["score"] - worst["score"], 6)  # 7.3 - 5.3 is a gap of 2
            if gap < self.min_margin:
                report.dropped_margin += 1
                continue
            self.candidate(kind, symptom, best["candidate"], worst["candidate"], gap, where)

    def diagnosis_pair(self, row: dict, symptom: str, where: str) -> None:
        diagnoses, illness = row["diagnoses"], row.get("illness")
        if not (isinstance(diagnoses, list) and len(diagnoses) == 2 and all(isinstance(d, str) for d in diagnoses)):
            raise InputError(f'{where}: field "diagnoses" must be a list of two texts')
        if not isinstance(illness, str):
            raise InputError(f'{where}: field "illness" must be text')
        first, second = (d.strip() for d in diagnoses)
        if not first or not second:
            self.report.dropped_empty += 1
            return
        if first == second:
            self.report.dropped_identical += 1
            return
        chosen, gap = attribute(illness, first, second, lambda: self.encoder, self.diagnosis_margin)
        if chosen is None:
            self.report.diagnosis_unattributed += 1
            return
        if gap is None:
            self.report.diagnosis_named += 1
        else:
            self.report.diagnosis_similarity += 1
        pick = (first, second) if chosen == 1 else (second, first)
        self.candidate("diagnosis", symptom, *pick, gap, where)


_NUMBER = {1: r"(?:1|one)", 2: r"(?:2|two)"}
_ORDINAL = {1: "first", 2: "second"}
_NAMED = {k: re.compile(rf"\b(?:doctor|dr\.?|diagnosis)\s*(?:#|no\.?)?\s*{_NUMBER[k]}\b|"
                        rf"\b{_ORDINAL[k]}\s+(?:doctor|diagnosis)\b|\bdoctor\s+{_ORDINAL[k]}\b", re.IGNORECASE)
          for k in (1, 2)}


def named_doctor(illness: str) -> int | None:
    """1 or 2 when the text names exactly one of the two doctors / diagnoses, else None."""
    named = [k for k in (1, 2) if _NAMED[k].search(illness)]
    return named[0] if len(named) == 1 else None


def attribute(illness: str, first: str, second: str, encoder, margin: float) -> tuple[int | None, float | None]:
    """(1 or 2 or None, similarity gap or None): which diagnosis the final illness comes from.
    `encoder` is an object with `similarity(a, b)`, or a function returning one (loaded only when needed)."""
    named = named_doctor(illness)
    if named is not None:
        return named, None
    if not illness.strip():
        return None, None
    enc = encoder() if callable(encoder) and not hasattr(encoder, "similarity") else encoder
    # rounded, so that float noise between batch shapes cannot move a pair across the margin
    s1, s2 = (round(float(enc.similarity(illness, d)), 4) for d in (first, second))
    gap = round(abs(s1 - s2), 4)
    if s1 == s2 or gap < margin:
        return None, gap
    return (1 if s1 > s2 else 2), gap


def _on_scale(score) -> bool:
    return isinstance(score, (int, float)) and not isinstance(score, bool) and SCALE[0] <= score <= SCALE[1]


def _search_tries(search, name: str) -> list[dict]:
    """The tries of one search, each with a text `candidate`; a try without `score` counts as unscored."""
    tries = search.get("tries") if isinstance(search, dict) else None
    if not isinstance(tries, list):
        raise InputError(f'field "{name}" must be an object with a list "tries"')
    for i, t in enumerate(tries):
        if not isinstance(t, dict) or not isinstance(t.get("candidate"), str):
            raise InputError(f'field "{name}.tries[{i}].candidate" must be text')
        score = t.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise InputError(f'field "{name}.tries[{i}].score" is {type(score).__name__}, not a number')
    return tries


# ---------------------------------------------------------------------------------- formats
def to_trl(pair: PreferencePair) -> dict:
    """TRL's conversational preference row (explicit prompt): the SFT system and question as the
    prompt, one assistant message each as chosen and rejected. `kind` and `margin` ride along."""
    return {"prompt": [{"role": "system", "content": pair.system}, {"role": "user", "content": pair.question}],
            "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}],
            "kind": pair.kind, "margin": pair.margin}


def to_trl_text(pair: PreferencePair) -> dict:
    """TRL's standard (plain text) preference row in the paper's SFT text layout: the prompt is the
    `### System: ... Question: ...\\n ### Answer:` head of the SFT text, the answers start with its
    space, so prompt + chosen is exactly the SFT text of the chosen answer, and the prompt ends on a
    token boundary."""
    head = f"{TEXT_SYSTEM}{pair.system}{TEXT_QUESTION}{pair.question}{TEXT_ANSWER}"
    return {"prompt": head[:-1], "chosen": " " + pair.chosen, "rejected": " " + pair.rejected}


def to_openai(pair: PreferencePair) -> dict:
    """OpenAI's preference fine-tuning row (method "dpo")."""
    return {"input": {"messages": [{"role": "system", "content": pair.system},
                                   {"role": "user", "content": pair.question}]},
            "preferred_output": [{"role": "assistant", "content": pair.chosen}],
            "non_preferred_output": [{"role": "assistant", "content": pair.rejected}]}


def row_kind(row) -> str:
    """"record", "trl" or "openai"; SFT rows and anything else are refused in one line."""
    if not isinstance(row, dict):
        raise InputError(f"a JSON {type(row).__name__}, not an object")
    if "preferred_output" in row or "non_preferred_output" in row:
        return "openai"
    if "chosen" in row or "rejected" in row:
        return "trl"
    if any(name in row for name in ("symptom", "illness", "treatment", "diagnoses", *SEARCHES.values())):
        return "record"
    if "messages" in row or "text" in row:
        raise InputError("an SFT row (one answer, no rejected one): preference pairs come from self-play records "
                         "or preference rows (prompt/chosen/rejected, or OpenAI's input/preferred_output/"
                         "non_preferred_output)")
    raise InputError("neither a self-play record nor a preference row (prompt/chosen/rejected, or "
                     "input/preferred_output/non_preferred_output)")


def _one_assistant(value, name: str) -> str:
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    raise InputError(f'field "{name}" must be one assistant message with text content')


def _system_and_question(messages, name: str) -> tuple[str, str]:
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages] if isinstance(messages, list) else []
    if roles not in (["user"], ["system", "user"]) or not all(isinstance(m.get("content"), str) for m in messages):
        raise InputError(f'field "{name}" must be a user message, optionally after a system message, with text content')
    return (messages[0]["content"] if len(messages) == 2 else ""), messages[-1]["content"]


def from_trl(row: dict, where: str = "") -> PreferencePair:
    """Inverse of `to_trl` and `to_trl_text`."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        head = prompt + " "  # to_trl_text moved the head's last space onto the answers
        system, sep, question = head.removeprefix(TEXT_SYSTEM).partition(TEXT_QUESTION)
        if not (sep and head.startswith(TEXT_SYSTEM) and question.endswith(TEXT_ANSWER)):
            raise InputError('field "prompt" is text but not "### System: ... Question: ...\\n ### Answer:"')
        question = question[:-len(TEXT_ANSWER)]
        chosen, rejected = _one_assistant(row.get("chosen"), "chosen"), _one_assistant(row.get("rejected"), "rejected")
        if not (isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)):
            raise InputError('a text "prompt" needs text "chosen" and "rejected"')
        return PreferencePair(system, question, chosen.removeprefix(" "), rejected.removeprefix(" "), "unknown",
                              source=where)
    system, question = _system_and_question(prompt, "prompt")
    return PreferencePair(system, question, _one_assistant(row.get("chosen"), "chosen"),
                          _one_assistant(row.get("rejected"), "rejected"), _kind(row), _margin(row), where)


def from_openai(row: dict, where: str = "") -> PreferencePair:
    problems = openai_problems(row)
    if problems:
        raise InputError(problems[0])
    system, question = _system_and_question(row["input"]["messages"], "input.messages")
    return PreferencePair(system, question, row["preferred_output"][0]["content"],
                          row["non_preferred_output"][0]["content"], "unknown", source=where)


def _kind(row: dict) -> str:
    return row["kind"] if row.get("kind") in KINDS else "unknown"


def _margin(row: dict) -> float | None:
    m = row.get("margin")
    return m if isinstance(m, (int, float)) and not isinstance(m, bool) else None


def openai_problems(row) -> list[str]:
    """What keeps one row from being a valid OpenAI preference fine-tuning example (empty: valid)."""
    if not isinstance(row, dict):
        return ["not a JSON object"]
    problems = [f'unknown field "{k}"' for k in row if k not in OPENAI_KEYS]
    problems += [f'field "{k}" is missing' for k in sorted(OPENAI_KEYS) if k not in row]
    if problems:
        return problems
    data = row["input"]
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list) or not data["messages"]:
        return ['field "input.messages" must be a non-empty list']
    problems += [f'unknown field "input.{k}"' for k in data if k not in OPENAI_INPUT_KEYS]
    messages = data["messages"]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in OPENAI_INPUT_ROLES:
            problems.append(f'field "input.messages[{i}].role" must be one of {", ".join(sorted(OPENAI_INPUT_ROLES))}')
        elif not isinstance(m.get("content"), str) or not m["content"]:
            problems.append(f'field "input.messages[{i}].content" must be non-empty text')
    if not problems and messages[-1]["role"] != "user":
        problems.append('field "input.messages" must end with a user message')
    for name in ("preferred_output", "non_preferred_output"):
        out = row[name]
        if not (isinstance(out, list) and len(out) == 1 and isinstance(out[0], dict)
                and out[0].get("role") == "assistant"):
            problems.append(f'field "{name}" must be a list of exactly one assistant message')
        elif not isinstance(out[0].get("content"), str) or not out[0]["content"].strip():
            problems.append(f'field "{name}[0].content" must be non-empty text')
    if not problems and row["preferred_output"][0]["content"] == row["non_preferred_output"][0]["content"]:
        problems.append("the preferred and non-preferred outputs are the same text")
    return problems


def validate_openai_file(path: str | Path) -> list[str]:
    """Problems against OpenAI's preference fine-tuning format, one "<file>: line N: ..." per bad line."""
    problems = []
    for number, row in json_lines(Path(path)):
        problems += [f"{path}: line {number}: {p}" for p in openai_problems(row)]
    return problems


def convert(paths, fmt: str, **options) -> tuple[list[dict], PairReport]:
    """Pairs -> rows in `fmt` ("trl", "trl_text" or "openai"), duplicates already dropped."""
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    pairs, report = load_preferences(paths, **options)
    write = {"trl": to_trl, "trl_text": to_trl_text, "openai": to_openai}[fmt]
    return [write(p) for p in pairs], report

