"""`arena_med.py report`: statistics on hand-made records with known values, figures written without a
display, the reference's six-field records, bad input, and the command end to end."""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data

import arena_med
from mentalarena.reports import report
from mentalarena.errors import InputError
from mentalarena.reports.report_figures import draw_all

SIX = {"symptom": "Patient History: a profile.", "treatment": "CBT", "explain_t": "It helps.", "explain_m": "It works."}


def record(sims: list[dict], tries_t: list[int], tries_m: list[int], illness: str, medicine: str,
           tokens: list[tuple[int, int]], elapsed: float, truncated: int = 0, threshold: float = 0.5) -> dict:
    def search(scores):
        best = max([0] + scores)
        return {"best": "x", "best_score": best, "fallback": best == 0,
                "tries": [{"candidate": "x", "score": s} for s in scores]}

    decoder = [{"round": n, "similarities": s, "below_threshold": [k for k, v in s.items() if v < threshold],
                "feedback": "more" if n < len(sims) - 1 else ""} for n, s in enumerate(sims)]
    return {**SIX, "illness": illness, "medicine": medicine, "decoder": decoder, "feedback_rounds": len(sims) - 1,
            "treatment_search": search(tries_t), "medicine_search": search(tries_m),
            "transcript": [{"step": "s", "prompt_tokens": p, "completion_tokens": c} for p, c in tokens],
            "calls": len(tokens), "truncated_calls": truncated, "elapsed_s": elapsed,
            "settings": {"similarity_threshold": threshold}}


@pytest.fixture
def records():
    return [
        record([{"a": 0.2, "b": 0.6}, {"a": 0.4, "b": 0.8}], [3, 7, 5], [0, 0], "Major Depressive Disorder (MDD).\nMore",
               "N/A", [(100, 10), (200, 20)], 10.0, truncated=1),
        record([{"a": 0.6, "b": 0.7}], [9], [121], "  major   depressive disorder", "", [(300, 30)], 20.0),
        record([{"a": 0.1, "b": 0.1}, {"a": 0.1, "b": 0.3}], [10], [4, 6], "Anxiety!", "Sertraline (Zoloft)",
               [(50, 5), (50, 5), (50, 5)], 30.0),
    ]


# ---------------------------------------------------------------- statistics, exact
def test_decoder_rounds_exact(records):
    d = report.decoder_rounds(records)
    assert d["sessions"] == 3 and d["items"] == ["a", "b"] and d["thresholds"] == [0.5]
    r0, r1 = d["rounds"]
    assert r0["sessions"] == 3 and r1["sessions"] == 2  # the session that passed everything stopped
    assert r0["similarity"]["a"]["mean"] == pytest.approx(0.3, abs=1e-12)
    assert r0["similarity"]["a"]["std"] == pytest.approx(math.sqrt(((0.1) ** 2 + 0.3 ** 2 + 0.2 ** 2) / 3), abs=1e-12)
    assert r0["similarity"]["b"]["mean"] == pytest.approx(1.4 / 3, abs=1e-12)
    assert r1["similarity"]["a"]["mean"] == pytest.approx(0.25, abs=1e-12)
    assert r1["similarity"]["b"]["p10"] == pytest.approx(0.35, abs=1e-12)  # linear between 0.3 and 0.8
    # round 0: a passes once (0.6), b twice (0.6, 0.7) of 6 checks; round 1: b once (0.8) of 4
    assert r0["pass_share"] == pytest.approx(3 / 6) and r1["pass_share"] == pytest.approx(1 / 4)
    assert r0["item_pass_share"] == {"a": pytest.approx(1 / 3), "b": pytest.approx(2 / 3)}
    assert r0["all_passed"] == 1 and r1["all_passed"] == 0
    assert d["feedback_rounds"] == {"0": 1, "1": 2} and d["mean_feedback_rounds"] == pytest.approx(2 / 3)
    # items below 0.5 in round 0 of the sessions with feedback: a 0.2->0.4, a 0.1->0.1, b 0.1->0.3
    e = d["feedback_effect"]
    assert e["n"] == 3 and e["mean"] == pytest.approx(0.4 / 3, abs=1e-12) and e["improved_share"] == pytest.approx(2 / 3)


