"""OpenAIBackend against the local fake server: replies, parallel order, retries, fault storms, secrets."""
from __future__ import annotations

import copy
import email.utils
import logging
from typing import Callable, Iterator

import pytest
from conftest import backend_sleeps

from fake_openai import FakeOpenAI, Faults, echo_responder
from mentalarena.errors import InputError, ModelCallError, ServiceRefused
from mentalarena.engines.openai_backend import OpenAIBackend
from mentalarena.engines.openai_client import parse_retry_after

SECRET = "sk-test-SECRET-123"
# Client timeouts. A request to the local fake server is answered in milliseconds, but a busy 2-core
# runner can hold one back for a second or more: a timeout that short would add retries that no fault
# caused and break the exact retry accounting below. So clients wait 30 s, except where a stall is the
# fault under test: there they give up after STALL_TIMEOUT, and the server holds a stalled request
# STALL_SECONDS (longer still), so a stall always times out and an answered request never does.
TIMEOUT = 30.0
STALL_TIMEOUT = 2.0
STALL_SECONDS = STALL_TIMEOUT + 3.0


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("SERVED_KEY", SECRET)  # the key a test names for the fake server (key_env)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(stall_seconds=STALL_SECONDS) as fake:
        yield fake


@pytest.fixture
def make_backend(server: FakeOpenAI) -> Iterator[Callable[..., OpenAIBackend]]:
    backends: list[OpenAIBackend] = []

    def make(**overrides: object) -> OpenAIBackend:
        options = dict(api_base=server.base_url, request_timeout=TIMEOUT, max_retries=5,
                       backoff_base=0.01, backoff_max=0.05)
        options.update(overrides)
        backend = OpenAIBackend("fake-model", **options)  # type: ignore[arg-type]
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        backend.close()


def conversation(i: int) -> list[dict]:
    return [{"role": "system", "content": "You are a patient."},
            {"role": "user", "content": f"question number {i}"}]


def expected_text(conv: list[dict]) -> str:
    return echo_responder({"messages": conv})


def test_plain_call_returns_text_tokens_and_keeps_the_openai_key_home(server, make_backend):
    backend = make_backend(temperature=0.3, max_new_tokens=17)
    [reply] = backend.generate([conversation(1)])
    assert reply.text == "ECHO: question number 1"
    assert (reply.prompt_tokens, reply.completion_tokens) == (7, 4)
    assert backend.counters == {"requests": 1, "retries": 0, "failures": 0,
                             "prompt_tokens": 7, "completion_tokens": 4}
    sent = server.requests[0]
    assert (sent["model"], sent["temperature"], sent["max_tokens"]) == ("fake-model", 0.3, 17)
    assert "seed" not in sent
    # OPENAI_API_KEY is set (the fixture), but this server is not the OpenAI API: it gets no key
    assert server.auth_headers == ["Bearer not-needed"]
    assert backend.name == "openai:fake-model" and not backend.batched


def test_a_served_model_gets_the_key_of_the_variable_named_for_it(server, make_backend, monkeypatch):
    monkeypatch.setenv("VLLM_KEY", "vllm-secret-1")
    make_backend(key_env="VLLM_KEY").generate([conversation(1)])
    assert server.auth_headers == ["Bearer vllm-secret-1"]


def test_seed_is_sent_when_given(server, make_backend):
    make_backend(seed=7).generate([conversation(1)])
    assert server.requests[0]["seed"] == 7


def test_empty_reply_from_a_200_is_returned_not_retried(server, make_backend):
    server.responder = lambda request: ""
    assert make_backend().generate([conversation(1)])[0].text == ""
    assert len(server.requests) == 1


def test_parallel_generate_keeps_order(server, make_backend):
    convs = [conversation(i) for i in range(20)]
    replies = make_backend(max_parallel=8).generate(convs)
    assert [r.text for r in replies] == [expected_text(c) for c in convs]
    assert len(server.requests) == 20


@pytest.mark.parametrize("kind", ["429", "429:0", "500", "503", "stall", "malformed", "html",
                                  "empty_choices", "null_content", "drop"])
def test_each_fault_is_retried_then_succeeds(server, make_backend, kind, caplog):
    server.faults.push(kind)
    backend = make_backend(request_timeout=STALL_TIMEOUT if kind == "stall" else TIMEOUT)
    with caplog.at_level(logging.WARNING, logger="mentalarena.openai"):
        [reply] = backend.generate([conversation(3)])
    assert reply.text == "ECHO: question number 3"
    assert len(server.requests) == 2
    assert backend.counters["retries"] == 1 and backend.counters["requests"] == 2
    assert "retry 1/5" in caplog.text
    if kind == "stall":
        assert "timed out" in caplog.text  # the client gave up on the stalled request, the server did not answer it


