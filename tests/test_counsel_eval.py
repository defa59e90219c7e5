"""Counsel_eval.py end to end: scripted models and judges (exact outcomes), resume, the fake OpenAI
server, the embedded model on a few rows, bad input, and the report."""
import json
import re
from pathlib import Path

import pytest

import Counsel_eval
from fake_openai import FakeOpenAI
from conftest import FAKE_OPENAI_KEY, ScriptedBackend

ROOT = Path(__file__).resolve().parent.parent


def _statements(tmp_path, n=6, risk=(1, 4), baseline=True):
    rows = [{"id": f"r{i}", "statement": f"Client statement number {i}: I feel low.", "risk": i in risk,
             "condition": "depression", "severity": "mild", **({"reference_response": "OK-ANSWER"} if baseline else {})}
            for i in range(n)]
    path = tmp_path / "statements.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


RANK = {"GOOD-ANSWER": 3, "OK-ANSWER": 2, "BAD-ANSWER": 1}


def _between(text, start, end='"""'):
    return text.split(start, 1)[1].split(end, 2)[1].strip() if start in text else None


def _fair_verdict(messages):
    prompt = messages[-1]["content"]
    a, b = _between(prompt, "Response A:"), _between(prompt, "Response B:")
    return "Some reasons.\nVerdict: " + ("tie" if RANK[a] == RANK[b] else "A" if RANK[a] > RANK[b] else "B")


def _rubric(messages):
    score = RANK[_between(messages[-1]["content"], "Therapist's response:")] * 3
    return "\n".join(f"{key}: {score}" for key in ("empathy", "exploration", "safety", "non_judgement", "clarity",
                                                   "competence", "tailoring"))


class Models:
    """make_backend's stand-in: one scripted backend per model name, every one kept for inspection."""

    def __init__(self, good=(0, 2, 3), judge="fair"):
        self.made: list[tuple[str, ScriptedBackend]] = []
        self.good, self.judge = good, judge
        self.other_judges: dict[str, str] = {}  # more judge models by name: their verdict style

    def contestant(self, messages):
        number = int(re.search(r"number (\d+)", messages[-1]["content"]).group(1))
        return "GOOD-ANSWER" if number in self.good else "BAD-ANSWER"

    def __call__(self, model, kind, api_base, **settings):
        if model == "judge-model" or model in self.other_judges:
            verdict = {"fair": _fair_verdict, "position_a": "Verdict: A", "tie": "Verdict: tie",
                       "mute": "I would rather not say."}[self.other_judges.get(model, self.judge)]
            backend = ScriptedBackend([("Response A:", verdict), ("Therapist's response:", _rubric)])
        elif model == "baseline-model":
            backend = ScriptedBackend(default="OK-ANSWER")
        else:
            backend = ScriptedBackend([("Client statement", self.contestant)])
        backend.settings = settings
        self.made.append((model, backend))
        return backend

    def calls(self, model):
        return [conv for name, b in self.made if name == model for conv in b.seen]


@pytest.fixture
def models(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_OPENAI_KEY)  # the scripted names resolve to the OpenAI backend
    made = Models()
    monkeypatch.setattr(Counsel_eval, "make_backend", made)
    return made


def _run(tmp_path, data, **flags):
    return Counsel_eval.run(model="contestant", data_file=data, judge_model="judge-model", output_dir=str(tmp_path / "out"),
                            progress=False, bootstrap=200, **flags)


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_exact_outcomes_with_a_fair_judge(tmp_path, models):
    data = _statements(tmp_path)
    results = _run(tmp_path, data, scorers="pairwise,rubric")
    whole = results["subsets"]["all"]
    # contestant: GOOD on rows 0, 2, 3 (beats OK in both orders), BAD on 1, 4, 5 (loses in both)
    assert whole["pairwise"] | {"ci95": None} == {"n": 6, "judged": 6, "wins": 3, "ties": 0, "losses": 3, "unjudged": 0,
                                                   "inconsistent": 0, "win_rate": 50.0, "ci95": None, "no_baseline": 0}
    assert whole["rubric"]["empathy"]["mean"] == 6.0  # (3 x 9 + 3 x 3) / 6
    assert whole["rubric"]["overall"]["complete_rows"] == 6
    risk = results["subsets"]["risk"]  # rows 1 and 4: both BAD
    assert (risk["rows"], risk["pairwise"]["win_rate"], risk["rubric"]["overall"]["mean"]) == (2, 0.0, 3.0)
    assert results["subsets"]["no_risk"]["pairwise"]["win_rate"] == 75.0
    assert results["baseline"] == "data field reference_response" and results["complete"]
    # both orders asked for every row: the model's answer once as A, once as B
    pairwise = [c[-1]["content"] for c in models.calls("judge-model") if "Response A:" in c[-1]["content"]]
    assert len(pairwise) == 12
    for i in range(6):
        own = [p for p in pairwise if f"number {i}:" in p]
        assert sorted(_between(p, "Response A:") == "OK-ANSWER" for p in own) == [False, True]
    # the therapist system text and the statement went to the contestant, one request seed each
    sent = models.calls("contestant")
    assert len(sent) == 6 and sent[0][0]["role"] == "system" and "psychotherapist" in sent[0][0]["content"]
    samples = _lines(tmp_path / "out" / "contestant" / "statements.samples.jsonl")
    assert len({s["seed"] for s in samples}) == 6
    scored = _lines(tmp_path / "out" / "contestant" / "statements.scored.jsonl")
    assert [s["pairwise"]["outcome"] for s in scored] == ["win", "loss", "win", "win", "loss", "loss"]
    assert scored[1]["risk"] and scored[1]["judge_replies"]["model_first"].endswith("Verdict: B")