def test_threshold_from_settings_else_below_list(records):
    r = records[0]
    assert report.passes(r, r["decoder"][0], "b") is True
    r["settings"]["similarity_threshold"] = 0.65  # the record's own threshold decides
    assert report.passes(r, r["decoder"][0], "b") is False
    del r["settings"]  # no threshold on file: the round's below_threshold list decides
    assert report.passes(r, r["decoder"][0], "b") is True and report.passes(r, r["decoder"][0], "a") is False


def test_search_curves_exact(records):
    s = report.search_curves(records)
    t, m = s["treatment"], s["medicine"]
    # best so far: [3, 7, 7], [9, 9, 9], [10, 10, 10] (stopped searches keep their best)
    assert t["best_so_far"] == pytest.approx([22 / 3, 26 / 3, 26 / 3])
    assert t["running"] == pytest.approx([1, 1 / 3, 1 / 3])
    assert t["final_scores"] == {"7": 1, "9": 1, "10": 1} and t["fallback_share"] == 0
    assert t["first_try"]["mean"] == pytest.approx(22 / 3)
    # medicine: [0, 0] fell back; 121 is off the scale, capped at 10; [4, 6]
    assert m["best_so_far"] == pytest.approx([14 / 3, 16 / 3])
    assert m["final_scores"] == {"0": 1, "6": 1, "10": 1}
    assert m["fallback_share"] == pytest.approx(1 / 3)
    assert (m["off_scale"], m["scores"], m["off_scale_examples"]) == (1, 5, [121])
    assert report.best_so_far([], 2) == [0.0, 0.0] and report.best_so_far([5, 2], 3) == [5.0, 5.0, 5.0]


def test_diagnoses_and_medicines(records):
    d = report.diagnoses(records)
    assert d["top"] == [["major depressive disorder", 2], ["anxiety", 1]] and d["distinct"] == 2
    assert d["medicine_empty_share"] == pytest.approx(1 / 3) and d["medicine_none_share"] == pytest.approx(1 / 3)
    assert d["medication_pair_dropped_share"] == pytest.approx(2 / 3)
    assert [report.medicine_kind(m) for m in ("None mentioned.", "Not applicable", " ", "no medication needed",
                                              "Nothing", "Nortriptyline", "None")] == \
        ["none", "none", "empty", "none", "none", "named", "none"]
    assert report.normalise_illness("**Generalized Anxiety Disorder (GAD)**:\n\nsecond") == "generalized anxiety disorder"
    assert len(report.normalise_illness("x" * 100)) == 60


def test_cost_exact(records):
    c = report.cost(records)
    assert c["sessions"] == 3
    assert c["calls"]["total"] == 6 and c["calls"]["mean"] == 2
    assert c["prompt_tokens"]["total"] == 750 and c["prompt_tokens"]["median"] == 300
    assert c["completion_tokens"]["total"] == 75
    assert c["elapsed_s"]["mean"] == 20 and c["truncated_calls"]["total"] == 1


def test_distinct_n_exact():
    texts = ["A b a", "b, A"]  # unigrams a b a b a; bigrams (a b) (b a) (b a)
    assert report.distinct_n(texts, 1) == pytest.approx(2 / 5)
    assert report.distinct_n(texts, 2) == pytest.approx(2 / 3)
    assert report.distinct_n(["one"], 2) is None
    answers = report.sft_answers({**SIX, "illness": "Anxiety", "medicine": "N/A"})
    assert answers == ["Anxiety", "CBT. It helps."]  # no medication pair: N/A fails the reference's rule


def test_distinct_n_on_the_same_number_of_answers():
    one = {**SIX, "illness": "a b", "medicine": "N/A"}  # answers "a b", "CBT. It helps."
    two = {**SIX, "illness": "c d", "medicine": "N/A"}
    v = {k: p["validity"] for k, p in report.build({"small": [one], "large": [one, two]})["files"].items()}
    assert v["small"]["distinct_1"] == 1.0 and v["large"]["distinct_1"] == pytest.approx(7 / 10)
    assert v["large"]["same_size"] == 2 and v["large"]["distinct_1_same_size"] == 1.0 == v["small"]["distinct_1_same_size"]


