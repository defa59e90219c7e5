"""`arena_med.py report`: what self-play produced, file against file, in a markdown report and figures.

Three layers, so that every number can be checked on hand-made records:
- statistics (pure functions of records or of vectors: `decoder_rounds`, `search_curves`, ...);
- the figures (`mentalarena.report_figures`, matplotlib without a display);
- reading the files and writing `report.md`, `report.json` and the PNGs (`write_report`).

A record of this project's `arena_med.py` carries the whole session; a record of the reference code
(or of an older version) has six fields only (symptom, illness, treatment, explain_t, medicine,
explain_m). Each section uses the records that have its fields; a file without any gets a line in
the report saying which section was skipped and why.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import InputError
from .files import write_atomic, write_json_atomic
from .inputs import decode_text, json_lines, read_bytes
from .sft import RECORD_FIELDS, check_record, medicine_usable, record_pairs

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
    """The answers of a record's fine-tuning pairs (mentalarena.sft: the medication pair only when
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


# ---------------------------------------------------------------- reading
def load_records(path: str | Path, max_records: int | None = None) -> tuple[list[dict], list[str]]:
    """The records of one JSONL file (the first `max_records`), and notes for the report. A missing,
    unreadable, non-JSONL or empty file, or a line that is not a record, is one line naming it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    notes = []
    raw = read_bytes(path)  # a folder, an unreadable or a non-UTF-8 file: one line (mentalarena/inputs.py)
    if _torn_tail(raw):
        notes.append("an incomplete last line (a run still writing, or killed) was left out")
        raw = raw[:raw.rfind(b"\n") + 1]
    numbered = json_lines(path, decode_text(path, raw))
    if not numbered:
        raise InputError(f"{path}: no records (empty file)")
    known = set(RECORD_FIELDS) | {"decoder", *SEARCH_KINDS, "transcript"}
    rows = [row for _, row in numbered]
    for number, row in numbered:
        if not isinstance(row, dict):
            raise InputError(f"{path}: line {number}: a JSON {type(row).__name__}, not a record")
        if not known & set(row):
            raise InputError(f"{path}: line {number}: not a self-play record (none of the fields "
                             f"{', '.join(sorted(known))})")
    if max_records is not None and len(rows) > max_records:
        notes.append(f"the first {max_records} of {len(rows)} records")
        rows = rows[:max_records]
    return rows, notes


def _torn_tail(raw: bytes) -> bool:
    """A last line without its newline that is not whole JSON: a run still writing, or killed. One
    that parses is a record written by hand or by another tool, and is read."""
    tail = raw[raw.rfind(b"\n") + 1:]
    try:
        json.loads(tail)
    except ValueError:  # not JSON, or cut inside a UTF-8 character
        return bool(tail.strip())
    return False


def has_section(records: list[dict], section: str) -> int:
    """How many records carry what the section needs."""
    fields, _ = SECTION_NEEDS[section]
    if section == "validity":
        return sum(_valid(r) for r in records)
    if section == "diagnoses":
        return sum(isinstance(r.get("illness"), str) or isinstance(r.get("medicine"), str) for r in records)
    return sum(any(r.get(f) for f in fields) or any(f in r for f in fields) for r in records)


def _valid(record: dict) -> bool:
    try:
        check_record(record)
    except InputError:
        return False
    return True


def labels_for(paths: list[str], labels: list[str]) -> list[str]:
    if labels and len(labels) != len(paths):
        raise InputError(f"--labels names {len(labels)} files, --input_file {len(paths)}")
    out = labels or [Path(p).stem for p in paths]
    seen: Counter = Counter()
    unique = []
    for label in out:
        seen[label] += 1
        unique.append(label if seen[label] == 1 else f"{label}_{seen[label]}")
    return unique


# ---------------------------------------------------------------- the report
def build(files: dict[str, list[dict]], encoder=None, perplexity=None) -> dict:
    """Every statistic of the report, per file. `encoder` (with `encode(texts)`) gives the embedding
    diversity, `perplexity` (answers -> one value each) the answers' perplexity; None skips them."""
    stats: dict = {"files": {}, "skipped": {}}
    for label, records in files.items():
        per = {"records": len(records)}
        skipped = []
        for section, (_, why) in SECTION_NEEDS.items():
            n = has_section(records, section)
            per[f"{section}_records"] = n
            if not n:
                skipped.append(f"{section}: {why}")
        per["decoder"] = decoder_rounds(records)
        per["try_and_reflect"] = search_curves(records)
        per["diagnoses"] = diagnoses(records)
        per["cost"] = cost(records)
        answers = [a for r in records for a in sft_answers(r)]
        per["validity"] = {"answers": len(answers), "distinct_1": distinct_n(answers, 1),
                           "distinct_2": distinct_n(answers, 2)}
        if perplexity is not None and answers:
            values = perplexity(records)
            per["validity"]["perplexity"] = summary([v for v in values if math.isfinite(v)])
            per["validity"]["perplexity_unscored"] = sum(not math.isfinite(v) for v in values)  # answer cut off
        stats["files"][label] = per
        stats["skipped"][label] = skipped
    # distinct-n falls as a corpus grows; on the first `same` answers of every file it compares like with like
    answers = {label: [a for r in records for a in sft_answers(r)] for label, records in files.items()}
    same = min((len(a) for a in answers.values() if a), default=0)
    for label, texts in answers.items():
        v = stats["files"][label]["validity"]
        v.update(same_size=same, distinct_1_same_size=distinct_n(texts[:same], 1) if texts else None,
                 distinct_2_same_size=distinct_n(texts[:same], 2) if texts else None)
    if encoder is not None:
        embeddings = {}
        for label, records in files.items():
            texts = [t for t in map(embedding_texts, records) if t is not None]
            dim = None
            vectors = {}
            for i, kind in enumerate(("answers", "record")):
                vectors[kind] = encoder.encode([t[i] for t in texts]) if texts else None
                dim = dim or (vectors[kind].shape[1] if vectors[kind] is not None else None)
            embeddings[label] = {k: (v if v is not None else np.zeros((0, dim or 1))) for k, v in vectors.items()}
        stats["diversity"] = diversity(embeddings)
    return stats