@pytest.mark.parametrize("judge, win_rate, ties, inconsistent, unjudged", [
    ("position_a", 50.0, 6, 6, 0),
    ("tie", 50.0, 6, 0, 0),
    ("mute", None, 0, 0, 6),
])
def test_biased_tie_prone_and_mute_judges(tmp_path, monkeypatch, judge, win_rate, ties, inconsistent, unjudged):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_OPENAI_KEY)
    made = Models(judge=judge)
    monkeypatch.setattr(Counsel_eval, "make_backend", made)
    got = _run(tmp_path, _statements(tmp_path), scorers="pairwise")["subsets"]["all"]["pairwise"]
    assert (got["win_rate"], got["ties"], got["inconsistent"], got["unjudged"]) == (win_rate, ties, inconsistent, unjudged)


def test_resume_asks_nothing_twice_and_a_new_judge_reuses_the_answers(tmp_path, models):
    data = _statements(tmp_path)
    first = _run(tmp_path, data, scorers="pairwise,rubric")
    asked = len(models.made)
    again = _run(tmp_path, data, scorers="pairwise,rubric")
    assert len(models.made) == asked  # nothing to ask: no backend even built
    assert again["subsets"] == first["subsets"]
    # another judge model (one that calls every pair a tie), same settings otherwise: it is asked
    # everything anew, about the answers on file; the first judge's verdicts are neither reused nor lost
    models.other_judges["tie-judge"] = "tie"
    other = Counsel_eval.run(model="contestant", data_file=data, judge_model="tie-judge", output_dir=str(tmp_path / "out"),
                             progress=False, bootstrap=200, scorers="pairwise")
    assert [name for name, _ in models.made[asked:]] == ["tie-judge"]  # the answers came from the file
    asked_again = [c[-1]["content"] for c in models.made[-1][1].seen]
    assert len(asked_again) == 12 and all(("GOOD-ANSWER" in p) != ("BAD-ANSWER" in p) for p in asked_again)
    whole = other["subsets"]["all"]["pairwise"]
    assert (whole["ties"], whole["wins"], whole["losses"]) == (6, 0, 0)  # its verdicts, not the fair judge's 3/3
    assert first["subsets"]["all"]["pairwise"]["wins"] == 3
    assert other["judge"]["model"] == "tie-judge" and first["judge"]["model"] == "judge-model"
    verdicts = _lines(tmp_path / "out" / "contestant" / "statements.judge.jsonl")
    assert len(verdicts) == 12 + 6 + 12  # the first judge's pairwise and rubric replies, then the new judge's
    samples = _lines(tmp_path / "out" / "contestant" / "statements.samples.jsonl")
    assert len(samples) == 6  # no duplicates
    # and back to the first judge: everything on file, nothing asked
    assert _run(tmp_path, data, scorers="pairwise,rubric")["subsets"] == first["subsets"]
    assert len(models.made) == asked + 1


