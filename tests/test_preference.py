"""Preference pairs from self-play records (mentalarena/training/preference.py): hand-made records with the exact
pairs they must give, the prompts shared with SFT, diagnosis attribution through a scripted encoder (no
model is loaded here), the reference's records (no scores: no pairs), converted rows read back, and bad input."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from conftest import shared_data

from mentalarena.training import sft
from mentalarena.errors import InputError
from mentalarena.training.preference import (PairReport, PreferencePair, convert, load_preferences, named_doctor,
                                    openai_problems, to_openai, to_trl, to_trl_text, validate_openai_file)
from mentalarena.training.sft import SFTPair, write_rows

GPT, LLAMA = "gpt_iter1_output.jsonl", "llama3_iter4_output_1.jsonl"
SYSTEM = "You are a psychiatric expert."
SYMPTOM = "Feels low.\nSleeps badly."
MISSING = object()  # a try without a "score" field


def question(kind: str, symptom: str = SYMPTOM) -> str:
    """The question texts, written out from prompts/sft_*.txt (not through the module)."""
    return symptom + "\n" + {
        "diagnosis": "What is the most likely diagnosis in this patient?",
        "treatment": "What is the most appropriate treatment for the patient?",
        "medication": "What is the proper medication for this patient?",
    }[kind]


def search(*tries) -> dict:
    """A try-and-reflect search as arena_med.py writes it; each try is (candidate, score), MISSING leaves `score` out."""
    out = []
    for candidate, score in tries:
        t = {"candidate": candidate, "patient_state": "state", "judge_reply": "reply"}
        if score is not MISSING:
            t["score"] = score
        out.append(t)
    return {"best": tries[0][0] if tries else "", "best_score": 0, "fallback": False, "tries": out}


def record(symptom=SYMPTOM, treatment=None, medicine=None, diagnoses=None, illness="", **extra) -> dict:
    row = {"symptom": symptom, "illness": illness, **extra}
    if treatment is not None:
        row["treatment_search"] = search(*treatment)
    if medicine is not None:
        row["medicine_search"] = search(*medicine)
    if diagnoses is not None:
        row["diagnoses"] = diagnoses
    return row


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


class NoEncoder:
    """An encoder that must not be used."""

    def similarity(self, a, b):
        raise AssertionError(f"the encoder was called ({a!r}, {b!r})")


class ScriptedEncoder:
    """similarity(illness, diagnosis) from a table; records every call."""

    def __init__(self, table: dict[tuple[str, str], float]):
        self.table, self.calls = table, []

    def similarity(self, a, b):
        self.calls.append((a, b))
        return self.table[(a, b)]


def load(tmp_path, rows, **options):
    path = write_lines(tmp_path / "records.jsonl", rows)
    options.setdefault("encoder", NoEncoder())
    pairs, report = load_preferences(path, **options)
    return path, pairs, report


def triples(pairs):
    return [(p.chosen, p.rejected, p.margin) for p in pairs]


# ------------------------------------------------------------------ treatment / medication
def test_best_against_worst_gives_the_exact_pairs(tmp_path):
    rows = [record(treatment=[("CBT", 4), ("Exercise", 8), ("Rest", 3), ("Sleep hygiene", 6)],
                   medicine=[("Sertraline", 7), ("Nothing", 2), ("Fluoxetine", 5)])]
    path, pairs, report = load(tmp_path, rows)
    where = f"{path}: line 1"
    assert pairs == [PreferencePair(SYSTEM, question("treatment"), "Exercise", "Rest", "treatment", 5, where),
                     PreferencePair(SYSTEM, question("medication"), "Sertraline", "Nothing", "medication", 5, where)]
    assert (report.records, report.searches, report.candidates, report.unscored, report.pairs) == (1, 2, 7, 0, 2)
    assert report.kinds == {"treatment": 1, "medication": 1}
    assert report.score_gaps == {"5": 2}
    assert (report.dropped_margin, report.dropped_empty, report.dropped_identical, report.duplicates) == (0, 0, 0, 0)


@pytest.mark.parametrize("scores, min_margin, kept", [
    ((5, 3), 2, True),      # gap exactly at the default margin
    ((5, 4), 2, False),     # one below
    ((3, 5), 2, True),      # the best try need not come first
    ((7, 4), 3, True),
    ((7, 5), 3, False),
    ((8, 5), 2.5, True),
    ((7.5, 5), 2.5, True),
    ((7, 5), 2.5, False),
    ((10, 1), 9, True),     # both ends of the scale are scores
    ((6, 6), 2, False),     # all equal: best and worst are one try, gap 0
])
def test_the_margin_keeps_gaps_at_or_above_it(tmp_path, scores, min_margin, kept):
    _, pairs, report = load(tmp_path, [record(treatment=[("A", scores[0]), ("B", scores[1])])], min_margin=min_margin)
    high, low = ("A", "B") if scores[0] >= scores[1] else ("B", "A")
    gap = abs(scores[0] - scores[1])
    assert triples(pairs) == ([(high, low, gap)] if kept else [])
    assert report.dropped_margin == (0 if kept else 1)
    assert report.min_margin == min_margin and report.single_candidate == 0


def test_ties_for_best_and_worst_take_the_first_of_equals(tmp_path):
    _, pairs, _ = load(tmp_path, [record(treatment=[("Mid", 5), ("First best", 9), ("First worst", 2),
                                                    ("Second best", 9), ("Second worst", 2)])])
    assert triples(pairs) == [("First best", "First worst", 7)]


def test_all_pairs_gives_every_pair_above_the_margin_in_try_order(tmp_path):
    tries = [("A", 5), ("B", 9), ("C", 2), ("D", 6), ("E", 9), ("F", 0)]
    _, pairs, report = load(tmp_path, [record(treatment=tries)], all_pairs=True)
    # by the chosen try's position, then the rejected one's; D-A (gap 1) is below the margin, B-E tie,
    # F has no score
    assert triples(pairs) == [("A", "C", 3),
                              ("B", "A", 4), ("B", "C", 7), ("B", "D", 3),
                              ("D", "C", 4),
                              ("E", "A", 4), ("E", "C", 7), ("E", "D", 3)]
    assert {p.kind for p in pairs} == {"treatment"} and {p.question for p in pairs} == {question("treatment")}
    assert (report.dropped_margin, report.candidates, report.unscored, report.pairs) == (1, 5, 1, 8)
    assert report.all_pairs is True
    assert report.score_gaps == {"3": 3, "4": 3, "7": 2}
    # the default keeps only best against worst (first of equals): B against C
    _, default, _ = load(tmp_path, [record(treatment=tries)])
    assert triples(default) == [("B", "C", 7)]


def test_all_pairs_with_a_higher_margin(tmp_path):
    _, pairs, report = load(tmp_path, [record(medicine=[("A", 5), ("B", 9), ("C", 2)])], all_pairs=True, min_margin=4)
    assert triples(pairs) == [("B", "A", 4), ("B", "C", 7)]
    assert report.dropped_margin == 1 and report.kinds == {"medication": 2}


def test_tries_without_a_score_on_the_scale_take_part_in_no_pair(tmp_path):
    tries = [("Zero", 0), ("Eleven", 11), ("Missing", MISSING), ("Null", None), ("Negative", -2),
             ("Good", 7), ("Fine", 5)]
    for all_pairs in (False, True):
        _, pairs, report = load(tmp_path, [record(treatment=tries)], all_pairs=all_pairs, min_margin=1)
        assert triples(pairs) == [("Good", "Fine", 2)]
        assert (report.candidates, report.unscored, report.searches_without_scores, report.single_candidate) \
            == (2, 5, 0, 0)
    # an unscored try is never the worst one either
    _, pairs, _ = load(tmp_path, [record(treatment=[("Good", 8), ("Zero", 0), ("Mid", 5)])])
    assert triples(pairs) == [("Good", "Mid", 3)]


@pytest.mark.parametrize("tries", [[("A", 0), ("B", 0), ("C", 0)], [("A", None), ("B", MISSING)], []])
def test_a_search_without_scores_gives_nothing(tmp_path, tries):
    _, pairs, report = load(tmp_path, [record(treatment=tries)], all_pairs=True)
    assert pairs == [] and report.why_none() == report.summary()
    assert (report.searches, report.searches_without_scores, report.single_candidate) == (1, 1, 1)
    assert (report.candidates, report.unscored, report.no_scores, report.dropped_margin) == (0, len(tries), 0, 0)


def test_a_single_scored_try_gives_nothing(tmp_path):
    _, pairs, report = load(tmp_path, [record(treatment=[("A", 0), ("B", 7), ("C", 12)], medicine=[("M", 3)])])
    assert pairs == []
    assert (report.searches, report.single_candidate, report.searches_without_scores) == (2, 2, 0)
    assert (report.candidates, report.unscored) == (2, 2)


def test_answers_are_stripped_and_empty_or_identical_ones_dropped(tmp_path):
    rows = [record(treatment=[("  Exercise daily.\n", 9), ("\tRest. ", 2)]),
            record(treatment=[("   ", 9), ("Rest", 2)]),
            record(treatment=[("Exercise", 9), ("", 2)]),
            record(treatment=[(" CBT", 9), ("CBT \n", 2)]),
            record(medicine=[("Sertraline", 9), ("Sertraline", 1)])]
    _, pairs, report = load(tmp_path, rows)
    assert triples(pairs) == [("Exercise daily.", "Rest.", 7)]
    assert (report.dropped_empty, report.dropped_identical, report.pairs) == (2, 2, 1)


# ------------------------------------------------------------------ prompts shared with SFT
SFT_RECORD = {"symptom": SYMPTOM, "illness": "Doctor 1 is right: major depressive disorder",
              "treatment": "CBT", "explain_t": "It helps.", "medicine": "Sertraline", "explain_m": "An SSRI."}


@pytest.mark.parametrize("glue", [False, True])
def test_the_prompt_is_exactly_the_sft_prompt_of_the_same_question(tmp_path, glue):
    row = {**SFT_RECORD, "diagnoses": ["Major depressive disorder", "Generalized anxiety disorder"],
           "treatment_search": search(("CBT", 8), ("Rest", 2)), "medicine_search": search(("Sertraline", 9), ("None", 1))}
    _, pairs, _ = load(tmp_path, [row], reference_glue=glue)
    expected = {p.kind: (p.system, p.question) for p in sft.record_pairs(SFT_RECORD, reference_glue=glue)}
    assert [p.kind for p in pairs] == ["diagnosis", "treatment", "medication"]
    assert {p.kind: (p.system, p.question) for p in pairs} == expected
    assert pairs[1].question == (question("treatment").replace("Sleeps badly.\n", "Sleeps badly.") if glue
                                 else question("treatment"))
    assert pairs[0].question == question("diagnosis") and pairs[2].question == question("medication")


# ------------------------------------------------------------------ diagnosis
DIAGNOSES = ["Major depressive disorder", "Generalized anxiety disorder"]


@pytest.mark.parametrize("illness, chosen", [
    ("Doctor 1's diagnosis of major depressive disorder is more accurate", 1),
    ("I agree with the second diagnosis: generalized anxiety disorder", 2),
    ("Dr. 2 is right", 2),
    ("doctor one got it", 1),
])
def test_a_diagnosis_named_in_the_illness_is_chosen_without_the_encoder(tmp_path, illness, chosen):
    path, pairs, report = load(tmp_path, [record(diagnoses=[f"  {DIAGNOSES[0]}\n", DIAGNOSES[1]], illness=illness)])
    first, second = DIAGNOSES if chosen == 1 else DIAGNOSES[::-1]
    assert pairs == [PreferencePair(SYSTEM, question("diagnosis"), first, second, "diagnosis", None,
                                    f"{path}: line 1")]
    assert (report.diagnosis_named, report.diagnosis_similarity, report.diagnosis_unattributed) == (1, 0, 0)
    assert report.score_gaps == {} and report.kinds == {"diagnosis": 1}


@pytest.mark.parametrize("s1, s2, chosen, gap", [
    (0.8, 0.6, 1, 0.2),
    (0.3, 0.7, 2, 0.4),
    (0.55, 0.50, 1, 0.05),       # exactly the default margin, after rounding away float noise
    (0.512341, 0.612344, 2, 0.1),  # rounded to 4 decimals
    (0.51, 0.49, None, 0.02),    # below the margin
    (0.5, 0.5, None, 0.0),       # equal
])
def test_an_illness_naming_both_or_neither_falls_back_to_similarity(tmp_path, s1, s2, chosen, gap):
    illnesses = ["Doctor 1 and Doctor 2 both miss the anxiety; it is an anxiety disorder",
                 "An anxiety disorder"]
    encoder = ScriptedEncoder({(i, d): s for i in illnesses for d, s in zip(DIAGNOSES, (s1, s2))})
    _, pairs, report = load(tmp_path, [record(diagnoses=DIAGNOSES, illness=i) for i in illnesses], encoder=encoder)
    assert encoder.calls == [(i, d) for i in illnesses for d in DIAGNOSES]
    if chosen is None:
        assert pairs == [] and report.diagnosis_unattributed == 2 and report.diagnosis_similarity == 0
    else:
        first, second = DIAGNOSES if chosen == 1 else DIAGNOSES[::-1]
        # the same pair twice: the second is a duplicate
        assert triples(pairs) == [(first, second, gap)]
        assert (report.diagnosis_similarity, report.diagnosis_unattributed, report.duplicates) == (2, 0, 1)
    assert report.diagnosis_named == 0


def test_the_diagnosis_margin_is_an_option(tmp_path):
    illness = "An anxiety disorder"
    encoder = ScriptedEncoder({(illness, DIAGNOSES[0]): 0.3, (illness, DIAGNOSES[1]): 0.32})
    rows = [record(diagnoses=DIAGNOSES, illness=illness)]
    assert load(tmp_path, rows, encoder=encoder)[1] == []
    _, pairs, report = load(tmp_path, rows, encoder=encoder, diagnosis_margin=0.02)
    assert triples(pairs) == [(DIAGNOSES[1], DIAGNOSES[0], 0.02)] and report.diagnosis_similarity == 1
    _, pairs, _ = load(tmp_path, rows, encoder=encoder, diagnosis_margin=0)
    assert triples(pairs) == [(DIAGNOSES[1], DIAGNOSES[0], 0.02)]


@pytest.mark.parametrize("illness", ["", "   \n"])
def test_an_empty_illness_is_unattributed_without_the_encoder(tmp_path, illness):
    _, pairs, report = load(tmp_path, [record(diagnoses=DIAGNOSES, illness=illness)])
    assert pairs == [] and report.diagnosis_unattributed == 1


def test_empty_or_identical_diagnoses_are_dropped(tmp_path):
    rows = [record(diagnoses=["  ", DIAGNOSES[1]], illness="Doctor 2"),
            record(diagnoses=[" PTSD", "PTSD\n"], illness="Doctor 2")]
    _, pairs, report = load(tmp_path, rows)
    assert pairs == [] and (report.dropped_empty, report.dropped_identical) == (1, 1)


def test_diagnosis_false_makes_no_diagnosis_pairs_and_calls_no_encoder(tmp_path):
    rows = [record(diagnoses=DIAGNOSES, illness="An anxiety disorder", treatment=[("CBT", 9), ("Rest", 3)]),
            record(diagnoses=DIAGNOSES, illness="Doctor 1")]
    _, pairs, report = load(tmp_path, rows, diagnosis=False)
    assert [p.kind for p in pairs] == ["treatment"]
    assert (report.diagnosis_named, report.diagnosis_similarity, report.diagnosis_unattributed) == (0, 0, 0)
    assert report.no_scores == 0  # a record with diagnoses is not a record without scores


class FakeEncoderClass:
    """Stands in for mentalarena.selfplay.similarity.Encoder: counts constructions, never loads a model."""

    made: list = []

    def __init__(self, name=None):
        FakeEncoderClass.made.append(name)

    def similarity(self, a, b):
        return 0.9 if "anxiety" in b.lower() else 0.1


def test_the_sentence_encoder_is_loaded_only_when_a_diagnosis_needs_it(tmp_path, monkeypatch):
    import mentalarena.selfplay.similarity

    monkeypatch.setattr(mentalarena.selfplay.similarity, "Encoder", FakeEncoderClass)
    monkeypatch.setattr(FakeEncoderClass, "made", [])
    named = [record(diagnoses=DIAGNOSES, illness=i) for i in ("Doctor 1", "the second diagnosis", "Dr 2")]
    _, pairs, report = load(tmp_path, named, encoder=None)
    assert len(pairs) == 2 and report.diagnosis_named == 3 and report.duplicates == 1
    assert FakeEncoderClass.made == []
    # an illness that names no doctor loads it, once, under the name given
    unnamed = [record(symptom="Worries.", diagnoses=DIAGNOSES, illness=i) for i in ("Anxiety", "Anxiety, surely")]
    _, pairs, report = load(tmp_path, named + unnamed, encoder="some/encoder")
    assert FakeEncoderClass.made == ["some/encoder"]
    assert report.diagnosis_similarity == 2 and triples(pairs)[-1] == (DIAGNOSES[1], DIAGNOSES[0], 0.8)
    load(tmp_path, unnamed, encoder=None)
    assert FakeEncoderClass.made == ["some/encoder", None]


@pytest.mark.parametrize("illness, doctor", [
    ("Doctor 1's diagnosis is more accurate", 1),
    ("Doctor 2\u2019s diagnosis", 2),
    ("the second diagnosis", 2),
    ("The First Doctor was right", 1),
    ("doctor first", 1),
    ("Dr. 2", 2), ("dr.2", 2), ("Dr 1", 1), ("DR2", 2), ("Dr. One", 1),
    ("doctor one", 1), ("DOCTOR TWO", 2), ("Doctor #2", 2), ("Doctor No. 1", 1), ("doctor\n1", 1),
    ("diagnosis 2 (PTSD)", 2), ("Diagnosis one", 1),
    ("Doctor 1's diagnosis is more accurate than the second one", 1),
    ("Doctor 1 and Doctor 2 agree", None),
    ("Doctor 1's diagnosis is more accurate than Doctor 2's", None),
    ("the first diagnosis, not the second diagnosis", None),
    ("Doctor 12", None), ("Doctor 21", None), ("Doctor 3", None), ("doctor ones", None), ("Dr. Twofold", None),
    ("doctors 1 and 2", None), ("the doctor", None),
    ("Major depressive disorder", None), ("", None), ("   ", None),
    ("Bipolar II disorder", None), ("Bipolar disorder type 2", None), ("secondary diagnosis: insomnia", None),
    ("first-line treatment: SSRIs", None), ("someone at address 2", None), ("redoctor 1", None),
])
def test_named_doctor(illness, doctor):
    assert named_doctor(illness) == doctor


# ------------------------------------------------------------------ duplicates
def test_duplicates_across_records_and_files_are_dropped_first_kept(tmp_path):
    one = record(treatment=[("CBT", 9), ("Rest", 2)])
    other = record(symptom="Hears voices.", treatment=[("CBT", 9), ("Rest", 2)])
    first = write_lines(tmp_path / "a.jsonl", [one, other, one, record(treatment=[("CBT", 8), ("Rest", 3)])])
    second = write_lines(tmp_path / "b.jsonl", [record(medicine=[("Sertraline", 9), ("Nothing", 1)]), other, one])
    pairs, report = load_preferences([first, second], encoder=NoEncoder())
    assert [(p.question.split("\n")[0], p.kind, p.chosen, p.source) for p in pairs] == [
        ("Feels low.", "treatment", "CBT", f"{first}: line 1"),
        ("Hears voices.", "treatment", "CBT", f"{first}: line 2"),
        ("Feels low.", "medication", "Sertraline", f"{second}: line 1"),
    ]
    assert pairs[0].margin == 7  # the first one, not the same texts at gap 5 (line 4)
    assert (report.records, report.duplicates, report.pairs) == (7, 4, 3)
    assert report.files == [str(first), str(second)]


# ------------------------------------------------------------------ records without scores
@pytest.mark.parametrize("names, count", [([GPT], 257), ([LLAMA], 106), ([GPT, LLAMA], 363)])
def test_the_references_records_carry_no_scores_and_give_no_pairs(names, count):
    files = [shared_data("arena_outputs", n) for n in names]
    assert sum(1 for f in files for line in f.read_text(encoding="utf-8").split("\n") if line.strip()) == count
    pairs, report = load_preferences(files, encoder=NoEncoder())
    assert pairs == []
    assert (report.records, report.no_scores, report.searches, report.pairs, report.problems) == (count, count, 0, 0, [])
    why = report.why_none()
    assert f"none of the {count} records carries try-and-reflect scores" in why
    assert "treatment_search" in why and "arena_med.py" in why


def test_a_mixed_file_counts_records_with_and_without_scores(tmp_path):
    six = dict(SFT_RECORD)
    _, pairs, report = load(tmp_path, [six, record(treatment=[("CBT", 9), ("Rest", 2)]), {**six, "symptom": "x"}])
    assert triples(pairs) == [("CBT", "Rest", 7)]
    assert (report.records, report.no_scores, report.searches, report.pairs) == (3, 2, 1, 1)
    # no pairs, but not because every record lacks scores: the summary, not the "no scores" line
    _, pairs, report = load(tmp_path, [six, record(treatment=[("CBT", 9)])])
    assert pairs == [] and (report.records, report.no_scores, report.single_candidate) == (2, 1, 1)
    assert "none of the" not in report.why_none() and report.why_none() == report.summary()


# ------------------------------------------------------------------ converted rows read back
UGLY = "Says: Question: why?\n ### Answer: none\nStill low."  # the text layout's markers inside a symptom


def some_pairs(tmp_path) -> tuple[Path, list[PreferencePair]]:
    rows = [record(treatment=[("CBT", 9), ("Rest", 2)], medicine=[("Sertraline", 8), ("Nothing", 1)],
                   diagnoses=DIAGNOSES, illness="the second diagnosis"),
            record(symptom=UGLY, treatment=[("Exercise\u2028daily", 7), ("Wait", 3)])]
    path, pairs, _ = load(tmp_path, rows)
    assert [p.kind for p in pairs] == ["diagnosis", "treatment", "medication", "treatment"]
    return path, pairs


# some_pairs' four pairs, written out by hand: (question, chosen, rejected, kind, margin)
SOME_PAIRS = [
    (question("diagnosis"), DIAGNOSES[1], DIAGNOSES[0], "diagnosis", None),  # "the second diagnosis" named
    (question("treatment"), "CBT", "Rest", "treatment", 7),
    (question("medication"), "Sertraline", "Nothing", "medication", 7),
    (question("treatment", UGLY), "Exercise\u2028daily", "Wait", "treatment", 4),
]


def written_row(fmt: str, asked: str, chosen: str, rejected: str, kind: str, margin) -> dict:
    """One pair as each format lays it out (TRL's conversational and plain-text preference rows,
    OpenAI's preference fine-tuning row), spelt out here rather than through the module."""
    if fmt == "trl":
        return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": asked}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}], "kind": kind, "margin": margin}
    if fmt == "trl_text":
        return {"prompt": f"### System: {SYSTEM} Question: {asked}\n ### Answer:",
                "chosen": " " + chosen, "rejected": " " + rejected}
    return {"input": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": asked}]},
            "preferred_output": [{"role": "assistant", "content": chosen}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}]}


