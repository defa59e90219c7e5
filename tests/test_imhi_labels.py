"""IMHI label rules (reference and fixed), metrics and CSV files (`mentalarena.evaluation.imhi`)."""
from __future__ import annotations

import csv
import random
import warnings

import pytest
import sklearn.metrics
from conftest import ROOT, shared_data

from mentalarena.evaluation import imhi
from mentalarena.errors import InputError

SAMPLE_DIR = ROOT / "data" / "imhi_sample"
INSTRUCTION = ("CAMS", "DR", "SAD", "dreaddit", "loneliness", "t-sid")
COMPLETE = ("CAMS", "DR", "SAD", "t-sid")
EXPERT = tuple(imhi.DATASETS)
SHARED_FILES = ([("test_instruction", n) for n in INSTRUCTION] + [("test_complete", n) for n in COMPLETE]
                + [("expert", n) for n in EXPERT])
# Instruction-set wordings the reference's gold keywords cannot read, and the subset its response
# keywords cannot read either ("other stress causes" still hits the response keyword "other").
GOLD_MISSES = ("emotion turmoil", "other stress causes", "no causes of depression")
RESPONSE_MISSES = ("emotion turmoil", "no causes of depression")


def _goldens(folder: str, name: str) -> list[str]:
    return [row["golden"] for row in imhi.read_imhi_csv(shared_data("imhi", folder, f"{name}.csv"))]


def _label_part(golden: str) -> str:
    return golden.split("Reasoning:")[0].lower()


# ---------------------------------------------------------------- oracle: goldens as responses

@pytest.mark.parametrize("folder,name", SHARED_FILES)
def test_fixed_rules_read_every_golden_back(folder, name):
    goldens = _goldens(folder, name)
    result = imhi.score(name, goldens, goldens, "fixed")
    assert (result["accuracy"], result["weighted_f1"], result["ood"], result["dropped"]) == (100.0, 100.0, 0, 0)
    assert result["n"] == len(goldens)


@pytest.mark.parametrize("folder,name", SHARED_FILES)
def test_reference_rules_on_goldens_drop_only_the_instruction_wordings(folder, name):
    goldens = _goldens(folder, name)
    dropped = sum(any(w in _label_part(g) for w in GOLD_MISSES) for g in goldens)
    ood = sum(any(w in _label_part(g) for w in RESPONSE_MISSES) for g in goldens)
    if folder == "test_complete":
        assert dropped == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = imhi.score(name, goldens, goldens, "reference")
    assert (result["dropped"], result["ood"], result["n"]) == (dropped, ood, len(goldens) - dropped)
    assert result["accuracy"] == 100.0  # on the rows it can read, it reproduces the golden
    assert len(caught) == (1 if dropped else 0)


def test_reference_drop_counts_on_the_instruction_sets():
    counts = {}
    for name in ("CAMS", "SAD"):
        goldens = _goldens("test_instruction", name)
        with pytest.warns(UserWarning, match=f"{name}: {'107' if name == 'CAMS' else '142'} golden"):
            counts[name] = imhi.score(name, goldens, goldens, "reference")["dropped"]
    assert counts == {"CAMS": 107, "SAD": 142}  # 107 "no causes"; 66 "emotion turmoil" + 76 "other stress causes"


@pytest.mark.parametrize("name", COMPLETE)
def test_instruction_and_completion_goldens_give_the_same_labels(name):
    labels = [[imhi.gold_label(name, g) for g in _goldens(folder, name)]
              for folder in ("test_instruction", "test_complete")]
    assert labels[0] == labels[1] and None not in labels[0]


@pytest.mark.parametrize("folder,name", [f for f in SHARED_FILES if f[0] != "test_complete"])
def test_fixed_rules_find_a_label_stated_after_the_reasoning(folder, name):
    goldens = _goldens(folder, name)
    flipped = []
    for golden in goldens:
        label, reason = golden.split("Reasoning:", 1)
        flipped.append(f"Reasoning: {reason.strip().rstrip('.')}. Therefore, {label.strip()}")
    result = imhi.score(name, goldens, flipped, "fixed")
    assert (result["accuracy"], result["ood"]) == (100.0, 0)