def test_embedding_diversity_exact():
    x = np.array([[1.0, 0.0], [0.0, 2.0]])  # rows need not be unit
    assert report.mean_pairwise_distance(x) == pytest.approx(1.0)
    assert report.mean_pairwise_distance(x[:1]) is None
    cov = report.coverage(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]), radius=0.5)
    assert cov == {"share": pytest.approx(0.5), "mean_nearest": pytest.approx(0.5)}
    # nearest other record in the pool: 0.4 (to b), 0.2 (to c), 0.2 (to b) -> median 0.2
    a, b, c = [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]
    assert report.coverage_radius([np.array([a, b]), np.array([c])]) == pytest.approx(0.2)
    d = report.diversity({"x": {"answers": np.array([a, b]), "record": np.array([a, b])},
                          "y": {"answers": np.array([c]), "record": np.array([c])}})
    assert d["answers"]["mean_pairwise_distance"] == {"x": pytest.approx(0.4), "y": None}
    assert d["answers"]["coverage"]["x"]["y"] == {"share": pytest.approx(1.0), "mean_nearest": pytest.approx(0.2)}
    assert d["answers"]["coverage"]["y"]["x"] == {"share": pytest.approx(0.5), "mean_nearest": pytest.approx(0.6)}


class HashEncoder:
    """Stand-in for the sentence encoder: a fixed unit vector per text."""
    name = "hash"

    def encode(self, texts):
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest(), dtype=np.uint8)[:8].astype(float) + 1 for t in texts]
        return np.array([r / np.linalg.norm(r) for r in rows]).reshape(len(texts), 8)


# ---------------------------------------------------------------- figures against tables
def figure_data(monkeypatch) -> dict[str, list]:
    """What each figure of `arena_med.py report` draws, read off its axes just before it is saved
    (file name -> one entry per axes): the title, the x tick labels, the y tick labels, the
    labelled lines as {label: (xs, ys)}, and the bar groups as {label: [(height, (p10, p90) or None)]}
    (a horizontal bar's width is its value)."""
    from mentalarena.reports import report_figures

    drawn: dict[str, list] = {}
    real_save = report_figures.save

    def spy(fig, path):
        drawn[Path(path).name] = [_axes_data(ax) for ax in fig.axes]
        return real_save(fig, path)

    monkeypatch.setattr(report_figures, "save", spy)
    return drawn


def _axes_data(ax) -> dict:
    from matplotlib.container import BarContainer

    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for line in ax.get_lines() if not line.get_label().startswith("_")}
    bars: dict[str, list] = {}
    for k, group in enumerate(c for c in ax.containers if isinstance(c, BarContainer)):
        label = group.get_label()
        label = f"_bar{k}" if label.startswith("_") else label  # unlabelled bars (one per file): by order
        spreads = [None] * len(group.patches)
        if group.errorbar is not None:  # the error bar's vertical segment: (low, high)
            segments = group.errorbar.lines[2][0].get_segments()
            spreads = [(float(seg[0][1]), float(seg[1][1])) for seg in segments]
        bars[label] = [(float(r.get_width() if group.orientation == "horizontal" else r.get_height()), spread)
                       for r, spread in zip(group.patches, spreads)]
    return {"title": ax.get_title(), "xticks": [t.get_text() for t in ax.get_xticklabels()],
            "yticks": [t.get_text() for t in ax.get_yticklabels()], "lines": lines, "bars": bars}


def markdown_tables(md: str) -> list[tuple[list[str], list[list[str]]]]:
    """The report's tables: (header cells, rows of cells), in order."""
    tables, block = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            tables.append((block[0], block[2:]))
            block = []
    return tables


class Tables:
    """A cell of the report's tables, found by the table's first header cell, the row's leading
    cells and the file's column; its numbers read as floats."""

    def __init__(self, md: str):
        self.tables = markdown_tables(md)

    def cell(self, first: str, label: str, *row: str) -> str:
        found = [r[header.index(label)] for header, rows in self.tables if header[0] == first and label in header
                 for r in rows if r[:len(row)] == list(row)]
        assert len(found) == 1, (first, label, row, found)
        return found[0]

    def numbers(self, first: str, label: str, *row: str) -> list[float]:
        return [float(x.replace(",", "")) for x in re.findall(r"-?[\d,]*\.?\d+", self.cell(first, label, *row))]


def close(figure_value: float, shown: float, digits: int) -> bool:
    """A figure's value equals a table's number printed with `digits` decimals."""
    return abs(figure_value - shown) <= 0.5 * 10 ** -digits + 1e-9


