"""Loaders for the two inputs of a self-play run: patient cognitive models and behaviour principles.

Every problem is reported as one `InputError` line naming the file, the entry/row/group and the
field, so a user can fix a hand-written file without reading a traceback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mentalarena.errors import InputError
from mentalarena.store.inputs import csv_rows, json_type as _json_type, parse_json as _parse_json, read_text

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
DEFAULT_PATIENTS_FILE = DATA_DIR / "sample_patients.json"
DEFAULT_PRINCIPLES_FILE = DATA_DIR / "sample_principles.csv"

# Fields the prompts and the decoder read; each must be a non-empty string.
REQUIRED_TEXT_FIELDS = (
    "name", "id", "history", "intermediate_belief", "intermediate_belief_depression",
    "coping_strategies", "situation", "auto_thought", "behavior",
)
# 16 of the 106 real profiles (ids 26-1 to 34-1) leave this one empty, so it must be a string but
# may be blank.
MAY_BE_EMPTY = frozenset({"intermediate_belief_depression"})
# Optional string lists; the belief lists come in two spellings in the real file (one profile uses
# the `_current` suffix), both accepted and kept as given.
OPTIONAL_LIST_FIELDS = (
    "type",
    "helpless_belief", "unlovable_belief", "worthless_belief",
    "helpless_belief_current", "unlovable_belief_current", "worthless_belief_current",
)

CSV_GROUP_COLUMN = "CreatorID"
CSV_TEXT_COLUMN = "Principles"


# ---------------------------------------------------------------- shared

def one_line(text: str, limit: int = 60) -> str:
    """Squash whitespace so user-provided names cannot break the one-line message."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# ---------------------------------------------------------------- patients

def _entry_label(index: int, entry: Any) -> str:
    """`entry 3 (id "1-4", Alex)`; the index counts from 0, like positions in a JSON array."""
    if not isinstance(entry, dict):
        return f"entry {index}"
    parts = []
    raw_id = entry.get("id")
    if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and str(raw_id).strip():
        parts.append(f'id "{one_line(str(raw_id))}"')
    name = entry.get("name")
    if isinstance(name, str) and name.strip():
        parts.append(one_line(name))
    return f"entry {index} ({', '.join(parts)})" if parts else f"entry {index}"


def _check_text_field(entry: dict, field: str) -> str | None:
    """The problem with one required text field, or None."""
    value = entry.get(field)
    if field == "id" and isinstance(value, int) and not isinstance(value, bool):
        return None  # numeric ids in user files are converted to strings
    if field in MAY_BE_EMPTY and isinstance(value, str):
        return None
    if value is None or (isinstance(value, str) and not value.strip()):
        return "is missing or empty"
    if not isinstance(value, str):
        expected = "a string or an integer" if field == "id" else "a string"
        return f"must be {expected}, got {_json_type(value)}"
    return None


def _check_string_list(value: Any, allow_empty: bool) -> str | None:
    if not isinstance(value, list):
        return f"must be a list of strings, got {_json_type(value)}"
    if not value and not allow_empty:
        return "is an empty list"
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            return f"item {i} must be a non-empty string, got {_json_type(item)} {one_line(json.dumps(item), 30)}"
    return None


def _check_emotion(entry: dict) -> str | None:
    value = entry.get("emotion")
    if value is None:
        return "is missing"
    if isinstance(value, str):
        return None if value.strip() else "is empty"
    return _check_string_list(value, allow_empty=False)


def _patient_problem(entry: dict) -> tuple[str, str] | None:
    """(field, problem) for the first invalid field of one entry, or None."""
    for field in REQUIRED_TEXT_FIELDS:
        problem = _check_text_field(entry, field)
        if problem:
            return field, problem
    problem = _check_emotion(entry)
    if problem:
        return "emotion", problem
    for field in OPTIONAL_LIST_FIELDS:
        if field in entry:
            problem = _check_string_list(entry[field], allow_empty=True)
            if problem:
                return field, problem
    return None


