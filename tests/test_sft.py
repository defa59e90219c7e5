"""Conversion of self-play records to fine-tuning pairs (METHOD.md §5), checked against counts derived here."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import shared_data

from mentalarena.errors import InputError
from mentalarena.training.sft import (SFTPair, convert, dedup, from_openai, load_pairs, medicine_usable, parse_text,
                             record_pairs, row_kind, to_openai, to_text, write_rows)

GPT, LLAMA = "gpt_iter1_output.jsonl", "llama3_iter4_output_1.jsonl"


def expected_counts(files: list[Path]) -> dict:
    """The same counts, written independently of the module: a regex for the skip rule, and duplicates
    found from (kind, symptom, answer), which fixes a row since the question and system texts are constant."""
    records = [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    keep_medicine = [r for r in records if r["medicine"] != "" and not re.search(r"None|N/A|Not|Explanation", r["medicine"])]
    keys = ([("d", r["symptom"], r["illness"]) for r in records]
            + [("t", r["symptom"], r["treatment"] + ". " + r["explain_t"]) for r in records]
            + [("m", r["symptom"], r["medicine"] + ". " + r["explain_m"]) for r in keep_medicine])
    return {"records": len(records), "skipped": len(records) - len(keep_medicine), "pairs": len(keys),
            "rows": len(set(keys))}


# Checked by hand: the GPT file has 257 records of 106 patients; medicine is "" in 10 and contains
# Not 61, None 61, N/A 32, Explanation 26 times (190 skipped, 67 kept); 15 diagnosis rows repeat an
# earlier (symptom, illness) pair. Llama: 106 records, every medicine kept, nothing repeated; 2 of its
# diagnosis rows repeat GPT ones.
@pytest.mark.parametrize("names, records, skipped, pairs, rows", [
    ([GPT], 257, 190, 581, 566),
    ([LLAMA], 106, 0, 318, 318),
    ([GPT, LLAMA], 363, 190, 899, 882),
])
@pytest.mark.parametrize("fmt", ["openai", "text"])
def test_counts_on_the_real_records(names, records, skipped, pairs, rows, fmt):
    files = [shared_data("arena_outputs", n) for n in names]
    assert expected_counts(files) == {"records": records, "skipped": skipped, "pairs": pairs, "rows": rows}
    out, report = convert(files, fmt)
    assert (report.records, report.skipped_medicine, report.pairs, report.rows) == (records, skipped, pairs, rows)
    assert len(out) == rows and report.duplicates == pairs - rows and report.problems == []
    assert report.kinds == {"diagnosis": records, "treatment": records, "medication": records - skipped}
    assert len({json.dumps(r, sort_keys=True) for r in out}) == rows


def test_reference_glue_changes_only_the_treatment_question():
    files = [shared_data("arena_outputs", LLAMA)]
    plain, _ = load_pairs(files)
    glued, _ = load_pairs(files, reference_glue=True)
    symptom = json.loads(files[0].read_text(encoding="utf-8").splitlines()[0])["symptom"]
    assert [p.kind for p in plain[:3]] == ["diagnosis", "treatment", "medication"]
    assert plain[1].question.startswith(symptom + "\n")
    assert glued[1].question == symptom + plain[1].question[len(symptom) + 1:]
    assert [p for i, p in enumerate(glued) if i % 3 != 1] == [p for i, p in enumerate(plain) if i % 3 != 1]


RECORD = {"symptom": "Feels low.", "illness": "Major depressive disorder", "treatment": "CBT",
          "explain_t": "It targets beliefs.", "medicine": "Sertraline", "explain_m": "An SSRI."}


def test_one_record_gives_three_pairs_in_the_reference_form():
    diagnosis, treatment, medication = record_pairs(RECORD)
    assert {p.system for p in (diagnosis, treatment, medication)} == {"You are a psychiatric expert."}
    assert diagnosis.answer == "Major depressive disorder"
    assert treatment.answer == "CBT. It targets beliefs."
    assert medication.answer == "Sertraline. An SSRI."
    for pair in (diagnosis, treatment, medication):
        symptom, newline, question = pair.question.partition("\n")
        assert (symptom, newline) == ("Feels low.", "\n") and question.endswith("?")
    glued = record_pairs(RECORD, reference_glue=True)[1].question
    assert glued.startswith("Feels low.") and glued[len("Feels low."):] == treatment.question.partition("\n")[2]


@pytest.mark.parametrize("medicine, kept", [
    ("Sertraline (Zoloft)", True), ("not prescribed", True), ("none", True), ("n/a", True), (" ", True),
    ("", False), ("None", False), ("N/A", False), ("Not mentioned", False), ("Nothing", False),
    ("Explanation:", False), ("Fluoxetine. None needed later", False),
])
def test_medicine_skip_rule_is_the_references_case_sensitive_substring_test(medicine, kept):
    assert medicine_usable(medicine) is kept
    assert len(record_pairs({**RECORD, "medicine": medicine})) == (3 if kept else 2)


def test_text_and_openai_forms_round_trip():
    pair = record_pairs(RECORD)[1]
    text = to_text(pair)["text"]
    assert text == f"### System: You are a psychiatric expert. Question: {pair.question}\n ### Answer: CBT. It targets beliefs."
    assert parse_text(text) == SFTPair(pair.system, pair.question, pair.answer, "unknown")
    row = to_openai(pair)
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert from_openai(row) == parse_text(text)
    with pytest.raises(InputError, match='field "text"'):
        parse_text("Question: no system marker\n ### Answer: x")
    for messages in (row["messages"][1:], row["messages"] + ["stray"], None):
        with pytest.raises(InputError, match='field "messages"'):
            from_openai({"messages": messages})


def test_dedup_keeps_first_occurrences_in_order():
    a, b, c = {"text": "a"}, {"text": "b"}, {"messages": [{"role": "user", "content": "a"}]}
    assert dedup([b, a, dict(b), c, a, {"text": "c"}, c]) == [b, a, c, {"text": "c"}]


def test_row_kind():
    assert row_kind({"symptom": "x"}) == "record"
    assert row_kind({"messages": []}) == "openai"
    assert row_kind({"text": "x"}) == "text"
    with pytest.raises(InputError, match="neither"):
        row_kind({"prompt": "x"})
    with pytest.raises(InputError, match="list"):
        row_kind([1])


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def test_bad_records_are_reported_with_file_and_line_and_the_rest_convert(tmp_path):
    missing = {k: v for k, v in RECORD.items() if k != "illness"}
    path = write_lines(tmp_path / "records.jsonl", [RECORD, missing, "", {**RECORD, "medicine": None},
                                                    {**RECORD, "symptom": "Other."}])
    rows, report = convert([path], "text")
    assert report.problems == [f'{path}: line 2: field "illness" is missing',
                               f'{path}: line 4: field "medicine" is NoneType, not text']
    assert (report.records, report.pairs, report.rows) == (4, 6, 6)
    assert [parse_text(r["text"]).question.split("\n")[0] for r in rows] == ["Feels low."] * 3 + ["Other."] * 3


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    (json.dumps({"prompt": "x"}), "line 2: neither a self-play record"),
    (json.dumps({"text": "no markers"}), 'line 2: field "text"'),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), 'line 2: field "messages"'),
    (json.dumps(["a list"]), "line 2: a JSON list"),
])
def test_unreadable_rows_stop_with_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "in.jsonl", [RECORD, line])
    with pytest.raises(InputError, match=re.escape(f"{path}: {message}")):
        convert([path], "openai")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(InputError, match="nowhere.jsonl: file not found"):
        load_pairs([tmp_path / "nowhere.jsonl"])
    with pytest.raises(InputError, match="format must be one of openai, text"):
        convert([write_lines(tmp_path / "in.jsonl", [RECORD])], "alpaca")


def test_converted_rows_mix_with_records_and_duplicates_go(tmp_path):
    records = write_lines(tmp_path / "records.jsonl", [RECORD, {**RECORD, "symptom": "Other."}])
    text_rows, _ = convert([records], "text")
    chat_rows, _ = convert([records], "openai")
    converted_text = write_lines(tmp_path / "text.jsonl", text_rows + [{"text": to_text(SFTPair("S", "Q", "A", "x"))["text"]}])
    converted_chat = write_lines(tmp_path / "chat.jsonl", chat_rows)
    rows, report = convert([records, converted_text, converted_chat], "text")
    assert (report.records, report.converted_rows, report.pairs) == (2, 13, 19)  # 6 + 7 + 6
    assert rows == text_rows + [{"text": "### System: S Question: Q\n ### Answer: A"}]
    assert report.duplicates == 12  # all but the 7 distinct rows


def test_write_rows_replaces_the_file(tmp_path):
    out = tmp_path / "sub" / "ft.jsonl"
    write_rows(out, [{"text": "a"}, {"text": "b"}])
    write_rows(out, [{"text": "c\u2028d"}])
    assert out.read_text(encoding="utf-8") == '{"text": "c\\u2028d"}\n'
    assert json.loads(out.read_text(encoding="utf-8")) == {"text": "c\u2028d"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["ft.jsonl"]


def test_written_rows_keep_one_line_each_whatever_the_text(tmp_path):
    """U+2028, U+2029 and U+0085 split lines for str.splitlines() and some JSONL readers: escaped."""
    import json

    from mentalarena.training.sft import write_rows
    rows = [{"text": f"before{c}after"} for c in ("\u2028", "\u2029", "\u0085")]
    path = tmp_path / "rows.jsonl"
    write_rows(path, rows)
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 3
    assert [json.loads(line) for line in text.splitlines()] == rows
