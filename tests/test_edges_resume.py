"""Issue 20, resumes that never reuse stale work (items 16, 18, 19): the evaluations' resume keys
cover what changes a score, answers are scored again against the data as it reads now, a local
model retrained in place is another model, two checkpoints of one name never share a folder, and
Counsel_eval checks every route before it asks anything and writes its files under its locks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import Counsel_eval
import MedQA_eval
from conftest import ROOT, make_tiny_llama, shared_data
from llama_server import free_port
from fake_openai import FakeOpenAI
from mentalarena.store.keys import model_fingerprint, model_tag

QA = ROOT / "data" / "qa_sample" / "medqa.jsonl"


def medqa(server, data: Path, out: Path, *extra: str) -> int:
    return MedQA_eval.main(["--model", "fake-model", "--api_base", server.base_url, "--dataset", "MedQA",
                            "--data_file", str(data), "--repeats", "2", "--progress", "False",
                            "--output_dir", str(out), *extra])


def results(out: Path, name: str = "MedQA") -> dict:
    (path,) = out.rglob(f"{name}.results.json")
    return json.loads(path.read_text())


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_corrected_gold_is_scored_again_without_asking_again(tmp_path):
    data = tmp_path / "medqa.jsonl"
    data.write_text(QA.read_text())
    with FakeOpenAI(responder=lambda r: "The answer is A.") as server:
        assert medqa(server, data, tmp_path / "qa") == 0
        asked = len(server.requests)
        before = results(tmp_path / "qa")
        rows = rows_of(data)
        golds = [row["answer_idx"] for row in rows]
        flip = next(i for i, g in enumerate(golds) if g != "A")  # a question whose gold becomes A
        rows[flip]["answer_idx"] = "A"
        rows[flip]["answer"] = rows[flip]["options"]["A"]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert medqa(server, data, tmp_path / "qa") == 0
        assert len(server.requests) == asked  # the answers were kept: the prompt did not change
    after = results(tmp_path / "qa")
    n = before["n"]
    assert after["accuracy"] == pytest.approx(before["accuracy"] + 100 / n, abs=0.01)  # the new gold counts
    assert after["gold_distribution"]["A"] == before["gold_distribution"].get("A", 0) + 1
    assert after["source_sha256"] != before["source_sha256"]


def test_an_edited_question_is_asked_again_and_only_it(tmp_path):
    data = tmp_path / "medqa.jsonl"
    data.write_text(QA.read_text())
    with FakeOpenAI(responder=lambda r: "The answer is B.") as server:
        assert medqa(server, data, tmp_path / "qa") == 0
        asked = len(server.requests)
        rows = rows_of(data)
        rows[2]["question"] = rows[2]["question"].replace("?", " (corrected wording)?")
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert medqa(server, data, tmp_path / "qa") == 0
        new = server.requests[asked:]
    assert len(new) == 2 and all("corrected wording" in r["messages"][-1]["content"] for r in new)  # 2 repeats


def test_another_cop_base_scores_the_same_answers_again(tmp_path):
    source = shared_data("medmcqa", "psychosis.jsonl")
    data = tmp_path / "mcqa.jsonl"
    # rows whose `cop` is valid numbered from 0 and from 1 (1..3), so both readings load
    kept = [line for line in source.read_text().splitlines() if line.strip() and 1 <= json.loads(line)["cop"] <= 3]
    data.write_text("".join(line + "\n" for line in kept[:6]))
    with FakeOpenAI(responder=lambda r: "The answer is B.") as server:
        argv = ["--model", "fake-model", "--api_base", server.base_url, "--dataset", "MedMCQA", "--data_file",
                str(data), "--repeats", "1", "--progress", "False", "--output_dir", str(tmp_path / "qa")]
        assert MedQA_eval.main([*argv, "--cop_base", "1"]) == 0
        one = results(tmp_path / "qa", "MedMCQA")
        asked = len(server.requests)
        assert MedQA_eval.main([*argv, "--cop_base", "0"]) == 0
        zero = results(tmp_path / "qa", "MedMCQA")
        assert len(server.requests) == asked
    cops = [json.loads(ln)["cop"] for ln in data.read_text().splitlines()]
    assert one["accuracy"] == pytest.approx(100 * cops.count(2) / len(cops), abs=0.01)  # B is cop 2 from 1
    assert zero["accuracy"] == pytest.approx(100 * cops.count(1) / len(cops), abs=0.01)  # B is cop 1 from 0


# ---------------------------------------------------------------------------------- local models
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """Two tiny random Llamas, both in folders named `merged` (as every merged model of iterate.py is)."""
    root = tmp_path_factory.mktemp("models")
    a = make_tiny_llama(root / "a" / "merged", tokenizer)
    b = make_tiny_llama(root / "b" / "merged", tokenizer, initializer_range=0.05)
    return Path(a), Path(b)


def local_medqa(model: Path, out: Path) -> int:
    return MedQA_eval.main(["--model", str(model), "--dataset", "MedQA", "--data_file", str(QA), "--limit", "1",
                            "--repeats", "1", "--max_new_tokens", "2", "--progress", "False",
                            "--output_dir", str(out), "--dtype", "float32"])


def test_two_models_named_merged_get_two_folders(tiny, tmp_path):
    a, b = tiny
    assert model_tag(str(a)) != model_tag(str(b)) and model_tag(str(a)).startswith("merged-")
    assert model_tag("meta-llama/Meta-Llama-3-8B") == "meta-llama--Meta-Llama-3-8B"  # hub ids: as before
    assert local_medqa(a, tmp_path / "qa") == 0
    assert local_medqa(b, tmp_path / "qa") == 0  # today: refused, "made with other settings"
    found = sorted(p.parent.name for p in (tmp_path / "qa").rglob("MedQA.results.json"))
    assert len(found) == 2 and found[0] != found[1]
    assert {json.loads(p.read_text())["model"] for p in (tmp_path / "qa").rglob("MedQA.results.json")} == {str(a), str(b)}


def test_a_model_retrained_in_place_is_another_model(tiny, tmp_path, tokenizer, capsys):
    model = tmp_path / "model"
    make_tiny_llama(model, tokenizer)
    first = model_fingerprint(str(model))
    assert local_medqa(model, tmp_path / "qa") == 0
    make_tiny_llama(model, tokenizer, initializer_range=0.3)  # new weights in the same folder
    assert model_fingerprint(str(model)) != first
    capsys.readouterr()
    assert local_medqa(model, tmp_path / "qa") == 2  # not the old answers taken for the new model's
    assert "made with other settings" in capsys.readouterr().err
    assert model_fingerprint("meta-llama/Meta-Llama-3-8B") is None and model_fingerprint(None) is None


def test_counsel_results_of_two_merged_models_do_not_overwrite_each_other(tiny, tmp_path):
    a, b = tiny
    data = tmp_path / "s.jsonl"
    data.write_text(json.dumps({"statement": "I cannot sleep since my father died.",
                                "reference_response": "That sounds very hard."}) + "\n")
    for model in (a, b):
        code = Counsel_eval.main(["--model", str(model), "--data_file", str(data), "--scorers", "rubric",
                                  "--max_new_tokens", "4", "--judge_max_new_tokens", "4", "--progress", "False",
                                  "--output_dir", str(tmp_path / "c"), "--dtype", "float32"])
        assert code in (0, 1)
    found = list((tmp_path / "c").rglob("s.results.json"))
    assert len(found) == 2 and {json.loads(p.read_text())["model"] for p in found} == {str(a), str(b)}


# ---------------------------------------------------------------------------------- Counsel_eval's checks
def test_counsel_checks_the_judge_before_the_model_answers_anything(tmp_path, capsys, monkeypatch):
    """A judge on a server that is not there: today the embedded model answered every statement
    (a minute of work) and then the run failed; now it stops before anything loads or is asked."""
    built = []
    real = Counsel_eval.make_backend

    def spy(model, kind, *args, **settings):
        built.append(kind)
        return real(model, kind, *args, **settings)

    monkeypatch.setattr(Counsel_eval, "make_backend", spy)
    port = free_port()
    code = Counsel_eval.main(["--judge_model", "some-judge", "--judge_api_base", f"http://127.0.0.1:{port}/v1",
                              "--scorers", "rubric", "--limit", "2", "--progress", "False",
                              "--output_dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "unreachable" in err, err
    assert built == ["openai"]  # the judge's client, for its preflight: the embedded model was never built
    assert not list((tmp_path / "c").rglob("*.samples.jsonl"))


def test_counsel_writes_its_files_while_it_holds_its_locks(tmp_path, monkeypatch):
    held = []
    real = Counsel_eval.write_rows

    def watching(path, rows):
        held.append(any(p.name.endswith(".lock") for p in Path(path).parent.iterdir()))
        return real(path, rows)

    monkeypatch.setattr(Counsel_eval, "write_rows", watching)
    with FakeOpenAI(responder=lambda r: "empathy: 7") as server:
        code = Counsel_eval.main(["--model", "fake-model", "--api_base", server.base_url, "--scorers", "rubric",
                                  "--limit", "2", "--progress", "False", "--output_dir", str(tmp_path / "c")])
    assert code == 0 and held == [True]
    assert not list((tmp_path / "c").rglob("*.lock"))  # and gives them back at the end