def test_project_samples_read_and_score():
    for name in ("dreaddit", "CAMS"):
        path = SAMPLE_DIR / f"{name}.csv"
        assert imhi.dataset_name(path) == name
        goldens = [row["golden"] for row in imhi.read_imhi_csv(path)]
        assert len(goldens) == 6
        assert imhi.score(name, goldens, goldens, "fixed")["accuracy"] == 100.0
    with pytest.warns(UserWarning, match="CAMS: 1 golden"):
        assert imhi.score("CAMS", goldens, goldens, "reference")["dropped"] == 1


# ---------------------------------------------------------------- label tables

# (dataset, response, reference label, fixed label); None: out-of-domain (gets the default label)
RESPONSES = [
    ("dreaddit", "Yes, the poster suffers from stress.", 1, 1),
    ("dreaddit", "No, the poster does not suffer from stress.", 0, 0),
    ("dreaddit", "Yes.", 1, 1),
    ("dreaddit", "no", 0, 0),
    ("dreaddit", "The poster does not suffer from stress.", 0, 0),  # reference: "no" inside "not"
    ("dreaddit", "I don't know.", 0, None),
    ("dreaddit", "The poster only talks about the economy.", 0, None),
    ("dreaddit", "Not really.", 0, None),
    ("dreaddit", "No, the poster does not suffer from stress, she just rests her eyes.", 1, 0),
    ("dreaddit", ("Reasoning: The poster lists deadlines and sleepless nights. Yes, the poster suffers "
                 "from stress."), None, 1),
    ("dreaddit", ("Reasoning: The poster writes about a calm weekend.\nTherefore, the poster does not "
                 "suffer from stress."), None, 0),
    ("dreaddit", "Yes. Reasoning: no deadline is mentioned, but the tone is tense.", 1, 1),
    ("DR", "The poster has no energy left, so yes, the poster suffers from depression.", 1, 1),
    ("loneliness", "No, the poster does not suffer from loneliness.", 0, 0),
    ("Irf", "Yes, the post shows this risk.", 1, 1),
    ("Irf", "No, the post does not show this risk.", 0, 0),
    ("MultiWD", "No, this wellness dimension does not exist in the post.", 0, 0),
    ("MultiWD", "This wellness dimension exists in the post.", None, 1),
    ("dreaddit", "", None, None),
    ("SAD", "This post shows the stress cause related to emotion turmoil.", None, 6),
    ("SAD", "This post shows the stress cause related to emotional turmoil.", 6, 6),
    ("SAD", "This post shows other stress causes.", 8, 8),
    ("SAD", "other causes.", 8, 8),
    ("SAD", "The poster's mother keeps criticizing her cooking.", 8, None),
    ("SAD", "This post shows the stress cause related to homework and exams.", 4, 0),
    ("SAD", "The stress comes from her mental health and emotional turmoil.", 5, 6),
    ("SAD", "Stress cause: work, as seen from her social media posts about deadlines.", 3, 4),
    ("SAD", "This post shows the stress cause related to health issues.", 5, 5),
    ("SAD", "everyday decision making.", 7, 7),
    ("SAD", "This post shows the stress cause related to financial problems.", 1, 1),
    ("SAD", ("Reasoning: She lost her job and cannot pay rent. This post shows the stress cause "
            "related to financial problem."), None, 1),
    ("SAD", "This post shows the stress cause related to family issues, not work.", 2, 2),
    ("CAMS", "This post shows no causes of depression.", None, 0),
    ("CAMS", "None.", 0, 0),
    ("CAMS", "This post shows causes of depression related to jobs and career.", 2, 2),
    ("CAMS", "This post shows causes of depression related to job loss.", None, 2),
    ("CAMS", "Nonetheless, this post shows causes of depression related to medication.", 0, 3),
    ("CAMS", "This post shows causes of depression related to bias or abuse.", 1, 1),
    ("CAMS", "relationship.", 4, 4),
    ("CAMS", ("Reasoning: The poster feels cut off from everyone at school. This post shows causes of "
             "depression related to alienation."), None, 5),
    ("swmh", "This post shows no mental disorder symptoms.", 0, 0),
    ("swmh", "This post shows mental disorder symptoms related to bipolar disorder.", 4, 4),
    ("swmh", "This post shows mental disorder symptoms related to anxiety, not suicide.", 1, 3),
    ("swmh", "The poster has suicidal thoughts.", None, 1),
    ("t-sid", "This post shows suicide or self-harm tendency caused by depression.", 2, 1),
    ("t-sid", "This post shows PTSD.", 3, 3),
    ("t-sid", "no mental disorders.", 0, 0),
    ("t-sid", "This post shows depression.", 2, 2),
    ("t-sid", "Reasoning: The poster relives the explosion every night. So the post shows PTSD.", None, 3),
]


