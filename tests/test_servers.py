"""Correct against servers: per-request seeds, the judge's route, preflight, several endpoints,
context overflows, one writer per output, and a progress bar that moves.

Fake servers (tests/fake_openai.py) inject what real ones rarely do on demand; the same behaviours
against a real llama.cpp server are in tests/test_llama_cpp.py.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, backend_sleeps, embedded_tokenizer, make_tiny_llama, request_deadlines
from fake_openai import FakeOpenAI, Faults
from test_session import CountingBackend, make_arena

import arena_med
import IMHI_eval
import iterate
import MedQA_eval
from mentalarena.engines.backends import Route, describe_routes, judge_route, route
from mentalarena.store.keys import request_seed
from mentalarena.selfplay.data import DEFAULT_PATIENTS_FILE, load_patients
from mentalarena.engines.engine import Gate, ModelClient
from mentalarena.errors import BusyError, ContextOverflow, ModelCallError
from mentalarena.store.locks import OutputLock
from mentalarena.engines.openai_backend import OpenAIBackend
from mentalarena.progress import Progress, SessionProgress

SECRET = "sk-test-SECRET-4242424242424242"
PATIENT = load_patients(DEFAULT_PATIENTS_FILE)[0]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question number {i}"}]


# ---------------------------------------------------------------------------------- 1. seeds
@pytest.mark.parametrize("parts, seed", [
    # the spec: sha256 of the parts joined by "|", first 8 bytes big-endian, top bit cleared
    ((0, "p-01", 0, "principles.choice"), 2201149112792687283),
    ((0, "p-01", 1, "principles.choice"), 3541292553689637524),   # another sample of the patient
    ((0, "p-01", 0, "treatment.2.score"), 4826189832666798032),   # another call of the session
    ((7, "p-01", 0, "principles.choice"), 4181585915221388129),   # another --seed
    ((0, "MedQA-12", 3), 7155929644326892622),                    # MedQA_eval: question, repeat
    (("0", "dreaddit", "5:ab12cd34ef56"), 7011424616829960482),   # IMHI_eval: dataset, row key
])
def test_request_seed_is_a_fixed_function_of_the_call(parts, seed):
    assert request_seed(*parts) == seed
    assert 0 <= seed < 2 ** 63


def test_every_call_of_a_session_has_its_own_seed_sent_and_recorded():
    backend = CountingBackend([5] * 14)
    arena = make_arena(backend, seed=3, max_tries=2, max_decode_rounds=1)
    arena.base.gate.active = 1
    first = asyncio.run(arena_med.run_session(PATIENT, 0, arena))
    sent_first = list(backend.seeds)
    second = asyncio.run(arena_med.run_session(PATIENT, 1, arena))

    seeds = [t["seed"] for t in first["transcript"]]
    assert len(set(seeds)) == len(seeds) == first["calls"]  # every step is its own draw
    assert seeds == [request_seed(3, PATIENT["id"], 0, t["step"]) for t in first["transcript"]]
    assert sorted(sent_first) == sorted(seeds)  # each call went out with its recorded seed
    assert not set(seeds) & {t["seed"] for t in second["transcript"]}  # another sample: other draws
    # the transcript keeps the order the calls were made in, also for calls run side by side
    steps = [t["step"] for t in first["transcript"]]
    assert steps.index("decode.0.feedback") < steps.index("decode.0.principle_feedback")


def test_the_local_engine_gives_the_same_records_at_any_concurrency(tmp_path):
    """Sampled sessions of a real (tiny, random) Llama in float32: concurrency 1 and 8 batch the
    calls differently, yet every reply is the same, and the two samples of a patient differ."""
    tiny = make_tiny_llama(tmp_path / "tiny", embedded_tokenizer(), max_position_embeddings=4096)
    records = {}
    for concurrency in (1, 8):
        out = tmp_path / f"c{concurrency}.jsonl"
        summary = arena_med.run(base_model=tiny, output_file=str(out), limit=2, num_samples=2, max_new_tokens=12,
                                dialogue_rounds=1, max_decode_rounds=0, max_tries=2, concurrency=concurrency,
                                dtype="float32", progress=False)
        assert summary["sessions_ok"] == 4
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        records[concurrency] = {(r["patient_id"], r["sample"]): _content(r) for r in rows}
    assert records[1] == records[8]
    one = records[1]
    pid = next(iter(one))[0]
    replies = [[t["reply"] for t in one[(pid, k)]["transcript"]] for k in (0, 1)]
    assert replies[0] != replies[1]
    assert sum(a != b for a, b in zip(*replies)) > len(replies[0]) // 2


def _content(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "elapsed_s"}


def test_transformers_generate_fallback_samples_each_row_from_its_own_seed(tmp_path):
    """Models the fast paths cannot run go through transformers' generate; with SeededSampler a
    row's reply does not depend on the others in its batch either."""
    from mentalarena.engines.hf_backend import HFBackend

    tiny = make_tiny_llama(tmp_path / "tiny", embedded_tokenizer())
    backend = HFBackend(tiny, temperature=1.0, max_new_tokens=10, dtype="float32")
    backend.prefix_reuse = False
    convs = [conversation(i) for i in range(3)]
    together = backend.generate(convs, seeds=[11, 12, 13])
    alone = backend.generate(convs[1:2], seeds=[12])
    assert together[1].text == alone[0].text
    assert backend.generate(convs[1:2], seeds=[99])[0].text != alone[0].text


