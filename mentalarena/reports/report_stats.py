"""The statistics of `arena_med.py report`: pure functions of records (or of embedding vectors),
so that every number of the report can be checked on hand-made records. `mentalarena.reports.report`
reads the files, calls these, and writes the report; `mentalarena.reports.report_figures` draws them."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

from mentalarena.errors import InputError
from mentalarena.training.sft import RECORD_FIELDS, medicine_usable, record_pairs

SEARCH_KINDS = ("treatment_search", "medicine_search")
# What a section needs in a record, and the line a file without it gets.
SECTION_NEEDS = {
    "decoder": (("decoder",), "no record has `decoder` (the Symptom Decoder's rounds)"),
    "try_and_reflect": (SEARCH_KINDS, "no record has `treatment_search` / `medicine_search`"),
    "diagnoses": (("illness", "medicine"), "no record has `illness` and `medicine`"),
    "cost": (("transcript", "calls", "elapsed_s"), "no record has `transcript`, `calls` or `elapsed_s`"),
    "validity": (RECORD_FIELDS, "no record has all six fields of a training record"),
}
SIX_FIELDS_NOTE = "records of the reference code or of an older version: six fields only"


# ---------------------------------------------------------------- small statistics
def summary(values: list[float]) -> dict:
    """n, mean, population std, median, p10 and p90 (numpy's linear percentiles); {"n": 0} if empty."""
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=float)
    p10, p50, p90 = np.percentile(a, [10, 50, 90])
    return {"n": len(values), "mean": float(a.mean()), "std": float(a.std()), "median": float(p50),
            "p10": float(p10), "p90": float(p90), "total": float(a.sum())}


def share(hits: int, n: int) -> float | None:
    return hits / n if n else None


# ---------------------------------------------------------------- Symptom Decoder
def record_threshold(record: dict) -> float | None:
    value = (record.get("settings") or {}).get("similarity_threshold")
    return float(value) if isinstance(value, (int, float)) else None


def passes(record: dict, round_: dict, item: str) -> bool:
    """An item passes a round when its similarity reaches the record's threshold; a record without
    a threshold in its settings falls back to the round's own `below_threshold` list."""
    threshold = record_threshold(record)
    if threshold is None:
        return item not in round_.get("below_threshold", [])
    return round_["similarities"][item] >= threshold


def decoder_rounds(records: list[dict]) -> dict:
    """Per round (0 = before any feedback): for each item the similarity's summary over the sessions
    that reached that round, and the share of (session, item) pairs at or above the threshold.
    A session that passed every item stops, so later rounds hold only the sessions still failing."""
    with_decoder = [r for r in records if r.get("decoder")]
    depth = max((len(r["decoder"]) for r in with_decoder), default=0)
    items = list(dict.fromkeys(k for r in with_decoder for d in r["decoder"] for k in d["similarities"]))
    rounds = []
    for n in range(depth):
        reached = [(r, r["decoder"][n]) for r in with_decoder if len(r["decoder"]) > n]
        per_item = {k: summary([d["similarities"][k] for _, d in reached if k in d["similarities"]]) for k in items}
        checks = [passes(r, d, k) for r, d in reached for k in d["similarities"]]
        item_pass = {k: share(sum(passes(r, d, k) for r, d in reached if k in d["similarities"]),
                              sum(k in d["similarities"] for _, d in reached)) for k in items}
        rounds.append({"round": n, "sessions": len(reached), "similarity": per_item,
                       "pass_share": share(sum(checks), len(checks)), "item_pass_share": item_pass,
                       "all_passed": sum(all(passes(r, d, k) for k in d["similarities"]) for r, d in reached)})
    feedback = Counter(feedback_rounds(r) for r in with_decoder)
    thresholds = sorted({t for t in map(record_threshold, with_decoder) if t is not None})
    return {"sessions": len(with_decoder), "items": items, "rounds": rounds, "thresholds": thresholds,
            "feedback_rounds": {str(k): feedback[k] for k in sorted(feedback)},
            "mean_feedback_rounds": summary([feedback_rounds(r) for r in with_decoder]).get("mean"),
            "feedback_effect": feedback_effect(with_decoder)}


def feedback_rounds(record: dict) -> int:
    value = record.get("feedback_rounds")
    return int(value) if isinstance(value, int) else len(record["decoder"]) - 1


def feedback_effect(records: list[dict]) -> dict:
    """Does feedback bring the doctor's picture closer? For each session with at least one feedback
    round, each item below the threshold in round 0: its similarity in the last round minus round 0."""
    deltas = []
    for r in records:
        if len(r.get("decoder") or []) < 2:
            continue
        first, last = r["decoder"][0], r["decoder"][-1]
        for k, v in first["similarities"].items():
            if not passes(r, first, k) and k in last["similarities"]:
                deltas.append(last["similarities"][k] - v)
    return {**summary(deltas), "improved_share": share(sum(d > 0 for d in deltas), len(deltas))}


