"""Issue 20, keys and network faults: keys only where they belong, no redirects, overall deadlines,
errors that stop a run at once, models that refuse parameters, replicas on probation, and fine-tuning
jobs never created twice. Against the fake OpenAI server (tests/fake_openai.py), over real HTTP."""
from __future__ import annotations

import json
import threading
import time
import types

import pytest

import arena_med
import data_process
import MedQA_eval
from conftest import ROOT, backend_sleeps, request_deadlines
from fake_openai import FakeOpenAI, Faults
from mentalarena.cli import public_url
from mentalarena.errors import InputError, ModelCallError, ServiceRefused
from mentalarena.engines.openai_backend import OpenAIBackend
from mentalarena.engines.openai_client import Credentials, credentials, plain_http_warning

OPENAI_KEY = "sk-proj-EDGE0OPENAI0KEY0abc123"
SERVED_KEY = "vllm-EDGE-served-key-456"
QA = str(ROOT / "data" / "qa_sample" / "medqa.jsonl")
QUICK_ARENA = ["--limit", "1", "--dialogue_rounds", "1", "--max_decode_rounds", "0", "--max_tries", "1",
               "--progress", "False"]


@pytest.fixture(autouse=True)
def keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("SERVED_KEY", SERVED_KEY)
    monkeypatch.setenv("OPENAI_ORG_ID", "org-EDGE")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def conversation(i: int = 0) -> list[dict]:
    return [{"role": "user", "content": f"question number {i}"}]


def all_output(capsys, folder) -> str:
    out, err = capsys.readouterr()
    written = "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())
    return out + err + written


# ---------------------------------------------------------------------------------- 1. keys
def test_the_openai_key_never_reaches_a_named_server(tmp_path, capsys):
    """Self-play against a served model with OPENAI_API_KEY exported, as a researcher's shell has it:
    not one request (model list, probe, chat) carries that key, or the OpenAI organisation header."""
    with FakeOpenAI(responder=lambda r: "Group 1. 7") as server:
        code = arena_med.main(["--base_model", "fake-model", "--api_base", server.base_url,
                               "--output_file", str(tmp_path / "o.jsonl"), *QUICK_ARENA])
        seen = server.auth_headers + server.model_list_auth
        headers = server.request_headers
    assert code == 0
    assert seen and all(h == "Bearer not-needed" for h in seen)
    assert all("openai-organization" not in h for h in headers)
    assert OPENAI_KEY not in all_output(capsys, tmp_path)


def test_each_server_gets_the_key_named_for_it(tmp_path, monkeypatch):
    """A keyed vLLM-like server for the model, the OpenAI API (here: OPENAI_BASE_URL pointing at a
    second fake) for the judge: each gets its own key and only that."""
    with FakeOpenAI(responder=lambda r: "Group 1. 7", require_key=SERVED_KEY) as served, \
            FakeOpenAI(responder=lambda r: "Group 1. 7", require_key=OPENAI_KEY) as api:
        monkeypatch.setenv("OPENAI_BASE_URL", api.base_url)
        code = arena_med.main(["--base_model", "fake-model", "--api_base", served.base_url, "--api_key_env", "SERVED_KEY",
                               "--judge_model", "fake-model-judge", "--judge_api_base", api.base_url,
                               "--output_file", str(tmp_path / "o.jsonl"), *QUICK_ARENA])
        assert code == 0
        assert set(served.auth_headers + served.model_list_auth) == {f"Bearer {SERVED_KEY}"}
        assert set(api.auth_headers + api.model_list_auth) == {f"Bearer {OPENAI_KEY}"}
        assert {r["model"] for r in served.requests} == {"fake-model"}
        assert {r["model"] for r in api.requests} == {"fake-model-judge"}
        assert all("openai-organization" not in h for h in served.request_headers)
        assert all(h.get("openai-organization") == "org-EDGE" for h in api.request_headers)


