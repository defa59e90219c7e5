"""One failing row fails that row (issue 20, item 20): a batch that fails is run again in halves,
so an out-of-memory on one long prompt fails that request only, in self-play (ModelClient) and in
the evaluations' streams (the default chunked stream, and the continuous batcher of HFBackend)."""
from __future__ import annotations

import asyncio
import functools

import pytest
import torch
from conftest import ScriptedBackend, make_tiny_llama

import arena_med as am
from mentalarena.selfplay.data import DEFAULT_PATIENTS_FILE, DEFAULT_PRINCIPLES_FILE, load_patients, load_principles
from mentalarena.engines.engine import Gate, ModelClient
from mentalarena.errors import ContextOverflow, InputError, ModelCallError, ServiceRefused
from mentalarena.engines.halving import describe, splittable
from mentalarena.engines.hf_backend import HFBackend
from mentalarena.store.jsonl import read_jsonl
from mentalarena.prompts import Prompts

MARK = "POISONED-ROW"
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 1.06 GiB is free."


@pytest.mark.parametrize(("exc", "split"), [
    (torch.OutOfMemoryError(CUDA_OOM), True),
    (torch.OutOfMemoryError("boom"), True),  # by its class, whatever it says
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 4503599627370496 bytes. Error code 12 (Cannot allocate memory)"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 17.90 GB, other allocations: 256.00 KB, max allowed: "
                  "18.13 GB). Tried to allocate 1.00 GB on private pool."), True),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API "
                  "call, so the stacktrace below might be incorrect."), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (MemoryError(), True),
    (ModelCallError("hf:tiny: gave up after 3 attempts"), True),
    (ServiceRefused("openai: the key was refused (401)"), False),
    (ContextOverflow("the prompt has 5000 tokens, the window 4096", 5000, 4096), False),
    (InputError("an encoder-decoder model reads raw text; use --prompting raw"), False),
    (RuntimeError("The size of tensor a (5) must match the size of tensor b (4) at non-singleton dimension 3"), False),
    (IndexError("index out of range in self"), False),
    (ValueError("too many values to unpack"), False),
])
def test_only_memory_and_a_backends_own_failure_are_split(exc, split):
    assert splittable(exc) is split


@pytest.mark.parametrize(("exc", "line"), [
    (torch.OutOfMemoryError(CUDA_OOM), f"OutOfMemoryError: {CUDA_OOM}"),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
     "RuntimeError: CUDA error: out of memory"),
    (MemoryError(), "MemoryError"),
])
def test_a_failure_is_described_by_its_type_and_first_line(exc, line):
    assert describe(exc) == line


# ---------------------------------------------------------------- self-play: ModelClient batches
class Poisoned(ScriptedBackend):
    """Scripted judge answers and, for every other call, a reply that depends only on the call's own
    conversation and seed. A conversation holding MARK runs the device out of memory whenever it
    shares its batch ("in company"), or always ("always")."""

    def __init__(self, poison=None, error=lambda: torch.OutOfMemoryError(CUDA_OOM)):
        super().__init__(rules=[("number of the best group", "I would choose Group 2."),
                                ("Rate this health state", "9"),
                                ("What should the doctor ask", "Ask about sleep."),
                                ("extract the treatment", "Treatment: CBT\nExplanation: it helps\n"
                                                          "Medicine: sertraline\nExplanation: an SSRI")])
        self.poison, self.error = poison, error
        self.failed: list[int] = []  # the size of every batch that raised

    def generate(self, conversations, seeds=None):
        marked = any(MARK in m["content"] for c in conversations for m in c)
        if marked and (self.poison == "always" or (self.poison == "in company" and len(conversations) > 1)):
            self.failed.append(len(conversations))
            raise self.error()
        replies = super().generate(conversations, seeds)
        for reply, conv, seed in zip(replies, conversations, seeds or [None] * len(replies)):
            if reply.text == self.default:
                reply.text = f"R{seed % 9973}-{len(conv)}"
        return replies


class FixedEncoder:
    name = "fixed"

    def similarities(self, pairs):
        return [0.1] * len(pairs)


def run_arena(backend, patients, tmp_path, name):
    """All sessions at once through arena_med.run_all; the records and the errors file's rows."""
    settings = am.Settings(base_model="scripted", judge_model="scripted", encoder="fixed", similarity_threshold=0.5,
                           dialogue_rounds=2, max_decode_rounds=1, max_tries=2)
    client = ModelClient(backend, Gate(), 256)
    groups = load_principles(DEFAULT_PRINCIPLES_FILE)
    arena = am.Arena(settings, Prompts(), client, client, FixedEncoder(), groups)
    arena.rank_groups = lambda text, k: [(g, 1.0) for g in list(groups)[:k]]  # no encoder: the file's order
    out, errors = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.errors.jsonl"
    counts = asyncio.run(am.run_all(arena, [(p, 0) for p in patients], out, errors, len(patients)))
    records = {r["patient_id"]: r for r in read_jsonl(out)}
    assert counts["ok"] == len(records)
    return records, read_jsonl(errors)