# ---------------------------------------------------------------- try and reflect
def best_so_far(scores: list[float], length: int) -> list[float]:
    """The search's best score after each try (it starts at 0 and keeps strictly higher scores, as
    `try_and_reflect`); after a search stopped (target reached or tries spent) it stays at its best."""
    out, best = [], 0.0
    for s in scores:
        best = max(best, float(s))
        out.append(best)
    return (out + [best] * length)[:length] if out else [0.0] * length


SCORE_SCALE = (0, 10)  # the judge is asked for a health score from 1 to 10; 0: no number in its reply


def on_scale(score: float) -> float:
    """A score capped to the 0-10 scale. The reference's parser (--score_parser reference, and records
    made before it) takes the reply's first integer, so "121" or "32% of patients ..." arrive as 121 or
    32; the session took them as top scores (they stop the search), so capped at 10 they weigh as the
    session weighed them. The robust parser records such replies as 0."""
    return min(max(score, SCORE_SCALE[0]), SCORE_SCALE[1])


def search_curves(records: list[dict]) -> dict:
    """Per kind (treatment, medicine): the mean best-so-far score by try index over all searches,
    the share of searches still running at each try, the final (best) scores and the fallbacks
    (no try scored above 0, so the first candidate was kept). Scores are capped to 0-10
    (`on_scale`); how many were off the scale is counted."""
    out = {}
    for kind in SEARCH_KINDS:
        searches = [r[kind] for r in records if isinstance(r.get(kind), dict)]
        if not searches:
            continue
        raw = [[t.get("score", 0) or 0 for t in s.get("tries", [])] for s in searches]
        scores = [[on_scale(v) for v in s] for s in raw]
        length = max(len(s) for s in scores)
        curves = np.array([best_so_far(s, length) for s in scores]) if length else np.zeros((len(scores), 0))
        finals = [on_scale(s.get("best_score", 0) or 0) for s in searches]
        off = [v for s in raw for v in s if on_scale(v) != v]
        out[kind.removesuffix("_search")] = {
            "searches": len(searches),
            "scores": sum(map(len, raw)), "off_scale": len(off), "off_scale_examples": sorted(set(off))[:5],
            "best_so_far": [float(v) for v in curves.mean(axis=0)],
            "running": [share(sum(len(s) > i for s in scores), len(scores)) for i in range(length)],
            "tries": summary([len(s) for s in scores]),
            "first_try": summary([s[0] for s in scores if s]),
            "final_scores": {str(k): v for k, v in sorted(Counter(finals).items())},
            "final": summary(finals),
            "fallback_share": share(sum(bool(s.get("fallback")) for s in searches), len(searches)),
        }
    return out


# ---------------------------------------------------------------- diagnoses
NONE_LIKE = re.compile(r"^(none|nil|n ?a|no|nothing|not (mentioned|applicable|specified|prescribed|provided|given|"
                       r"available|recommended|needed|required)|none (mentioned|specified|prescribed|recommended|"
                       r"needed|required)|no (medication|medicine|medications|medicines|drug|drugs)( \w+)?)$")


def normalise_illness(text: str, width: int = 60) -> str:
    """The first non-blank line, without markdown, parentheses (abbreviations such as "(MDD)") and
    punctuation, lowercase, spaces collapsed, cut at `width` characters."""
    line = next((ln for ln in str(text).splitlines() if ln.strip()), "")
    line = re.sub(r"\([^)]*\)", " ", line.lower())
    line = re.sub(r"[^\w\s'-]|_", " ", line).replace("'", "")
    return " ".join(line.split())[:width].strip()


def normalise_free(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]|_", " ", str(text).lower()).split())


def medicine_kind(medicine: str) -> str:
    """"empty" (blank), "none" (None, N/A, Not mentioned, ...) or "named"."""
    if not str(medicine).strip():
        return "empty"
    return "none" if NONE_LIKE.match(normalise_free(medicine)) else "named"


def diagnoses(records: list[dict], top: int = 10) -> dict:
    rows = [r for r in records if isinstance(r.get("illness"), str)]
    names = Counter(normalise_illness(r["illness"]) for r in rows)
    meds = [r["medicine"] for r in records if isinstance(r.get("medicine"), str)]
    kinds = Counter(medicine_kind(m) for m in meds)
    return {"records": len(rows), "distinct": len(names),
            "top": [[name, n] for name, n in sorted(names.items(), key=lambda kv: (-kv[1], kv[0]))[:top]],
            "medicines": len(meds), "medicine_empty_share": share(kinds["empty"], len(meds)),
            "medicine_none_share": share(kinds["none"], len(meds)),
            "medication_pair_dropped_share": share(sum(not medicine_usable(m) for m in meds), len(meds))}