@pytest.mark.parametrize("rules", imhi.RULES)
@pytest.mark.parametrize("dataset,response,reference,fixed", RESPONSES)
def test_response_labels(dataset, response, reference, fixed, rules):
    expected = reference if rules == "reference" else fixed
    assert imhi.response_label(dataset, response, rules) == expected
    # Through the list API: an unread response gets the default label and counts as OOD.
    golden = f"{imhi.DATASETS[dataset].labels[0]}."
    result = (imhi.reference_labels if rules == "reference" else imhi.fixed_labels)(dataset, [golden], [response])
    default = imhi.DATASETS[dataset].default
    assert (result.pred, result.ood) == ([default if expected is None else expected], int(expected is None))


# (dataset, golden, reference label, fixed label): both wordings of the benchmark's goldens.
GOLDENS = [
    ("DR", "Yes, the poster suffers from depression. Reasoning: no hope left.", 1, 1),
    ("DR", "No, the poster does not suffer from depression. Reasoning: yes-men at work.", 0, 0),
    ("DR", "yes.", 1, 1),
    ("SAD", "This post shows the stress cause related to emotion turmoil. Reasoning: x", None, 6),
    ("SAD", "emotional turmoil.", 6, 6),
    ("SAD", "This post shows other stress causes. Reasoning: her work is fine.", None, 8),
    ("SAD", "other causes.", 8, 8),
    ("SAD", "This post shows the stress cause related to work. Reasoning: her school", 4, 4),
    ("CAMS", "This post shows no causes of depression. Reasoning: none", None, 0),
    ("CAMS", "none.", 0, 0),
    ("CAMS", "This post shows causes of depression related to jobs and career.", 2, 2),
    ("t-sid", "This post shows suicide or self-harm tendency.", 1, 1),
    ("t-sid", "suicide or self-harm tendency.", 1, 1),
    ("t-sid", "This post shows PTSD.", 3, 3),
    ("t-sid", "This post shows no mental disorders.", 0, 0),
    ("swmh", "This post shows no mental disorder symptoms.", 0, 0),
    ("swmh", "This post shows mental disorder symptoms related to anxiety.", 3, 3),
]


@pytest.mark.parametrize("dataset,golden,reference,fixed", GOLDENS)
def test_gold_labels(dataset, golden, reference, fixed):
    assert imhi.gold_label(dataset, golden, "reference") == reference
    assert imhi.gold_label(dataset, golden, "fixed") == fixed


def test_reference_drops_unreadable_goldens_and_still_counts_their_ood_responses():
    goldens = ["This post shows the stress cause related to emotion turmoil.", "work.", "school."]
    responses = ["emotion turmoil", "work", "I am not sure."]
    with pytest.warns(UserWarning, match=r"SAD: 1 golden.*rows 1\)"):
        result = imhi.reference_labels("SAD", goldens, responses)
    assert (result.gold, result.pred, result.ood, result.dropped) == ([4, 0], [4, 8], 2, 1)
    result = imhi.fixed_labels("SAD", goldens, responses)
    assert (result.gold, result.pred, result.ood, result.dropped) == ([6, 4, 0], [6, 4, 8], 1, 0)