def test_a_variable_that_is_not_set_or_holds_a_key_is_bad_input(monkeypatch):
    monkeypatch.delenv("MISSING_KEY", raising=False)
    with pytest.raises(InputError, match="--api_key_env MISSING_KEY: that environment variable is not set"):
        credentials("http://127.0.0.1:1/v1", "MISSING_KEY")
    with pytest.raises(InputError) as raised:  # a key pasted where the variable's name goes
        credentials("http://127.0.0.1:1/v1", "sk-live-PASTED-0123456789", "judge_api_key_env")
    assert "--judge_api_key_env takes the name of an environment variable" in str(raised.value)
    assert "PASTED" not in str(raised.value)


@pytest.mark.parametrize(("url", "source", "warned"), [
    ("http://10.0.0.5:8000/v1", "SERVED_KEY", True),       # another machine, unencrypted
    ("http://gpu7.lab.example:8000/v1", "SERVED_KEY", True),
    ("http://127.0.0.1:8000/v1", "SERVED_KEY", False),     # this machine
    ("http://localhost:8000/v1", "SERVED_KEY", False),
    ("http://[::1]:8000/v1", "SERVED_KEY", False),
    ("https://gpu7.lab.example/v1", "SERVED_KEY", False),  # encrypted
    ("http://10.0.0.5:8000/v1", None, False),              # no key sent
])
def test_a_key_over_plain_http_to_another_machine_is_one_warning(url, source, warned):
    note = plain_http_warning(url, Credentials("k", source, False))
    assert (note is not None) is warned
    if note:
        assert note.count("\n") == 0 and "SERVED_KEY" in note and "k" != note


def test_a_plain_http_key_warning_is_printed_once_per_server(capsys):
    OpenAIBackend("m", api_base="http://10.0.0.5:8000/v1,http://127.0.0.1:1/v1", key_env="SERVED_KEY").close()
    err = capsys.readouterr().err
    assert err.count("warning: the key in SERVED_KEY goes to http://10.0.0.5:8000/v1 over plain http") == 1
    assert SERVED_KEY not in err


# ---------------------------------------------------------------------------------- 2. credentials in URLs
@pytest.mark.parametrize(("url", "shown"), [
    ("http://user:pw@host:8000/v1", "http://host:8000/v1"),
    ("user:pw@host:8000/v1", "host:8000/v1"),                       # no scheme: still cut
    ("host:8000/v1", "host:8000/v1"),
    ("https://h/v1?api_key=abc&api-version=2024-06-01", "https://h/v1?api-version=2024-06-01"),
    ("https://h/v1?key=abc", "https://h/v1"),
    ("https://h/v1?token=abc&x=1", "https://h/v1?x=1"),
    ("https://h/v1?access_token=abc", "https://h/v1"),
    ("https://h/v1?sig=abc&signature=d", "https://h/v1"),
    ("https://h/v1#token=abc", "https://h/v1"),
    ("http://a:1/v1,user:pw@b:2/v1", "http://a:1/v1,b:2/v1"),
    ("env:MY_SERVER", "env:MY_SERVER"),
])
def test_public_url_cuts_every_credential(url, shown):
    assert public_url(url) == shown


def test_an_address_in_the_environment_is_used_and_never_shown(tmp_path, monkeypatch, capsys):
    """`--api_base env:VAR` (how iterate.py hands a credentialed address to its stages): the stage
    reaches the server, and nothing it prints or writes holds the password."""
    with FakeOpenAI(responder=lambda r: "The answer is A.") as server:
        monkeypatch.setenv("QA_SERVER", server.base_url.replace("http://", "http://user:s3cretpw@"))
        code = MedQA_eval.main(["--model", "fake-model", "--api_base", "env:QA_SERVER", "--dataset", "MedQA",
                                "--data_file", QA, "--limit", "2", "--repeats", "1", "--progress", "False",
                                "--output_dir", str(tmp_path / "qa")])
        assert len(server.requests) == 2
    assert code == 0
    assert "s3cretpw" not in all_output(capsys, tmp_path)


