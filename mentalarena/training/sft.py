"""Self-play records -> supervised fine-tuning pairs (METHOD.md §5), in OpenAI chat or plain-text form.

One record gives up to three pairs, all with the same system text: the diagnosis, the treatment and,
when `medicine` passes the reference's skip rule, the medication. The questions are the reference's
three sentences by default (`prompts/sft_*.txt`, slot `{symptom}`); `--sft_questions project` asks the
project's rewording (`prompts/sft_*_project.txt`). Answers are the record's fields as the reference
joins them. Both fine-tuning scripts and the preference pairs ask through `Questions`, so their data agree.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from mentalarena.errors import InputError, check_choice
from mentalarena.store.files import atomic_file
from mentalarena.store.inputs import json_lines
from mentalarena.store.jsonl import dumps_line
from mentalarena.prompts import Prompts

RECORD_FIELDS = ("symptom", "illness", "treatment", "explain_t", "medicine", "explain_m")
QUESTION_KINDS = ("diagnosis", "treatment", "medication")
# --sft_questions: reference (the reference's own three questions; the paper's numbers were trained on
# them, and its diagnosis question echoes MedQA's "most likely diagnosis" stems) | project (reworded)
WORDINGS = {"reference": {kind: f"sft_{kind}" for kind in QUESTION_KINDS},
            "project": {kind: f"sft_{kind}_project" for kind in QUESTION_KINDS}}
DEFAULT_WORDING = "reference"
SYSTEM_PROMPT = "sft_system"
# The reference drops the medication pair when `medicine` contains any of these: case-sensitive
# substrings, so "Not mentioned" and "Nothing" are skipped but "not prescribed" is kept.
MEDICINE_STOP_WORDS = ("None", "N/A", "Not", "Explanation")
FORMATS = ("openai", "text")
TEXT_SYSTEM, TEXT_QUESTION, TEXT_ANSWER = "### System: ", " Question: ", "\n ### Answer: "


@dataclass(frozen=True)
class SFTPair:
    system: str
    question: str
    answer: str
    kind: str  # diagnosis | treatment | medication, or "unknown" for a row read back from a file


@dataclass
class ConvertReport:
    """What a conversion read, made and dropped; printed by the scripts and kept with their outputs."""
    files: list[str]
    records: int = 0  # self-play records read, the bad ones included
    converted_rows: int = 0  # rows that were already in OpenAI or text form
    pairs: int = 0  # before duplicate removal
    skipped_medicine: int = 0  # records whose medicine failed the skip rule (no medication pair)
    duplicates: int = 0
    rows: int = 0  # after duplicate removal
    kinds: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # bad records, "<file>: line N: ..."

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.records} records, {self.converted_rows} converted rows -> {self.pairs} pairs "
                f"({', '.join(f'{k} {v}' for k, v in self.kinds.items()) or 'none'}); medication skipped "
                f"for {self.skipped_medicine}; {self.duplicates} duplicates dropped; {self.rows} rows; "
                f"{len(self.problems)} bad records")


def medicine_usable(medicine: str) -> bool:
    """The reference's rule for keeping the medication pair."""
    return len(medicine) > 0 and not any(word in medicine for word in MEDICINE_STOP_WORDS)


def check_record(record: dict) -> None:
    """Every field the conversion reads is present and is text; otherwise one line naming the field."""
    for name in RECORD_FIELDS:
        if name not in record:
            raise InputError(f'field "{name}" is missing')
        if not isinstance(record[name], str):
            raise InputError(f'field "{name}" is {type(record[name]).__name__}, not text')


@dataclass(frozen=True)
class Questions:
    """How a record's symptom is asked about: the one home of the fine-tuning questions, which the SFT
    pairs and the preference pairs share. `glue` drops the newline between the symptom and the
    treatment question, as the reference does (by accident: its other two have one)."""
    prompts: Prompts = field(default_factory=Prompts)
    wording: str = DEFAULT_WORDING
    glue: bool = False

    def __post_init__(self):
        check_choice("sft_questions", self.wording, tuple(WORDINGS))

    def check(self) -> None:
        """Every template renders: a bad one fails here, before any record is read."""
        self.system()
        for kind in QUESTION_KINDS:
            self.ask(kind, "")

    def system(self) -> str:
        return self.prompts.render(SYSTEM_PROMPT)

    def ask(self, kind: str, symptom: str) -> str:
        """The question of one kind (diagnosis / treatment / medication) about `symptom`."""
        text = self.prompts.render(WORDINGS[self.wording][kind], symptom=symptom)
        if self.glue and kind == "treatment" and text.startswith(symptom + "\n"):
            text = symptom + text[len(symptom) + 1:]
        return text


def questions_of(questions: Questions | None = None, reference_glue: bool = False,
                 prompts: Prompts | None = None) -> Questions:
    """`questions` as given, else one from the older keyword arguments (the glue and a prompt folder)."""
    return questions or Questions(prompts or Prompts(), glue=reference_glue)