@pytest.mark.parametrize("fmt", ["trl", "trl_text", "openai"])
def test_converted_rows_read_back_to_the_same_pairs(tmp_path, fmt):
    records, pairs = some_pairs(tmp_path)
    rows, report = convert(records, fmt, encoder=NoEncoder())
    assert rows == [written_row(fmt, *p) for p in SOME_PAIRS] and report.pairs == 4
    out = tmp_path / f"{fmt}.jsonl"
    write_rows(out, rows)
    back, back_report = load_preferences(out, encoder=NoEncoder())
    assert [p.key() for p in back] == [(SYSTEM, q, c, r) for q, c, r, _, _ in SOME_PAIRS]
    assert (back_report.converted_rows, back_report.records, back_report.pairs) == (4, 0, 4)
    assert [p.source for p in back] == [f"{out}: line {n}" for n in range(1, 5)]
    if fmt == "trl":  # kind and margin ride along
        assert [(p.kind, p.margin) for p in back] == [(k, m) for _, _, _, k, m in SOME_PAIRS]
    else:
        assert {(p.kind, p.margin) for p in back} == {("unknown", None)}
    # read together with the records they came from: every converted row is a duplicate
    both, both_report = load_preferences([records, out], encoder=NoEncoder())
    assert both == pairs and both_report.duplicates == 4