# ---------------------------------------------------------------------------------- 3. redirects
def test_a_redirect_is_an_error_naming_both_addresses_and_nothing_is_resent():
    with FakeOpenAI() as elsewhere:
        target = elsewhere.base_url + "/chat/completions"
        with FakeOpenAI(faults=Faults(["redirect"]), redirect_to=target) as server:
            backend = OpenAIBackend("fake-model", api_base=server.base_url, max_retries=3, backoff_base=0.01)
            with pytest.raises(ServiceRefused) as raised:
                backend.generate([conversation()])
            backend.close()
            asked = len(server.requests)
        message = str(raised.value)
        assert server.base_url in message and elsewhere.base_url in message and "redirect" in message
        assert asked == 1 and elsewhere.requests == []  # not re-sent there, not retried here


# ---------------------------------------------------------------------------------- 5. deadlines
def test_a_trickling_server_cannot_hold_a_request_past_its_deadline(monkeypatch):
    """A byte every 0.3 s: no read ever waits the 1.5 s per-read timeout, and the whole body would take
    about a minute. The request was given an overall deadline of 1.5 s, and it timed out: only that
    deadline can have stopped it."""
    deadlines = request_deadlines(monkeypatch)
    with FakeOpenAI(faults=Faults(["trickle"]), trickle_seconds=0.3) as server:
        backend = OpenAIBackend("fake-model", api_base=server.base_url, max_retries=0, request_timeout=1.5)
        with pytest.raises(ModelCallError, match="timed out"):
            backend.generate([conversation()])
        backend.close()
    assert deadlines == [1.5] and server.faults.injected == ["trickle"]


def test_a_trickling_server_fails_the_preflight_within_its_short_deadline(tmp_path, capsys, monkeypatch):
    deadlines = request_deadlines(monkeypatch)
    with FakeOpenAI(trickle_models=True, trickle_seconds=0.3) as server:
        code = arena_med.main(["--base_model", "fake-model", "--api_base", server.base_url, "--request_timeout", "2",
                               "--output_file", str(tmp_path / "o.jsonl"), *QUICK_ARENA])
        listed = server.model_lists
    err = capsys.readouterr().err
    # one GET /models, given the preflight's deadline (--request_timeout, shorter than its 10 s), then the error
    assert code == 2 and deadlines == [2.0] and listed == 1, (deadlines, err)
    assert f"error: {server.base_url}: no complete answer within the preflight's 2 s" in err
    assert not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------------------------- 6. errors retrying cannot fix
@pytest.mark.parametrize(("fault", "said"), [
    ("quota", "has no credit left (HTTP 429 insufficient_quota)"),
    ("401", "refused the key in SERVED_KEY (HTTP 401)"),
    ("404", "not found (HTTP 404)"),
    ("400", "rejected the request as invalid (HTTP 400)"),
])
def test_a_refusal_mid_run_stops_self_play_at_once(tmp_path, capsys, monkeypatch, fault, said):
    """The preflight passes, then the service refuses (credit runs out, a key is revoked): the run
    stops with one line and exit 1 at once, instead of retrying every session's calls."""
    waits = backend_sleeps(monkeypatch)
    with FakeOpenAI(responder=lambda r: "Group 1. 7", faults=Faults(["ok", *[fault] * 50])) as server:
        code = arena_med.main(["--base_model", "fake-model", "--api_base", server.base_url, "--api_key_env",
                               "SERVED_KEY", "--output_file", str(tmp_path / "o.jsonl"), "--limit", "4",
                               "--concurrency", "4", "--dialogue_rounds", "1", "--max_decode_rounds", "0",
                               "--max_tries", "1", "--progress", "False"])
        asked = len(server.requests)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and said in lines[0] and "stopped" in lines[0], err
    assert asked <= 1 + 4 + 1  # the probe, at most one call per session in flight: nothing retried
    # no wait for the refusal, nor for a call in flight that fails as the run stops (it is not retried)
    assert waits == [], (waits, err)
    assert SERVED_KEY not in err