def assert_figures_match_tables(drawn: dict[str, list], md: str, stats: dict) -> None:
    """Every number each figure draws is the one its section's table prints (to the table's precision)."""
    t = Tables(md)
    files = list(stats["files"])
    decoder = [f for f in files if stats["files"][f]["decoder_records"]]
    searched = [f for f in files if stats["files"][f]["try_and_reflect_records"]]
    costed = [f for f in files if stats["files"][f]["cost_records"]]
    checked = 0

    if "decoder_similarity.png" in drawn:
        for ax in drawn["decoder_similarity.png"]:
            item = ax["title"].replace(" ", "_")
            for label in decoder:
                xs, ys = ax["lines"][label]
                for x, y in zip(xs, ys):  # the mean of "mean ± std [p10, p90], pass x%"
                    assert close(y, t.numbers("round", label, str(x), item)[0], 3), (item, label, x, y)
                    checked += 1
    if "decoder_rounds.png" in drawn:
        share, feedback = drawn["decoder_rounds.png"]
        for label in decoder:
            xs, ys = share["lines"][label]
            for x, y in zip(xs, ys):
                assert close(100 * y, t.numbers("round", label, str(x), "pass share (all items)")[0], 1)
                checked += 1
            sessions = t.numbers("round", label, "0", "sessions")[0]
            for rounds, (height, _) in zip(feedback["xticks"], feedback["bars"][label]):
                assert height == pytest.approx(t.numbers("feedback rounds", label, rounds)[0] / sessions)
                checked += 1
    if "try_and_reflect.png" in drawn:
        best, finals, fallback = drawn["try_and_reflect.png"]
        for label in searched:
            for kind in ("treatment", "medicine"):
                xs, ys = best["lines"][f"{label} {kind}"]
                for x, y in zip(xs, ys):  # "7.33 (100.0%)": the best so far, then the share still running
                    assert close(y, t.numbers("search", label, kind, f"best after try {x} (still running)")[0], 2)
                    checked += 1
                counts = dict(pair.split(": ") for pair in t.cell("search", label, kind, "final score counts").split(", "))
                searches = t.numbers("search", label, kind, "searches")[0]
                for score, (height, _) in zip(finals["xticks"], finals["bars"][f"{label} {kind}"]):
                    assert height == pytest.approx(int(counts.get(score, 0)) / searches)
                    checked += 1
            for kind, (height, _) in zip(("treatment", "medicine"), fallback["bars"][label]):
                assert close(100 * height, t.numbers("search", label, kind, "fallback share")[0], 1)
                checked += 1
    if "diagnoses.png" in drawn:
        *tops, medicine = drawn["diagnoses.png"]
        for ax in tops:
            label = ax["title"].split(":")[0]
            records = t.numbers("", label, "records")[0]
            ranks = {t.cell("rank", label, str(r)).rsplit(" (", 1)[0]: int(t.cell("rank", label, str(r)).rsplit("(", 1)[1][:-1])
                     for r in range(1, len(ax["yticks"]) + 1)}
            for name, (width, _) in zip(ax["yticks"], ax["bars"]["_bar0"]):  # from the bottom: the least frequent
                assert width == pytest.approx(ranks[name] / records), (label, name)
                checked += 1
        for label in [f for f in files if stats["files"][f]["diagnoses_records"]]:
            for row, (height, _) in zip(("medicine empty", "medicine None-like", "medication pair dropped"),
                                        medicine["bars"][label]):
                assert close(100 * height, t.numbers("", label, row)[0], 1)
                checked += 1
    if "cost.png" in drawn:
        for ax in drawn["cost.png"]:
            row = ax["title"].removesuffix(" per session")  # "model calls per session": the row "model calls"
            for k, label in enumerate(costed):
                [(mean, (p10, p90))] = ax["bars"][f"_bar{k}"]
                shown_mean, _std, shown_p10, shown_p90, _total = t.numbers("", label, row)
                assert close(mean, shown_mean, 3) and close(p10, shown_p10, 3) and close(p90, shown_p90, 3), row
                checked += 1
    if "validity.png" in drawn:
        distinct, *others = drawn["validity.png"]
        for label in files:
            heights = [h for h, _ in distinct["bars"][label]]
            same = f"on the first {stats['files'][label]['validity']['same_size']} answers (the smallest file's count)"
            shown = [t.numbers("", label, row)[0] for row in ("distinct-1", "distinct-2", f"distinct-1 {same}",
                                                               f"distinct-2 {same}")]
            assert all(close(h, s, 3) for h, s in zip(heights, shown)), (label, heights, shown)
            checked += 1
        for ax in others:
            if ax["title"] == "mean pairwise cosine distance":
                for label in files:
                    for row, (height, _) in zip(("answers: mean pairwise distance", "answers + symptom: mean pairwise distance"),
                                                ax["bars"][label]):
                        assert close(height, t.numbers("", label, row)[0], 3)
                        checked += 1
            elif ax["title"].startswith("answer perplexity"):
                scored = [f for f in files if (stats["files"][f]["validity"].get("perplexity") or {}).get("n")]
                for k, label in enumerate(scored):
                    [(median, (p10, p90))] = ax["bars"][f"_bar{k}"]
                    assert close(median, t.numbers("", label, "perplexity: median")[0], 3)
                    spread = t.numbers("", label, f"perplexity under {stats['perplexity_model']}: mean ± std [p10, p90]")
                    assert close(p10, spread[2], 3) and close(p90, spread[3], 3)
                    checked += 1
    assert checked > 0


