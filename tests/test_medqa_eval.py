"""MedQA_eval.py end to end: scripted answers scored exactly by both scorers, repeats, resume,
failures, bad input, the report, and one run of the embedded model."""
from __future__ import annotations

import json

import pytest
from conftest import ScriptedBackend, shared_data

import MedQA_eval as ev
from mentalarena.errors import InputError, ModelCallError
from mentalarena.store.jsonl import read_jsonl
from mentalarena.prompts import Prompts

QUESTIONS = [
    {"question": "Q-alpha: which drug?", "options": {"A": "Lithium", "B": "Gynecomastia", "C": "Sertraline", "D": "Haloperidol"},
     "answer_idx": "B", "answer": "Gynecomastia"},
    {"question": "Q-beta: which test?", "options": {"A": "ANC", "B": "TSH", "C": "ECG", "D": "EEG"},
     "answer_idx": "C", "answer": "ECG"},
    {"question": "Q-gamma: which diagnosis?", "options": {"A": "Schizophrenia", "B": "Delirium", "C": "Mania", "D": "Panic"},
     "answer_idx": "A", "answer": "Schizophrenia"},
    {"question": "Q-delta: which treatment?", "options": {"A": "Thiamine", "B": "Folate", "C": "Zinc", "D": "Iron"},
     "answer_idx": "A", "answer": "Thiamine"},
]
# gold B, C, A, A. Robust: right, right, right, wrong. Rule R: "The answer is C." starts with "T": wrong;
# "Gynecomastia" has no "." and is the answer text: right; "A" is right; "D." is wrong.
ANSWERS = [("Q-alpha", "Gynecomastia"), ("Q-beta", "The answer is C."), ("Q-gamma", "A"), ("Q-delta", "D.")]


class StreamingScripted(ScriptedBackend):
    """Scripted answers through the default `stream`; may fail chosen questions."""

    max_batch_size = 3

    def __init__(self, rules, fail=(), **kw):
        super().__init__(rules, **kw)
        self.fail = set(fail)
        self.asked: list[str] = []

    def generate(self, conversations, seeds=None):
        self.asked += [c[-1]["content"].split(":")[0] for c in conversations]
        if any(c[-1]["content"].split(":")[0] in self.fail for c in conversations):
            raise ModelCallError("scripted failure")
        return super().generate(conversations, seeds)


@pytest.fixture()
def medqa_file(tmp_path):
    path = tmp_path / "tiny_medqa.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def evaluate(backend, data_file, out_dir, repeats=1, dataset="MedQA", **settings):
    job = ev._job(dataset, None, str(data_file), None, None)
    s = ev._settings("scripted-model", "openai", None, None, None, 256, repeats, 0, False)
    s.update(settings)
    return ev.evaluate(backend, job, Prompts(), s, out_dir, progress=False)


def test_both_scorers_exactly_on_scripted_answers(medqa_file, tmp_path):
    backend = StreamingScripted(ANSWERS)
    result = evaluate(backend, medqa_file, tmp_path)
    assert result["accuracy"] == 75.0 and result["accuracy_reference"] == 50.0
    assert result["n"] == 4 and result["complete"] and result["accuracy_std"] == 0.0
    assert result["majority_baseline"] == {"answer": "A", "accuracy": 50.0}
    rows = read_jsonl(tmp_path / "scripted-model" / "MedQA.samples.jsonl")
    by_id = {r["id"]: r for r in rows}
    assert by_id["MedQA-1"]["extracted"] == "C" and by_id["MedQA-1"]["correct_reference"] is False
    assert by_id["MedQA-0"]["output"] == "Gynecomastia" and by_id["MedQA-0"]["correct_reference"] is True
    # what was sent: the paper's system text, the question, one "X. text" line per option
    sent = backend.seen[0]
    assert sent[0] == {"role": "system", "content": "You are a psychiatric expert."}
    assert "\nA. Lithium\nB. Gynecomastia\nC. Sertraline\nD. Haloperidol\n" in sent[1]["content"]
    saved = json.loads((tmp_path / "scripted-model" / "MedQA.results.json").read_text())
    assert saved["accuracy"] == 75.0 and saved["settings"]["temperature"] == 0.0  # API default