def test_trl_text_prompt_and_answer_are_exactly_the_sft_text(tmp_path):
    _, pairs = some_pairs(tmp_path)
    for p in pairs:
        row = to_trl_text(p)
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["prompt"] + row["chosen"] == sft.to_text(SFTPair(p.system, p.question, p.chosen, p.kind))["text"]
        assert row["prompt"] + row["rejected"] == sft.to_text(SFTPair(p.system, p.question, p.rejected, p.kind))["text"]
        assert row["prompt"].endswith("\n ### Answer:") and row["chosen"] == " " + p.chosen
    assert to_trl_text(pairs[1])["prompt"] == f"### System: {SYSTEM} Question: {question('treatment')}\n ### Answer:"


def test_trl_rows_are_conversational_with_an_explicit_prompt(tmp_path):
    _, pairs = some_pairs(tmp_path)
    assert to_trl(pairs[1]) == {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question("treatment")}],
        "chosen": [{"role": "assistant", "content": "CBT"}], "rejected": [{"role": "assistant", "content": "Rest"}],
        "kind": "treatment", "margin": 7}


def test_every_openai_row_is_valid(tmp_path):
    _, pairs = some_pairs(tmp_path)
    rows = [to_openai(p) for p in pairs]
    assert [openai_problems(r) for r in rows] == [[]] * 4
    out = tmp_path / "openai.jsonl"
    write_rows(out, rows)
    assert validate_openai_file(out) == []


