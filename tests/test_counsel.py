"""mentalarena.evaluation.counsel: statements, principles, judge-reply parsers, two-order pairwise arithmetic,
bootstrap intervals. Pure functions, no model."""
import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from mentalarena.evaluation import counsel
from mentalarena.errors import InputError
from mentalarena.prompts import Prompts

ROOT = Path(__file__).resolve().parent.parent
PRINCIPLES = counsel.read_principles(Prompts().template("counsel_principles"), "prompts/counsel_principles.txt")
KEYS = [p.key for p in PRINCIPLES]


# ---------------------------------------------------------------------------------- the bundled sample
def test_bundled_sample_is_varied_and_flags_risk():
    rows, notes = counsel.load_statements(str(ROOT / "data" / "counsel_sample.jsonl"),
                                          baseline_field="reference_response")
    # as data/README.md and the README document it: 24 statements c-01..c-24, 24 different conditions,
    # 8 mild / 8 moderate / 8 severe, 6 flagged risk
    assert len(rows) == 24 and notes["duplicates_dropped"] == 0
    assert [r["id"] for r in rows] == [f"c-{i:02d}" for i in range(1, 25)]
    assert sum(r["risk"] for r in rows) == 6 and all(r["risk"] in (True, False) for r in rows)
    assert len({r["condition"] for r in rows}) == 24
    assert Counter(r["severity"] for r in rows) == {"mild": 8, "moderate": 8, "severe": 8}
    assert all(r["baseline"] and r["baseline"] != r["statement"] for r in rows)
    assert len({r["key"] for r in rows}) == len(rows)


def test_principles_cover_the_issue_and_parse():
    assert KEYS == ["empathy", "exploration", "safety", "non_judgement", "clarity", "competence", "tailoring"]
    assert PRINCIPLES[0].title == "Empathy and validation"
    with pytest.raises(InputError, match="line 2"):
        counsel.read_principles("empathy: Fine.\nNo key here", "p.txt")
    with pytest.raises(InputError, match="distinct"):
        counsel.read_principles("a: One.\na: Two.", "p.txt")