# ---------------------------------------------------------------------------------- 2. routes
A, B, OPENAI = "http://a:8000/v1", "http://b:8000/v1", "https://api.openai.com/v1"


@pytest.mark.parametrize("base, judge, expected", [
    (("m", "auto", A), (None, "auto", None), "base"),
    (("m", "auto", A), ("m", "auto", None), "base"),                  # the same model is the same client
    (("m", "auto", A), ("m", "auto", A), "base"),
    (("m", "auto", f"{A},{B}"), ("m", "auto", None), "base"),
    (("m", "auto", A), ("j", "auto", None), ("openai", (A,))),       # another served model: the same server
    (("m", "auto", A), ("gpt-4-turbo", "auto", None), ("openai", (A,))),  # never the OpenAI API by itself
    (("m", "auto", A), ("gpt-4-turbo", "openai", None), ("openai", (A,))),
    (("m", "auto", A), ("gpt-4-turbo", "auto", OPENAI), ("openai", (OPENAI,))),  # unless named
    (("m", "auto", A), ("m", "auto", B), ("openai", (B,))),          # the same name on another server
    (("m", "auto", A), ("org/judge", "hf", None), ("hf", ())),       # a local judge, when asked for
    (("org/base", "auto", None), ("gpt-4-turbo", "auto", None), ("openai", ())),  # the paper's setting
    (("org/base", "auto", None), ("org/base", "auto", None), "base"),
    (("org/base", "auto", None), ("org/judge", "auto", None), ("hf", ())),
    ((None, "auto", None), (None, "auto", None), "base"),
    (("gpt-4o", "auto", None), ("gpt-4o", "openai", None), "base"),
    (("gpt-4o", "auto", None), ("judge", "auto", B), ("openai", (B,))),
])
def test_judge_routing_table(base, judge, expected):
    base_route = route(*base)
    got = judge_route(base_route, *judge)
    assert (got if got is None else (got.kind, got.servers)) == (None if expected == "base" else expected)


def test_the_routes_line_says_where_each_role_goes():
    base = route("m", "auto", "http://user:pw@a:8000/v1")
    assert describe_routes(base, None) == ("base model 'm' -> http://a:8000/v1 (no key); judge -> the base model "
                                           "(same client, shared batches)")
    away = describe_routes(base, judge_route(base, "gpt-4-turbo", "auto", OPENAI))
    assert "judge 'gpt-4-turbo' -> https://api.openai.com/v1 (key $OPENAI_API_KEY) (not --api_base" in away
    assert "pw" not in away
    local = describe_routes(route("org/base"), judge_route(route("org/base"), "gpt-4o"))
    assert "base model 'org/base' -> a local model" in local and "judge 'gpt-4o' -> the OpenAI API" in local
    assert Route("m", "openai", (A, B)).where() == f"{A}, {B} (no key)"
    keyed = route("m", "auto", A, "VLLM_KEY")
    assert keyed.where() == f"{A} (key $VLLM_KEY)"
    assert judge_route(keyed, "j").where() == f"{A} (key $VLLM_KEY)"  # a judge served there gets the same key