def test_repeats_give_mean_and_sample_std(medqa_file, tmp_path):
    calls = {"n": 0}

    def alternating(messages):  # first repeat of Q-delta wrong, second right
        calls["n"] += 1
        return "D" if calls["n"] == 1 else "A"

    backend = StreamingScripted([*ANSWERS[:3], ("Q-delta", alternating)])
    result = evaluate(backend, medqa_file, tmp_path, repeats=2)
    assert [p["accuracy"] for p in result["per_repeat"]] == [75.0, 100.0]
    assert result["accuracy"] == 87.5 and result["accuracy_std"] == pytest.approx(17.68, abs=0.01)
    assert result["repeats"] == 2 and len(backend.asked) == 8


def test_failed_requests_are_retried_by_a_rerun_and_nothing_is_asked_twice(medqa_file, tmp_path):
    broken = StreamingScripted(ANSWERS, fail={"Q-delta"})  # chunks of 3: the last chunk fails
    first = evaluate(broken, medqa_file, tmp_path)
    assert not first["complete"] and first["missing_answers"] == 1 and first["failed_requests"] == 1
    assert first["accuracy"] == 100.0  # scored on what was answered, and flagged incomplete
    fixed = StreamingScripted(ANSWERS)
    second = evaluate(fixed, medqa_file, tmp_path)
    assert fixed.asked == ["Q-delta"]
    assert second["complete"] and second["accuracy"] == 75.0 and second["accuracy_reference"] == 50.0
    rows = read_jsonl(tmp_path / "scripted-model" / "MedQA.samples.jsonl")
    assert len(rows) == 4 and len({(r["id"], r["repeat"]) for r in rows}) == 4


def test_other_settings_refuse_to_mix(medqa_file, tmp_path):
    evaluate(StreamingScripted(ANSWERS), medqa_file, tmp_path)
    with pytest.raises(InputError, match="made with other settings"):
        evaluate(StreamingScripted(ANSWERS), medqa_file, tmp_path, max_new_tokens=8)


def test_more_questions_or_repeats_top_up_the_same_run(medqa_file, tmp_path):
    """--limit and --repeats are not in the hash: raising them asks only what is missing."""
    first = StreamingScripted(ANSWERS)
    job = ev._job("MedQA", None, str(medqa_file), 2, None)
    s = ev._settings("scripted-model", "openai", None, None, None, 256, 1, 0, False)
    small = ev.evaluate(first, job, Prompts(), s, tmp_path, progress=False)
    assert small["n"] == 2 and len(first.asked) == 2
    more = StreamingScripted(ANSWERS)
    result = evaluate(more, medqa_file, tmp_path, repeats=2)
    assert len(more.asked) == 4 * 2 - 2  # 2 new questions x 2 repeats, plus repeat 1 of the first two
    assert result["complete"] and result["n"] == 4 and result["repeats"] == 2
    assert result["settings_hash"] == small["settings_hash"]
    again = StreamingScripted(ANSWERS)
    back = evaluate(again, medqa_file, tmp_path, repeats=1)  # fewer repeats: answers on file, nothing asked
    assert again.asked == [] and back["complete"] and [p["repeat"] for p in back["per_repeat"]] == [0]
    rows = read_jsonl(tmp_path / "scripted-model" / "MedQA.samples.jsonl")
    assert len(rows) == len({(r["id"], r["repeat"]) for r in rows}) == 8


