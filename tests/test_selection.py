"""mentalarena/training/selection.py: IQR pruning on known values (numpy's linear quartiles, inclusive
fences, ties, NaN), k-center greedy against hand-worked traversals and a brute-force optimum,
composition order, k >= n, and bad input. No model is loaded: perplexities and embeddings are given."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mentalarena.errors import InputError
from mentalarena.training.selection import check_options, iqr_fences, iqr_keep, kcenter_greedy, parse_methods, row_text, select
from mentalarena.training.sft import SFTPair, to_openai, to_text


# ---------------------------------------------------------------------------------- IQR
def test_iqr_keep_on_known_values():
    values = [1, 2, 3, 4, 5, 6, 7, 8, 9, 100]
    # linear quartiles: Q1 at rank 2.25 -> 3.25, Q3 at rank 6.75 -> 7.75, IQR 4.5
    assert iqr_fences(values) == (3.25, 7.75, 3.25 - 6.75, 7.75 + 6.75)
    assert iqr_keep(values) == list(range(9))  # fences [-3.5, 14.5]: 100 goes
    assert iqr_keep(values, factor=0) == [3, 4, 5, 6]  # [3.25, 7.75]
    assert iqr_keep(values, factor=0.5) == list(range(9))  # [1.0, 10.0]: 1 sits on the fence and stays
    assert iqr_keep(values, factor=21) == list(range(10))  # [-91.25, 102.25]
    assert iqr_keep(list(reversed(values))) == list(range(1, 10))  # indices, not ranks


def test_iqr_fences_are_inclusive_and_ties_stay_together():
    values = [0, 4, 4, 8, 20]  # Q1 4, Q3 8, IQR 4
    assert iqr_keep(values, 1.5) == [0, 1, 2, 3]  # [-2, 14]
    assert iqr_keep(values, 3) == [0, 1, 2, 3, 4]  # [-8, 20]: 20 is on the fence
    assert iqr_keep([1, 1, 1, 1, 5]) == [0, 1, 2, 3]  # IQR 0: only the tied value survives
    assert iqr_keep([7, 7, 7]) == [0, 1, 2]


def test_iqr_never_keeps_a_missing_perplexity():
    values = [1, math.nan, 2, 3, math.inf]  # quartiles of 1, 2, 3: 1.5, 2.5 -> fences [0, 4]
    assert iqr_keep(values) == [0, 2, 3]
    assert iqr_keep([math.nan]) == [] and iqr_keep([]) == [] and iqr_fences([math.nan]) is None


@pytest.mark.parametrize("factor", [-1, math.nan, math.inf, "1.5", True])
def test_iqr_bad_factor(factor):
    with pytest.raises(InputError, match="factor must be a number of at least 0"):
        iqr_keep([1, 2, 3], factor)


# ---------------------------------------------------------------------------------- k-center
def radius_of(points, centers):
    points = np.asarray(points, dtype=float)
    return max(min(np.linalg.norm(p - points[c]) for c in centers) for p in points)


def test_kcenter_greedy_traversal_worked_by_hand():
    points = [[0.0], [1.0], [2.0], [10.0]]
    # mean 3.25: nearest is 2 (index 2); farthest from it 10; then 0 (2 away; 1 is only 1 away)
    assert kcenter_greedy(points, 3) == ([2, 3, 0], 1.0)
    assert kcenter_greedy(points, 2) == ([2, 3], 2.0)
    assert kcenter_greedy(points, 1) == ([2], 8.0)
    assert kcenter_greedy(points, 2, first=0) == ([0, 3], 2.0)
    # ties: both points are 1 from the mean, and both 2 from the start: the lowest index wins
    assert kcenter_greedy([[-1.0], [1.0], [3.0], [-3.0]], 2) == ([0, 2], 2.0)
    assert kcenter_greedy([[5.0, 5.0]] * 3, 2) == ([0, 1], 0.0)  # duplicates: nothing left to cover


def test_kcenter_greedy_finds_the_optimum_on_well_separated_clusters():
    """Three equilateral triangles (sides 1, 2, 3) 100 apart: any optimal 3-cover puts one center in
    each (else one center spans two clusters, radius > 90), and in a triangle every vertex covers the
    others at exactly its side, so the optimum is 3, which farthest-first reaches from any start."""
    def triangle(x, y, side):
        return [[x, y], [x + side, y], [x + side / 2, y + side * math.sqrt(3) / 2]]

    points = triangle(0, 0, 1) + triangle(100, 0, 2) + triangle(0, 100, 3)
    optimum = min(radius_of(points, c) for c in itertools.combinations(range(len(points)), 3))
    assert optimum == pytest.approx(3.0)
    for first in ["mean", *range(len(points))]:
        chosen, radius = kcenter_greedy(points, 3, first=first)
        assert sorted(c // 3 for c in chosen) == [0, 1, 2]  # one center per cluster
        assert radius == pytest.approx(optimum, abs=1e-6) and radius == pytest.approx(radius_of(points, chosen))


@pytest.mark.parametrize("seed", range(5))
def test_kcenter_greedy_is_within_twice_the_optimum_and_reports_its_radius(seed):
    points = np.random.default_rng(seed).normal(size=(10, 3))
    chosen, radius = kcenter_greedy(points, 3)
    assert len(set(chosen)) == 3 and radius == pytest.approx(radius_of(points, chosen), abs=1e-6)
    optimum = min(radius_of(points, c) for c in itertools.combinations(range(10), 3))
    assert optimum - 1e-6 <= radius <= 2 * optimum + 1e-6


def test_kcenter_keeps_everything_when_k_is_at_least_n():
    assert kcenter_greedy([[0.0], [3.0]], 2) == ([0, 1], 0.0)
    assert kcenter_greedy([[0.0], [3.0]], 50) == ([0, 1], 0.0)


@pytest.mark.parametrize("vectors, k, first, message", [
    ([], 1, "mean", "non-empty list of vectors"),
    ([[0.0], [1.0, 2.0]], 1, "mean", "non-empty list of vectors of one length"),
    ([[0.0], [math.nan]], 1, "mean", "NaN or infinity"),
    ([[0.0], [1.0]], 0, "mean", "k must be a whole number of at least 1"),
    ([[0.0], [1.0]], 1.5, "mean", "k must be a whole number"),
    ([[0.0], [1.0], [2.0]], 1, 3, "first must be"),
    ([[0.0], [1.0], [2.0]], 1, "median", "first must be"),
])
def test_kcenter_bad_input(vectors, k, first, message):
    with pytest.raises(InputError, match=message):
        kcenter_greedy(vectors, k, first)


# ---------------------------------------------------------------------------------- select
PPL = [1, 2, 2, 3, 3, 3, 2, 50]  # Q1 2, Q3 3 -> fences [0.5, 4.5]: row 7 goes
POSITION = [0, 0.1, 5, 5.1, 10, 10.1, 0.2, 30]  # 1-D "embeddings": row 7 is also far from the rest
ROWS = [to_text(SFTPair("sys", f"question {i}?", f"answer {i}", "diagnosis")) for i in range(8)]


def fakes():
    index = {row_text(row): i for i, row in enumerate(ROWS)}
    return {"perplexities": lambda rows: [PPL[index[row_text(r)]] for r in rows],
            "embeddings": lambda texts: np.array([[POSITION[index[t]]] for t in texts])}


def test_methods_compose_in_the_order_given():
    kept, report = select(ROWS, ["ppl_iqr", "kcenter"], size=3, model="tiny", encoder_name="fake", **fakes())
    # without row 7: start at 5 (nearest the mean 4.357), then 10.1, then 0; kept in input order
    assert kept == [ROWS[0], ROWS[2], ROWS[5]]
    assert [(s["method"], s["in"], s["kept"], s["dropped"]) for s in report["steps"]] == \
        [("ppl_iqr", 8, 7, 1), ("kcenter", 7, 3, 4)]
    ppl, kc = report["steps"]
    assert (ppl["q1"], ppl["q3"], ppl["lower_fence"], ppl["upper_fence"]) == (2, 3, 0.5, 4.5)
    assert (ppl["dropped_low"], ppl["dropped_high"], ppl["no_answer_tokens"]) == (0, 1, 0)
    assert kc["radius"] == pytest.approx(0.2)
    assert (report["rows_in"], report["rows_kept"], report["rows_dropped"]) == (8, 3, 5)
    assert report["settings"] == {"methods": ["ppl_iqr", "kcenter"], "iqr_factor": 1.5, "select_size": 3,
                                  "perplexity_model": "tiny", "format": "original", "max_len": 1024, "encoder": "fake"}

    # the other order: k-center first keeps the far row 7 (start 10, then 30, then 0), and IQR over
    # three values keeps them all
    kept, report = select(ROWS, ["kcenter", "ppl_iqr"], size=3, **fakes())
    assert kept == [ROWS[0], ROWS[4], ROWS[7]]
    assert [(s["method"], s["kept"], s["dropped"]) for s in report["steps"]] == [("kcenter", 3, 5), ("ppl_iqr", 3, 0)]
    assert report["settings"]["perplexity_model"] == "embedded"


def test_each_method_alone_and_k_at_least_n():
    assert select(ROWS, ["ppl_iqr"], **fakes())[0] == ROWS[:7]
    kept, report = select(ROWS, ["kcenter"], size=8, **fakes())
    assert kept == ROWS and report["steps"][0]["dropped"] == 0 and report["settings"]["iqr_factor"] is None
    assert select(ROWS, ["kcenter"], size=100, **fakes())[0] == ROWS
    kept, report = select(ROWS, [], **fakes())
    assert kept == ROWS and report["steps"] == [] and report["rows_dropped"] == 0
    assert select(ROWS, ["ppl_iqr"], factor=0, **fakes())[0] == [ROWS[i] for i in (1, 2, 3, 4, 5, 6)]


def test_row_text_is_question_and_answer_in_both_formats():
    pair = SFTPair("sys", "What is it?", "Burnout", "diagnosis")
    assert row_text(to_text(pair)) == row_text(to_openai(pair)) == "What is it?\nBurnout"


@pytest.mark.parametrize("select_, size, factor, model, message", [
    ("perplexity", None, 1.5, None, "--select must be a comma list of ppl_iqr, kcenter, not 'perplexity'"),
    ("kcenter", None, 1.5, None, "--select kcenter needs --select_size"),
    ("kcenter", 0, 1.5, None, "--select kcenter needs --select_size"),
    ("ppl_iqr", 10, 1.5, None, "--select_size is the number of rows kcenter keeps"),
    ("ppl_iqr", None, -1, None, "--iqr_factor must be a number of at least 0"),
    ("kcenter", 5, 1.5, "some/model", "--select_model is the perplexity model of ppl_iqr"),
    ("ppl_iqr,ppl_iqr", None, 1.5, None, "names a method twice"),
])
def test_bad_options_are_one_line(select_, size, factor, model, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        check_options(select_, size, factor, model)


def test_parse_methods_takes_fires_tuples_and_none():
    assert parse_methods(("ppl_iqr", "kcenter")) == ["ppl_iqr", "kcenter"]
    assert parse_methods("kcenter,ppl_iqr") == ["kcenter", "ppl_iqr"]
    assert parse_methods(None) == parse_methods("none") == []