def test_unknown_format(tmp_path):
    records, _ = some_pairs(tmp_path)
    with pytest.raises(InputError, match="format must be one of trl, trl_text, openai, not 'dpo'"):
        convert(records, "dpo")


# ------------------------------------------------------------------ OpenAI's format
def good_openai() -> dict:
    return {"input": {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]},
            "preferred_output": [{"role": "assistant", "content": "good"}],
            "non_preferred_output": [{"role": "assistant", "content": "bad"}]}


def _changed(change):
    row = good_openai()
    change(row)
    return row


ASSISTANT = {"role": "assistant", "content": "A"}


@pytest.mark.parametrize("row, problems", [
    (good_openai(), []),
    (_changed(lambda r: r["input"].update(tools=[], parallel_tool_calls=False)), []),
    (_changed(lambda r: r["input"]["messages"].pop(0)), []),
    (_changed(lambda r: r.pop("non_preferred_output")), ['field "non_preferred_output" is missing']),
    (_changed(lambda r: r.update(kind="treatment")), ['unknown field "kind"']),
    (_changed(lambda r: (r.update(margin=3), r.pop("input"))), ['unknown field "margin"', 'field "input" is missing']),
    (_changed(lambda r: r["input"].update(temperature=0)), ['unknown field "input.temperature"']),
    (_changed(lambda r: r["input"]["messages"].append(ASSISTANT)), ['field "input.messages" must end with a user message']),
    (_changed(lambda r: r["preferred_output"].append(ASSISTANT)),
     ['field "preferred_output" must be a list of exactly one assistant message']),
    (_changed(lambda r: r["non_preferred_output"][0].update(role="user")),
     ['field "non_preferred_output" must be a list of exactly one assistant message']),
    (_changed(lambda r: r.update(preferred_output={"role": "assistant", "content": "good"})),
     ['field "preferred_output" must be a list of exactly one assistant message']),
    (_changed(lambda r: r["input"]["messages"][1].update(role="bot")),
     ['field "input.messages[1].role" must be one of assistant, developer, system, user']),
    (_changed(lambda r: r["input"]["messages"][1].update(content="")),
     ['field "input.messages[1].content" must be non-empty text']),
    (_changed(lambda r: r["input"]["messages"][0].update(content=None)),
     ['field "input.messages[0].content" must be non-empty text']),
    (_changed(lambda r: r["preferred_output"][0].update(content=" \n")),
     ['field "preferred_output[0].content" must be non-empty text']),
    (_changed(lambda r: r["non_preferred_output"][0].update(content="good")),
     ["the preferred and non-preferred outputs are the same text"]),
    (_changed(lambda r: r["input"].update(messages=[])), ['field "input.messages" must be a non-empty list']),
    (_changed(lambda r: r.update(input=[])), ['field "input.messages" must be a non-empty list']),
    (["a", "list"], ["not a JSON object"]),
    ("text", ["not a JSON object"]),
])
def test_openai_problems(row, problems):
    assert openai_problems(row) == problems