@pytest.mark.parametrize("change", [{"dtype": "float32"}, {"temperature": 0.7}, {"with_context": True}])
def test_what_changes_answers_refuses_to_mix(medqa_file, tmp_path, change):
    evaluate(StreamingScripted(ANSWERS), medqa_file, tmp_path, dtype="bfloat16")
    with pytest.raises(InputError, match="made with other settings"):
        evaluate(StreamingScripted(ANSWERS), medqa_file, tmp_path, **{"dtype": "bfloat16", **change})


def test_pubmedqa_decisions_through_the_loop(tmp_path):
    rows = [{"QUESTION": f"Q{i}: does it work?", "CONTEXTS": ["Some abstract."], "final_decision": gold, "id": str(i)}
            for i, gold in enumerate(["yes", "no", "maybe", "yes"])]
    path = tmp_path / "pub.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = [("Q0", "Yes."), ("Q1", "No, it does not."), ("Q2", "The answer is maybe"), ("Q3", "Yes and no.")]
    backend = StreamingScripted(answers)
    result = evaluate(backend, path, tmp_path, dataset="PubMedQA", with_context=True)
    # robust: yes, no, maybe, yes -> 4/4; reference: Q3 has both "yes" and "no" -> 3/4
    assert result["accuracy"] == 100.0 and result["accuracy_reference"] == 75.0
    assert "Context:\nSome abstract." in backend.seen[0][1]["content"]


def test_report_is_one_table_per_scorer_with_published_numbers(medqa_file, tmp_path):
    evaluate(StreamingScripted(ANSWERS), medqa_file, tmp_path)
    other = StreamingScripted([(q, "A") for q, _ in ANSWERS])
    job = ev._job("MedQA", None, str(medqa_file), None, None)
    s = ev._settings("another/model", "openai", None, None, None, 256, 1, 0, False)
    ev.evaluate(other, job, Prompts(), s, tmp_path, progress=False)
    text = ev.report(str(tmp_path))
    assert "| scripted-model | 75.00 ± 0.00 (1 run) |" in text
    assert "| scripted-model | 50.00 ± 0.00 (1 run) |" in text  # reference scorer table
    assert "| another/model | 50.00 ± 0.00 (1 run) |" in text
    assert "| majority answer (constant) | 50.00 |" in text
    assert "| Llama-3-8B | 70.52 | 42.04 | 86.59 |" in text
    assert (tmp_path / "report.md").read_text() == text
    # one figure per scorer beside the report, named in it, drawn from the table's numbers
    for scorer in ("accuracy", "accuracy_reference"):
        figure = tmp_path / f"report_{scorer}.png"
        assert figure.read_bytes().startswith(b"\x89PNG") and figure.stat().st_size > 5000
        assert f"![{scorer}](report_{scorer}.png)" in text
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.rglob("*.results.json"))]
    robust, rule_r = (ev.figure_panel(rows, ["MedQA"], s) for s in ("accuracy", "accuracy_reference"))
    assert [(s["label"], s["values"], s["errors"]) for s in robust["series"][:2]] == [
        ("another/model", {"MedQA": 50.0}, {}), ("scripted-model", {"MedQA": 75.0}, {})]  # 1 run: no error bar
    assert [s["values"] for s in rule_r["series"][:2]] == [{"MedQA": 50.0}, {"MedQA": 50.0}]
    assert robust["baseline"] == rule_r["baseline"] == {"MedQA": 50.0}
    assert [(s["label"], s["values"], s["published"]) for s in robust["series"][2:]] == [
        (f"published: {m}", {"MedQA": v["MedQA"]}, True) for m, v in ev.PUBLISHED.items()]


def _result(model, benchmark, accuracy, std, repeats, majority=30.0, **more):
    return {"model": model, "benchmark": benchmark, "accuracy": accuracy, "accuracy_std": std, "repeats": repeats,
            "accuracy_reference": accuracy and accuracy - 10, "accuracy_reference_std": std, "complete": True,
            "majority_baseline": {"answer": "A", "accuracy": majority}, **more}