def test_label_errors():
    with pytest.raises(ValueError, match="unknown IMHI dataset 'CLP'"):
        imhi.response_label("CLP", "yes")
    with pytest.raises(ValueError, match="unknown rule set"):
        imhi.score("DR", ["yes."], ["yes"], "loose")
    with pytest.raises(ValueError, match="1 goldens but 2 responses"):
        imhi.fixed_labels("DR", ["yes."], ["yes", "no"])


def test_rule_tables_are_consistent():
    for name, rules in imhi.DATASETS.items():
        ids = set(range(len(rules.labels)))
        assert rules.default in ids
        assert {label for _, label in rules.ref_response} == ids, name
        assert {label for _, label in rules.ref_gold} == ids, name
        assert {label for label, _ in rules.fixed[0]} == ids, name
        assert all(label in ids for tier in rules.fixed for label, _ in tier), name
        # each label's own name reads back as that label under the fixed rules
        assert [imhi.response_label(name, f"{text}.") for text in rules.labels] == sorted(ids), name
        assert sorted(imhi.CLASSIFIER_LABELS[name].values()) == sorted(ids), name


def test_classifier_ids_follow_label_inference_names():
    # label_inference.py's class names per classifier id, mapped onto the rule labels
    swmh = ["depression", "suicide", "anxiety", "bipolar disorder", "no mental disorders"]
    tsid = ["depression", "suicide or self-harm", "ptsd", "no mental disorders"]  # 3 is "control"
    for name, names in (("swmh", swmh), ("t-sid", tsid)):
        labels = imhi.DATASETS[name].labels
        assert [labels[imhi.CLASSIFIER_LABELS[name][i]] for i in range(len(names))] == names


@pytest.mark.parametrize("name,golden,reference,fixed", [
    # label_inference.py's gold keywords fit the instruction wording, unlike --rule_calculate's
    ("CAMS", "This post shows no causes of depression. Reasoning: x", 0, 0),
    ("CAMS", "none. Reasoning: x", None, 0),                        # completion wording: unread
    ("SAD", "This post shows the stress cause is emotion turmoil. Reasoning: x", 6, 6),
    ("SAD", "emotional turmoil. Reasoning: x", None, 6),
    ("SAD", "This post shows other stress causes. Reasoning: x", 8, 8),
    ("t-sid", "This post shows no mental disorders. Reasoning: x", 0, 0),
    ("t-sid", "suicide or self-harm tendency, not depression. Reasoning: x", 2, 1),  # depression checked first
    ("dreaddit", "No, the poster does not suffer from stress. Reasoning: yes", 0, 0),
])
def test_classifier_gold_keywords_follow_label_inference(name, golden, reference, fixed):
    assert imhi.classifier_gold_label(name, golden, "reference") == reference
    assert imhi.classifier_gold_label(name, golden, "fixed") == fixed


def test_classifier_score_reads_goldens_by_the_rule_set():
    goldens = ["none. Reasoning: a", "This post shows no causes of depression. Reasoning: b",
               "jobs and career. Reasoning: c", "medication. Reasoning: d"]
    with pytest.warns(UserWarning, match=r"CAMS: 1 golden\(s\) match no label_inference.py gold keyword \(rows 1\)"):
        reference = imhi.classifier_score("CAMS", goldens, [0, 0, 0, 0], "reference")
    # gold 0, 2, 3 all predicted 0: F1 of 0 is 2*1/(1+3), weighted 0.5/3, macro 0.5/3
    assert reference == {"accuracy": 33.33, "weighted_f1": 16.67, "micro_f1": 33.33, "macro_f1": 16.67,
                         "ood": 0, "dropped": 1, "n": 3}
    # gold 0, 0, 2, 3: F1 of 0 is 2*2/(2+4), weighted 2/3*2/4, macro 2/3/3
    assert imhi.classifier_score("CAMS", goldens, [0, 0, 0, 0], "fixed") == {
        "accuracy": 50.0, "weighted_f1": 33.33, "micro_f1": 50.0, "macro_f1": 22.22, "ood": 0, "dropped": 0, "n": 4}
    with pytest.raises(ValueError, match="4 goldens but 3 predictions"):
        imhi.classifier_score("CAMS", goldens, [0, 0, 0], "fixed")