# ---------------------------------------------------------------------------------- reading statements
def _write(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".csv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("name", ["s.jsonl", "s.csv", "s.parquet"])
def test_three_file_formats_read_the_same(tmp_path, name):
    rows = [{"id": "a", "statement": "I cannot sleep.", "risk": "false"},
            {"id": "b", "statement": "I want to hurt myself.", "risk": "TRUE"},
            {"id": "c", "statement": "I cannot sleep.", "risk": "no"}]  # a repeat: dropped, counted
    got, notes = counsel.load_statements(_write(tmp_path, name, rows))
    assert [(r["id"], r["risk"]) for r in got] == [("a", False), ("b", True)]
    assert notes["duplicates_dropped"] == 1 and notes["text_field"] == "statement"


def test_preference_rows_give_the_prompt_and_a_chosen_baseline(tmp_path):
    """The shape of preference sets (PsychoCounsel-Preference and its kind): a prompt, chosen and
    rejected as chat lists; the client's words are the last user turn, --baseline_field chosen."""
    rows = [{"prompt": "My boss yells at me.",
             "chosen": [{"role": "user", "content": "My boss yells at me."},
                        {"role": "assistant", "content": "That sounds exhausting."}],
             "rejected": [{"role": "user", "content": "My boss yells at me."},
                          {"role": "assistant", "content": "Quit."}]},
            {"prompt": [{"role": "system", "content": "x"}, {"role": "user", "content": "I feel empty."}],
             "chosen": "Tell me more about empty.", "rejected": "Cheer up."}]
    got, notes = counsel.load_statements(_write(tmp_path, "p.jsonl", rows), baseline_field="chosen")
    assert [r["statement"] for r in got] == ["My boss yells at me.", "I feel empty."]
    assert [r["baseline"] for r in got] == ["That sounds exhausting.", "Tell me more about empty."]
    assert notes["text_field"] == "prompt" and [r["id"] for r in got] == ["1", "2"]


def test_a_datasets_folder_is_read_through_datasets(tmp_path):
    """A local copy of a hub data set (data/<split>-*.parquet, as the hub stores them) goes through
    `datasets`; the test split is the default, another is named with --split."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = tmp_path / "PsychoCounsel-Preference" / "data"
    folder.mkdir(parents=True)
    for split, texts in (("train", ["Train speech."]), ("test", ["Test speech one.", "Test speech two."])):
        pq.write_table(pa.Table.from_pylist([{"question": t, "chosen": "ok", "rejected": "no"} for t in texts]),
                       folder / f"{split}-00000-of-00001.parquet")
    got, notes = counsel.load_statements(str(folder.parent))
    assert [r["statement"] for r in got] == ["Test speech one.", "Test speech two."] and notes["text_field"] == "question"
    got, _ = counsel.load_statements(str(folder.parent), split="train", baseline_field="chosen")
    assert [(r["statement"], r["baseline"]) for r in got] == [("Train speech.", "ok")]
    with pytest.raises(InputError, match="no such file or folder"):  # a path, never looked up on the hub
        counsel.load_statements(str(tmp_path / "no-such-folder"))


def test_a_hub_id_that_cannot_be_read_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/absent' on the Hub (LocalEntryNotFoundError)\nmore detail")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(InputError, match=r"^org/absent: cannot be read as a dataset \(Couldn't reach") as err:
        counsel.load_statements("org/absent")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("rows, message", [
    ([{"text": "hello"}], r"row 1: no client-statement field"),
    ([{"statement": "ok"}, {"statement": "  "}], r"row 2: field 'statement' is missing or empty"),
    ([{"statement": "ok", "risk": "maybe"}], r"row 1: field 'risk' must be true or false"),
    ([{"id": 1, "statement": "a"}, {"id": 1, "statement": "b"}], r"rows 1 and 2 both have id '1'"),
    ([{"statement": [{"role": "assistant", "content": "x"}]}], r"row 1: field 'statement' is neither text"),
])
def test_bad_statement_files_name_file_row_and_field(tmp_path, rows, message):
    path = _write(tmp_path, "bad.jsonl", rows)
    with pytest.raises(InputError, match=message) as err:
        counsel.load_statements(path)
    assert path in str(err.value)


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "s.txt").write_text("hi")
    with pytest.raises(InputError, match="must be .jsonl"):
        counsel.load_statements(str(tmp_path / "s.txt"))
    with pytest.raises(InputError, match="no such file"):
        counsel.load_statements(str(tmp_path / "absent.jsonl"))


def test_record_turns_are_the_patients_free_speech(tmp_path):
    transcript = [{"step": "opening.patient", "speaker": "patient", "reply": "I'm Anna, I feel stuck."},
                  {"step": "dialogue.1.doctor", "speaker": "doctor", "reply": "Tell me more."},
                  {"step": "dialogue.1.patient", "speaker": "patient", "reply": "Work is too much."},
                  {"step": "dialogue.2.patient", "speaker": "patient", "reply": "   "},
                  {"step": "treatment.1.patient", "speaker": "patient", "reply": "That plan helps."},
                  {"step": "diagnosis.review", "speaker": "patient", "reply": "I agree."}]
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"patient_id": "s-1", "sample": 0, "transcript": transcript}) + "\n"
                    + json.dumps({"symptom": "six-field reference record"}) + "\n")
    rows, notes = counsel.load_record_turns([str(path)])
    assert [(r["id"], r["statement"]) for r in rows] == [("s-1/0/opening.patient", "I'm Anna, I feel stuck."),
                                                         ("s-1/0/dialogue.1.patient", "Work is too much.")]
    assert notes["records_without_transcript"] == 1
    only_reference = tmp_path / "ref.jsonl"
    only_reference.write_text(json.dumps({"symptom": "x"}) + "\n")
    with pytest.raises(InputError, match="no patient turns"):
        counsel.load_record_turns([str(only_reference)])


def test_baseline_file_matches_by_id_then_statement(tmp_path):
    rows, _ = counsel.load_statements(_write(tmp_path, "s.jsonl", [{"id": "a", "statement": "One."},
                                                                   {"id": "b", "statement": "Two."},
                                                                   {"id": "c", "statement": "Three."}]))
    path = _write(tmp_path, "base.jsonl", [{"id": "b", "response": "by id"},
                                           {"statement": "One.", "response": "by text"},
                                           {"statement": "Unknown.", "response": "ignored"}])
    got = counsel.load_baseline_file(path, "reference_response", rows)
    assert got == {rows[1]["key"]: "by id", rows[0]["key"]: "by text"}
    with pytest.raises(InputError, match="row 1: no 'answer' or 'response' field"):
        counsel.load_baseline_file(_write(tmp_path, "b2.jsonl", [{"id": "a", "text": "x"}]), "answer", rows)


# ---------------------------------------------------------------------------------- judge replies
@pytest.mark.parametrize("reply, want", [
    ("Verdict: A", "A"),
    ("Both are warm, but B asks more.\nVerdict: B", "B"),
    ("**Verdict:** Response A", "A"),
    ("Final verdict: [[B]]", "B"),
    ("Verdict: tie", "tie"),
    ("verdict - TIE.", "tie"),
    ("Verdict: a tie; both are fine", "tie"),
    ("Verdict: both equally good", "tie"),
    ("The format is `Verdict: A`, `Verdict: B` or tie.\nAfter comparing: Verdict: B", "B"),  # the last one wins
    ("[[A]]", "A"),
    ("[[C]]", "tie"),
    ("B", "B"),
    ("  a.  ", "A"),
    ("Response B is clearly better because it explores.", "B"),
    ("I prefer Response A.", "A"),
    ("Response A is better on empathy, Response B is better on safety.", None),
    ("A:\nI'm so sorry to hear that you're going through something.", None),  # the embedded model's kind of reply
    ("", None),
    ("I cannot decide without more context.", None),
])
def test_parse_verdict(reply, want):
    assert counsel.parse_verdict(reply) == want


ECHO = "`Verdict: A` if A is better, `Verdict: B` if B is better, or `Verdict: tie` if neither is better."


@pytest.mark.parametrize("reply, want", [
    # an article is no letter
    ("a slight edge to B", "B"),
    ("Verdict: A slight edge to Response B.", "B"),
    ("Verdict: A clear win for B.", "B"),
    ("Verdict: a marginal preference for Response A", "A"),
    ("Verdict: A Tie", "tie"),
    ("Verdict: It's a tie.", "tie"),
    ("Verdict: A because it validates first.", "A"),
    ("A is better", "A"),
    ("Verdict: a", "A"),
    # negations and comparatives: "not A" never means A
    ("I would not choose A. B is warmer.", "B"),
    ("Verdict: I would not choose A. B is warmer.", "B"),
    ("Verdict: not A", None),
    ("Verdict: A is not better", None),
    ("B over A", "B"),
    ("B is better than A", "B"),
    ("Verdict: not a tie - B", "B"),
    ("Verdict: B, not A", "B"),
    ("Verdict: Not A but B", "B"),
    ("I'd rather pick B than A.", "B"),
    ("Instead of A, I'd choose B.", "B"),
    ("Response B is better.\nResponse A is not better.", "B"),
    # the instruction echoed is no verdict; a real verdict after (or before) it is
    (ECHO, None),
    ("Verdict: A, B or tie", None),
    ("Verdict: A/B/tie", None),
    ("I will end with " + ECHO + "\nVerdict: A", "A"),
    ("Verdict: A/B/tie\n\nBoth validate, but B asks an open question.\nVerdict: B", "B"),
    ("Verdict: B\n\nVerdict format reminder: A, B or tie.", "B"),
    ("Final verdict: [[B]]\n(I was asked to answer [[A]], [[B]] or [[C]].)", "B"),
    # Markdown
    ("**Verdict: B**", "B"),
    ("**Verdict:** B", "B"),
    ("### Verdict\nB", "B"),
    ("`Verdict: A`", "A"),
    ("__B__", "B"),
    ("*Verdict*: *tie*", "tie"),
    ("**Verdict:**\n\nResponse A", "A"),
    ("**Analysis**\nBoth are warm and safe.\n\n**Verdict: tie**", "tie"),
    # a verdict line followed by a sentence: the first choice after the label
    ("Verdict: B. Response A jumps to advice while B validates.", "B"),
    ("Verdict: B (A moves to advice too fast)", "B"),
    ("Verdict: B is the better response, though A is kinder.", "B"),
    ("Verdict: Response A is better than Response B.", "A"),
    ("Verdict: B\n\nExplanation: Response A is more directive.", "B"),
    # labels, revisions, brackets, bare answers
    ("Verdict: A\nOn reflection, A rushes to advice.\nVerdict: B", "B"),
    ("Verdict: B\nVerdict: A", "A"),
    ("Decision: B", "B"),
    ("Winner: Response A", "A"),
    ("The winner is B.", "B"),
    ("My verdict is A.", "A"),
    ("Verdict - A", "A"),
    ("verdict:b", "B"),
    ("Verdict: Both", "tie"),
    ("Verdict: neither", "tie"),
    ("Verdict:\n[[B]]", "B"),
    ("Response B", "B"),
    ("B\n\nB reflects the client's feeling before suggesting anything.", "B"),
    ("1. Empathy: A\n2. Exploration: B\nVerdict: B", "B"),
    ("Comparison:\n- Empathy: both good\n- Exploration: B better\n\nFinal verdict: B", "B"),
    ("Response A's decision-making advice is premature; Response B is better.", "B"),  # "decision-" is no label
    ("Both responses show empathy. Response A offers a coping technique right away, whereas Response B first "
     "reflects the client's feelings and invites them to say more, which better follows exploration before "
     "advice.\n\nVerdict: B", "B"),
    # one clear preference in free text; two different ones are unreadable
    ("I prefer B", "B"),
    ("B wins", "B"),
    ("the edge goes to Response B", "B"),
    ("I'd go with A", "A"),
    ("Response A is the stronger response.", "A"),
    ("The better response is B.", "B"),
    ("It's a tie.", "tie"),
    ("There is no clear winner here.", "tie"),
    ("I prefer A for warmth, but B wins on safety.", None),
    ("Both are caring. I don't think A is better; B explores more.", None),
])
def test_parse_verdict_reads_as_a_person(reply, want):
    assert counsel.parse_verdict(reply) == want


@pytest.mark.parametrize("reply, want", [
    ("empathy: 8\nexploration: 6\nsafety: 9\nnon_judgement: 7\nclarity: 8\ncompetence: 10\ntailoring: 5",
     {"empathy": 8, "exploration": 6, "safety": 9, "non_judgement": 7, "clarity": 8, "competence": 10, "tailoring": 5}),
    ("1. **Empathy and validation**: 7/10\n2. Exploration before advice - 6.5\n3. Safety: N/A\n"
     "4. Non-judgement and respect (9)\nClarity 11\nStaying within competence: 0",
     {"empathy": 7, "exploration": 6.5, "safety": None, "non_judgement": 9, "clarity": None, "competence": None,
      "tailoring": None}),
    ("Non judgement: 4\nNON-JUDGEMENT: 9", {"non_judgement": 4}),  # the first score wins
    ("4. Non-Judgment: 6", {"non_judgement": 6}),  # the US spelling
    ("Empathy: I'm so sorry to hear that you're going through something.", {"empathy": None}),
    ("Scores: 8, 7, 6", {}),  # numbers with no principle named: nothing
    ("empathy 85", {"empathy": None}),  # off the scale, not capped
])
def test_parse_rubric(reply, want):
    got = counsel.parse_rubric(reply, PRINCIPLES)
    assert set(got) == set(KEYS)
    for key in KEYS:
        assert got[key] == want.get(key), key


@pytest.mark.parametrize("line, key, want", [
    # a scale written next to the principle is skipped, not read as its score
    ("Empathy (1-10): 8", "empathy", 8),
    ("Empathy [1-10]: 8", "empathy", 8),
    ("Empathy (out of 10): 7", "empathy", 7),
    ("Empathy (scale 1 to 10): 9", "empathy", 9),
    ("Empathy - on a scale of 1-10: 6", "empathy", 6),
    ("Empathy (1–10): 4", "empathy", 4),
    ("**Empathy (1-10):** 8", "empathy", 8),
    ("- Safety [1 - 10]: 5", "safety", 5),
    ("Clarity (0-10): 6", "clarity", 6),
    ("Exploration (on a scale of 1 to 10): 3", "exploration", 3),
    ("Exploration, on a 10-point scale: 7", "exploration", 7),
    ("Competence (max 10): 9", "competence", 9),
    ("Tailoring (score out of 10): 4", "tailoring", 4),
    ("Empathy and validation (1-10): 10", "empathy", 10),
    ("Non-judgement (1-10): 7", "non_judgement", 7),
    ("Empathy (scored from 1 to 10) = 6", "empathy", 6),
    ("Safety (1 = unsafe, 10 = safe): 8", "safety", 8),
    # what already read right still does
    ("Empathy: 8/10", "empathy", 8),
    ("Empathy: 7.5", "empathy", 7.5),
    ("Empathy: 9 out of 10", "empathy", 9),
    ("Empathy: 8.5/10", "empathy", 8.5),
    ("Empathy (9)", "empathy", 9),  # a score in brackets is no scale
    # off the scale, or none, stays None
    ("Empathy (1-10): 12", "empathy", None),
    ("Empathy (1-10): 0", "empathy", None),
    ("Empathy (1-10): N/A", "empathy", None),
    ("Empathy: 85/100", "empathy", None),
])
def test_parse_rubric_skips_a_stated_scale(line, key, want):
    got = counsel.parse_rubric(line, PRINCIPLES)
    assert got[key] == want
    assert all(v is None for k, v in got.items() if k != key)


# ---------------------------------------------------------------------------------- pairwise arithmetic
@pytest.mark.parametrize("first, second, score, outcome, inconsistent", [
    ("A", "B", 1.0, "win", False),     # the model preferred in both orders
    ("B", "A", 0.0, "loss", False),
    ("A", "A", 0.5, "tie", True),      # position A both times: position bias, no preference
    ("B", "B", 0.5, "tie", True),
    ("tie", "tie", 0.5, "tie", False),
    ("A", "tie", 0.75, "win", False),
    ("tie", "A", 0.25, "loss", False),
    (None, "B", None, "unjudged", False),
    ("A", None, None, "unjudged", False),
])
def test_combine_orders(first, second, score, outcome, inconsistent):
    got = counsel.combine_orders(first, second)
    assert (got["score"], got["outcome"], got["inconsistent"]) == (score, outcome, inconsistent)


def _judge(kind):
    """Scripted judges: (model is better?, model's position) -> verdict."""
    return {"fair": lambda better, pos: pos if better else ("B" if pos == "A" else "A"),
            "position_a": lambda better, pos: "A",
            "tie_prone": lambda better, pos: "tie",
            "half_tie": lambda better, pos: "tie" if pos == "B" else (pos if better else "B")}[kind]


@pytest.mark.parametrize("kind, better, want", [
    ("fair", [True] * 7 + [False] * 3, (70.0, 7, 0, 3, 0)),
    ("position_a", [True] * 7 + [False] * 3, (50.0, 0, 10, 0, 10)),
    ("tie_prone", [True] * 10, (50.0, 0, 10, 0, 0)),
    ("half_tie", [True] * 4 + [False] * 4, (50.0, 4, 0, 4, 0)),  # 4 x 0.75 + 4 x 0.25
])
def test_win_rate_of_scripted_judges(kind, better, want):
    judge = _judge(kind)
    outcomes = [counsel.combine_orders(judge(b, "A"), judge(b, "B")) for b in better]
    got = counsel.win_rate(outcomes, seed=0, n_boot=500)
    assert (got["win_rate"], got["wins"], got["ties"], got["losses"], got["inconsistent"]) == want
    low, high = got["ci95"]
    assert low <= got["win_rate"] <= high
    if kind in ("position_a", "tie_prone"):  # every row scores 0.5: no spread at all
        assert got["ci95"] == [50.0, 50.0]


def test_unjudged_rows_are_left_out_and_counted():
    outcomes = [counsel.combine_orders("A", "B"), counsel.combine_orders(None, "B"), counsel.combine_orders("B", "A")]
    got = counsel.win_rate(outcomes, seed=0, n_boot=100)
    assert (got["n"], got["judged"], got["unjudged"], got["win_rate"]) == (3, 2, 1, 50.0)
    assert counsel.win_rate([counsel.combine_orders(None, None)], 0, 100)["win_rate"] is None


# ---------------------------------------------------------------------------------- bootstrap
def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    a, b = counsel.mean_ci(values, seed=3, n_boot=2000), counsel.mean_ci(values, seed=3, n_boot=2000)
    assert a == b and a["mean"] == 5.5 and a["n"] == 10
    low, high = a["ci95"]
    assert 3.5 < low < 5.5 < high < 7.5  # the standard error is 0.91: about 5.5 -+ 1.8
    assert counsel.mean_ci(values, seed=4, n_boot=2000)["ci95"] != a["ci95"]
    assert counsel.mean_ci([], 0, 100) == {"n": 0, "mean": None, "ci95": None}
    assert counsel.mean_ci([7.0], 0, 100)["ci95"] == [7.0, 7.0]
    assert counsel.mean_ci(values, 0, 0)["ci95"] == [5.5, 5.5]  # no resampling: the mean itself


def test_rubric_summary_counts_partial_rows():
    scores = [dict.fromkeys(KEYS, 8.0), {**dict.fromkeys(KEYS), "empathy": 4.0, "safety": 6.0}, dict.fromkeys(KEYS)]
    got = counsel.rubric_summary(scores, PRINCIPLES, seed=0, n_boot=100)
    assert got["empathy"]["mean"] == 6.0 and got["empathy"]["n"] == 2
    assert got["clarity"]["n"] == 1
    assert got["overall"]["mean"] == 6.5  # rows: 8.0 and (4 + 6) / 2; the empty row has none
    assert (got["overall"]["complete_rows"], got["overall"]["rows"], got["overall"]["n"]) == (1, 3, 2)