def test_a_key_without_credit_stops_an_evaluation_at_once(tmp_path, capsys, monkeypatch):
    waits = backend_sleeps(monkeypatch)
    with FakeOpenAI(responder=lambda r: "The answer is A.", faults=Faults(["ok", *["quota"] * 50])) as server:
        code = MedQA_eval.main(["--model", "fake-model", "--api_base", server.base_url, "--dataset", "MedQA",
                                "--data_file", QA, "--repeats", "5", "--batch_size", "2", "--progress", "False",
                                "--output_dir", str(tmp_path / "qa")])
        asked = len(server.requests)
    err = capsys.readouterr().err
    assert code == 1 and "no credit left" in err, err
    assert asked <= 1 + 2 + 2  # the probe, the requests in flight; not 40 questions x retries
    assert waits == []  # no backoff wait either, even for a request cut off as the run stops


def test_after_a_refusal_the_backend_sends_and_retries_nothing(monkeypatch):
    """Once the service refuses (no credit), every later call of that backend raises the same refusal
    without reaching the server, and one that fails transiently is not waited on and retried."""
    waits = backend_sleeps(monkeypatch)
    with FakeOpenAI(faults=Faults(["quota", "drop"])) as server:
        backend = OpenAIBackend("fake-model", api_base=server.base_url)
        with pytest.raises(ServiceRefused) as first:
            backend.generate([conversation(1)])
        with pytest.raises(ServiceRefused) as second:
            backend.generate([conversation(2)])
        assert str(second.value) == str(first.value) and "no credit left" in str(first.value)
        assert len(server.requests) == 1 and waits == []
        backend.close()


def test_rate_limits_are_still_retried(monkeypatch):
    with FakeOpenAI(faults=Faults(["429:0", "429:0"])) as server:
        backend = OpenAIBackend("fake-model", api_base=server.base_url, backoff_base=0.01)
        assert backend.generate([conversation(3)])[0].text.endswith("question number 3")
        backend.close()
        assert len(server.requests) == 3


# ---------------------------------------------------------------------------------- 7. reasoning models
def test_a_model_that_refuses_max_tokens_and_temperature_is_sent_what_it_takes(capsys):
    with FakeOpenAI(reject_params={"max_tokens": "unsupported_parameter", "temperature": "unsupported_value"}) as server:
        backend = OpenAIBackend("o3-mini", api_base=server.base_url, temperature=0.8, max_new_tokens=64)
        notes = backend.check()  # the probe learns it already
        replies = backend.generate([conversation(i) for i in range(4)])
        stats = backend.stats()
        backend.close()
        sent = server.requests
    assert [r.text for r in replies] == [f"ECHO: question number {i}" for i in range(4)]
    last = sent[-4:]
    assert all(r["max_completion_tokens"] == 64 and "max_tokens" not in r and "temperature" not in r for r in last)
    assert stats["sent"] == {"token_limit": "max_completion_tokens", "dropped": ["temperature"]}
    assert backend.sampling["sent"] is backend.sent  # recorded with the run's settings (arena: records' sampling)
    err = capsys.readouterr().err
    assert err.count("does not take max_tokens; sending max_completion_tokens instead") == 1
    assert err.count("does not take temperature 0.8; sending none") == 1
    assert isinstance(notes, list)


def test_a_parameter_refused_mid_run_is_learned_there_too():
    with FakeOpenAI() as server:
        backend = OpenAIBackend("m", api_base=server.base_url, temperature=0.3, top_p=0.9)
        server.reject_params = {"top_p": "unsupported_parameter"}
        assert backend.generate([conversation()])[0].text == "ECHO: question number 0"
        backend.close()
    assert "top_p" in server.requests[0] and "top_p" not in server.requests[1]
    assert server.requests[1]["temperature"] == 0.3