def test_a_served_judge_stays_on_the_named_server(tmp_path, monkeypatch):
    """The reported bug: --api_base with a judge named like the base model sent the judge's calls
    (and the key) to the OpenAI API. Every call must reach the named server, none leave it."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{free_port()}/v1")  # where a stray call would go
    with FakeOpenAI(responder=lambda r: "Group 1. 7") as server:
        code = arena_med.main(["--base_model", "fake-model", "--judge_model", "other-judge", "--api_base",
                               server.base_url, "--output_file", str(tmp_path / "o.jsonl"), "--limit", "1",
                               "--dialogue_rounds", "1", "--max_decode_rounds", "0", "--max_tries", "1",
                               "--progress", "False"])
        models = {r["model"] for r in server.requests}
    assert code == 0
    assert models == {"fake-model", "other-judge"}  # the judge has its own name, on the same server


# ---------------------------------------------------------------------------------- 3. preflight
def _arena_argv(api_base: str, output: Path, model: str = "fake-model") -> list[str]:
    return ["--base_model", model, "--api_base", api_base, "--output_file", str(output), "--progress", "False"]


def _fails_fast(main, argv, capsys, monkeypatch, *needles: str) -> str:
    """The run stops at its preflight with one line. Fast by its mechanism, not by a clock: every
    request it made had the preflight's deadline (PREFLIGHT_TIMEOUT, 10 s), and the backend asked
    for no wait (no backoff)."""
    from mentalarena.engines.openai_client import PREFLIGHT_TIMEOUT

    deadlines, sleeps = request_deadlines(monkeypatch), backend_sleeps(monkeypatch)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert deadlines and set(deadlines) == {PREFLIGHT_TIMEOUT}, deadlines
    assert sleeps == [], sleeps
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert SECRET not in out + err and "pw@" not in out + err
    return lines[0]


def test_an_unreachable_server_fails_in_seconds_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    port = free_port()  # nothing listens there
    output = tmp_path / "o.jsonl"
    _fails_fast(arena_med.main, _arena_argv(f"http://user:pw@127.0.0.1:{port}/v1", output), capsys, monkeypatch,
                f"http://127.0.0.1:{port}/v1", "unreachable", "connection refused")
    assert not output.exists()
    _fails_fast(MedQA_eval.main, ["--model", "m", "--api_base", f"http://127.0.0.1:{port}/v1", "--dataset", "MedQA",
                                  "--data_file", str(ROOT / "data/qa_sample/medqa.jsonl"), "--output_dir",
                                  str(tmp_path / "qa")], capsys, monkeypatch, f"127.0.0.1:{port}", "connection refused")


def test_a_refused_key_fails_in_seconds_without_printing_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("WRONG_KEY", SECRET)
    with FakeOpenAI(require_key="sk-the-right-one") as server:  # its 401 quotes the key it got
        # no key named for this server: OPENAI_API_KEY stays home, and the line says which flag to use
        _fails_fast(arena_med.main, _arena_argv(server.base_url, tmp_path / "o.jsonl"), capsys, monkeypatch,
                    server.base_url, "wants an API key (HTTP 401)", "--api_key_env")
        assert server.model_list_auth == ["Bearer not-needed"]
        _fails_fast(arena_med.main, _arena_argv(server.base_url, tmp_path / "o.jsonl") + ["--api_key_env", "WRONG_KEY"],
                    capsys, monkeypatch, server.base_url, "refused the key in WRONG_KEY (HTTP 401)")
        assert server.requests == []  # not one chat request with the patients' data


def test_an_unknown_model_fails_in_seconds_listing_what_is_served(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    # as vLLM: only its served name; its 404 quotes the Authorization header back (_fails_fast: not printed)
    with FakeOpenAI(strict_model=True, echo_key=True) as server:
        line = _fails_fast(arena_med.main, _arena_argv(server.base_url, tmp_path / "o.jsonl", "llama-3-8b"), capsys,
                           monkeypatch,
                           server.base_url, "no model 'llama-3-8b'", "'fake-model'")
        assert len(server.requests) == 1 and server.echoed == 1  # the one-token probe, refused with the key quoted
    assert "OPENAI" not in line


def test_an_address_without_the_api_path_is_named_as_such(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAI(echo_key=True) as server:  # its 404s quote the Authorization header back
        root = server.base_url.removesuffix("/v1")  # a common slip: the server, not its /v1 API
        _fails_fast(arena_med.main, _arena_argv(root, tmp_path / "o.jsonl"), capsys, monkeypatch, root,
                    "no OpenAI-compatible API there", "ends in /v1")
        assert server.echoed == 2  # GET /models and the probe's POST, both 404 with the key quoted


def test_a_key_that_may_not_list_models_passes_by_the_probe(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAI(models_forbidden=True, strict_model=True) as server:
        backend = OpenAIBackend("fake-model", api_base=server.base_url)
        assert backend.check() == [] and len(server.requests) == 1  # one probe, answered
        backend.close()


def test_a_server_that_answers_any_name_is_accepted_with_a_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAI(window=4096) as server:  # as llama.cpp: one model, any name, a published window
        backend = OpenAIBackend("any-name", api_base=server.base_url)
        notes = backend.check()
        backend.close()
    assert "does not list model 'any-name' but answered it" in notes[0]
    assert backend.context_limit == 4096 and "context window 4096" in notes[1]


# ---------------------------------------------------------------------------------- 4. several endpoints
def test_requests_spread_over_endpoints_fewest_outstanding_first(monkeypatch):
    """A slow replica and a fast one. The slow one holds every request it gets until the fast one has
    answered 30 (or 10 s pass). Fewest outstanding first: while the slow one's requests are out, each
    new request goes to the fast one, so the slow one gets at most four (8 in parallel, ties to the
    first) before the fast one reaches 30. A router blind to what is outstanding (random, round-robin,
    fewest sent) gives the slow one about half, and the fast one never reaches 30."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    fast_answered, released, lock = [0], threading.Event(), threading.Lock()

    def fast_reply(request: dict) -> str:
        with lock:
            fast_answered[0] += 1
            if fast_answered[0] >= 30:
                released.set()
        return "ECHO: " + request["messages"][-1]["content"]

    def slow_reply(request: dict) -> str:
        released.wait(10)  # a bound for a router that never lets the fast one reach 30
        return "ECHO: " + request["messages"][-1]["content"]

    with FakeOpenAI(responder=slow_reply) as slow, FakeOpenAI(responder=fast_reply) as fast:
        backend = OpenAIBackend("fake-model", api_base=f"{slow.base_url},{fast.base_url}", max_parallel=8)
        replies = backend.generate([conversation(i) for i in range(40)], seeds=list(range(40)))
        stats = backend.stats()
        backend.close()
    assert [r.text for r in replies] == [f"ECHO: question number {i}" for i in range(40)]
    assert len(slow.requests) + len(fast.requests) == 40
    # the fast one answered 30 while the slow one held its first ones: it got them all
    assert len(fast.requests) >= 30 and 1 <= len(slow.requests) <= 10, (len(fast.requests), len(slow.requests))
    assert {r.endpoint for r in replies} == {slow.base_url, fast.base_url}
    assert stats["endpoints"][slow.base_url]["ok"] == len(slow.requests)
    assert stats["endpoints"][fast.base_url]["ok"] == len(fast.requests)
    assert sorted(r["seed"] for r in slow.requests + fast.requests) == list(range(40))  # one seed per request