@pytest.mark.parametrize("folder,name", SHARED_FILES)
def test_label_inference_gold_keywords_on_the_shared_goldens(folder, name):
    # on the sets label_inference.py was written for it agrees with the fixed rules everywhere; on the
    # completion set it cannot read CAMS "none" (107 rows) and SAD "emotional turmoil" (66 rows)
    goldens = _goldens(folder, name)
    reference = [imhi.classifier_gold_label(name, g, "reference") for g in goldens]
    fixed = [imhi.gold_label(name, g, "fixed") for g in goldens]
    unread = {("test_complete", "CAMS"): 107, ("test_complete", "SAD"): 66}.get((folder, name), 0)
    assert reference.count(None) == unread
    assert all(r == f for r, f in zip(reference, fixed) if r is not None)


# ---------------------------------------------------------------- metrics

def test_metrics_hand_computed():
    # label 0: F1 2*1/(3+1) = 0.5, labels 1 and 2: 0 -> weighted 0.5/3, macro 0.5/3
    assert imhi.metrics([0, 1, 2], [0, 0, 0]) == {
        "accuracy": 33.33, "weighted_f1": 16.67, "micro_f1": 33.33, "macro_f1": 16.67}
    # label 2 is only predicted: it counts in macro F1 (as 0) but has no weight
    # F1: label 0 2/3, label 1 1, label 2 0 -> weighted (2*2/3 + 2*1)/4, macro (2/3 + 1)/3
    assert imhi.metrics([0, 0, 1, 1], [0, 2, 1, 1]) == {
        "accuracy": 75.0, "weighted_f1": 83.33, "micro_f1": 75.0, "macro_f1": 55.56}
    assert imhi.metrics([1, 1], [1, 1]) == {
        "accuracy": 100.0, "weighted_f1": 100.0, "micro_f1": 100.0, "macro_f1": 100.0}
    assert imhi.metrics([0, 0], [1, 1]) == {
        "accuracy": 0.0, "weighted_f1": 0.0, "micro_f1": 0.0, "macro_f1": 0.0}


def test_metrics_errors():
    with pytest.raises(ValueError, match="empty"):
        imhi.metrics([], [])
    with pytest.raises(ValueError, match="2 gold labels but 1"):
        imhi.metrics([0, 1], [0])