def calls(record):
    return [(t["step"], t["seed"], t["reply"]) for t in record["transcript"]]


@pytest.fixture(scope="module")
def arena_patients():
    patients = load_patients(DEFAULT_PATIENTS_FILE)
    assert len(patients) == 8
    patients[3] = {**patients[3], "history": patients[3]["history"] + " " + MARK}
    return patients


@pytest.fixture(scope="module")
def unpoisoned(arena_patients, tmp_path_factory):
    backend = Poisoned()
    records, errors = run_arena(backend, arena_patients, tmp_path_factory.mktemp("clean"), "clean")
    assert len(records) == 8 and errors == [] and max(backend.batches) >= 8  # the sessions did share batches
    return records


@pytest.mark.parametrize("error", [lambda: torch.OutOfMemoryError(CUDA_OOM), MemoryError,
                                   lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                                                        "allocate 8589934592 bytes. Error code 12")],
                         ids=["torch-oom", "MemoryError", "cpu-allocator"])
def test_a_row_that_fails_alone_fails_its_session_only(arena_patients, unpoisoned, tmp_path, error):
    backend = Poisoned("always", error)
    records, errors = run_arena(backend, arena_patients, tmp_path, "run")
    poisoned = arena_patients[3]["id"]
    assert [(e["patient_id"], e["sample"]) for e in errors] == [(poisoned, 0)]
    assert "(on this request alone)" in errors[0]["error"] and MARK not in errors[0]["error"]
    assert sorted(records) == sorted(p["id"] for p in arena_patients if p["id"] != poisoned)
    for pid, record in records.items():  # the same calls, seeds and replies as without the poison
        assert calls(record) == calls(unpoisoned[pid])
    assert backend.failed[0] >= 8 and backend.failed.count(1) == 1  # halved down to the one row, once


def test_a_row_that_fails_only_in_company_is_answered_alone(arena_patients, unpoisoned, tmp_path):
    backend = Poisoned("in company")
    records, errors = run_arena(backend, arena_patients, tmp_path, "run")
    assert errors == [] and backend.failed
    assert {pid: calls(r) for pid, r in records.items()} == {pid: calls(r) for pid, r in unpoisoned.items()}


@pytest.mark.parametrize("error", [lambda: ServiceRefused("openai: the key was refused (401)"),
                                   lambda: RuntimeError("The size of tensor a (5) must match the size of tensor b (4)")],
                         ids=["service-refused", "a-bug"])
def test_a_failure_of_the_run_reaches_every_waiting_session_unsplit(error):
    """A refused service (and a bug, which every half would hit again) is never bisected."""
    backend = Poisoned("always", error)
    gate = Gate()
    client = ModelClient(backend, gate, max_new_tokens=8)

    async def main():
        gate.active = 4
        convs = [[{"role": "user", "content": f"question {i}" + (MARK if i == 2 else "")}] for i in range(4)]
        return await asyncio.gather(*(client.chat(c, seed=i) for i, c in enumerate(convs)), return_exceptions=True)

    results = asyncio.run(main())
    assert backend.failed == [4] and backend.batches == []
    assert len({id(r) for r in results}) == 1 and isinstance(results[0], type(error()))


# ---------------------------------------------------------------- evaluations: the default stream
def test_the_default_stream_fails_the_row_that_fails_alone():
    backend = Poisoned("always", MemoryError)
    backend.max_batch_size = 4
    convs = [[{"role": "user", "content": f"question {i}" + (MARK if i == 5 else "")}] for i in range(7)]
    seeds = list(range(100, 107))
    got = dict(backend.stream(convs, seeds=seeds))
    clean = dict(Poisoned().stream(convs, seeds=seeds))
    assert sorted(got) == list(range(7))
    assert isinstance(got[5], ModelCallError) and str(got[5]) == "MemoryError (on this request alone)"
    assert {i: r.text for i, r in got.items() if i != 5} == {i: r.text for i, r in clean.items() if i != 5}
    assert backend.failed == [3, 2, 1]  # the chunk 4-6, then its half 5-6, then row 5 alone


# ---------------------------------------------------------------- evaluations: HFBackend.stream
PROMPTS = [f"Question {i}: how do I sleep better?" for i in range(5)]
LONG = "Tell me everything about " + "sleep and worry and work, " * 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer)