# ---------------------------------------------------------------- cost
def cost(records: list[dict]) -> dict:
    """Per session: model calls, prompt and completion tokens (the transcript's sums), wall time,
    truncated replies. Each is summarised over the records that have it."""
    have = [r for r in records if any(k in r for k in SECTION_NEEDS["cost"][0])]

    def tokens(r, key):
        return sum(e.get(key) or 0 for e in r["transcript"])

    return {"sessions": len(have),
            "calls": summary([r.get("calls", len(r.get("transcript") or [])) for r in have
                              if "calls" in r or "transcript" in r]),
            "prompt_tokens": summary([tokens(r, "prompt_tokens") for r in have if isinstance(r.get("transcript"), list)]),
            "completion_tokens": summary([tokens(r, "completion_tokens") for r in have
                                          if isinstance(r.get("transcript"), list)]),
            "elapsed_s": summary([r["elapsed_s"] for r in have if isinstance(r.get("elapsed_s"), (int, float))]),
            "truncated_calls": summary([r["truncated_calls"] for r in have if isinstance(r.get("truncated_calls"), int)])}


# ---------------------------------------------------------------- validity and diversity
def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def distinct_n(texts: list[str], n: int) -> float | None:
    """Distinct n-grams over all n-grams (Li et al., 2016), n-grams taken within each text, words
    lowercased (\\w+)."""
    grams = [tuple(w[i:i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return share(len(set(grams)), len(grams))


def sft_answers(record: dict) -> list[str]:
    """The answers of a record's fine-tuning pairs (mentalarena.training.sft: the medication pair only when
    the medicine passes the reference's rule); [] for a record without the six fields."""
    try:
        return [p.answer for p in record_pairs(record)]
    except InputError:
        return []


def cosine_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cosine similarity of every row of `a` with every row of `b` (rows need not be unit)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.clip(1.0 - a @ b.T, 0.0, 2.0)


def mean_pairwise_distance(x: np.ndarray) -> float | None:
    """Mean cosine distance over all unordered pairs of distinct rows; None under two rows."""
    n = len(x)
    if n < 2:
        return None
    d = cosine_distances(x, x)
    return float(d[np.triu_indices(n, 1)].mean())


def nearest_distances(x: np.ndarray, y: np.ndarray, same: bool = False) -> np.ndarray:
    """For each row of `y`, the cosine distance to its nearest row of `x` (itself excluded when
    `same`: x and y are the same set)."""
    d = cosine_distances(y, x)
    if same:
        np.fill_diagonal(d, np.inf)
    return d.min(axis=1)


def coverage_radius(sets: list[np.ndarray]) -> float | None:
    """The radius the coverage uses: the median, over all records of all files pooled, of the
    distance to the record's nearest other record (a typical gap between close records)."""
    pooled = np.concatenate([s for s in sets if len(s)]) if any(len(s) for s in sets) else np.zeros((0, 1))
    if len(pooled) < 2:
        return None
    return float(np.median(nearest_distances(pooled, pooled, same=True)))


def coverage(x: np.ndarray, y: np.ndarray, radius: float) -> dict:
    """How well the records `x` cover the records `y`: the share of `y` whose nearest record of `x`
    lies within `radius`, and the mean distance from a record of `y` to its nearest record of `x`."""
    if not len(x) or not len(y):
        return {"share": None, "mean_nearest": None}
    near = nearest_distances(x, y)
    return {"share": float((near <= radius).mean()), "mean_nearest": float(near.mean())}


def embedding_texts(record: dict) -> tuple[str, str] | None:
    """(answers only, answers + symptom) of a six-field record. The answers come first: an encoder
    that truncates long inputs (512 tokens) cuts the symptom profile, not what the model generated."""
    answers = sft_answers(record)
    if not answers:
        return None
    joined = "\n".join(answers)
    return joined, joined + "\n" + record["symptom"]


def diversity(embeddings: dict[str, dict[str, np.ndarray]]) -> dict:
    """Per text kind ("answers", "record"): each file's mean pairwise distance, the coverage radius
    over all files, and the coverage of every file by every other file (`coverage[a][b]`: how much
    of b lies near a)."""
    out = {}
    for kind in ("answers", "record"):
        sets = {label: e[kind] for label, e in embeddings.items()}
        radius = coverage_radius(list(sets.values()))
        out[kind] = {"mean_pairwise_distance": {label: mean_pairwise_distance(x) for label, x in sets.items()},
                     "radius": radius,
                     "coverage": {a: {b: coverage(sets[a], sets[b], radius) for b in sets if b != a}
                                  for a in sets} if radius is not None else {}}
    return out