def test_metrics_agree_with_sklearn():
    # the reference's own expressions (label_inference.py, IMHI.py): default zero_division, x100, 2 decimals
    rng = random.Random(0)
    for _ in range(300):
        n, k = rng.randint(1, 40), rng.randint(1, 9)
        gold = [rng.randrange(k) for _ in range(n)]
        pred = [rng.randrange(k) if rng.random() < 0.8 else gold[i] for i in range(n)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = {"accuracy": round(sklearn.metrics.accuracy_score(gold, pred) * 100, 2)} | {
                f"{avg}_f1": round(sklearn.metrics.f1_score(gold, pred, average=avg) * 100, 2)
                for avg in ("weighted", "micro", "macro")}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no UndefinedMetricWarning leaks into the results' warnings
            assert imhi.metrics(gold, pred) == expected, (gold, pred)


def test_majority_baseline():
    goldens = ["yes.", "Yes, the poster suffers from stress.", "no.", "This post is fine"]
    with pytest.warns(UserWarning, match="1 golden"):
        result = imhi.majority_baseline("dreaddit", goldens)
    # yes F1 2*2/(3+2) = 0.8, no F1 0 -> weighted 0.8*2/3, macro 0.4
    assert result == {"label": 1, "label_name": "yes", "share": 66.67, "accuracy": 66.67,
                      "weighted_f1": 53.33, "micro_f1": 66.67, "macro_f1": 40.0, "n": 3, "dropped": 1}
    assert imhi.majority_baseline("DR", ["no.", "yes."])["label"] == 0  # tie: the smaller id


# ---------------------------------------------------------------- files

def test_dataset_name():
    assert imhi.dataset_name("out/t-sid.csv") == "t-sid"
    assert imhi.dataset_name("multiwd.csv") == "MultiWD"
    with pytest.raises(InputError, match=r"notes\.csv: unknown IMHI dataset 'notes'.*known: CAMS, DR"):
        imhi.dataset_name("notes.csv")


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_imhi_csvs(tmp_path):
    missing = _write(tmp_path / "DR.csv", "query,answer\nhello,yes\n")
    with pytest.raises(InputError, match=r'DR\.csv: line 1 \(header\): column "gpt-3\.5-turbo" is missing'):
        imhi.read_imhi_csv(missing)
    empty = _write(tmp_path / "SAD.csv", "")
    with pytest.raises(InputError, match=r"SAD\.csv: the file is empty \(expected columns query, gpt-3\.5-turbo\)"):
        imhi.read_imhi_csv(empty)
    header_only = _write(tmp_path / "CAMS.csv", "query,gpt-3.5-turbo\n")
    with pytest.raises(InputError, match=r"CAMS\.csv: no data rows"):
        imhi.read_imhi_csv(header_only)
    blank = _write(tmp_path / "Irf.csv", 'query,gpt-3.5-turbo\nq1,yes.\n"multi\nline",\n')
    with pytest.raises(InputError, match=r'Irf\.csv: row 2 \(line 3\): column "gpt-3\.5-turbo" is empty'):
        imhi.read_imhi_csv(blank)
    with pytest.raises(InputError, match=r"nothere\.csv: file not found"):
        imhi.read_imhi_csv(tmp_path / "nothere.csv")
    (tmp_path / "bytes.csv").write_bytes(b"query,gpt-3.5-turbo\n\xff,yes\n")
    with pytest.raises(InputError, match=r"bytes\.csv: line 2, column 1: not UTF-8"):
        imhi.read_imhi_csv(tmp_path / "bytes.csv")
    no_generated = _write(tmp_path / "out.csv", "goldens,text\nyes.,yes\n")
    with pytest.raises(InputError, match=r'out\.csv: line 1 \(header\): column "generated_text" is missing'):
        imhi.read_generated_csv(no_generated)


def test_read_imhi_csv_keeps_text_and_skips_blank_lines(tmp_path):
    text = '\ufeffquery,gpt-3.5-turbo\n"Post: ""a, b""\nQ?","Yes. Reasoning: x"\n\nq2,no.\n'
    path = _write(tmp_path / "DR.csv", text)
    assert imhi.read_imhi_csv(path) == [{"query": 'Post: "a, b"\nQ?', "golden": "Yes. Reasoning: x"},
                                        {"query": "q2", "golden": "no."}]


TRICKY = ['plain', 'comma, and "quotes"', 'back\\slash \\n not a newline', 'two\nlines\r\nCRLF', '',
          '  spaced  ', 'naïve ünïcode — ok']


def test_generated_csv_round_trip(tmp_path):
    path = tmp_path / "run" / "SAD.csv"
    goldens = [f"gold {i}. Reasoning: {text or 'x'}" for i, text in enumerate(TRICKY)]
    imhi.write_generated_csv(path, goldens, TRICKY[:-1] + [None])
    assert path.read_text(encoding="utf-8").startswith("goldens,generated_text\n")
    assert imhi.read_generated_csv(path) == (goldens, TRICKY[:-1] + [""])
    with open(path, encoding="utf-8", newline="") as handle:
        assert list(csv.reader(handle))[1:] == [list(pair) for pair in zip(goldens, TRICKY[:-1] + [""])]
    with pytest.raises(ValueError, match="2 goldens but 1"):
        imhi.write_generated_csv(path, ["a", "b"], ["x"])


def test_generated_csv_reads_back_in_pandas(tmp_path):
    import pandas  # installed with `datasets` (requirements.txt): a broken install fails here, never skips
    path = tmp_path / "DR.csv"
    imhi.write_generated_csv(path, ["yes."] * len(TRICKY), TRICKY)
    frame = pandas.read_csv(path, keep_default_na=False)  # pandas' default reads "" as NaN
    assert frame["generated_text"].tolist() == TRICKY