def hf(path, monkeypatch, **kwargs):
    """An HFBackend whose reply texts are the generated token ids (so replies compare by ids)."""
    backend = HFBackend(path, temperature=0.8, max_new_tokens=8, max_batch_size=4, device="cpu", **kwargs)
    monkeypatch.setattr(backend, "_text", lambda ids: " ".join(map(str, ids)))
    return backend


def fail_forward(monkeypatch, model, when):
    """model.forward raises torch.OutOfMemoryError where `when(input_ids, position_ids)`; returns the count."""
    forward, raised = model.forward, []

    @functools.wraps(forward)
    def patched(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if when(ids, kwargs.get("position_ids")):
            raised.append(tuple(ids.shape))
            raise torch.OutOfMemoryError(CUDA_OOM)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", patched)
    return raised


def ask(backend, prompts, seeds):
    return dict(backend.stream([[{"role": "user", "content": p}] for p in prompts], seeds=seeds))


@pytest.mark.parametrize("reuse", [True, False], ids=["batcher", "plain-generate"])
def test_a_long_prompt_that_cannot_be_prefilled_fails_alone(tiny, monkeypatch, reuse):
    backend = hf(tiny, monkeypatch)
    backend.prefix_reuse = reuse  # False: the path of sliding-window models, transformers' generate
    prompts, seeds = PROMPTS[:3] + [LONG] + PROMPTS[3:], [7, 8, 9, 10, 11, 12]
    want = ask(backend, prompts, seeds)
    assert len(backend.encode([{"role": "user", "content": LONG}])) > 200
    assert all(len(backend.encode([{"role": "user", "content": p}])) < 100 for p in PROMPTS)
    raised = fail_forward(monkeypatch, backend.model, lambda ids, _: ids.shape[1] > 150)
    got = ask(backend, prompts, seeds)
    # the batcher prefills the long prompt once, alone, and nothing else again; plain batches of
    # generate halve the chunk holding it: rows 0-3, then 2-3, then 3 alone
    assert len(raised) == (1 if reuse else 3) and sorted(got) == list(range(6))
    assert isinstance(got[3], ModelCallError) and "OutOfMemoryError" in str(got[3])
    assert {i: (r.text, r.completion_tokens) for i, r in got.items() if i != 3} == \
        {i: (r.text, r.completion_tokens) for i, r in want.items() if i != 3}


def test_a_decode_step_out_of_memory_runs_the_unanswered_again_with_fewer_slots(tiny, monkeypatch, caplog):
    """More than 2 rows decoding together do not fit: every request is still answered, each with the
    tokens it samples without the failure (fresh generators from its seed for each attempt)."""
    backend = hf(tiny, monkeypatch)
    prompts, seeds = PROMPTS + [PROMPTS[0] + " And at night?"], [21, 22, 23, 24, 25, 26]
    want = ask(backend, prompts, seeds)
    assert len({r.text for r in want.values()}) == 6  # sampled, and different: a mix-up would show
    raised = fail_forward(monkeypatch, backend.model, lambda ids, _: ids.shape[1] == 1 and ids.shape[0] > 2)
    got = ask(backend, prompts, seeds)
    assert raised == [(4, 1)]  # the first step of 4 rows; then 2 at a time fit
    assert {i: r.text for i, r in got.items()} == {i: r.text for i, r in want.items()}
    assert "4 requests decoding together ran out of memory (OutOfMemoryError: CUDA out of memory." in caplog.text


def test_a_request_that_cannot_decode_even_alone_fails_and_the_rest_are_answered(tiny, monkeypatch):
    backend = hf(tiny, monkeypatch)
    medium = "Tell me about " + "sleep, " * 20
    prompts, seeds = PROMPTS[:2] + [medium] + PROMPTS[2:], [31, 32, 33, 34, 35, 36]
    length = len(backend.encode([{"role": "user", "content": medium}]))
    assert all(len(backend.encode([{"role": "user", "content": p}])) + 8 < length for p in PROMPTS)
    want = ask(backend, prompts, seeds)
    # any decode step with the medium prompt's row in it (its positions are past every other row's)
    raised = fail_forward(monkeypatch, backend.model,
                          lambda ids, pos: ids.shape[1] == 1 and pos is not None and int(pos.max()) >= length)
    got = ask(backend, prompts, seeds)
    assert raised[-1] == (1, 1) and sorted(got) == list(range(6))
    assert isinstance(got[2], ModelCallError) and str(got[2]).startswith("OutOfMemoryError: CUDA out of memory.")
    assert {i: r.text for i, r in got.items() if i != 2} == {i: r.text for i, r in want.items() if i != 2}
