"""Tests for mentalarena.selfplay.similarity against the real bundled all-MiniLM-L6-v2 (offline, small)."""
from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import ROOT

from mentalarena.selfplay.similarity import (
    BUNDLED_NAME,
    THRESHOLDS,
    Encoder,
    default_encoder_path,
    threshold_for,
    top_k_groups,
)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(device="cpu")


def test_identical_texts_score_one(encoder: Encoder) -> None:
    text = "I feel like nobody in my family wants me around."
    assert encoder.similarity(text, text) == pytest.approx(1.0, abs=1e-5)


def test_paraphrase_beats_unrelated(encoder: Encoder) -> None:
    anchor = "I am worthless and nobody could ever love me."
    paraphrase = "Nobody will ever love me because I have no value."
    unrelated = "The train to Berlin leaves at seven in the morning."
    assert encoder.similarity(anchor, paraphrase) > encoder.similarity(anchor, unrelated)


def test_encode_returns_unit_float32_rows(encoder: Encoder) -> None:
    vectors = encoder.encode(["one sentence", "another, somewhat longer sentence here"])
    assert vectors.dtype == np.float32
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_cache_reuses_vectors_without_model_calls(
    encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    original = encoder._embed_batch

    def counting(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return original(texts)

    monkeypatch.setattr(encoder, "_embed_batch", counting)
    texts = ["a sentence seen for the first time by the cache test", "and a second new one"]
    first = encoder.encode(texts)
    assert len(calls) == 1
    second = encoder.encode(list(reversed(texts)) + texts)
    assert len(calls) == 1
    np.testing.assert_array_equal(second, np.concatenate([first[::-1], first]))


def test_similarities_match_pairwise(encoder: Encoder) -> None:
    pairs = [
        ("I avoid my family.", "He stopped answering his mother's calls."),
        ("I cannot control myself.", "There is nothing I can do to change this."),
        ("It is raining today.", "I am unlovable."),
    ]
    batched = encoder.similarities(pairs)
    single = [encoder.similarity(a, b) for a, b in pairs]
    np.testing.assert_allclose(batched, single, atol=1e-6)


def test_mean_pooling_ignores_padding(encoder: Encoder) -> None:
    # _embed_batch bypasses the cache, so the short sentence really is padded in the second call.
    short = "I feel trapped."
    long = " ".join(["My week was long and every day felt heavier than the one before it."] * 6)
    alone = encoder._embed_batch([short])[0]
    padded = encoder._embed_batch([short, long])[0]
    np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_top_k_groups_orders_by_best_principle_with_stable_ties(encoder: Encoder) -> None:
    text = "I am afraid of going to the wedding because my family will judge me."
    groups = {
        "weather": ["Talk about the weather forecast.", "Mention rain and sunshine."],
        "family_a": ["Speak about fear of being judged by family at events."],
        "mixed": ["Describe cooking pasta.", text],
        "family_b": ["Speak about fear of being judged by family at events."],
    }
    ranked = top_k_groups(encoder, groups, text, k=3)
    # "mixed" contains the text itself (score 1); the two family groups tie and keep dict order.
    assert [group for group, _ in ranked] == ["mixed", "family_a", "family_b"]
    assert ranked[0][1] == pytest.approx(1.0, abs=1e-5)
    # The same principle text is scored once, so the tie is exact by design, whatever the threads.
    assert ranked[1][1] == ranked[2][1]
    assert len(top_k_groups(encoder, groups, text, k=10)) == 4


class _StubEncoder:
    """Unit vectors chosen so that cosine scores differ only below the ranking's precision."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = []
        for t in texts:
            s = self.scores.get(t, 1.0)
            rows.append([s, np.sqrt(max(0.0, 1.0 - s * s))])
        return np.asarray(rows, dtype=np.float64)


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        # 2e-8 apart: noise of batch shape / thread count, a tie, so file order decides.
        ({"a": 0.50000001, "b": 0.50000003, "c": 0.2}, ["a", "b", "c"]),
        ({"a": 0.50000003, "b": 0.50000001, "c": 0.2}, ["a", "b", "c"]),
        # 1e-5 apart: a real difference, ranked by score.
        ({"a": 0.50000, "b": 0.50001, "c": 0.2}, ["b", "a", "c"]),
        ({"a": 0.1, "b": 0.2, "c": 0.3}, ["c", "b", "a"]),
    ],
)
def test_top_k_groups_ties_below_precision_keep_file_order(
    scores: dict[str, float], expected: list[str]
) -> None:
    groups = {name: [f"principle {name}"] for name in ("a", "b", "c")}
    stub = _StubEncoder({f"principle {k}": v for k, v in scores.items()})
    ranked = top_k_groups(stub, groups, "the text", k=3)  # type: ignore[arg-type]
    assert [g for g, _ in ranked] == expected


def test_threshold_for_known_and_unknown_encoders() -> None:
    assert threshold_for("bert-base-uncased") == 0.9
    assert threshold_for("/some/dir/bert-base-uncased") == 0.9
    # the bundled encoder's calibrated default (benchmarks/calibrate_threshold.py), exactly, as the
    # product defines it and as README's flag table documents it: a silent change of either fails here
    documented = 0.29
    assert THRESHOLDS["all-MiniLM-L6-v2"] == documented
    assert threshold_for(BUNDLED_NAME) == documented
    assert threshold_for(default_encoder_path()) == documented  # the bundled folder's path, not only its label
    flag_row = next(line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
                    if line.startswith("| `--similarity_threshold` |"))
    assert re.search(r"\b0\.9 for `bert-base-uncased`, (\d\.\d+) for the bundled all-MiniLM-L6-v2",
                     flag_row).group(1) == f"{documented:.2f}"
    assert threshold_for("my-own-encoder") is None
