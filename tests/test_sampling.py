"""Top-p / top-k: taken from the checkpoint's generation config as transformers would, the same on
every local path, recorded in every record; flags override."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import embedded_tokenizer, make_tiny_llama
from transformers import GenerationConfig
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import arena_med
import mentalarena.engines.hf_backend as hf_backend
import mentalarena.engines.sampling as sampling
from mentalarena.engines.sampling import checkpoint_sampling, filter_scores

CKPT, DEFAULT, FLAG = "generation_config", "transformers_default", "flag"


@pytest.mark.parametrize(
    ("config", "flags", "expected"),
    [
        # Llama-3.1-Instruct's generation_config.json: top_p 0.9, no top_k -> transformers' 50
        (GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9), {}, (0.9, 50, CKPT, DEFAULT)),
        (GenerationConfig(), {}, (1.0, 50, DEFAULT, DEFAULT)),
        (GenerationConfig(top_k=20, top_p=0.8), {}, (0.8, 20, CKPT, CKPT)),
        (GenerationConfig(top_k=0), {}, (1.0, 0, DEFAULT, CKPT)),            # 0: top-k off
        (GenerationConfig(top_p=0.9), {"top_p": 1.0, "top_k": 0}, (1.0, 0, FLAG, FLAG)),
        (None, {"top_k": 7}, (1.0, 7, DEFAULT, FLAG)),
    ],
)
def test_checkpoint_sampling_follows_transformers(config, flags, expected):
    got = checkpoint_sampling(config, **flags)
    assert (got["top_p"], got["top_k"], got["source"]["top_p"], got["source"]["top_k"]) == expected


@pytest.mark.parametrize(("top_p", "top_k"), [(1.5, None), (0.0, None), (None, -1)])
def test_checkpoint_sampling_refuses_impossible_values(top_p, top_k):
    with pytest.raises(ValueError):
        checkpoint_sampling(GenerationConfig(), top_p, top_k)


def test_filter_on_known_scores():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    scores = probs.log()
    kept = lambda s: torch.isfinite(s)[0].tolist()  # noqa: E731
    assert kept(filter_scores(scores, top_k=2)) == [True, True, False, False]
    assert kept(filter_scores(scores, top_p=0.8)) == [True, True, False, False]   # 0.5 + 0.3 reaches 0.8
    assert kept(filter_scores(scores, top_p=0.81)) == [True, True, True, False]
    assert kept(filter_scores(scores, top_p=0.1)) == [True, False, False, False]  # at least one
    # top-p after top-k, on the renormalised k best: 0.5/0.8 = 0.625 >= 0.6
    assert kept(filter_scores(scores, top_k=2, top_p=0.6)) == [True, False, False, False]
    assert kept(filter_scores(scores)) == [True] * 4


@pytest.mark.parametrize(("top_k", "top_p"), [(50, 1.0), (5, 0.9), (0, 0.9), (50, 0.9), (1, 0.5), (200, 0.95)])
def test_filter_keeps_what_transformers_warpers_keep(top_k, top_p):
    gen = torch.Generator().manual_seed(top_k)
    scores = torch.randn(6, 1000, generator=gen) * 3 / 0.8
    ours = torch.isfinite(filter_scores(scores.clone(), top_k, top_p))
    theirs = scores.clone()
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1.0:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    assert torch.equal(ours, torch.isfinite(theirs))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    path = make_tiny_llama(folder, embedded_tokenizer(), max_position_embeddings=4096)
    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9).save_pretrained(path)
    return path


def test_both_local_paths_sample_with_the_same_settings(tiny, monkeypatch):
    """The fast path (own decode loop) and the fallback (transformers' generate + SeededSampler)
    filter with the same top-p / top-k and draw the same tokens for the same seeds."""
    calls = []
    real = sampling.sample_rows

    def spy(logits, temperature, top_p, generators, top_k=0):
        calls.append((temperature, top_p, top_k))
        return real(logits, temperature, top_p, generators, top_k)

    monkeypatch.setattr(sampling, "sample_rows", spy)
    monkeypatch.setattr(hf_backend, "sample_rows", spy)
    backend = hf_backend.HFBackend(tiny, temperature=0.8, max_new_tokens=8, dtype="float32")
    assert (backend.top_p, backend.top_k) == (0.9, 50)
    conv = [[{"role": "user", "content": "How do you feel today?"}]]
    fast = backend.generate(conv, seeds=[5])[0].text
    fast_calls, calls[:] = set(calls), []
    backend.prefix_reuse = False
    plain = backend.generate(conv, seeds=[5])[0].text
    assert fast_calls == set(calls) == {(0.8, 0.9, 50)}
    assert fast == plain


def test_the_values_used_are_in_every_record_and_flags_change_the_hash(tiny, tmp_path):
    hashes = {}
    for label, flags in (("checkpoint", {}), ("flags", {"top_p": 0.95, "top_k": 7})):
        out = tmp_path / f"{label}.jsonl"
        summary = arena_med.run(base_model=tiny, output_file=str(out), limit=1, max_new_tokens=4,
                                dialogue_rounds=1, max_decode_rounds=0, max_tries=1, dtype="float32",
                                progress=False, **flags)
        assert summary["sessions_ok"] == 1
        record = json.loads(out.read_text().splitlines()[0])
        used = record["settings"]["sampling"]["base"]
        if label == "checkpoint":
            assert (used["top_p"], used["top_k"]) == (0.9, 50)
            assert used["source"] == {"top_p": CKPT, "top_k": DEFAULT}
            assert record["settings"]["top_p"] is None and record["settings"]["top_k"] is None
        else:
            assert (used["top_p"], used["top_k"]) == (0.95, 7) and used["source"] == {"top_p": FLAG, "top_k": FLAG}
            assert (record["settings"]["top_p"], record["settings"]["top_k"]) == (0.95, 7)
        assert record["settings"]["sampling"]["judge"] == used  # the judge is the base model here
        hashes[label] = record["settings_hash"]
    assert hashes["checkpoint"] != hashes["flags"]
