"""`arena_med.py report`: what self-play produced, file against file, in a markdown report and figures.

Three layers, so that every number can be checked on hand-made records:
- statistics (`mentalarena.reports.report_stats`: pure functions of records or of vectors, re-exported here);
- the figures (`mentalarena.reports.report_figures`, matplotlib without a display);
- reading the files and writing `report.md`, `report.json` and the PNGs (`write_report`).

A record of this project's `arena_med.py` carries the whole session; a record of the reference code
(or of an older version) has six fields only (symptom, illness, treatment, explain_t, medicine,
explain_m). Each section uses the records that have its fields; a file without any gets a line in
the report saying which section was skipped and why.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np

from mentalarena.errors import InputError
from mentalarena.store.files import write_atomic, write_json_atomic
from mentalarena.reports.tables import markdown_table
from mentalarena.store.inputs import decode_text, json_lines, read_bytes
from mentalarena.reports.report_stats import (NONE_LIKE, SCORE_SCALE, SEARCH_KINDS, SECTION_NEEDS, SIX_FIELDS_NOTE,  # noqa: F401
                           best_so_far, cosine_distances, cost, coverage, coverage_radius, decoder_rounds,
                           diagnoses, distinct_n, diversity, embedding_texts, feedback_effect, feedback_rounds,
                           mean_pairwise_distance, medicine_kind, nearest_distances, normalise_free,
                           normalise_illness, on_scale, passes, record_threshold, search_curves, sft_answers, share,
                           summary, words)
from mentalarena.training.sft import RECORD_FIELDS, check_record, record_pairs


# ---------------------------------------------------------------- reading
def load_records(path: str | Path, max_records: int | None = None) -> tuple[list[dict], list[str]]:
    """The records of one JSONL file (the first `max_records`), and notes for the report. A missing,
    unreadable, non-JSONL or empty file, or a line that is not a record, is one line naming it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    notes = []
    raw = read_bytes(path)  # a folder, an unreadable or a non-UTF-8 file: one line (mentalarena/store/inputs.py)
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
    from mentalarena.cli import names
    from mentalarena.reports.report_figures import draw_all

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
        from mentalarena.selfplay.similarity import Encoder
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
    (`mentalarena.training.quality.answer_perplexities`: the answer's tokens given the system and question)."""
    from mentalarena.training import quality
    from mentalarena.training.sft import to_text

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
    """A report section's table and the blank line after it."""
    return [*markdown_table(header, rows), ""]


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
                  "pair dropped: the reference's rule (mentalarena.training.sft) leaves out the medication pair.", ""]
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
        lines += ["Over the answers of the fine-tuning pairs each record gives (`mentalarena.training.sft`: diagnosis, "
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
