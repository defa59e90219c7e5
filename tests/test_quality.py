"""mentalarena/training/quality.py: batched answer perplexities on a tiny random Llama match a direct
computation, one row at a time with plain torch, in both row formats; a cut-off answer is NaN."""
from __future__ import annotations

import math

import pytest
import torch

from mentalarena.training.quality import answer_perplexities, load_scorer
from mentalarena.training.sft import SFTPair, to_openai, to_text
from mentalarena.training.trainers import IGNORE, encode

SYSTEM = "You are a psychiatric expert."
PAIRS = [
    SFTPair(SYSTEM, "Patient History: lost her job.\nWhat is the diagnosis?", "Major depressive disorder", "diagnosis"),
    SFTPair(SYSTEM, "She sleeps four hours.\nWhich treatment?", "CBT. It reframes the thoughts about failing, "
            "step by step, with homework between the sessions.", "treatment"),
    SFTPair(SYSTEM, "A student abroad, an exam next week, stays in bed all day and fears that everyone will "
            "know he failed.\nWhich medication?", "Sertraline. It lifts the mood.", "medication"),
    SFTPair(SYSTEM, "Q?", "Burnout", "diagnosis"),
    SFTPair(SYSTEM, "A retired teacher living alone skips meals.\nWhat is the diagnosis?",
            "Persistent depressive disorder", "diagnosis"),
]


def direct(model, tokenizer, row, fmt, max_len=1024):
    """exp(mean over answer tokens of -log p(token | everything before it)), one row, no batching."""
    ex = encode(row, tokenizer, fmt, max_len, answer_only=True, add_eos=False)
    ids = torch.tensor([ex["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    nll = [-float(logp[t - 1, ids[0, t]]) for t, label in enumerate(ex["labels"]) if label != IGNORE]
    return math.exp(sum(nll) / len(nll)) if nll else math.nan


@pytest.fixture(scope="module")
def scorer(tiny_base):
    return load_scorer(tiny_base)


@pytest.mark.parametrize("fmt, convert", [("original", to_text), ("chat_template", to_openai)])
def test_batched_perplexities_match_a_direct_computation(scorer, fmt, convert):
    model, tokenizer = scorer
    assert not model.training
    rows = [convert(p) for p in PAIRS]
    want = [direct(model, tokenizer, row, fmt) for row in rows]
    for batch_size in (1, 2, 8):  # batches of rows of different lengths: padding must not count
        got = answer_perplexities(model, tokenizer, rows, fmt, batch_size=batch_size)
        assert got == pytest.approx(want, rel=1e-4)
    assert all(v > 1 for v in want) and len(set(round(v, 3) for v in want)) == len(want)


def test_a_cut_answer_is_scored_on_what_remains_and_a_cut_off_one_is_nan(scorer):
    model, tokenizer = scorer
    rows = [to_text(PAIRS[3]), to_text(PAIRS[2])]
    prompt_len = [encode(r, tokenizer, "original", 1024, True, False)["labels"].count(IGNORE) for r in rows]
    max_len = prompt_len[0] + 2  # row 0 keeps two answer tokens; row 1's prompt alone is longer
    assert prompt_len[1] >= max_len
    got = answer_perplexities(model, tokenizer, rows, "original", max_len=max_len)
    assert got[0] == pytest.approx(direct(model, tokenizer, rows[0], "original", max_len), rel=1e-4)
    assert math.isnan(got[1])
    assert answer_perplexities(model, tokenizer, [], "original") == []