def test_figure_values_are_the_tables_and_missing_data_is_no_bar(tmp_path):
    rows = [_result("m1", "MedQA", 61.5, 2.25, 5), _result("m1", "MedMCQA-Anatomy", 40.0, 0.0, 1, majority=25.5),
            _result("m2", "MedQA", None, None, 3, complete=False)]  # m2: no answer yet, and no Anatomy run
    columns = sorted({r["benchmark"] for r in rows}, key=ev._column_order)
    panel = ev.figure_panel(rows, columns, "accuracy")
    assert panel["groups"] == ["MedQA", "MedMCQA-Anatomy"]
    assert [(s["label"], s["values"], s["errors"]) for s in panel["series"][:2]] == [
        ("m1", {"MedQA": 61.5, "MedMCQA-Anatomy": 40.0}, {"MedQA": 2.25}), ("m2", {"MedQA": None}, {"MedQA": None})]
    assert panel["baseline"] == {"MedQA": 30.0, "MedMCQA-Anatomy": 25.5}
    # the paper has no generalization-table numbers: published series carry MedQA only
    assert all(s["values"] == {"MedQA": ev.PUBLISHED[s["label"].removeprefix("published: ")]["MedQA"]}
               for s in panel["series"][2:])
    assert "61.50 ± 2.25" in "\n".join(ev._table(rows, columns, "accuracy"))
    assert ev.figure_panel(rows, columns, "accuracy_reference")["series"][0]["values"] == \
        {"MedQA": 51.5, "MedMCQA-Anatomy": 30.0}
    # drawn without error, also the generalization sets alone (no published numbers at all)
    (tmp_path / "m").mkdir()
    for i, r in enumerate(rows):
        (tmp_path / "m" / f"{i}.results.json").write_text(json.dumps(r))
    ev.report(str(tmp_path), str(tmp_path / "out" / "qa.md"))
    assert (tmp_path / "out" / "qa_accuracy.png").stat().st_size > 0
    assert (tmp_path / "out" / "qa_accuracy_reference.png").stat().st_size > 0
    first = (tmp_path / "out" / "qa_accuracy.png").read_bytes()
    ev.report(str(tmp_path), str(tmp_path / "out" / "qa.md"))
    assert (tmp_path / "out" / "qa_accuracy.png").read_bytes() == first  # the same figure, byte for byte
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["qa.md", "qa_accuracy.png",
                                                                     "qa_accuracy_reference.png"]  # no temporary left
    only = ev.figure_panel(rows[1:2], ["MedMCQA-Anatomy"], "accuracy")
    assert [s["label"] for s in only["series"]] == ["m1"]


@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "MedQB"], "MedQB"),
    (["--dataset", "MedQA", "--data_file", "/nonexistent/x.jsonl"], "/nonexistent/x.jsonl"),
    (["--dataset", "MMLU", "--name", "astrology", "--data_file", "x.jsonl"], "astrology"),
    (["--repeats", "0", "--data_file", "DATA"], "--repeats"),
    (["report", "--output_dir", "/nonexistent/dir"], "no *.results.json"),
    (["suite", "--tables", "appendix"], "--tables"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, medqa_file, capsys):
    argv = [str(medqa_file) if a == "DATA" else a for a in argv]
    if argv[:2] == ["--repeats", "0"]:
        argv += ["--dataset", "MedQA"]
    assert ev.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_suite_accepts_the_readme_tables_form(capsys):
    # fire hands "main,appendix" over as a tuple; the bad name must be named, not the tuple's repr
    assert ev.main(["suite", "--tables", "main,appendix"]) == 2
    err = capsys.readouterr().err
    assert "'appendix'" in err and "('main'" not in err