def test_failed_calls_are_retried_by_the_next_run(tmp_path, models, monkeypatch):
    data = _statements(tmp_path)

    class Flaky(ScriptedBackend):
        def stream(self, conversations, seeds=None, chat=True):
            for index, reply in super().stream(conversations, seeds, chat):
                yield index, (RuntimeError("server went away") if index % 2 else reply)

    real = models.__call__
    monkeypatch.setattr(Counsel_eval, "make_backend", lambda model, *a, **k: (
        Flaky([("Client statement", models.contestant)]) if model == "contestant" else real(model, *a, **k)))
    partial = _run(tmp_path, data, scorers="rubric")
    assert not partial["complete"] and partial["answered"] == 3 and partial["failed_requests"]["responses"] == 3
    assert Counsel_eval._exit_code(Counsel_eval.run, partial) == 1
    monkeypatch.setattr(Counsel_eval, "make_backend", models)
    full = _run(tmp_path, data, scorers="rubric")
    assert full["complete"] and full["answered"] == 6
    samples = _lines(tmp_path / "out" / "contestant" / "statements.samples.jsonl")
    assert sorted(s["statement_id"] for s in samples) == [f"r{i}" for i in range(6)]
    assert len(models.calls("contestant")) == 3  # only the three that failed


def test_baseline_model_answers_in_its_own_folder(tmp_path, models):
    data = _statements(tmp_path, baseline=False)
    got = _run(tmp_path, data, scorers="pairwise", baseline_model="baseline-model")
    assert got["baseline"] == "baseline-model" and got["subsets"]["all"]["pairwise"]["win_rate"] == 50.0
    own = _lines(tmp_path / "out" / "baseline-model" / "statements.samples.jsonl")
    assert [s["response"] for s in own] == ["OK-ANSWER"] * 6
    # the baseline's answers are the same requests the contestant got: same system text, same seeds
    mine = _lines(tmp_path / "out" / "contestant" / "statements.samples.jsonl")
    assert [s["seed"] for s in own] == [s["seed"] for s in mine]


def test_baseline_file(tmp_path, models):
    data = _statements(tmp_path, baseline=False)
    base = tmp_path / "base.jsonl"
    base.write_text("".join(json.dumps({"id": f"r{i}", "response": "GOOD-ANSWER"}) + "\n" for i in range(3)))
    got = _run(tmp_path, data, scorers="pairwise", baseline_file=str(base))["subsets"]["all"]["pairwise"]
    # rows 0-2 only; 0 and 2 tie (GOOD = GOOD), 1 loses (BAD < GOOD)
    assert (got["judged"], got["ties"], got["losses"], got["no_baseline"]) == (3, 2, 1, 3)
    assert got["win_rate"] == pytest.approx(100 / 3, abs=1e-3)


def test_report_table_and_figure_from_two_models(tmp_path, models):
    data = _statements(tmp_path)
    _run(tmp_path, data, scorers="pairwise,rubric")
    models.good = (0, 1, 2, 3, 4, 5)
    Counsel_eval.run(model="other-model", data_file=data, judge_model="judge-model", output_dir=str(tmp_path / "out"),
                     progress=False, bootstrap=200, scorers="pairwise,rubric")
    text = Counsel_eval.report(str(tmp_path / "out"))
    assert "| contestant | statements | all | 6 of 6 |" in text and "| other-model | statements | risk | 2 of 2 |" in text
    assert "100.0 [100.0, 100.0]" in text and (tmp_path / "out" / "report_scores.png").stat().st_size > 5000
    rows = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").rglob("*.results.json"))]
    panels = Counsel_eval.figure_panels(rows, ["empathy", "safety"])
    win = {s["label"]: s["points"] for s in panels[0]["series"]}
    assert win["other-model"]["all"][0] == 100.0 and win["contestant"]["risk"][0] == 0.0
    assert panels[2]["series"][0]["points"] == {}  # no reward scorer: nothing drawn, no crash
    assert {s["label"]: s["points"]["empathy"][0] for s in panels[3]["series"]} == {"contestant": 6.0, "other-model": 9.0}