# ---------------------------------------------------------------------------------- 8. probation
def test_a_replica_back_from_its_cool_down_gets_one_request_to_prove_itself():
    """A replica out of the rotation comes back: its first request (the probe) hangs 1.5 s. While it
    hangs, every other request goes to the healthy replica, not a burst to the hung one."""
    with FakeOpenAI(stall_seconds=1.5) as hung, FakeOpenAI() as healthy:
        backend = OpenAIBackend("fake-model", api_base=f"{hung.base_url},{healthy.base_url}", max_parallel=8,
                                request_timeout=10, remove_after=3, cooldown=0.2)
        first = backend.endpoints[0]
        first.back_at, first.probation = time.monotonic() - 0.01, True  # as it is after its cool-down
        hung.faults.push("stall")
        replies = backend.generate([conversation(i) for i in range(8)])
        during = (len(hung.requests), len(healthy.requests))
        assert [r.text for r in replies] == [f"ECHO: question number {i}" for i in range(8)]
        assert during == (1, 7)
        assert not first.probation  # its probe answered: back in the rotation
        backend.generate([conversation(i) for i in range(8)])
        backend.close()
        assert len(hung.requests) > 1  # it takes its share again


def test_a_failed_probe_sends_the_replica_back_to_its_cool_down():
    with FakeOpenAI(faults=Faults(["500"])) as sick, FakeOpenAI() as healthy:
        backend = OpenAIBackend("fake-model", api_base=f"{sick.base_url},{healthy.base_url}", max_parallel=1,
                                backoff_base=0.01, cooldown=30)
        first = backend.endpoints[0]
        first.back_at, first.probation = time.monotonic() - 0.01, True
        backend.generate([conversation(0)])  # the probe fails, retried on the healthy one at once
        assert first.back_at > time.monotonic() + 20 and first.counts["removed"] == 1
        backend.generate([conversation(i) for i in range(4)])
        backend.close()
    assert len(sick.requests) == 1


class Clock:
    """A monotonic clock the test moves by hand (the backend's cool-downs read it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_a_replica_removed_for_failures_gets_traffic_again_after_its_cool_down(monkeypatch):
    """Three failures in a row take a replica out for its 30 s cool-down: until then every request
    goes to the other one; once the clock has passed the cool-down, it gets requests again (its first
    one, the probe, succeeds and ends its probation). The clock is the test's, moved by hand."""
    from mentalarena.engines import openai_backend

    clock, waits = Clock(), []
    monkeypatch.setattr(openai_backend, "time", types.SimpleNamespace(monotonic=clock.monotonic, sleep=waits.append))
    with FakeOpenAI(faults=Faults(["500"] * 3)) as flaky, FakeOpenAI() as steady:
        backend = OpenAIBackend("fake-model", api_base=f"{flaky.base_url},{steady.base_url}", max_parallel=1,
                                remove_after=3, cooldown=30, backoff_base=0.01)
        replica = backend.endpoints[0]

        def ask(n: int) -> list[str]:
            return [backend.generate([conversation(i)])[0].endpoint for i in range(n)]

        assert ask(3) == [steady.base_url] * 3  # each failed on the flaky one, retried on the other at once
        assert len(flaky.requests) == 3 and replica.counts["removed"] == 1
        assert replica.back_at == 1030.0 and not backend.stats()["endpoints"][flaky.base_url]["in_rotation"]
        clock.now += 29.9  # still cooling down: nothing for it
        assert ask(4) == [steady.base_url] * 4 and len(flaky.requests) == 3
        clock.now += 0.2  # the cool-down is over
        served = ask(6)
        stats = backend.stats()
        backend.close()
    assert served[0] == flaky.base_url and len(flaky.requests) > 4  # its probe, then its share again
    assert served.count(flaky.base_url) == len(flaky.requests) - 3
    assert not replica.probation and stats["endpoints"][flaky.base_url]["in_rotation"]
    assert stats["endpoints"][flaky.base_url]["ok"] == len(flaky.requests) - 3 and waits == []


# ---------------------------------------------------------------------------------- 9. one paid job
def write_records(path, n: int = 12) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"symptom": f"Patient {i} cannot sleep.", "illness": "Insomnia", "treatment": "CBT-I",
                                "explain_t": "Sleep restriction helps.", "medicine": "Melatonin",
                                "explain_m": "Short courses are safe."}) + "\n")


