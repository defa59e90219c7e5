"""Data selection before fine-tuning, after MentalQLM: perplexity pruning and diversity selection.

- `ppl_iqr`: each SFT row's answer perplexity under a reference model (`quality.py`; by default the
  model being fine-tuned); rows outside the inter-quartile fences [Q1 - f*IQR, Q3 + f*IQR] are
  dropped (both ends: answers the model finds implausible, and near-copies it finds trivial).
- `kcenter`: k-center greedy (farthest-first traversal) on sentence embeddings of each row's question
  and answer (the bundled all-MiniLM-L6-v2, `similarity.Encoder`): keeps `size` rows that cover the
  set, each dropped row near a kept one.

Methods compose in the order given; each works on what the previous one kept, and the kept rows
stay in their input order. Everything is deterministic: quartiles by numpy's default (linear)
rule, ties in k-center broken by the lowest index, distances compared rounded to
`DISTANCE_DECIMALS` so that last-digit noise of the encoder does not decide.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np

from mentalarena.errors import InputError

METHODS = ("ppl_iqr", "kcenter")
DISTANCE_DECIMALS = 6


# ---------------------------------------------------------------------------------- the two rules
def iqr_keep(values: Sequence[float], factor: float = 1.5) -> list[int]:
    """Indices of the values inside [Q1 - factor*IQR, Q3 + factor*IQR], fences included, in order.
    Q1 and Q3 are numpy's default percentiles (linear interpolation between the order statistics,
    `np.percentile(..., method="linear")`), taken over the finite values only; a NaN or infinite
    value (a row with no answer token left) is never kept."""
    _check_factor(factor)
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise InputError("iqr_keep takes a flat list of numbers")
    finite = np.isfinite(array)
    if not finite.any():
        return []
    q1, q3 = np.percentile(array[finite], [25, 75])
    low, high = q1 - factor * (q3 - q1), q3 + factor * (q3 - q1)
    return [i for i, v in enumerate(array) if np.isfinite(v) and low <= v <= high]


def iqr_fences(values: Sequence[float], factor: float = 1.5) -> tuple[float, float, float, float] | None:
    """(Q1, Q3, lower fence, upper fence) as `iqr_keep` uses them; None without a finite value."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if not array.size:
        return None
    q1, q3 = (float(q) for q in np.percentile(array, [25, 75]))
    return q1, q3, q1 - factor * (q3 - q1), q3 + factor * (q3 - q1)


def kcenter_greedy(vectors, k: int, first: int | str = "mean") -> tuple[list[int], float]:
    """k points by farthest-first traversal, in the order chosen, and the covering radius: the
    largest Euclidean distance from any point to its nearest chosen one. `first`: "mean" starts at
    the point nearest the mean of all points, or an index starts there. Each next point is the one
    farthest from those chosen. Ties (distances equal after rounding to DISTANCE_DECIMALS) go to
    the lowest index. k >= n chooses every point in index order, radius 0. The result is within
    twice the optimal radius (Gonzalez 1985), and optimal when each of k well-separated clusters
    has a radius that any of its points achieves."""
    try:
        points = np.asarray(vectors, dtype=np.float64)
    except (ValueError, TypeError):
        points = np.zeros(0)
    if points.ndim != 2 or not len(points):
        raise InputError("k-center needs a non-empty list of vectors of one length")
    if not np.isfinite(points).all():
        raise InputError("k-center: a vector holds NaN or infinity")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k-center: k must be a whole number of at least 1, not {k!r}")
    n = len(points)
    if k >= n:
        return list(range(n)), 0.0
    if first == "mean":
        start = int(np.argmin(_rounded(np.linalg.norm(points - points.mean(axis=0), axis=1))))
    elif isinstance(first, (int, np.integer)) and not isinstance(first, bool) and 0 <= first < n:
        start = int(first)
    else:
        raise InputError(f'k-center: first must be "mean" or an index below {n}, not {first!r}')
    chosen = [start]
    nearest = _rounded(np.linalg.norm(points - points[start], axis=1))
    free = np.ones(n, dtype=bool)  # a point is chosen once, even when duplicates leave it at distance 0
    free[start] = False
    while len(chosen) < k:
        # argmax: the first of equal maxima, i.e. the lowest index
        pick = int(np.argmax(np.where(free, nearest, -1.0)))
        chosen.append(pick)
        free[pick] = False
        nearest = np.minimum(nearest, _rounded(np.linalg.norm(points - points[pick], axis=1)))
    return chosen, float(nearest.max())


def _rounded(distances: np.ndarray) -> np.ndarray:
    return np.round(distances, DISTANCE_DECIMALS)


# ---------------------------------------------------------------------------------- options
def parse_methods(select) -> list[str]:
    """The --select comma list (a string or fire's tuple) as method names; [] for none."""
    from mentalarena.cli import names

    if select in (None, "", "none", False):
        return []
    methods = names(select)
    for name in methods:
        if name not in METHODS:
            raise InputError(f"--select must be a comma list of {', '.join(METHODS)}, not {name!r}")
    if len(set(methods)) != len(methods):
        raise InputError(f"--select names a method twice: {','.join(methods)}")
    return methods