def _suite_data_dir(root):
    """Every file of both tables in the paper's layout; job j holds 1 + j % 3 questions, each naming its
    set, with gold A for the first question and B for the others: an always-"A" model scores 100 / n."""
    files, j = {}, 0
    for table in ("main", "generalization"):
        for dataset, subset in ev.TABLES[table]:
            stem = dataset + (f"-{subset}" if subset else "")
            n = 1 + j % 3
            j += 1
            questions = [f"[{stem}] question {q}?" for q in range(n)]
            golds = ["A"] + ["B"] * (n - 1)
            if dataset == "PubMedQA":
                path = root / "pubmedqa" / "test_samples.jsonl"
                rows = [{"QUESTION": text, "CONTEXTS": ["An abstract."], "final_decision": "yes" if gold == "A" else "no"}
                        for text, gold in zip(questions, golds)]
            elif dataset == "MedMCQA":
                path = root / "medmcqa" / ("psychosis.jsonl" if subset is None else f"subjects/{subset}.jsonl")
                rows = [{"question": text, "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": "ABCD".index(gold) + 1,
                         "subject_name": subset or "Psychiatry"} for text, gold in zip(questions, golds)]
            else:  # MedQA and MMLU: the paper's files share one schema
                path = root / ("medqa/psychosis.jsonl" if dataset == "MedQA" else f"mmlu/{subset}_test.jsonl")
                rows = [{"question": text, "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": gold}
                        for text, gold in zip(questions, golds)]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            files[stem] = (table, n)
    return files