def test_validate_openai_file_names_file_and_line(tmp_path):
    bad = _changed(lambda r: r["non_preferred_output"][0].update(content="good"))
    path = write_lines(tmp_path / "dpo.jsonl", [good_openai(), bad, "", [1]])
    assert validate_openai_file(path) == [f"{path}: line 2: the preferred and non-preferred outputs are the same text",
                                          f"{path}: line 4: not a JSON object"]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("line, message", [
    (json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}),
     "an SFT row (one answer, no rejected one)"),
    (json.dumps({"text": "### System: S Question: Q\n ### Answer: A"}), "an SFT row (one answer, no rejected one)"),
    (json.dumps([1, 2]), "a JSON list, not an object"),
    (json.dumps("text"), "a JSON str, not an object"),
    ("{not json", "not valid JSON"),
    (json.dumps({"id": 3}), "neither a self-play record nor a preference row"),
    (json.dumps({"symptom": "x", "treatment_search": [{"candidate": "a", "score": 3}]}),
     'field "treatment_search" must be an object with a list "tries"'),
    (json.dumps({"symptom": "x", "medicine_search": {"best": "a"}}),
     'field "medicine_search" must be an object with a list "tries"'),
    (json.dumps({"symptom": "x", "treatment_search": search(("a", 3), ("b", "7"))}),
     'field "treatment_search.tries[1].score" is str, not a number'),
    (json.dumps({"symptom": "x", "treatment_search": search(("a", True), ("b", 7))}),
     'field "treatment_search.tries[0].score" is bool, not a number'),
    (json.dumps({"symptom": "x", "medicine_search": search(("a", 3), (None, 7))}),
     'field "medicine_search.tries[1].candidate" must be text'),
    (json.dumps({"symptom": "x", "diagnoses": ["a", "b", "c"], "illness": "Doctor 1"}),
     'field "diagnoses" must be a list of two texts'),
    (json.dumps({"symptom": "x", "diagnoses": ["a", "b"], "illness": None}), 'field "illness" must be text'),
    (json.dumps({"prompt": "no markers", "chosen": " a", "rejected": " b"}), 'field "prompt" is text but not'),
    (json.dumps({"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "user", "content": "a"}],
                 "rejected": "b"}), 'field "chosen" must be one assistant message'),
    (json.dumps({"prompt": [{"role": "assistant", "content": "Q"}], "chosen": "a", "rejected": "b"}),
     'field "prompt" must be a user message'),
    (json.dumps(_changed(lambda r: r["non_preferred_output"][0].update(content="good"))),
     "the preferred and non-preferred outputs are the same text"),
])
def test_unreadable_rows_stop_with_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "in.jsonl", [record(treatment=[("CBT", 9), ("Rest", 2)]), line])
    with pytest.raises(InputError) as caught:
        load_preferences(path, encoder=NoEncoder())
    text = str(caught.value)
    assert text.startswith(f"{path}: line 2: ") and message in text
    assert text.count(str(path)) == 1  # named once, not wrapped twice