def check_options(select, select_size, iqr_factor, select_model=None) -> list[str]:
    """Every selection flag checked together, before any model loads; returns the methods."""
    methods = parse_methods(select)
    if "kcenter" in methods:
        if isinstance(select_size, bool) or not isinstance(select_size, int) or select_size < 1:
            raise InputError(f"--select kcenter needs --select_size, the number of rows to keep (a whole number of at "
                             f"least 1), not {select_size!r}")
    elif select_size is not None:
        raise InputError("--select_size is the number of rows kcenter keeps: add kcenter to --select")
    _check_factor(iqr_factor, "--iqr_factor")
    if select_model not in (None, "") and "ppl_iqr" not in methods:
        raise InputError("--select_model is the perplexity model of ppl_iqr: add ppl_iqr to --select")
    return methods


def _check_factor(factor, name: str = "factor") -> None:
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (factor >= 0 and math.isfinite(factor)):
        raise InputError(f"{name} must be a number of at least 0, not {factor!r}")


# ---------------------------------------------------------------------------------- rows
def row_text(row: dict) -> str:
    """A row's question and answer (the system text, the same in every row, left out)."""
    from mentalarena.training.sft import from_openai, parse_text

    pair = from_openai(row) if "messages" in row else parse_text(row["text"])
    return f"{pair.question}\n{pair.answer}"


def select(rows: list[dict], methods: Sequence[str], *, fmt: str = "original", size: int | None = None,
           factor: float = 1.5, model: str | None = None, max_len: int = 1024, batch_size: int = 8,
           perplexities: Callable[[list[dict]], list[float]] | None = None,
           embeddings: Callable[[list[str]], np.ndarray] | None = None,
           encoder_name: str | None = None) -> tuple[list[dict], dict]:
    """The rows the methods keep, in input order, and a report: per step the rows in, kept and
    dropped (with the fences or the radius) and its seconds, and the settings. `model`: the
    perplexity model (None: the embedded one); `fmt`: "original" (`text` rows) or "chat_template"
    (`messages` rows). `perplexities` / `embeddings` replace the models (tests)."""
    methods = list(methods)
    check_options(methods, size, factor)
    settings = {"methods": methods, "iqr_factor": factor if "ppl_iqr" in methods else None,
                "select_size": size, "perplexity_model": None, "format": fmt, "max_len": max_len, "encoder": None}
    steps, kept = [], list(range(len(rows)))
    for method in methods:
        started = time.time()
        if method == "ppl_iqr":
            settings["perplexity_model"] = model or "embedded"
            if perplexities is None:
                perplexities = _perplexity_function(model, fmt, max_len, batch_size)
            values = perplexities([rows[i] for i in kept])
            inside = iqr_keep(values, factor)
            fences = iqr_fences(values, factor)
            step = {"method": method, "in": len(kept), "kept": len(inside), "dropped": len(kept) - len(inside),
                    "no_answer_tokens": sum(not math.isfinite(v) for v in values),
                    "q1": None, "q3": None, "lower_fence": None, "upper_fence": None,
                    "dropped_low": sum(math.isfinite(v) and v < fences[2] for v in values) if fences else 0,
                    "dropped_high": sum(math.isfinite(v) and v > fences[3] for v in values) if fences else 0}
            if fences:
                step.update(zip(("q1", "q3", "lower_fence", "upper_fence"), (round(f, 6) for f in fences)))
            kept = [kept[i] for i in inside]
        else:
            if embeddings is None:
                embeddings, settings["encoder"] = _embedding_function()
            else:
                settings["encoder"] = encoder_name or getattr(embeddings, "name", "given")
            if kept:
                chosen, radius = kcenter_greedy(embeddings([row_text(rows[i]) for i in kept]), size)
            else:
                chosen, radius = [], 0.0
            step = {"method": method, "in": len(kept), "kept": len(chosen), "dropped": len(kept) - len(chosen),
                    "radius": round(radius, DISTANCE_DECIMALS)}
            kept = [kept[i] for i in sorted(chosen)]
        step["seconds"] = round(time.time() - started, 2)
        steps.append(step)
    report = {"settings": settings, "rows_in": len(rows), "rows_kept": len(kept), "rows_dropped": len(rows) - len(kept),
              "steps": steps, "seconds": round(sum(s["seconds"] for s in steps), 2)}
    return [rows[i] for i in kept], report


def summary(report: dict) -> str:
    """One line: rows in -> kept, and what each step did."""
    parts = []
    for step in report["steps"]:
        detail = (f"fences [{step['lower_fence']}, {step['upper_fence']}]" if step["method"] == "ppl_iqr"
                  else f"radius {step['radius']}")
        parts.append(f"{step['method']} kept {step['kept']} of {step['in']} ({detail}, {step['seconds']} s)")
    return f"{report['rows_in']} rows -> {report['rows_kept']} kept: " + "; ".join(parts)


def _perplexity_function(model: str | None, fmt: str, max_len: int, batch_size: int):
    from mentalarena.training.quality import answer_perplexities, load_scorer

    def score(rows: list[dict]) -> list[float]:
        net, tokenizer = load_scorer(model)
        try:
            return answer_perplexities(net, tokenizer, rows, fmt, max_len, batch_size)
        finally:
            del net  # freed before training loads its own copy
            _free_cuda()

    return score


def _embedding_function():
    from mentalarena.selfplay.similarity import Encoder

    encoder = Encoder()

    def embed(texts: list[str]) -> np.ndarray:
        return encoder.encode(texts)

    return embed, encoder.name


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