@pytest.mark.parametrize("argv, message", [
    (["--scorers", "pairwise,vibes"], "--scorers must be one of"),
    (["--scorers", "reward"], "needs --reward_model"),
    (["--scorers", "pairwise", "--baseline_field", "nothing"], "pairwise needs a baseline"),
    (["--from_records", "x.jsonl", "--data_file", "y.jsonl"], "not both"),
    (["--data_file", "absent.jsonl"], "absent.jsonl: no such file"),
    (["--from_records", "absent.jsonl"], "absent.jsonl: --from_records file not found"),
    (["--batch_size", "0"], "--batch_size must be a whole number of at least 1, not 0"),
    (["--scorers", "pairwise", "--baseline_file", "absent.jsonl"], "--baseline_file not found"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Counsel_eval, "make_backend", lambda *a, **k: pytest.fail("no model may load on bad input"))
    code = Counsel_eval.main([*argv, "--output_dir", "out"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and err[-1].startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_a_bad_baseline_file_stops_before_any_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Counsel_eval, "make_backend", lambda *a, **k: pytest.fail("no model may load on bad input"))
    base = tmp_path / "base.jsonl"
    base.write_text(json.dumps({"id": "r0", "answer": "x"}) + "\n")
    code = Counsel_eval.main(["--data_file", _statements(tmp_path, baseline=False), "--baseline_file", str(base),
                              "--output_dir", str(tmp_path / "out")])
    assert code == 2 and f"{base}: row 1: no 'reference_response' or 'response' field" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_judge_that_fails_its_preflight_stops_before_anything(tmp_path, monkeypatch, capsys):
    """The judge named on a server that does not serve it: exit 2 and one line naming that server,
    from the judge's preflight, before the contestant (the embedded model, local) is built or asked
    anything, and nothing is written."""
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_OPENAI_KEY)
    built = []
    real = Counsel_eval.make_backend

    def spy(model, kind, *args, **settings):
        built.append((model, kind))
        return real(model, kind, *args, **settings)

    monkeypatch.setattr(Counsel_eval, "make_backend", spy)
    out = tmp_path / "out"
    with FakeOpenAI(strict_model=True) as server:  # serves "fake-model" only, as vLLM: another name is a 404
        code = Counsel_eval.main(["--judge_model", "absent-judge", "--judge_api_base", server.base_url, "--scorers",
                                  "pairwise,rubric", "--limit", "2", "--progress", "False", "--output_dir", str(out)])
        chats = list(server.requests)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert server.base_url in lines[0] and "no model 'absent-judge' there" in lines[0]
    assert built == [("absent-judge", "openai")]  # the judge's client for its preflight; no local model
    assert [r["max_tokens"] for r in chats] == [1]  # its one-token probe; no statement went anywhere
    assert not out.exists() or [p for p in out.rglob("*") if p.is_file()] == []


def test_bad_row_names_file_row_and_field(tmp_path, capsys):
    data = tmp_path / "s.jsonl"
    data.write_text(json.dumps({"statement": "fine"}) + "\n" + json.dumps({"statement": "x", "risk": "perhaps"}) + "\n")
    assert Counsel_eval.main(["--data_file", str(data), "--output_dir", str(tmp_path / "out")]) == 2
    assert f"{data}: row 2: field 'risk'" in capsys.readouterr().err


def test_through_the_fake_openai_server(tmp_path, monkeypatch):
    """Contestant and judge served by one OpenAI-compatible server (as vLLM or llama.cpp would)."""
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_OPENAI_KEY)

    def responder(request):
        last = request["messages"][-1]["content"]
        if "Response A:" in last:
            return "A is warmer.\nVerdict: A"
        if "Therapist's response:" in last:
            return "empathy: 7\nexploration: 5\nsafety: 9"
        return "It sounds heavy. What has the last week been like?"

    data = _statements(tmp_path, n=4)
    with FakeOpenAI(responder) as server:
        code = Counsel_eval.main(["--model", "fake-model", "--api_base", server.base_url, "--data_file", data,
                                  "--scorers", "pairwise,rubric", "--output_dir", str(tmp_path / "out"),
                                  "--progress", "false", "--seed", "11", "--baseline_model", "fake-baseline"])
    assert code == 0
    results = json.loads((tmp_path / "out" / "fake-model" / "statements.results.json").read_text())
    whole = results["subsets"]["all"]
    assert whole["pairwise"]["inconsistent"] == 4 and whole["pairwise"]["win_rate"] == 50.0  # always A: position bias
    assert whole["rubric"]["safety"]["mean"] == 9.0 and whole["rubric"]["clarity"]["n"] == 0
    # the baseline, named by its served name only, went to the same server; the preflight probed it
    # (a model the server does not list) with one 1-token request, not counted here
    chats = [r for r in server.requests if r.get("max_tokens") != 1]
    assert len(chats) == 4 + 4 + 4 * 3 and sum(r["model"] == "fake-baseline" for r in chats) == 4
    answers = [r for r in chats if r["messages"][0]["role"] == "system"]
    assert len({r["seed"] for r in answers}) == 4 and all(r["temperature"] == 0.7 for r in answers)
    assert results["baseline"] == "fake-baseline"
    assert all(r["temperature"] == 0.0 for r in chats if r["messages"][0]["role"] == "user")
    assert results["settings"]["runs_on"] == "served" and results["seed"] == 11
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file() and path.suffix != ".png":
            assert FAKE_OPENAI_KEY not in path.read_text()


def test_embedded_model_on_two_rows(tmp_path, capsys):
    """The real embedded model answers and judges; whatever a 135M judge writes, the run completes
    and says how many verdicts it could read."""
    code = Counsel_eval.main(["--limit", "2", "--max_new_tokens", "12", "--judge_max_new_tokens", "12",
                              "--scorers", "rubric,pairwise", "--output_dir", str(tmp_path / "out"), "--progress", "false",
                              "--batch_size", "4"])
    assert code == 0
    results = json.loads((tmp_path / "out" / "embedded-SmolLM2-135M-Instruct" / "counsel_sample.results.json").read_text())
    assert results["answered"] == 2 and results["complete"] and results["subsets"]["all"]["pairwise"]["n"] == 2
    scored = _lines(tmp_path / "out" / "embedded-SmolLM2-135M-Instruct" / "counsel_sample.scored.jsonl")
    assert all(s["response"].strip() and len(s["judge_replies"]) == 3 for s in scored)
    assert "win rate" in capsys.readouterr().out and (tmp_path / "out" / "report.md").is_file()


def test_reward_scorer_through_the_script(tmp_path, models, tokenizer, monkeypatch):
    """--scorers reward with a tiny random reward model: the results' mean is the mean of each pair
    scored alone by a direct forward pass; a re-run reads the scores back instead of loading it."""
    import statistics

    import torch
    from test_counsel_reward import save_tiny_reward
    from transformers import AutoModelForSequenceClassification

    from mentalarena.evaluation.reward import pair_ids

    reward = save_tiny_reward(tmp_path / "reward", tokenizer)
    data = _statements(tmp_path)
    got = _run(tmp_path, data, scorers="reward", reward_model=reward, reward_batch_size=4, dtype="float32")
    scored = _lines(tmp_path / "out" / "contestant" / "statements.scored.jsonl")
    model = AutoModelForSequenceClassification.from_pretrained(reward, dtype="float32").eval()
    with torch.inference_mode():
        direct = [float(model(input_ids=torch.tensor([pair_ids(tokenizer, s["statement"], s["response"])])).logits[0, 0])
                  for s in scored]
    assert [s["reward"] for s in scored] == pytest.approx(direct, abs=1e-4)
    whole = got["subsets"]["all"]["reward"]
    assert whole["mean"] == pytest.approx(statistics.fmean(direct), abs=1e-3) and whole["n"] == 6
    assert got["subsets"]["risk"]["reward"]["mean"] == pytest.approx((direct[1] + direct[4]) / 2, abs=1e-3)
    import mentalarena.evaluation.reward
    monkeypatch.setattr(mentalarena.evaluation.reward, "RewardModel", lambda *a, **k: pytest.fail("scores on file: nothing loads"))
    assert _run(tmp_path, data, scorers="reward", reward_model=reward, dtype="float32")["subsets"] == got["subsets"]


def test_no_flagged_statement_means_one_subset(tmp_path, models):
    got = _run(tmp_path, _statements(tmp_path, risk=()), scorers="rubric")
    assert list(got["subsets"]) == ["all"] and got["subsets"]["all"]["rubric"]["overall"]["mean"] == 6.0


def test_an_edited_judge_prompt_asks_the_judge_again(tmp_path, models):
    """Judge replies are found by their exact prompt: an edited rubric template (or principles
    file) asks the judge anew and reuses the answers; an unchanged one asks nothing."""
    import shutil

    data = _statements(tmp_path)
    _run(tmp_path, data, scorers="rubric")
    prompts = tmp_path / "prompts"
    shutil.copytree(ROOT / "prompts", prompts)
    _run(tmp_path, data, scorers="rubric", prompt_dir=str(prompts))
    assert [name for name, _ in models.made] == ["contestant", "judge-model"]  # the same prompts: nothing asked
    (prompts / "counsel_rubric.txt").write_text((prompts / "counsel_rubric.txt").read_text().replace(
        "You are an experienced clinical supervisor.", "You are a strict clinical supervisor."))
    _run(tmp_path, data, scorers="rubric", prompt_dir=str(prompts))
    assert [name for name, _ in models.made] == ["contestant", "judge-model", "judge-model"]
    assert all("strict clinical supervisor" in c[-1]["content"] for c in models.made[-1][1].seen)
    assert len(models.made[-1][1].seen) == 6