def ft(server, tmp_path, *extra) -> int:
    return data_process.main(["--input_file", str(tmp_path / "records.jsonl"), "--finetune_file", str(tmp_path / "ft.jsonl"),
                              "--api_base", server.base_url, "--poll_seconds", "0.01", *extra])


def state(tmp_path) -> dict:
    return json.loads((tmp_path / "ft.jsonl.job.json").read_text())


def test_a_job_created_without_an_answer_is_found_not_made_again(tmp_path, capsys):
    write_records(tmp_path / "records.jsonl")
    with FakeOpenAI(ft_faults=Faults(["ok", "drop_after"])) as server:  # upload fine; the job is made, the answer lost
        assert ft(server, tmp_path) == 0
        assert len(server.job_creates) == 1 and state(tmp_path)["job_id"] in server.jobs
        assert "but job" in capsys.readouterr().out
        assert ft(server, tmp_path, "--wait") == 0  # and a re-run reuses it
        assert len(server.job_creates) == 1


def test_a_lost_creation_that_made_no_job_asks_for_a_rerun_which_makes_exactly_one(tmp_path, capsys):
    write_records(tmp_path / "records.jsonl")
    with FakeOpenAI(ft_faults=Faults(["ok", "drop", "ok"])) as server:  # the creation never reaches the server
        assert ft(server, tmp_path) == 1
        err = capsys.readouterr().err
        assert "may or may not exist" in err and "Re-run the same command" in err and err.count("\n") == 1
        pending = state(tmp_path)["pending_request"]
        assert pending and state(tmp_path)["job_id"] is None and server.job_creates == []
        assert ft(server, tmp_path) == 0
        assert len(server.job_creates) == 1
        assert server.job_creates[0]["metadata"] == {"mentalarena_request": pending["tag"]}


def test_a_run_that_died_after_asking_for_a_job_finds_it(tmp_path, capsys):
    """The process was killed between asking for the job and recording it: the record holds the
    request's tag, the server the job; the re-run adopts the job instead of paying for another."""
    write_records(tmp_path / "records.jsonl")
    with FakeOpenAI(ft_faults=Faults(["ok", "drop"])) as server:
        assert ft(server, tmp_path) == 1  # leaves the tagged, pending record
        tag = state(tmp_path)["pending_request"]["tag"]
        server.create_job({"training_file": state(tmp_path)["file_id"], "model": "gpt-3.5-turbo-0125",
                           "metadata": {"mentalarena_request": tag}})  # what the killed run's request did
        capsys.readouterr()
        assert ft(server, tmp_path) == 0
        assert len(server.job_creates) == 1 and "created by an earlier attempt" in capsys.readouterr().out


def test_a_rate_limited_creation_is_waited_out_and_a_refused_one_is_not_retried(tmp_path, capsys):
    write_records(tmp_path / "records.jsonl")
    with FakeOpenAI(ft_faults=Faults(["ok", "429:0", "ok"])) as server:
        assert ft(server, tmp_path) == 0  # the 429 was an answer: no job was made, so asking again is safe
        assert len(server.job_creates) == 1 and len(server.uploads) == 1
    (tmp_path / "ft.jsonl.job.json").unlink()
    with FakeOpenAI(ft_faults=Faults(["ok", "400"])) as server:
        assert ft(server, tmp_path) == 1 and server.job_creates == []
        assert "creating the fine-tuning job: HTTP 400" in capsys.readouterr().err


def test_threads_share_one_deadline_each():
    """The deadline is per request and per thread: a slow request on one thread does not cut another's."""
    with FakeOpenAI(faults=Faults(["trickle"]), trickle_seconds=0.2) as server:
        backend = OpenAIBackend("fake-model", api_base=server.base_url, max_retries=0, request_timeout=1.0,
                                max_parallel=4)
        results = {}

        def one(i):
            try:
                results[i] = backend.generate([conversation(i)])[0].text
            except ModelCallError as exc:
                results[i] = type(exc).__name__

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        backend.close()
    assert sorted(results.values()).count("ModelCallError") == 1  # only the trickled one