def test_an_endpoint_that_keeps_failing_leaves_the_rotation_and_loses_nothing(monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAI() as a, FakeOpenAI(faults=Faults(rate=1.0, kinds=("drop",))) as b:
        backend = OpenAIBackend("fake-model", api_base=f"{a.base_url},{b.base_url}", max_parallel=4,
                                backoff_base=2.0, remove_after=3, cooldown=60)
        with caplog.at_level(logging.WARNING, logger="mentalarena.openai"):
            replies = backend.generate([conversation(i) for i in range(30)])
        stats = backend.stats()
        backend.close()
    assert [r.text for r in replies] == [f"ECHO: question number {i}" for i in range(30)]
    assert all(r.endpoint == a.base_url for r in replies)
    dead = stats["endpoints"][b.base_url]
    assert dead["ok"] == 0 and dead["errors"] == len(b.requests) >= 3 and dead["removed"] == 1
    assert not dead["in_rotation"] and stats["endpoints"][a.base_url]["ok"] == 30
    # every failed request went to the other endpoint at once: one retry per drop, none of them a backoff wait
    retries = [r.getMessage() for r in caplog.records if "; retry " in r.getMessage()]
    assert len(retries) == stats["http_retries"] == dead["errors"]
    assert all(m.endswith("on another endpoint") for m in retries), retries


def test_every_endpoint_failing_still_backs_off_and_names_the_last_one(monkeypatch):
    """Two endpoints, both failing: a failed request goes to the other at once, and once both have
    failed since the last pause, the backend waits (backoff with jitter: 0.5 to 1 times
    min(backoff_max, backoff_base * 2 ** attempt)) before it starts over."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    asked = backend_sleeps(monkeypatch)
    refused = f"http://127.0.0.1:{free_port()}/v1"
    with FakeOpenAI(faults=Faults(rate=1.0, kinds=("503",))) as a:
        backend = OpenAIBackend("fake-model", api_base=f"{a.base_url},{refused}", max_retries=3,
                                backoff_base=1.0, backoff_max=4.0)
        with pytest.raises(ModelCallError) as raised:
            backend.generate([conversation(1)])
        stats = backend.stats()
        backend.close()
    message = str(raised.value)
    assert "gave up after 4 attempts" in message and stats["http_retries"] == 3
    # attempts: a (503), the other at once (refused), a wait, a, the other: the last error is the refused one
    assert len(a.requests) == 2
    assert "connection refused" in message and refused in message, message
    assert len(asked) == 1 and 0.5 * 2.0 <= asked[0] <= 2.0, asked  # after attempt 1: backoff_base * 2 ** 1


# ---------------------------------------------------------------------------------- 5. context overflow
def test_a_prompt_the_server_refuses_as_too_long_is_cut_and_sent_again(monkeypatch):
    """Short words make the 4-characters-a-token estimate too low: the server (a window of 60
    'tokens', counted as words, llama.cpp's error) refuses, says its count, and the cut call passes."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    history = [{"role": "system", "content": "persona " * 5}, {"role": "user", "content": "hello"}]
    for i in range(12):
        history.append({"role": "assistant" if i % 2 else "user", "content": "a " * 10})
    history.append({"role": "user", "content": "last question"})
    with FakeOpenAI(window=60) as server:
        client = ModelClient(OpenAIBackend("fake-model", api_base=server.base_url, max_new_tokens=8), Gate(), 8)
        reply = asyncio.run(client.chat(history, seed=1))
        sent = [sum(len(m["content"].split()) for m in r["messages"]) for r in server.requests]
        last = server.requests[-1]["messages"]
        with pytest.raises(ContextOverflow, match="--max_context_tokens"):
            asyncio.run(client.chat([{"role": "user", "content": "word " * 100}]))  # nothing to cut
        client.close()
    assert sent[0] > 60 >= sent[-1] and len(sent) == 2
    assert reply.truncated and client.stats.overflow_refits >= 1 and client.stats.truncated_calls == 1
    assert last[:2] == history[:2] and last[-1] == history[-1]  # the head and this call's prompt are kept


# ---------------------------------------------------------------------------------- 6. one writer per output
def test_an_output_lock_is_exclusive_and_a_dead_holder_never_blocks(tmp_path):
    target = tmp_path / "records.jsonl"
    lock = OutputLock(target).acquire()
    with pytest.raises(BusyError, match=f"records.jsonl: another run is writing it \\(pid {os.getpid()} on "):
        OutputLock(target).acquire()
    lock.release()
    assert not lock.path.exists()
    lock.path.write_text('{"pid": 999999, "host": "gone"}')  # what a run killed by kill -9 leaves
    with OutputLock(target):
        pass


@pytest.mark.parametrize("script", ["MedQA_eval", "IMHI_eval", "iterate"])
def test_the_other_scripts_refuse_an_output_a_live_run_holds(tmp_path, capsys, script):
    if script == "MedQA_eval":
        held = tmp_path / MedQA_eval.model_tag("embedded:SmolLM2-135M-Instruct") / "MedQA.samples.jsonl"
        argv = ["--dataset", "MedQA", "--data_file", str(ROOT / "data/qa_sample/medqa.jsonl"),
                "--output_dir", str(tmp_path)]
        main = MedQA_eval.main
    elif script == "IMHI_eval":
        held = tmp_path / IMHI_eval.model_tag(IMHI_eval.EMBEDDED) / "IMHI" / "dreaddit.samples.jsonl"
        argv = ["--datasets", "dreaddit", "--output_dir", str(tmp_path)]
        main = IMHI_eval.main
    else:
        held = tmp_path / "work" / "state.json"
        argv = ["--work_dir", str(tmp_path / "work"), "--iterations", "1", "--eval", "none"]
        main = iterate.main
    with OutputLock(held):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {held}: another run is writing it (pid {os.getpid()}" in err


def test_two_runs_on_one_output_the_second_is_refused_and_nothing_is_duplicated(tmp_path):
    from test_arena_cli import check_sessions, cli_env, command, explain, make_responder, read_records

    output = tmp_path / "out.jsonl"
    with FakeOpenAI(responder=make_responder(delay=0.05)) as server:
        cmd = command(server.base_url, output, "--limit", "3")
        first = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lock = output.with_name(output.name + ".lock")
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)
        out, err = first.communicate(timeout=150)
        model_lists = server.model_lists
    assert second.returncode == 2, explain(second)
    assert f"another run is writing it (pid {first.pid}" in second.stderr
    # refused at the lock, before its preflight: the server saw one preflight, the first run's
    assert model_lists == 1
    assert first.returncode == 0, out + err
    check_sessions(read_records(output), [(p["id"], 0) for p in json.loads(
        (ROOT / "data/sample_patients.json").read_text())[:3]])
    assert not lock.exists()


# ---------------------------------------------------------------------------------- 7. progress
def test_the_progress_bar_moves_with_every_call_and_estimates_the_rest():
    from mentalarena.engines.backends import Reply

    bar = SessionProgress(sessions=4, calls_per_session=30)
    assert bar.bar.total == 120
    for _ in range(25):
        bar.reply(Reply("x", prompt_tokens=10, completion_tokens=4))
    assert bar.bar.n == 25 and bar.tokens == 100 and "tok/s" in bar.bar.postfix
    bar.session(20)  # the first session took 20 calls: the other three should take about as many
    assert bar.bar.total == 80 and "sessions=1/4" in bar.bar.postfix
    bar.session(None)  # a failed one
    assert "failed_sessions=1" in bar.bar.postfix
    for _ in range(100):  # more calls than estimated: the total follows, the bar never runs past it
        bar.reply(Reply("x"))
    assert bar.bar.total >= bar.bar.n == 125
    bar.close()
    quiet = Progress(10, "x", enabled=False)
    quiet.reply(Reply("x"))
    assert quiet.calls == 1 and quiet.bar is None


def test_the_first_estimate_is_the_most_calls_a_session_can_make():
    """Every score unreadable (the judge never says a number): every decoder round runs and every try
    is used, so this session makes the most calls the settings allow, and the estimate is that."""
    backend = CountingBackend([0] * 20)
    arena = make_arena(backend, max_tries=3, max_decode_rounds=2, dialogue_rounds=2)
    arena.base.gate.active = 1
    record = asyncio.run(arena_med.run_session(PATIENT, 0, arena))
    assert record["calls"] == arena_med.expected_calls(arena.settings)


def test_arena_progress_advances_before_any_session_ends(tmp_path, monkeypatch):
    """The bar used to stay at 0 % until sessions finished; now each model call moves it."""
    seen = []
    real_reply = SessionProgress.reply

    def spy(self, reply):
        real_reply(self, reply)
        seen.append((self.bar.n, self.done_sessions))

    monkeypatch.setattr(SessionProgress, "reply", spy)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAI(responder=lambda r: "2") as server:
        arena_med.main(["--base_model", "fake-model", "--api_base", server.base_url, "--output_file",
                        str(tmp_path / "o.jsonl"), "--limit", "1", "--dialogue_rounds", "1", "--max_decode_rounds", "0",
                        "--max_tries", "1"])
    moved_early = [n for n, done in seen if done == 0]
    assert len(moved_early) >= 10 and moved_early == sorted(moved_early)


@pytest.mark.parametrize("model, window", [
    ("gpt-3.5-turbo", 16385), ("gpt-3.5-turbo-0125", 16385), ("gpt-3.5-turbo-0613", 4096),
    ("ft:gpt-3.5-turbo-0125:my-org::9abc", 16385), ("gpt-4", 8192), ("gpt-4-0613", 8192),
    ("gpt-4-turbo-2024-04-09", 128000), ("gpt-4o-mini", 128000), ("gpt-4-32k", 32768),
    ("llama-3.1-8b-instruct", None), ("my-gpt-4", None),
])
def test_known_windows_of_openai_models(model, window):
    from mentalarena.engines.openai_backend import known_window
    assert known_window(model) == window


def test_an_openai_model_gets_its_known_window_and_long_conversations_are_cut(monkeypatch):
    """A server that publishes no window: the model's known one (gpt-3.5-turbo: 16385) applies, and a
    conversation longer than it is cut before it is sent (no 400, no lost session)."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    long = [{"role": "system", "content": "persona"}, {"role": "user", "content": "hello"}]
    for i in range(40):  # 40 messages of 2,000 characters: about 20,000 tokens by the 4-characters rule
        long.append({"role": "assistant" if i % 2 else "user", "content": "x" * 2000})
    long.append({"role": "user", "content": "last question"})
    with FakeOpenAI(model="gpt-3.5-turbo", window=16385, window_style="openai") as server:
        backend = OpenAIBackend("gpt-3.5-turbo", api_base=server.base_url, max_new_tokens=256)
        notes = backend.check()
        assert backend.context_limit == 16385 and any("published window" in n for n in notes)
        client = ModelClient(backend, Gate(), 256)
        reply = asyncio.run(client.chat(long, seed=1))
        client.close()
        sent = server.requests[-1]["messages"]
    assert reply.truncated and client.stats.truncated_calls == 1 and client.stats.overflow_refits == 0
    assert sum(len(m["content"]) for m in sent) // 4 + 4 * len(sent) <= 16385 - 256
    assert sent[:2] == long[:2] and sent[-1] == long[-1]


def test_openai_context_length_exceeded_is_cut_and_sent_again(monkeypatch):
    """OpenAI's 400 gives its numbers only in the message; they are read and the call is cut to fit."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    history = [{"role": "system", "content": "persona " * 5}, {"role": "user", "content": "hello"}]
    for i in range(12):
        history.append({"role": "assistant" if i % 2 else "user", "content": "a " * 10})
    history.append({"role": "user", "content": "last question"})
    with FakeOpenAI(window=60, window_style="openai") as server:
        client = ModelClient(OpenAIBackend("fake-model", api_base=server.base_url, max_new_tokens=8), Gate(), 8)
        reply = asyncio.run(client.chat(history, seed=1))
        sent = [sum(len(m["content"].split()) for m in r["messages"]) for r in server.requests]
        client.close()
    assert sent[0] > 60 >= sent[-1] and len(sent) == 2
    assert client.window == 60  # the window read from OpenAI's message
    assert reply.truncated and client.stats.overflow_refits == 1 and client.stats.truncated_calls == 1