# 2 + 2 + 3 answers: record 0's medicine "N/A" and record 1's empty one give no medication answer
PERPLEXITIES = [2.0, 3.0, 4.0, 5.0, 6.0, 10.0, math.nan]  # one per answer; the last one cut off


def test_build_render_and_figures(records, tmp_path, monkeypatch):
    six = [{k: r[k] for k in report.RECORD_FIELDS} for r in records]
    asked = []

    def perplexity(rs):  # one value per SFT answer of the records given
        asked.append(len(rs))
        return list(PERPLEXITIES)

    stats = report.build({"ours": records, "six": six}, HashEncoder(), perplexity)
    assert asked == [3, 3]
    assert stats["skipped"]["ours"] == []
    assert [s.split(":")[0] for s in stats["skipped"]["six"]] == ["decoder", "try_and_reflect", "cost"]
    ppl = stats["files"]["ours"]["validity"]["perplexity"]
    assert (ppl["n"], ppl["mean"], ppl["median"]) == (6, 5.0, 4.5)  # every finite value, none left out
    assert stats["files"]["ours"]["validity"]["perplexity_unscored"] == 1
    stats.update(inputs={"ours": "a.jsonl", "six": "b.jsonl"}, notes={}, perplexity_model="stub")
    drawn = figure_data(monkeypatch)
    paths = draw_all(stats, tmp_path)
    assert sorted(p.name for p in paths) == sorted(drawn) == ["cost.png", "decoder_rounds.png", "decoder_similarity.png",
                                                              "diagnoses.png", "try_and_reflect.png", "validity.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    stats["figures"] = [p.name for p in paths]
    md = report.render(stats)
    for heading in ("## Symptom Decoder", "## Try and reflect", "## Diagnoses", "## Cost", "## Validity and diversity"):
        assert heading in md
    assert "- six: decoder: no record has `decoder`" in md and "![cost](cost.png)" in md
    assert "| medicine | scores off the 0-10 scale (capped) | 1 of 5 (e.g. 121) |" in md
    assert_figures_match_tables(drawn, md, stats)
    # a few of them by hand: round 0 passes 3 of 6 checks; treatment's best after try 2 is 26/3
    assert drawn["decoder_rounds.png"][0]["lines"]["ours"][1][0] == pytest.approx(0.5)
    assert drawn["try_and_reflect.png"][0]["lines"]["ours treatment"][1][1] == pytest.approx(26 / 3)
    assert drawn["cost.png"][0]["bars"]["_bar0"][0][0] == pytest.approx(2)  # 6 calls over 3 sessions


def test_report_command_figures_draw_the_numbers_of_its_tables(tmp_path, records, monkeypatch):
    """`arena_med.py report` end to end (no perplexity, no encoder): each figure's data are its tables' numbers."""
    a = write(tmp_path / "a.jsonl", records)
    b = write(tmp_path / "b.jsonl", records[1:])
    drawn = figure_data(monkeypatch)
    out = tmp_path / "report"
    assert arena_med.main(["report", "--input_file", f"{a},{b}", "--labels", "ours,fewer", "--output_dir", str(out),
                           "--perplexity_model", "none", "--encoder_model", "none"]) == 0
    stats = json.loads((out / "report.json").read_text())
    assert sorted(drawn) == sorted(stats["figures"]) and len(drawn) == 6
    assert_figures_match_tables(drawn, (out / "report.md").read_text(), stats)


# ---------------------------------------------------------------- the reference's records
def test_reference_records_six_field_sections_only(tmp_path):
    files = {name: report.load_records(shared_data("arena_outputs", f"{name}.jsonl"))[0]
             for name in ("gpt_iter1_output", "llama3_iter4_output_1")}
    stats = report.build(files)
    for label, per in stats["files"].items():
        assert {s.split(":")[0] for s in stats["skipped"][label]} == {"decoder", "try_and_reflect", "cost"}
        assert per["decoder"]["sessions"] == 0 and per["try_and_reflect"] == {}
        assert per["diagnoses"]["records"] == per["records"] > 100
        assert per["validity"]["answers"] >= 2 * per["records"] and 0 < per["validity"]["distinct_2"] < 1
    gpt = stats["files"]["gpt_iter1_output"]["diagnoses"]
    assert gpt["top"][0] == ["major depressive disorder", 33]  # 17 plain, 15 "(MDD)", 1 "Disorder."
    assert gpt["medicine_none_share"] > 0.3
    stats.update(inputs={k: k for k in files}, notes={})
    stats["figures"] = [p.name for p in draw_all(stats, tmp_path)]
    assert stats["figures"] == ["diagnoses.png", "validity.png"]
    md = report.render(stats)
    assert "No file has the fields this section needs." in md and "- gpt_iter1_output: decoder:" in md


# ---------------------------------------------------------------- input and the command
def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), ("", "no records (empty file)"), ('{"symptom": "x"}\nnot json\n', "line 2: not valid JSON"),
    ('[1, 2]\n', "line 1: a JSON list, not a record"), ('{"foo": 1}\n', "line 1: not a self-play record"),
    (b"\xff\xfe{}\n", "not UTF-8"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "in.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    code = arena_med.main(["report", "--input_file", str(path), "--output_dir", str(tmp_path / "out"),
                           "--perplexity_model", "none", "--encoder_model", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(path) in err and message in err


def test_labels_must_match_files(tmp_path, records):
    path = write(tmp_path / "a.jsonl", records)
    with pytest.raises(InputError, match="--labels names 2 files, --input_file 1"):
        report.write_report(str(path), tmp_path / "out", labels="x,y", perplexity_model="none", encoder_model="none")


def test_cli_end_to_end(tmp_path, records, capsys):
    a = write(tmp_path / "a.jsonl", records)
    b = write(tmp_path / "b.jsonl", [{k: r[k] for k in report.RECORD_FIELDS} for r in records])
    out = tmp_path / "report"
    code = arena_med.main(["report", "--input_file", f"{a},{b}", "--labels", "ours,old", "--output_dir", str(out),
                           "--perplexity_model", "none", "--max_records", "2"])
    assert code == 0, capsys.readouterr().err
    md = (out / "report.md").read_text()
    assert "**ours**" in md and "the first 2 of 3 records" in md and "Perplexity was not computed" in md
    assert "all-MiniLM-L6-v2" in md  # the bundled encoder gave the embedding diversity
    stats = json.loads((out / "report.json").read_text())
    assert stats["files"]["ours"]["records"] == 2
    # "old" holds the same answers: every record has a twin at distance 0, so it is covered whole
    assert stats["diversity"]["answers"]["radius"] == pytest.approx(0, abs=1e-6)
    assert stats["diversity"]["answers"]["coverage"]["ours"]["old"]["share"] == 1.0
    for name in stats["figures"]:
        assert (out / name).stat().st_size > 5000
    assert len(stats["figures"]) == 6


def test_self_play_still_the_default(monkeypatch):
    seen = {}

    def fake_run(limit: int = 0, progress: bool = True):
        seen.update(limit=limit, progress=progress)
        return {"sessions_failed": 0}

    monkeypatch.setattr(arena_med, "run", fake_run)
    assert arena_med.main(["--limit", "3", "--progress", "false"]) == 0
    assert seen == {"limit": 3, "progress": False}


def test_perplexity_with_a_tiny_model(tmp_path, records, tiny_base):
    from mentalarena.training import quality
    from mentalarena.training.sft import record_pairs, to_text

    out = tmp_path / "report"
    stats = report.write_report(str(write(tmp_path / "a.jsonl", records)), out, perplexity_model=tiny_base,
                                encoder_model="none")
    ppl = stats["files"]["a"]["validity"]["perplexity"]
    model, tokenizer = quality.load_scorer(tiny_base)
    want = quality.answer_perplexities(model, tokenizer, [to_text(p) for r in records for p in record_pairs(r)])
    assert ppl["n"] == len(want) == 7 and ppl["mean"] == pytest.approx(float(np.mean(want)), rel=1e-6)
    assert "perplexity under" in (out / "report.md").read_text()