def test_a_record_missing_a_needed_field_is_reported_and_the_rest_kept(tmp_path):
    no_symptom = record(treatment=[("A", 9), ("B", 1)])
    del no_symptom["symptom"]
    rows = [record(treatment=[("CBT", 9), ("Rest", 2)]), no_symptom,
            record(symptom=5, medicine=[("A", 9), ("B", 1)]),
            {"symptom": "x", "diagnoses": DIAGNOSES, "treatment_search": search(("A", 9), ("B", 1))},
            record(medicine=[("Sertraline", 8), ("Nothing", 1)])]
    path, pairs, report = load(tmp_path, rows)
    assert report.problems == [f'{path}: line 2: field "symptom" is missing',
                               f'{path}: line 3: field "symptom" is int, not text',
                               f'{path}: line 4: field "illness" is missing']
    assert triples(pairs) == [("CBT", "Rest", 7), ("Sertraline", "Nothing", 7)]
    assert [p.source for p in pairs] == [f"{path}: line 1", f"{path}: line 5"]
    assert report.records == 5 and report.summary().endswith("; 3 bad records skipped")


def test_a_missing_file(tmp_path):
    with pytest.raises(InputError, match="nowhere.jsonl: file not found"):
        load_preferences(tmp_path / "nowhere.jsonl")


