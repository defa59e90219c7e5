"""Loaders: the real reference files, the bundled samples, and one-line errors for bad files."""
import json
from pathlib import Path

import pytest

from mentalarena.selfplay.data import (
    DEFAULT_PATIENTS_FILE,
    DEFAULT_PRINCIPLES_FILE,
    load_patients,
    load_principles,
)
from mentalarena.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
REAL_PATIENTS = SHARED_DATA / "patient_psi_cm" / "Patient-Psi-CM_dataset.json"
REAL_FILTERED = SHARED_DATA / "roleplay_doh" / "roleplay-doh_filtered.csv"
REAL_PRINCIPLES = SHARED_DATA / "roleplay_doh" / "roleplay-doh_principles.csv"

PSI_CM_KEYS = {
    "name", "id", "type", "history", "helpless_belief", "unlovable_belief", "worthless_belief",
    "intermediate_belief", "intermediate_belief_depression", "coping_strategies", "situation",
    "auto_thought", "emotion", "behavior",
}


def need_real(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not available: {path} (expected ../shared/data next to the repo)")
    return path


# ---------------------------------------------------------------- real files

def test_real_patients_load():
    patients = load_patients(need_real(REAL_PATIENTS))
    assert len(patients) == 106
    ids = [p["id"] for p in patients]
    assert len(set(ids)) == 106
    assert all(isinstance(i, str) for i in ids)


def test_real_patient_with_current_suffix_loads_unchanged():
    patients = load_patients(need_real(REAL_PATIENTS))
    current = [p for p in patients if "helpless_belief_current" in p]
    assert [p["id"] for p in current] == ["1-1"]
    assert current[0]["helpless_belief_current"] == json.loads(REAL_PATIENTS.read_text(encoding="utf-8"))[0]["helpless_belief_current"]


def test_real_patients_keep_empty_depression_beliefs():
    patients = load_patients(need_real(REAL_PATIENTS))
    assert sum(1 for p in patients if not p["intermediate_belief_depression"]) == 16


@pytest.mark.parametrize("path, n_groups, n_principles", [
    (REAL_FILTERED, 25, 112),
    (REAL_PRINCIPLES, 25, 121),
])
def test_real_principles_load(path, n_groups, n_principles):
    groups = load_principles(need_real(path))
    assert len(groups) == n_groups
    assert sum(len(v) for v in groups.values()) == n_principles
    assert list(groups)[:3] == ["0", "1", "2"]


def test_grouped_json_round_trips(tmp_path):
    groups = load_principles(need_real(REAL_FILTERED))
    target = tmp_path / "roleplay.json"
    target.write_text(json.dumps(groups, indent=4), encoding="utf-8")
    loaded = load_principles(target)
    assert loaded == groups
    assert list(loaded) == list(groups)


# ---------------------------------------------------------------- bundled samples

def test_sample_patients_load():
    patients = load_patients(DEFAULT_PATIENTS_FILE)
    assert [p["id"] for p in patients] == [f"s-{i}" for i in range(1, 9)]
    assert all(set(p) == PSI_CM_KEYS for p in patients)
    assert all(isinstance(p["emotion"], list) and p["emotion"] for p in patients)


def test_sample_principles_load():
    groups = load_principles(DEFAULT_PRINCIPLES_FILE)
    assert list(groups) == [str(i) for i in range(8)]
    assert all(1 <= len(v) <= 4 for v in groups.values())
    assert sum(len(v) for v in groups.values()) == 20


def test_default_paths_point_into_the_repo_data_folder():
    assert DEFAULT_PATIENTS_FILE.parent == REPO_ROOT / "data"
    assert DEFAULT_PRINCIPLES_FILE.parent == REPO_ROOT / "data"


# ---------------------------------------------------------------- accepted variations

def patient(**overrides):
    entry = {
        "name": "Ada", "id": "t-1", "type": ["plain"], "history": "Some history.",
        "helpless_belief": ["I am helpless."], "unlovable_belief": [], "worthless_belief": [],
        "intermediate_belief": "A belief.", "intermediate_belief_depression": "A darker belief.",
        "coping_strategies": "Avoids people.", "situation": "A party.", "auto_thought": "They hate me.",
        "emotion": ["sad, down, lonely, unhappy"], "behavior": "Stayed home.",
    }
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not ...}  # `...` drops a key