def record_pairs(record: dict, prompts: Prompts | None = None, reference_glue: bool = False,
                 questions: Questions | None = None) -> list[SFTPair]:
    """The two or three pairs of one record."""
    check_record(record)
    asked = questions_of(questions, reference_glue, prompts)
    system, symptom = asked.system(), record["symptom"]
    pairs = [SFTPair(system, asked.ask("diagnosis", symptom), record["illness"], "diagnosis"),
             SFTPair(system, asked.ask("treatment", symptom), f"{record['treatment']}. {record['explain_t']}",
                     "treatment")]
    if medicine_usable(record["medicine"]):
        pairs.append(SFTPair(system, asked.ask("medication", symptom), f"{record['medicine']}. {record['explain_m']}",
                             "medication"))
    return pairs


def to_openai(pair: SFTPair) -> dict:
    return {"messages": [{"role": "system", "content": pair.system},
                         {"role": "user", "content": pair.question},
                         {"role": "assistant", "content": pair.answer}]}


def to_text(pair: SFTPair) -> dict:
    """The reference's single-field format for open models (SFT on the field `text`)."""
    return {"text": f"{TEXT_SYSTEM}{pair.system}{TEXT_QUESTION}{pair.question}{TEXT_ANSWER}{pair.answer}"}


def parse_text(text: str) -> SFTPair:
    """Inverse of `to_text`; the first answer marker ends the question."""
    head, marker, answer = text.partition(TEXT_ANSWER) if isinstance(text, str) else ("", "", "")
    system, sep, question = head.removeprefix(TEXT_SYSTEM).partition(TEXT_QUESTION)
    if not (marker and sep and head.startswith(TEXT_SYSTEM)):
        raise InputError('field "text" is not of the form "### System: ... Question: ...\\n ### Answer: ..."')
    return SFTPair(system, question, answer, "unknown")


def from_openai(row: dict) -> SFTPair:
    """Inverse of `to_openai`: exactly a system, a user and an assistant message, in that order."""
    messages = row.get("messages")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages] if isinstance(messages, list) else []
    if roles != ["system", "user", "assistant"] or not all(isinstance(m.get("content"), str) for m in messages):
        raise InputError('field "messages" must be a system, a user and an assistant message with text content')
    system, user, assistant = (m["content"] for m in messages)
    return SFTPair(system, user, assistant, "unknown")


def row_kind(row: dict) -> str:
    """"record" (a self-play record, even an incomplete one), "openai" or "text"."""
    if not isinstance(row, dict):
        raise InputError(f"a JSON {type(row).__name__}, not an object")
    if any(name in row for name in RECORD_FIELDS):
        return "record"
    if "messages" in row:
        return "openai"
    if "text" in row:
        return "text"
    raise InputError('neither a self-play record ("symptom", "illness", ...) nor a converted row '
                     '("messages" or "text")')


def load_pairs(paths: Sequence[str | Path] | str | Path, reference_glue: bool = False,
               prompts: Prompts | None = None, questions: Questions | None = None
               ) -> tuple[list[SFTPair], ConvertReport]:
    """Pairs from JSONL files of self-play records or already converted rows, detected row by row.
    A record with a missing field is reported and skipped; anything else wrong stops with file and line."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    asked = questions_of(questions, reference_glue, prompts)
    asked.check()  # a bad template fails here, not as a per-record problem
    report = ConvertReport(files=[str(p) for p in paths])
    pairs: list[SFTPair] = []
    for path in paths:
        for number, row in json_lines(Path(path)):
            where = f"{path}: line {number}"
            try:
                kind = row_kind(row)
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
            if kind == "record":
                report.records += 1
                try:
                    check_record(row)
                except InputError as exc:
                    report.problems.append(f"{where}: {exc}")
                    continue
                pairs.extend(record_pairs(row, questions=asked))
                report.skipped_medicine += not medicine_usable(row["medicine"])
                continue
            report.converted_rows += 1
            try:
                pairs.append(from_openai(row) if kind == "openai" else parse_text(row["text"]))
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
    report.pairs = len(pairs)
    report.kinds = dict(Counter(p.kind for p in pairs))
    return pairs, report


def dedup(rows: list[dict]) -> list[dict]:
    """Exact duplicates removed, first occurrences kept in order."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = json.dumps(row, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def convert(paths: Sequence[str | Path] | str | Path, fmt: str, reference_glue: bool = False,
            prompts: Prompts | None = None, questions: Questions | None = None) -> tuple[list[dict], ConvertReport]:
    """Pairs -> rows in `fmt` ("openai" or "text") -> exact duplicates dropped."""
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    pairs, report = load_pairs(paths, questions=questions_of(questions, reference_glue, prompts))
    to_row = to_openai if fmt == "openai" else to_text
    rows = dedup([to_row(p) for p in pairs])
    report.rows, report.duplicates = len(rows), len(pairs) - len(rows)
    return rows, report


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """Write the whole file fresh (atomically: mentalarena/store/files.py): a re-run replaces, never appends."""
    with atomic_file(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(dumps_line(row) + "\n")  # U+2028/2029/0085 escaped: no reader splits a row
