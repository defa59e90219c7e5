"""mentalarena.store.inputs, the one reader of users' input files, through the loaders every script calls:
files saved the ways people save them (a spreadsheet's BOM, Windows-1252, Excel's UTF-16, no final
newline, a huge CSV field, a folder, repeated ids), each one line naming the file and where."""
import csv
import json
from pathlib import Path

import pytest

from conftest import FAKE_OPENAI_KEY, ScriptedBackend, shared_data
from mentalarena.evaluation import counsel, imhi, qa
from mentalarena.selfplay import data
from mentalarena.store import inputs
from mentalarena.reports import report
from mentalarena.training import sft
from mentalarena.errors import InputError

LONG = "I keep replaying the argument. " * 6700  # ~200,000 characters: over csv's default limit of 131,072
MEDMCQA_HEADER = "id,question,opa,opb,opc,opd,cop,subject_name\r\n"
RECORD = {"symptom": "I cannot sleep.", "illness": "insomnia", "treatment": "CBT-I", "explain_t": "Sleep habits.",
          "medicine": "None", "explain_m": "None"}


def _bytes(path: Path, raw: bytes) -> str:
    path.write_bytes(raw)
    return str(path)


def _error(load, *args) -> str:
    with pytest.raises(InputError) as err:
        load(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


def _jsonl(rows, end="\n") -> str:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + end


# ---------------------------------------------------------------- decoding: one table
@pytest.mark.parametrize("raw, text", [
    (b"\xef\xbb\xbfid,statement\r\n1,ok\r\n", "id,statement\r\n1,ok\r\n"),  # Excel's "CSV UTF-8"
    ("caf\u00e9\n".encode("utf-8"), "caf\u00e9\n"),
    (b"", ""),
], ids=["bom-crlf", "plain", "empty"])
def test_utf8_with_or_without_bom_is_read(tmp_path, raw, text):
    assert inputs.read_text(_bytes(tmp_path / "f.csv", raw)) == text


@pytest.mark.parametrize("raw, parts", [
    ("id,statement\r\n1,fine\r\n2,Caf\u00e9 \u201cnever again\u201d\r\n".encode("cp1252"),
     ["f.csv: line 3, column 6: not UTF-8 (byte 0xE9)", "looks like Windows-1252",
      "iconv -f cp1252 -t utf-8 ", "f.utf8.csv"]),
    ("name\nok\nM\u00fcller\n".encode("cp437"),  # a DOS code page: 0x81 is undefined in Windows-1252
     ["line 3, column 2: not UTF-8 (byte 0x81)", "8-bit code page", "iconv -f latin1"]),
    ("id,statement\n1,caf\u00e9\n".encode("utf-16"), ["f.csv: UTF-16 text", "not UTF-8", "iconv -f utf-16"]),
    (b"\xfe\xff" + "id,statement\n".encode("utf-16-be"), ["UTF-16 text"]),  # big-endian
    ("id,statement\n1,x\n".encode("utf-16-le"), ["line 1, column 2: a NUL byte", "UTF-16 without a byte-order mark"]),
], ids=["cp1252", "cp437", "utf-16", "utf-16-be", "utf-16-no-bom"])
def test_other_encodings_are_one_line_with_the_place_and_the_fix(tmp_path, raw, parts):
    message = _error(inputs.read_text, _bytes(tmp_path / "f.csv", raw))
    assert message.startswith(str(tmp_path / "f.csv") + ": ")
    for part in parts:
        assert part in message


def test_missing_and_folder(tmp_path):
    assert _error(inputs.read_text, tmp_path / "absent.csv") == f"{tmp_path / 'absent.csv'}: file not found"
    assert _error(inputs.read_text, tmp_path) == f"{tmp_path}: is a folder, expected a file"


def test_csv_rows_read_any_field_size_and_leave_the_limit_as_it_was(tmp_path):
    before = csv.field_size_limit()
    path = tmp_path / "big.csv"
    path.write_text(f'a,b\n1,"{LONG}"\n\n2,"two\nlines"\n3,x\n', encoding="utf-8")
    header, rows = inputs.csv_rows(path)
    assert header == ["a", "b"] and [(n, c[0]) for n, c in rows] == [(2, "1"), (4, "2"), (6, "3")]
    assert len(rows[0][1][1]) == len(LONG) and csv.field_size_limit() == before


def test_read_table_numbers_rows_as_the_messages_name_them(tmp_path):
    lines = tmp_path / "t.jsonl"
    lines.write_text('{"a": 1}\n\n{"a": 2}', encoding="utf-8")  # a blank line; no final newline
    assert inputs.read_table(lines) == [(1, {"a": 1}), (3, {"a": 2})]
    table = tmp_path / "t.csv"
    table.write_text("a,b\n1\n,,\n2,3\n", encoding="utf-8")
    assert inputs.read_table(table) == [(1, {"a": "1", "b": None}), (2, {"a": "2", "b": "3"})]
    listed = tmp_path / "t.json"
    listed.write_text('[{"a": 1}, "x"]', encoding="utf-8")
    assert _error(inputs.read_table, listed) == f"{listed}: row 2: expected an object, got string"


# ---------------------------------------------------------------- the loaders: one test per item
def _statements_csv(path: Path, rows: list[tuple[str, str]]) -> str:
    """As a spreadsheet saves "CSV UTF-8": a BOM and CRLF line ends."""
    text = "id,statement\r\n" + "".join(f'{i},"{s}"\r\n' for i, s in rows)
    return _bytes(path, ("\ufeff" + text).encode("utf-8"))


def test_a_bom_csv_keeps_its_id_column(tmp_path):
    path = _statements_csv(tmp_path / "s.csv", [("c-17", "I feel stuck."), ("c-40", "Work is too much.")])
    rows, _ = counsel.load_statements(path)
    assert [r["id"] for r in rows] == ["c-17", "c-40"]  # not renumbered 1, 2


@pytest.mark.parametrize("name", ["s.csv", "s.jsonl"])
def test_repeated_statement_ids_name_both_rows(tmp_path, name):
    rows = [("7", "I feel stuck."), ("8", "Nobody listens."), ("7", "Work is too much.")]
    path = _statements_csv(tmp_path / name, rows) if name.endswith(".csv") else \
        _bytes(tmp_path / name, _jsonl([{"id": i, "statement": s} for i, s in rows]).encode())
    assert _error(counsel.load_statements, path) == f"{path}: rows 1 and 3 both have id '7'"


def test_qa_ids_on_two_different_questions_are_refused_naming_both_rows(tmp_path):
    path = tmp_path / "set.csv"
    path.write_text(MEDMCQA_HEADER + "q1,Which lobe?,a,b,c,d,2,Anatomy\r\nq2,Which nerve?,a,b,c,d,1,Anatomy\r\n"
                    "q1,Which vessel?,a,b,c,d,3,Anatomy\r\n", encoding="utf-8")
    assert _error(qa.load_items, "MedMCQA", None, path) == f"{path}: rows 1 and 3 both have id 'q1'"
    path.write_text(MEDMCQA_HEADER + "q1,Which lobe?,a,b,c,d,2,Anatomy\r\nq1,Which lobe?,a,b,c,d,2,Anatomy\r\n",
                    encoding="utf-8")  # the same question twice, as the paper's files have it: both scored
    assert [i.id for i in qa.load_items("MedMCQA", data_file=path)] == ["q1", "q1#2"]


def _records(path: Path, end: str) -> str:
    records = [dict(RECORD, symptom=f"Symptom {i}.") for i in range(3)]
    return _bytes(path, _jsonl(records, end).encode("utf-8"))


def test_jsonl_inputs_without_a_final_newline_are_read_whole(tmp_path):
    path = _records(tmp_path / "records.jsonl", end="")
    assert sft.load_pairs(path)[1].records == 3
    rows, notes = report.load_records(path)
    assert len(rows) == 3 and notes == []  # a whole last record is not a torn one
    statements = _bytes(tmp_path / "s.jsonl", _jsonl([{"statement": "One."}, {"statement": "Two."}], "").encode())
    assert [r["statement"] for r in counsel.load_statements(statements)[0]] == ["One.", "Two."]
    turns = {"patient_id": "p", "transcript": [{"step": "opening.patient", "speaker": "patient", "reply": "Hi."}]}
    recorded = _bytes(tmp_path / "turns.jsonl", json.dumps(turns).encode())
    assert [r["statement"] for r in counsel.load_record_turns([recorded])[0]] == ["Hi."]
    medqa = shared_data("medqa", "psychosis.jsonl")
    cut = _bytes(tmp_path / "medqa.jsonl", medqa.read_bytes().rstrip(b"\n"))
    assert len(qa.load_items("MedQA", data_file=cut)) == 173


@pytest.mark.parametrize("tail", [b'{"symptom": "cut', '{"symptom": "Caf\u00e9'.encode()[:-1]],
                         ids=["mid-json", "mid-character"])
def test_report_leaves_a_torn_last_record_out_with_a_note(tmp_path, tail):
    path = tmp_path / "records.jsonl"
    path.write_bytes(Path(_records(path, "\n")).read_bytes() + tail)
    rows, notes = report.load_records(path)
    assert len(rows) == 3 and "incomplete last line" in notes[0]


def _long_field(kind: str, path: Path):
    """(loader, file) with one ~200,000-character CSV field where each loader reads it."""
    if kind == "counsel":
        return counsel.load_statements, _statements_csv(path, [("1", LONG)])
    if kind == "qa":
        path.write_text(MEDMCQA_HEADER + f'q1,"{LONG}",a,b,c,d,2,Anatomy\r\n', encoding="utf-8")
        return lambda p: qa.load_items("MedMCQA", data_file=p), path
    if kind == "imhi":
        path = path.with_name("DR.csv")
        path.write_text(f'query,gpt-3.5-turbo\n"Post: {LONG}",yes.\n', encoding="utf-8")
        return imhi.read_imhi_csv, path
    real = shared_data("roleplay_doh", "roleplay-doh_principles.csv").read_text(encoding="utf-8")
    path.write_text(real + f'99,"{LONG}"\n', encoding="utf-8")
    return data.load_principles, path


@pytest.mark.parametrize("kind", ["counsel", "qa", "imhi", "principles"])
def test_csv_fields_of_any_size_are_read(tmp_path, kind):
    load, path = _long_field(kind, tmp_path / "big.csv")
    got = load(path)
    texts = {"counsel": lambda: got[0][0]["statement"], "qa": lambda: got[0].question,
             "imhi": lambda: got[0]["query"], "principles": lambda: got["99"][0]}[kind]()
    assert LONG.strip() in texts


def _cp1252(kind: str, folder: Path):
    """(loader, file, line of the first non-ASCII character): the real files, saved as Windows-1252."""
    if kind == "imhi":
        text = shared_data("imhi", "test_instruction", "DR.csv").read_text(encoding="utf-8")
        return imhi.read_imhi_csv, _save(folder / "DR.csv", text), _first_line(text)
    if kind == "patients":
        text = shared_data("patient_psi_cm", "Patient-Psi-CM_dataset.json").read_text(encoding="utf-8")
        text = text.replace('"name": "Alex"', '"name": "Ren\u00e9e"', 1)
        return data.load_patients, _save(folder / "p.json", text), 3
    if kind == "principles":
        text = shared_data("roleplay_doh", "roleplay-doh_principles.csv").read_text(encoding="utf-8")
        text = text.replace("don't", "don\u2019t", 1)  # a curly apostrophe, as word processors type it
        return data.load_principles, _save(folder / "p.csv", text), _first_line(text)
    if kind == "qa":
        text = shared_data("medmcqa", "psychosis.jsonl").read_text(encoding="utf-8")
        return lambda p: qa.load_items("MedMCQA", data_file=p), _save(folder / "m.jsonl", text), _first_line(text)
    if kind == "records":
        lines = shared_data("arena_outputs", "gpt_iter1_output.jsonl").read_text(encoding="utf-8").split("\n")
        lines[2] = lines[2].replace('"symptom": "', '"symptom": "\u201cCaf\u00e9\u201d ', 1)
        return sft.load_pairs, _save(folder / "r.jsonl", "\n".join(lines)), 3
    text = "id,statement\r\n1,Fine.\r\n2,\u201cI can\u2019t\u201d, she said.\r\n"
    return counsel.load_statements, _save(folder / "s.csv", text), 3


def _save(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("cp1252", errors="replace"))  # as Excel does: "?" for what it cannot hold
    return path


def _first_line(text: str) -> int:
    return text[:next(i for i, c in enumerate(text) if ord(c) > 127)].count("\n") + 1


@pytest.mark.parametrize("kind", ["counsel", "qa", "imhi", "patients", "principles", "records"])
def test_a_windows_1252_file_names_the_line_and_the_encoding(tmp_path, kind):
    load, path, line = _cp1252(kind, tmp_path)
    message = _error(load, path)
    assert message.startswith(f"{path}: line {line}, column ") and "not UTF-8" in message
    assert "looks like Windows-1252" in message and f"iconv -f cp1252 -t utf-8 {path} >" in message


def _utf16(kind: str, folder: Path):
    real = {"imhi": ("imhi", "test_instruction", "DR.csv"), "patients": ("patient_psi_cm", "Patient-Psi-CM_dataset.json"),
            "principles": ("roleplay_doh", "roleplay-doh_principles.csv"), "qa": ("medqa", "psychosis.jsonl"),
            "records": ("arena_outputs", "gpt_iter1_output.jsonl")}
    loaders = {"imhi": imhi.read_imhi_csv, "patients": data.load_patients, "principles": data.load_principles,
               "qa": lambda p: qa.load_items("MedQA", data_file=p), "records": sft.load_pairs,
               "counsel": counsel.load_statements}
    text = shared_data(*real[kind]).read_text(encoding="utf-8") if kind in real else "id,statement\n1,Fine.\n"
    path = folder / (real[kind][-1] if kind in real else "s.csv")
    path.write_text(text, encoding="utf-16")  # what Excel's "Unicode text" and Python's "utf-16" write
    return loaders[kind], path


@pytest.mark.parametrize("kind", ["counsel", "qa", "imhi", "patients", "principles", "records"])
def test_a_utf16_file_says_so(tmp_path, kind):
    load, path = _utf16(kind, tmp_path)
    message = _error(load, path)
    assert message.startswith(f"{path}: UTF-16 text") and "save it as UTF-8" in message


@pytest.mark.parametrize("load, name", [
    (counsel.load_statements, "statements.csv"), (lambda p: qa.load_items("MedQA", data_file=p), "medqa.jsonl"),
    (imhi.read_imhi_csv, "DR.csv"), (data.load_patients, "patients.json"), (data.load_principles, "p.csv"),
    (sft.load_pairs, "records.jsonl"), (report.load_records, "records.jsonl"),
    (lambda p: counsel.load_record_turns([p]), "records.jsonl"),
], ids=["counsel", "qa", "imhi", "patients", "principles", "sft", "report", "record-turns"])
def test_a_folder_where_a_file_is_expected_is_one_line(tmp_path, load, name):
    folder = tmp_path / name
    folder.mkdir()
    assert _error(load, str(folder)) == f"{folder}: is a folder, expected a file"


@pytest.mark.parametrize("kind", ["imhi", "patients", "principles"])
def test_real_files_with_a_bom_read_like_the_originals(tmp_path, kind):
    parts, load = {"imhi": (("imhi", "expert", "DR.csv"), imhi.read_imhi_csv),
                   "patients": (("patient_psi_cm", "Patient-Psi-CM_dataset.json"), data.load_patients),
                   "principles": (("roleplay_doh", "roleplay-doh_filtered.csv"), data.load_principles)}[kind]
    real = shared_data(*parts)
    copy = tmp_path / real.name
    copy.write_bytes(b"\xef\xbb\xbf" + real.read_bytes())
    assert load(copy) == load(real)


def test_an_edited_prompt_saved_by_notepad_renders_like_the_plain_one(tmp_path):
    from mentalarena.prompts import Prompts
    (tmp_path / "plain").mkdir()
    (tmp_path / "notepad").mkdir()
    (tmp_path / "plain" / "greet.txt").write_bytes(b"Hello {name}.\nBe kind.\n")
    (tmp_path / "notepad" / "greet.txt").write_bytes(b"\xef\xbb\xbfHello {name}.\r\nBe kind.\r\n")
    assert Prompts(tmp_path / "notepad").render("greet", name="Ann") == Prompts(tmp_path / "plain").render(
        "greet", name="Ann") == "Hello Ann.\nBe kind."
    (tmp_path / "notepad" / "greet.txt").write_bytes("Hello {name}.\r\nBe kind \u2013 always.\r\n".encode("cp1252"))
    message = _error(Prompts(tmp_path / "notepad").template, "greet")
    assert message.startswith(f"{tmp_path / 'notepad' / 'greet.txt'}: line 2, column 9: not UTF-8")


# ---------------------------------------------------------------- through the scripts' main
def _refuse_models(*args, **kwargs):
    pytest.fail("no model may load on bad input")


def test_counsel_eval_refuses_a_bom_csv_with_a_repeated_id(tmp_path, monkeypatch, capsys):
    import Counsel_eval
    monkeypatch.setattr(Counsel_eval, "make_backend", _refuse_models)
    path = _statements_csv(tmp_path / "s.csv", [("a", "I feel stuck."), ("b", "Nobody listens."), ("a", "Too much.")])
    assert Counsel_eval.main(["--data_file", path, "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path}: rows 1 and 3 both have id 'a'"
    assert not (tmp_path / "out").exists()


def test_counsel_eval_keeps_the_ids_of_a_bom_csv(tmp_path, monkeypatch):
    import Counsel_eval
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_OPENAI_KEY)  # the scripted name resolves to the OpenAI backend
    scores = "\n".join(f"{key}: 7" for key in ("empathy", "exploration", "safety", "non_judgement", "clarity",
                                                 "competence", "tailoring"))
    monkeypatch.setattr(Counsel_eval, "make_backend", lambda *a, **k: ScriptedBackend(
        [("Therapist's response:", scores)], default="That sounds hard."))
    path = _statements_csv(tmp_path / "s.csv", [("c-17", "I feel stuck."), ("c-40", "Work is too much.")])
    assert Counsel_eval.main(["--model", "contestant", "--data_file", path, "--scorers", "rubric", "--bootstrap", "0",
                              "--progress", "False", "--output_dir", str(tmp_path / "out")]) == 0
    scored = (tmp_path / "out" / "contestant" / "s.scored.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in scored] == ["c-17", "c-40"]


def test_medqa_eval_refuses_one_id_on_two_questions(tmp_path, monkeypatch, capsys):
    import MedQA_eval
    monkeypatch.setattr(MedQA_eval, "make_backend", _refuse_models)
    path = tmp_path / "set.csv"
    path.write_text(MEDMCQA_HEADER + "q1,Which lobe?,a,b,c,d,2,Anatomy\r\nq1,Which nerve?,a,b,c,d,1,Anatomy\r\n",
                    encoding="utf-8")
    assert MedQA_eval.main(["--dataset", "MedMCQA", "--data_file", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path}: rows 1 and 2 both have id 'q1'"
    assert not (tmp_path / "out").exists()


def test_imhi_eval_names_the_line_of_a_windows_1252_csv(tmp_path, monkeypatch, capsys):
    import IMHI_eval
    monkeypatch.setattr(IMHI_eval, "make_backend", _refuse_models)
    (tmp_path / "sets").mkdir()
    _, path, line = _cp1252("imhi", tmp_path / "sets")
    assert IMHI_eval.main(["--test_dir", str(tmp_path / "sets"), "--output_dir", str(tmp_path / "out"),
                           "--progress", "False"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: line {line}, column ") and "Windows-1252" in err[0]
    assert not (tmp_path / "out").exists()


def test_arena_med_report_on_a_folder(tmp_path, capsys):
    import arena_med
    (tmp_path / "records.jsonl").mkdir()
    assert arena_med.main(["report", "--input_file", str(tmp_path / "records.jsonl"),
                           "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'records.jsonl'}: is a folder, expected a file"
    assert not (tmp_path / "out").exists()