def test_suite_runs_both_tables_from_a_data_dir_and_reports_every_set(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-suite")  # the OpenAI API's key must be there before anything runs
    files = _suite_data_dir(tmp_path / "data")
    assert len(files) == len(ev.MAIN_TABLE) + len(ev.GENERALIZATION_TABLE) == 19  # 3 + 10 MedMCQA + 6 MMLU
    backend = StreamingScripted([("[PubMedQA]", "Yes.")], default="A")
    built = []
    monkeypatch.setattr(ev, "_backend", lambda *a: built.append(a) or backend)  # one model for the whole suite
    out = tmp_path / "out"
    # the README's form: fire hands "main,generalization" over as a tuple
    assert ev.main(["suite", "--model", "scripted-model", "--backend", "openai", "--tables", "main,generalization",
                    "--data_dir", str(tmp_path / "data"), "--repeats", "1", "--output_dir", str(out),
                    "--progress", "False"]) == 0
    assert len(built) == 1
    # every question of every set of both tables was asked once, and nothing else
    asked = sorted(c[-1]["content"].split("\n")[0] for c in backend.seen)  # the question opens the prompt
    assert asked == sorted(f"[{stem}] question {q}?" for stem, (_, n) in files.items() for q in range(n))
    for stem, (table, n) in files.items():
        result = json.loads((out / "scripted-model" / f"{stem}.results.json").read_text())
        assert (result["benchmark"], result["n"], result["complete"]) == (stem, n, True), (table, stem)
        assert result["accuracy"] == round(100 / n, 2), (table, stem)
        assert result["source"] == str((tmp_path / "data").resolve() / ev.LOCAL_FILES[
            (result["dataset"], None if table == "main" else "*")][0].format(s=result["subset"])), (table, stem)
    # the report: one column per set of both tables, in both scorers' tables
    report = (out / "report.md").read_text()
    assert report in capsys.readouterr().out
    header = next(line for line in report.splitlines() if line.startswith("| model |"))
    columns = header.strip("| ").split(" | ")[1:]
    assert columns[:3] == ["MedQA", "MedMCQA", "PubMedQA"] and sorted(columns) == sorted(files)
    assert report.count(header) == 2  # robust and reference scorers
    row = next(line for line in report.splitlines() if line.startswith("| scripted-model |"))
    cells = dict(zip(columns, row.strip("| ").split(" | ")[1:]))
    assert cells == {stem: f"{100 / n:.2f} ± 0.00 (1 run)" for stem, (_, n) in files.items()}


def test_row_without_gold_names_file_row_and_field(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps({**QUESTIONS[1], "answer_idx": ""}) + "\n")
    assert ev.main(["--dataset", "MedQA", "--data_file", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: row 2: field 'answer_idx' must be a non-empty string" in err


def test_suite_finds_the_paper_files_in_a_data_dir():
    data = shared_data()
    assert ev._local_file(str(data), "MedQA", None).endswith("medqa/psychosis.jsonl")
    assert ev._local_file(str(data), "MedMCQA", "Anatomy").endswith("medmcqa/subjects/Anatomy.jsonl")
    assert ev._local_file(str(data), "MMLU", "college_medicine").endswith("mmlu/college_medicine_test.jsonl")
    assert ev._local_file(str(data), "MMLU", "college_biology") is None  # -> the hub
    with pytest.raises(InputError, match="not on the hub"):
        ev._local_file(str(data / "mmlu"), "MedQA", None)


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(QUESTIONS[0]) + "\n")
    return path


def test_suite_data_dir_names_match_regardless_of_case(tmp_path, capsys):
    # the MentalArena repository's data/ folder: MedQA/, MedMCQA/illnesses/, MMLU/test/, PubMedQA/
    paper = tmp_path / "data"
    files = {("MedQA", None): _touch(paper / "MedQA" / "psychosis.jsonl"),
             ("MedMCQA", None): _touch(paper / "MedMCQA" / "Psychosis.JSONL"),
             ("MedMCQA", "Anatomy"): _touch(paper / "MedMCQA" / "illnesses" / "ANATOMY.jsonl"),
             ("PubMedQA", None): _touch(paper / "PubMedQA" / "test_samples.jsonl"),
             ("MMLU", "college_medicine"): _touch(paper / "MMLU" / "test" / "college_medicine_test.jsonl")}
    for (dataset, subset), path in files.items():
        assert ev._local_file(str(paper), dataset, subset) == str(path)
    assert ev._local_file(str(paper), "MMLU", "college_biology") is None  # -> the hub
    (paper / "MedQA" / "psychosis.jsonl").unlink()
    with pytest.raises(InputError, match="no medqa/psychosis.jsonl"):
        ev._local_file(str(paper), "MedQA", None)
    if (tmp_path / "DATA").exists():
        pytest.skip("case-insensitive file system: two names differing only by case cannot exist")
    _touch(paper / "medqa" / "psychosis.jsonl")
    _touch(paper / "MEDQA" / "psychosis.jsonl")
    assert ev.main(["suite", "--tables", "main", "--data_dir", str(paper)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {paper / 'MEDQA'} and {paper / 'MedQA'} and {paper / 'medqa'} differ only by case; "
                   "keep one of them"]


def test_model_tags_are_safe_folder_names():
    assert ev.model_tag("gpt-4o") == "gpt-4o"
    assert ev.model_tag("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama--Meta-Llama-3-8B-Instruct"
    assert ev.model_tag("ft:gpt-3.5-turbo:org::abc") == "ft-gpt-3.5-turbo-org--abc"


def test_the_embedded_model_on_three_questions(tmp_path):
    """Real model, real loop: three questions of the project's sample, greedy."""
    result = ev.run(dataset="MedQA", data_file="data/qa_sample/medqa.jsonl", limit=3, repeats=1, temperature=0,
                    max_new_tokens=16, batch_size=2, output_dir=str(tmp_path), progress=False)
    assert result["complete"] and result["n"] == 3 and result["backend"] == "embedded"
    rows = read_jsonl(tmp_path / "embedded-SmolLM2-135M-Instruct" / "MedQA.samples.jsonl")
    assert len(rows) == 3 and all(r["output"] for r in rows)
    assert result["accuracy"] == round(100 * sum(r["correct"] for r in rows) / 3, 2)
    assert result["accuracy_reference"] == round(100 * sum(r["correct_reference"] for r in rows) / 3, 2)