@pytest.mark.parametrize("options, flag", [
    ({"min_margin": 0}, "--min_margin"), ({"min_margin": -1}, "--min_margin"), ({"min_margin": True}, "--min_margin"),
    ({"min_margin": "2"}, "--min_margin"), ({"min_margin": math.nan}, "--min_margin"),
    ({"diagnosis_margin": -0.1}, "--diagnosis_margin"), ({"diagnosis_margin": 2}, "--diagnosis_margin"),
    ({"diagnosis_margin": False}, "--diagnosis_margin"),
])
def test_bad_options_stop_before_any_file_is_read(tmp_path, options, flag):
    with pytest.raises(InputError, match=re.escape(flag)):
        load_preferences(tmp_path / "not-even-there.jsonl", **options)


def test_small_positive_margins_are_accepted(tmp_path):
    _, pairs, report = load(tmp_path, [record(treatment=[("A", 5), ("B", 4.5)])], min_margin=0.5, diagnosis_margin=0)
    assert triples(pairs) == [("A", "B", 0.5)] and report.score_gaps == {"0": 1}


# ------------------------------------------------------------------ the report
def test_the_summary_mentions_the_counts_and_the_report_serialises(tmp_path):
    rows = [dict(SFT_RECORD),
            record(treatment=[("CBT", 9), ("Rest", 2), ("Wait", 0)], medicine=[("A", 5), ("B", 4)]),
            record(treatment=[("CBT", 9), ("Rest", 2)], diagnoses=DIAGNOSES, illness="Doctor 2"),
            record(medicine=[("M", 3)], treatment=[("  ", 8), ("x", 1)]),
            record(diagnoses=DIAGNOSES, illness="")]
    _, pairs, report = load(tmp_path, rows)
    assert triples(pairs) == [("CBT", "Rest", 7), (DIAGNOSES[1], DIAGNOSES[0], None)]
    text = report.summary()
    for part in ("5 records (1 without scores or diagnoses)", "0 converted rows", "5 searches",
                 "9 scored candidates (1 unscored, 1 searches with under two)", "dropped: 1 below margin 2",
                 "1 empty", "0 identical", "1 diagnoses unattributed", "1 duplicates",
                 "2 pairs (treatment 1, diagnosis 1)"):
        assert part in text, part
    assert "bad records" not in text
    data = report.as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["score_gaps"] == {"7": 1} and data["kinds"] == {"treatment": 1, "diagnosis": 1}
    assert PairReport(**data) == report
    assert PairReport(files=[]).summary().endswith("0 pairs (none)")