def write_json(tmp_path, data, name="patients.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_text(tmp_path, text, name):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_numeric_id_becomes_string(tmp_path):
    loaded = load_patients(write_json(tmp_path, [patient(id=7)]))
    assert loaded[0]["id"] == "7"


def test_plain_string_emotion_is_kept(tmp_path):
    loaded = load_patients(write_json(tmp_path, [patient(emotion="anxious")]))
    assert loaded[0]["emotion"] == "anxious"


def test_both_belief_spellings_and_empty_depression_beliefs_load(tmp_path):
    current = patient(id="t-2", helpless_belief=..., helpless_belief_current=["I am trapped."],
                      intermediate_belief_depression="")
    loaded = load_patients(write_json(tmp_path, [patient(), current]))
    assert loaded[1]["helpless_belief_current"] == ["I am trapped."]
    assert "helpless_belief" not in loaded[1]


def test_patient_without_optional_lists_loads(tmp_path):
    entry = patient(type=..., helpless_belief=..., unlovable_belief=..., worthless_belief=...)
    assert load_patients(write_json(tmp_path, [entry])) == [entry]


def test_csv_groups_keep_first_appearance_and_row_order(tmp_path):
    path = write_text(tmp_path, "CreatorID,Principles\n1,a\n0,b\n1,c\n\n2,\"d, with comma\"\n", "p.csv")
    groups = load_principles(path)
    assert groups == {"1": ["a", "c"], "0": ["b"], "2": ["d, with comma"]}
    assert list(groups) == ["1", "0", "2"]


def test_csv_header_with_bom_extra_column_and_other_order(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("\ufeffPrinciples,Extra,CreatorID\nbe brief,x,3\n", encoding="utf-8")
    assert load_principles(path) == {"3": ["be brief"]}


@pytest.mark.parametrize("text, expected", [
    ("CreatorID,Principles\n0,hesitate\n", {"0": ["hesitate"]}),
    ('{"g": ["hesitate"]}', {"g": ["hesitate"]}),
])
def test_form_is_sniffed_without_known_extension(tmp_path, text, expected):
    assert load_principles(write_text(tmp_path, text, "principles.txt")) == expected


# ---------------------------------------------------------------- one-line errors

def assert_error(call, path, *parts):
    with pytest.raises(InputError) as info:
        call(path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert path.name in message, message
    for part in parts:
        assert part in message, message
    return message


def test_missing_patients_file(tmp_path):
    assert_error(load_patients, tmp_path / "nope.json", "not found")


def test_invalid_json_gives_line_and_column(tmp_path):
    path = write_text(tmp_path, '[\n  {"name": "Ada",}\n]', "patients.json")
    assert_error(load_patients, path, "invalid JSON", "line 2, column")


@pytest.mark.parametrize("data, parts", [
    ({"name": "Ada"}, ("expected a JSON list", "object")),
    ([], ("empty",)),
    (["Ada"], ("entry 0", "JSON object")),
])
def test_patients_wrong_shape(tmp_path, data, parts):
    assert_error(load_patients, write_json(tmp_path, data), *parts)


@pytest.mark.parametrize("bad, parts", [
    (patient(coping_strategies=...), ('field "coping_strategies"', "missing or empty")),
    (patient(situation="   "), ('field "situation"', "missing or empty")),
    (patient(intermediate_belief_depression=...), ('field "intermediate_belief_depression"', "missing")),
    (patient(history=42), ('field "history"', "must be a string")),
    (patient(id=1.5), ('field "id"', "string or an integer")),
    (patient(emotion=5), ('field "emotion"', "list of strings")),
    (patient(emotion=[]), ('field "emotion"', "empty")),
    (patient(emotion=["sad", 3]), ('field "emotion"', "item 1")),
    (patient(emotion=...), ('field "emotion"', "missing")),
    (patient(type="plain"), ('field "type"', "list of strings")),
    (patient(worthless_belief_current=[None]), ('field "worthless_belief_current"', "item 0")),
])
def test_bad_patient_field_names_file_entry_and_field(tmp_path, bad, parts):
    bad = {**bad, "name": "Bea"}
    if bad["id"] == "t-1":  # keep ids unique so that only the field under test is wrong
        bad["id"] = "t-2"
    message = assert_error(load_patients, write_json(tmp_path, [patient(), bad]), "entry 1", "Bea", *parts)
    if isinstance(bad["id"], str):
        assert 'id "t-2"' in message


def test_multiline_name_stays_on_one_line(tmp_path):
    path = write_json(tmp_path, [patient(name="Ada\nLovelace", behavior="")])
    assert_error(load_patients, path, "entry 0", "Ada Lovelace", 'field "behavior"')


@pytest.mark.parametrize("second_id", ["t-1", 1])
def test_duplicate_id_names_both_entries(tmp_path, second_id):
    first = patient(id=1) if second_id == 1 else patient()
    entries = [first, patient(id="t-9", name="Cy"), patient(id=second_id, name="Bea")]
    assert_error(load_patients, write_json(tmp_path, entries), "entry 2", "entry 0", 'field "id"', "duplicate")


def test_missing_principles_file(tmp_path):
    assert_error(load_principles, tmp_path / "nope.csv", "not found")


def test_csv_missing_column(tmp_path):
    path = write_text(tmp_path, "CreatorID,Text\n0,hesitate\n", "principles.csv")
    assert_error(load_principles, path, "line 1", 'column "Principles"', "CreatorID, Text")


def test_csv_empty_principle_names_its_line(tmp_path):
    # The quoted principle spans lines 3-4, so the empty one starts on line 5.
    text = 'CreatorID,Principles\n0,hesitate\n1,"speak\nslowly"\n1,""\n'
    path = write_text(tmp_path, text, "principles.csv")
    assert_error(load_principles, path, "line 5", "CreatorID 1", 'field "Principles"')


def test_csv_short_row_and_empty_group(tmp_path):
    assert_error(load_principles, write_text(tmp_path, "CreatorID,Principles\n0\n", "a.csv"),
                 "line 2", 'field "Principles"')
    assert_error(load_principles, write_text(tmp_path, "CreatorID,Principles\n ,x\n", "b.csv"),
                 "line 2", 'field "CreatorID"')


@pytest.mark.parametrize("text, parts", [
    ("CreatorID,Principles\n", ("no principles",)),
    ("", ("empty",)),
])
def test_csv_without_groups(tmp_path, text, parts):
    assert_error(load_principles, write_text(tmp_path, text, "principles.csv"), *parts)


@pytest.mark.parametrize("data, parts", [
    ({"0": "hesitate"}, ('group "0"', 'field "principles"', "list of strings")),
    ({"0": ["ok"], "1": []}, ('group "1"', 'field "principles"', "empty")),
    ({"0": ["ok", ""]}, ('group "0"', "item 1")),
    (["hesitate"], ("JSON object", "list")),
    ({}, ("no principle groups",)),
])
def test_bad_grouped_json(tmp_path, data, parts):
    assert_error(load_principles, write_json(tmp_path, data, "roleplay.json"), *parts)


def test_principles_invalid_json(tmp_path):
    path = write_text(tmp_path, '{"0": ["a",]}', "roleplay.json")
    assert_error(load_principles, path, "invalid JSON", "line 1, column")