def write_report(input_file, output_dir: str | Path, labels=None, perplexity_model: str | None = "embedded",
                 max_records: int | None = None, encoder_model: str | None = None, figures: bool = True) -> dict:
    """Read the files, compute, write `report.md`, `report.json` and the figures; returns the stats."""
    from .cli import names
    from .report_figures import draw_all

    started = time.time()
    paths = names(input_file)
    if not paths:
        raise InputError("--input_file: name one or more JSONL files of self-play records (a comma list)")
    if max_records is not None and (not isinstance(max_records, int) or max_records < 1):
        raise InputError(f"--max_records must be a positive integer, not {max_records!r}")
    perplexity_model = None if perplexity_model in (None, "none", "") else str(perplexity_model)
    labels = labels_for(paths, names(labels))
    files, notes = {}, {}
    for label, path in zip(labels, paths):
        files[label], notes[label] = load_records(path, max_records)
    encoder = None
    if encoder_model != "none":
        from .similarity import Encoder
        encoder = Encoder(encoder_model)
    scorer = perplexity_scorer(perplexity_model) if perplexity_model else None
    stats = build(files, encoder, scorer)
    stats.update(inputs={label: str(p) for label, p in zip(labels, paths)}, notes=notes,
                 encoder=getattr(encoder, "name", None), perplexity_model=perplexity_model)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats["figures"] = [p.name for p in draw_all(stats, out)] if figures else []
    stats["seconds"] = round(time.time() - started, 1)
    write_json_atomic(out / "report.json", stats)
    write_atomic(out / "report.md", render(stats))
    print(f"[report] {out / 'report.md'}: {len(files)} files, {len(stats['figures'])} figures, "
          f"{stats['seconds']} s", flush=True)
    return stats