def test_random_fault_storm_completes_in_order(make_backend):
    faults = Faults(rate=0.4, seed=1234)
    with FakeOpenAI(faults=faults, stall_seconds=STALL_SECONDS) as storm:
        backend = make_backend(api_base=storm.base_url, max_retries=15, request_timeout=STALL_TIMEOUT)
        convs = [conversation(i) for i in range(50)]
        replies = backend.generate(convs)
    assert [r.text for r in replies] == [expected_text(c) for c in convs]
    assert len(faults.injected) >= 10  # the storm really happened
    assert backend.counters["retries"] == len(faults.injected)
    assert backend.counters["requests"] == 50 + len(faults.injected)


def test_retry_after_header_is_honoured(server, make_backend, monkeypatch):
    """The server's Retry-After (1 s) is the wait asked for, not the backoff's (0.01 s base)."""
    waits = backend_sleeps(monkeypatch)
    server.faults.push("429:1")
    assert make_backend().generate([conversation(1)])[0].text == expected_text(conversation(1))
    assert waits == [1.0] and len(server.requests) == 2


def test_parse_retry_after_forms():
    now = 1_700_000_000.0
    in_two_seconds = email.utils.formatdate(now + 2, usegmt=True)
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after": in_two_seconds}, now=now) == pytest.approx(2.0)
    assert parse_retry_after({"retry-after": email.utils.formatdate(now - 60, usegmt=True)}, now=now) == 0.0
    assert parse_retry_after({"retry-after": "-5"}) == 0.0
    assert parse_retry_after({"retry-after": "1e9"}) == 600.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "nan"}) is None
    assert parse_retry_after({}) is None


def test_exhausted_retries_raise_without_leaking_the_key(server, make_backend, caplog):
    server.echo_key = True  # each 500 quotes the Authorization header back, as some servers do
    server.faults.push(*["500"] * 4)
    backend = make_backend(max_retries=3, key_env="SERVED_KEY")
    with caplog.at_level(logging.DEBUG), pytest.raises(ModelCallError) as raised:
        backend.generate([conversation(1)])
    message = str(raised.value)
    assert "fake-model" in message and "4 attempts" in message and "HTTP 500" in message
    assert "\n" not in message and "question number" not in message
    assert len(server.requests) == 4 and backend.counters["failures"] == 1
    assert caplog.text.count("retry ") == 3
    assert server.auth_headers[0] == f"Bearer {SECRET}"  # sent to the server, and nowhere else:
    assert server.echoed == 4  # every error body quoted the key back: a leak was on offer 4 times
    assert SECRET not in message and SECRET not in caplog.text and SECRET not in repr(backend)


@pytest.mark.parametrize(("status", "stops"), [("400", True), ("401", True), ("403", True), ("404", True),
                                               ("413", False), ("422", False)])
def test_client_errors_are_not_retried(server, make_backend, status, stops, caplog):
    """400/401/403/404 stop the run (ServiceRefused: no retry can fix them); other 4xx fail the one request."""
    server.echo_key = True  # the error body quotes the Authorization header back, as some servers do
    server.faults.push(status)
    with caplog.at_level(logging.DEBUG), pytest.raises(ModelCallError) as raised:
        make_backend(key_env="SERVED_KEY").generate([conversation(1)])
    assert f"HTTP {status}" in str(raised.value) and "\n" not in str(raised.value)
    assert isinstance(raised.value, ServiceRefused) is stops
    assert ("stopped (retrying cannot fix this)" if stops else "not retried") in str(raised.value)
    assert len(server.requests) == 1
    assert server.echoed == 1 and SECRET in str(_server_error(raised.value))  # the key was on offer...
    assert SECRET not in str(raised.value) and SECRET not in caplog.text  # ... and not taken


def _server_error(err: BaseException) -> object:
    """The body of the HTTP error under a ModelCallError (what the server sent), or None."""
    cause = err.__cause__
    return getattr(cause, "body", None)


def test_missing_key_without_api_base_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(InputError, match="api.openai.com.*OPENAI_API_KEY.*--api_base"):  # exit 2, one line
        OpenAIBackend("gpt-4o-mini")


def test_missing_key_with_api_base_uses_a_placeholder(server, make_backend, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    assert make_backend().generate([conversation(2)])[0].text == "ECHO: question number 2"
    assert server.auth_headers == ["Bearer not-needed"]


@pytest.mark.parametrize("count", [1, 5])
def test_callers_messages_are_not_mutated(server, make_backend, count):
    server.faults.push("500", "malformed")  # retries must not touch them either
    convs = [conversation(i) for i in range(count)]
    snapshot = copy.deepcopy(convs)
    make_backend().generate(convs)
    assert convs == snapshot


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("  Sertraline.\n", "Sertraline."),
        ("\n\nTreatment: CBT\nExplanation: helps\n  ", "Treatment: CBT\nExplanation: helps"),
        ("   ", ""),
        ("plain", "plain"),
    ],
)
def test_replies_are_stripped_like_the_reference(content, expected):
    with FakeOpenAI(responder=lambda request: content) as fake:
        backend = OpenAIBackend("fake-model", api_base=fake.base_url, request_timeout=5.0, max_retries=0)
        try:
            [reply] = backend.generate([conversation(1)])
        finally:
            backend.close()
    assert reply.text == expected