def load_patients(path: str | Path) -> list[dict]:
    """Read and validate a Patient-Ψ-CM JSON list; ids come back as strings and must be unique.

    Entries are returned as given (shallow copies), apart from a numeric id turned into a string.
    """
    path = Path(path)
    data = _parse_json(path, read_text(path))
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of patient objects, got {_json_type(data)}")
    if not data:
        raise InputError(f"{path}: the list of patients is empty")
    patients: list[dict] = []
    first_index_of_id: dict[str, int] = {}
    for index, entry in enumerate(data):
        label = _entry_label(index, entry)
        if not isinstance(entry, dict):
            raise InputError(f"{path}: {label}: expected a JSON object, got {_json_type(entry)}")
        problem = _patient_problem(entry)
        if problem:
            field, text = problem
            raise InputError(f'{path}: {label}: field "{field}" {text}')
        patient = dict(entry, id=str(entry["id"]))
        if patient["id"] in first_index_of_id:
            raise InputError(
                f'{path}: {label}: field "id" duplicates entry {first_index_of_id[patient["id"]]}'
            )
        first_index_of_id[patient["id"]] = index
        patients.append(patient)
    return patients


# ---------------------------------------------------------------- principles

def _looks_like_json(text: str) -> bool:
    return text.lstrip().startswith(("{", "["))


def _find_column(header: list[str], wanted: str) -> int | None:
    # Case and surrounding spaces are forgiven: hand-edited headers vary, the meaning does not.
    for i, name in enumerate(header):
        if name.strip().lower() == wanted.lower():
            return i
    return None


def _principles_from_csv(path: Path, text: str) -> dict[str, list[str]]:
    header, rows = csv_rows(path, text)
    if header is None:
        raise InputError(f"{path}: the file is empty (expected header {CSV_GROUP_COLUMN},{CSV_TEXT_COLUMN})")
    columns = {}
    for wanted in (CSV_GROUP_COLUMN, CSV_TEXT_COLUMN):
        columns[wanted] = _find_column(header, wanted)
        if columns[wanted] is None:
            found = ", ".join(one_line(h, 30) for h in header) or "nothing"
            raise InputError(f'{path}: line 1 (header): column "{wanted}" is missing (found: {found})')
    groups: dict[str, list[str]] = {}
    for start, row in rows:  # a quoted principle may span lines: `start` is where its row starts
        cells = {name: row[i] if i < len(row) else "" for name, i in columns.items()}
        group = cells[CSV_GROUP_COLUMN].strip()
        if not group:
            raise InputError(f'{path}: line {start}: field "{CSV_GROUP_COLUMN}" is missing or empty')
        if not cells[CSV_TEXT_COLUMN].strip():
            raise InputError(
                f'{path}: line {start} ({CSV_GROUP_COLUMN} {one_line(group, 30)}): '
                f'field "{CSV_TEXT_COLUMN}" is missing or empty'
            )
        groups.setdefault(group, []).append(cells[CSV_TEXT_COLUMN])
    if not groups:
        raise InputError(f"{path}: no principles found (only a header)")
    return groups


def _principles_from_json(path: Path, text: str) -> dict[str, list[str]]:
    data = _parse_json(path, text)
    if not isinstance(data, dict):
        raise InputError(
            f"{path}: expected a JSON object mapping group id to a list of principles, got {_json_type(data)}"
        )
    if not data:
        raise InputError(f"{path}: no principle groups found (empty object)")
    for group, principles in data.items():
        problem = _check_string_list(principles, allow_empty=False)
        if problem:
            raise InputError(f'{path}: group "{one_line(group, 30)}": field "principles" {problem}')
    return {group: list(principles) for group, principles in data.items()}


def load_principles(path: str | Path) -> dict[str, list[str]]:
    """Read behaviour principles as {group id: [principle, ...]}, groups in first-appearance order.

    Accepts the roleplay-doh CSV (`CreatorID,Principles`, rows grouped by CreatorID, row order kept
    inside a group) or the grouped JSON object the reference code used. The form comes from the
    extension (.csv/.json), else from the content. Principle texts are kept exactly as written.
    """
    path = Path(path)
    text = read_text(path)
    suffix = path.suffix.lower()
    is_json = suffix == ".json" or (suffix != ".csv" and _looks_like_json(text))
    return _principles_from_json(path, text) if is_json else _principles_from_csv(path, text)