def perplexity_scorer(model: str, max_len: int = 1024, batch_size: int = 8):
    """records -> the perplexity of each of their SFT answers under `model` ("embedded": the
    embedded SmolLM2), each pair in the reference's text form as fine-tuning sees it
    (`mentalarena.quality.answer_perplexities`: the answer's tokens given the system and question)."""
    from . import quality
    from .sft import to_text

    scorer, tokenizer = quality.load_scorer(None if model == "embedded" else model)

    def score(records: list[dict]) -> list[float]:
        rows = [to_text(p) for r in records if _valid(r) for p in record_pairs(r)]
        return list(quality.answer_perplexities(scorer, tokenizer, rows, fmt="original", max_len=max_len,
                                                batch_size=batch_size))

    return score


# ---------------------------------------------------------------- markdown
def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows] + [""]


def _spread(s: dict) -> str:
    return "–" if not s.get("n") else f"{fmt(s['mean'])} ± {fmt(s['std'])} [{fmt(s['p10'])}, {fmt(s['p90'])}]"


def render(stats: dict) -> str:
    """The markdown report: one column per file in every table, figures linked under their section."""
    files = stats["files"]
    labels = list(files)
    figs = set(stats.get("figures", []))
    lines = ["# Self-play records: report", "",
             "Made by `python arena_med.py report`. Files (label: path, records used):", ""]
    for label in labels:
        note = "; ".join(stats.get("notes", {}).get(label, []))
        lines.append(f"- **{label}**: `{stats['inputs'][label]}`, {files[label]['records']} records" + (f" ({note})" if note else ""))
    lines.append("")
    skipped = [(label, s) for label, s in stats["skipped"].items() if s]
    if skipped:
        lines += ["Sections skipped for a file lack the fields they need (" + SIX_FIELDS_NOTE + ", for instance):", ""]
        lines += [f"- {label}: " + "; ".join(s) for label, s in skipped] + [""]

    def figure(name: str, caption: str) -> None:
        if name in figs:
            lines.extend([f"![{caption}]({name})", ""])

    def section(title: str, key: str) -> list[str]:
        have = [label for label in labels if files[label][f"{key}_records"]]
        lines.extend([f"## {title}", ""])
        if not have:
            lines.extend(["No file has the fields this section needs.", ""])
        return have

    have = section("Symptom Decoder", "decoder")
    if have:
        depth = max(len(files[label]["decoder"]["rounds"]) for label in have)
        thresholds = ", ".join(f"{label} {files[label]['decoder']['thresholds']}" for label in have)
        lines += ["Similarity of each decoded item to the encoded one: mean ± std [p10, p90] over the sessions "
                  "that reached the round (a session whose items all pass stops, so later rounds hold the "
                  "harder sessions only). Pass: similarity at or above the record's threshold "
                  f"(thresholds: {thresholds}).", ""]
        rows = []
        for n in range(depth):
            items = list(dict.fromkeys(k for label in have for r in files[label]["decoder"]["rounds"][n:n + 1]
                                       for k in r["similarity"]))
            for label_row in ["sessions", "pass share (all items)", "all items pass"] + items:
                row = [str(n), label_row]
                for label in have:
                    rounds = files[label]["decoder"]["rounds"]
                    r = rounds[n] if n < len(rounds) else None
                    if r is None:
                        row.append("–")
                    elif label_row == "sessions":
                        row.append(str(r["sessions"]))
                    elif label_row == "pass share (all items)":
                        row.append(pct(r["pass_share"]))
                    elif label_row == "all items pass":
                        row.append(str(r["all_passed"]))
                    else:
                        row.append(_spread(r["similarity"].get(label_row, {})) + f", pass {pct(r['item_pass_share'].get(label_row))}")
                rows.append(row)
        lines += table(["round", "item"] + have, rows)
        hist = sorted({int(k) for label in have for k in files[label]["decoder"]["feedback_rounds"]})
        lines += ["Feedback rounds per session (sessions):", ""]
        lines += table(["feedback rounds"] + have,
                       [[str(k)] + [str(files[label]["decoder"]["feedback_rounds"].get(str(k), 0)) for label in have] for k in hist]
                       + [["mean"] + [fmt(files[label]["decoder"]["mean_feedback_rounds"]) for label in have]])
        lines += ["Effect of feedback: for the items below the threshold in round 0 of a session that had feedback, "
                  "the similarity in the session's last round minus round 0:", ""]
        lines += table(["", *have], [
            ["items", *[str(files[label]["decoder"]["feedback_effect"]["n"]) for label in have]],
            ["mean change ± std [p10, p90]", *[_spread(files[label]["decoder"]["feedback_effect"]) for label in have]],
            ["share improved", *[pct(files[label]["decoder"]["feedback_effect"]["improved_share"]) for label in have]]])
        figure("decoder_similarity.png", "decoder similarity by round")
        figure("decoder_rounds.png", "decoder pass share and feedback rounds")

    have = section("Try and reflect", "try_and_reflect")
    if have:
        lines += ["Health scores (0-10) the judge gave the patient's imagined state after each candidate. "
                  "Best so far: the mean over searches of the best score after try t; a search that stopped "
                  "(target reached, or tries spent) keeps its best. Fallback: no try scored above 0, the "
                  "first candidate was kept. By default (--score_parser robust) the score is the reply's 1-10 "
                  "rating and a reply off the scale scores 0; the reference's first integer (--score_parser "
                  "reference, and records made before that flag) turns replies such as \"121\" into scores "
                  "off the scale: they are capped at 10 here, the weight the session gave them (they end the "
                  "search), and counted.", ""]
        rows = []
        for kind in ("treatment", "medicine"):
            searches = {label: files[label]["try_and_reflect"].get(kind) for label in have}
            depth = max((len(s["best_so_far"]) for s in searches.values() if s), default=0)
            rows.append([kind, "searches", *[str(s["searches"]) if s else "–" for s in searches.values()]])
            rows.append([kind, "tries per search", *[_spread(s["tries"]) if s else "–" for s in searches.values()]])
            for t in range(depth):
                rows.append([kind, f"best after try {t + 1} (still running)", *[
                    f"{fmt(s['best_so_far'][t], 2)} ({pct(s['running'][t])})" if s and t < len(s["best_so_far"]) else "–"
                    for s in searches.values()]])
            rows.append([kind, "final score", *[_spread(s["final"]) if s else "–" for s in searches.values()]])
            rows.append([kind, "final score counts", *[", ".join(f"{k}: {v}" for k, v in s["final_scores"].items()) if s else "–"
                                                       for s in searches.values()]])
            rows.append([kind, "fallback share", *[pct(s["fallback_share"]) if s else "–" for s in searches.values()]])
            rows.append([kind, "scores off the 0-10 scale (capped)", *[
                f"{s['off_scale']} of {s['scores']}" + (f" (e.g. {', '.join(map(str, s['off_scale_examples']))})"
                                                        if s["off_scale"] else "") if s else "–" for s in searches.values()]])
        lines += table(["search", "", *have], rows)
        figure("try_and_reflect.png", "try and reflect")

    have = section("Diagnoses", "diagnoses")
    if have:
        lines += ["Illness names normalised: first non-blank line, lowercase, parentheses and punctuation "
                  "removed, cut at 60 characters. Medicine: empty; None-like (None, N/A, Not mentioned, ...); "
                  "pair dropped: the reference's rule (mentalarena.sft) leaves out the medication pair.", ""]
        d = {label: files[label]["diagnoses"] for label in have}
        lines += table(["", *have], [
            ["records", *[str(v["records"]) for v in d.values()]],
            ["distinct illnesses", *[str(v["distinct"]) for v in d.values()]],
            ["medicine empty", *[pct(v["medicine_empty_share"]) for v in d.values()]],
            ["medicine None-like", *[pct(v["medicine_none_share"]) for v in d.values()]],
            ["medication pair dropped", *[pct(v["medication_pair_dropped_share"]) for v in d.values()]]])
        depth = max(len(v["top"]) for v in d.values())
        lines += table(["rank", *have], [[str(i + 1), *[f"{v['top'][i][0] or '(empty)'} ({v['top'][i][1]})"
                                                       if i < len(v["top"]) else "" for v in d.values()]]
                                         for i in range(depth)])
        figure("diagnoses.png", "diagnoses")

    have = section("Cost", "cost")
    if have:
        lines += ["Per session: mean ± std [p10, p90], and the total over the file's sessions. Tokens are the "
                  "sums over the session's transcript; wall time is the session's own (`elapsed_s`: sessions "
                  "run concurrently, so they overlap).", ""]
        rows = []
        for key, name in (("calls", "model calls"), ("prompt_tokens", "prompt tokens"),
                          ("completion_tokens", "completion tokens"), ("elapsed_s", "wall time (s)"),
                          ("truncated_calls", "truncated replies")):
            rows.append([name, *[_spread(files[label]["cost"][key]) + f"; total {fmt(files[label]['cost'][key].get('total'), 1)}"
                                 if files[label]["cost"][key].get("n") else "–" for label in have]])
        lines += table(["", *have], rows)
        figure("cost.png", "cost")

    have = section("Validity and diversity", "validity")
    if have:
        lines += ["Over the answers of the fine-tuning pairs each record gives (`mentalarena.sft`: diagnosis, "
                  "treatment and, when the medicine passes the reference's rule, medication). distinct-n: "
                  "distinct word n-grams over all n-grams (n-grams within an answer); it falls as a corpus grows, "
                  "so it is also given on the same number of answers from each file.", ""]
        v = {label: files[label]["validity"] for label in have}
        rows = [["SFT answers", *[str(x["answers"]) for x in v.values()]],
                ["distinct-1", *[fmt(x["distinct_1"]) for x in v.values()]],
                ["distinct-2", *[fmt(x["distinct_2"]) for x in v.values()]],
                *[[f"{name} on the first {x0['same_size']} answers (the smallest file's count)",
                   *[fmt(x[key]) for x in v.values()]]
                  for x0 in list(v.values())[:1] for name, key in (("distinct-1", "distinct_1_same_size"),
                                                                    ("distinct-2", "distinct_2_same_size"))]]
        if any("perplexity" in x for x in v.values()):
            rows.append([f"perplexity under {stats.get('perplexity_model')}: mean ± std [p10, p90]",
                         *[_spread(x.get("perplexity", {})) for x in v.values()]])
            rows.append(["perplexity: median", *[fmt(x.get("perplexity", {}).get("median")) for x in v.values()]])
        lines += table(["", *have], rows)
        if not stats.get("perplexity_model"):
            lines += ["Perplexity was not computed (`--perplexity_model none`).", ""]
        div = stats.get("diversity")
        if div:
            lines += [f"Embedding diversity with the sentence encoder {stats.get('encoder')}: each record is one text, "
                      "its answers alone or its answers followed by its symptom profile (answers first, so a "
                      "512-token cut removes the profile's end, not the answers). Mean pairwise distance: mean "
                      "cosine distance over all pairs of a file's records. Coverage of B by A: the share of B's "
                      "records whose nearest record of A lies within radius r, r being the median distance from "
                      "a record to its nearest other record in all files pooled (a typical gap between close "
                      "records); with it the mean distance from a record of B to its nearest record of A. A file with "
                      "more records covers more by its size alone.", ""]
            rows = []
            for kind, name in (("answers", "answers"), ("record", "answers + symptom")):
                rows.append([f"{name}: mean pairwise distance", *[fmt(div[kind]["mean_pairwise_distance"].get(label))
                                                                   for label in have]])
            lines += table(["", *have], rows)
            for kind, name in (("answers", "answers"), ("record", "answers + symptom")):
                cov = div[kind]["coverage"]
                if not cov:
                    continue
                lines += [f"Coverage, {name} (r = {fmt(div[kind]['radius'])}); row A covers column B: share within r "
                          "/ mean nearest distance:", ""]
                def cell(c: dict) -> str:
                    return f"{pct(c['share'])} / {fmt(c['mean_nearest'])}"
                lines += table(["A \\ B", *have], [[a, *["·" if a == b else cell(cov[a][b]) for b in have]]
                                                     for a in have if a in cov])
        figure("validity.png", "validity and diversity")
    lines += [f"Made in {stats.get('seconds', '?')} s.", ""]
    return "\n".join(lines)
