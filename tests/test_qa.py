"""mentalarena.evaluation.qa: loaders for both schemas (paper's files, hub rows), rule R, the robust parser."""
import json
from collections import Counter

import pytest
from conftest import shared_data

from mentalarena.evaluation import qa
from mentalarena.errors import InputError
from mentalarena.prompts import Prompts
from mentalarena.evaluation.qa import QAItem


def raw_rows(path):
    """The file's rows read here independently of the module under test."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def hub_table(rows):
    """What the hub hands back: a datasets.Dataset where `datasets` is installed, else the rows."""
    try:
        import datasets
    except ImportError:
        return list(rows)
    return datasets.Dataset.from_list(rows)


class FakeHub:
    """Stands in for datasets.load_dataset: records its calls, returns in-memory rows."""

    def __init__(self, rows):
        self.rows = rows
        self.calls = []

    def __call__(self, path, name=None, split=None):
        self.calls.append((path, name, split))
        return hub_table(self.rows)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the paper's files

def expected_gold(dataset, row):
    if dataset == "MedMCQA":
        return "ABCD"[row["cop"] - 1]
    if dataset == "PubMedQA":
        return row["final_decision"].lower()
    return row["answer_idx"]


PAPER_FILES = [
    ("MedQA", "medqa/psychosis.jsonl", None, 173),
    ("MedMCQA", "medmcqa/psychosis.jsonl", None, 314),
    ("MedMCQA", "medmcqa/subjects/Anatomy.jsonl", "Anatomy", 234),
    ("MedMCQA", "medmcqa/subjects/Psychiatry.jsonl", "Psychiatry", 16),
    ("MedMCQA", "medmcqa/subjects/Pharmacology.jsonl", "Pharmacology", 243),
    ("PubMedQA", "pubmedqa/test_samples.jsonl", None, 328),
    ("MMLU", "mmlu/medical_genetics_test.jsonl", "medical_genetics", 100),
    ("MMLU", "mmlu/college_medicine_test.jsonl", "test/college_medicine_test", 173),
]


@pytest.mark.parametrize("dataset,rel,name,count", PAPER_FILES)
def test_paper_file_rows_and_golds(dataset, rel, name, count):
    path = shared_data(*rel.split("/"))
    raw = raw_rows(path)
    items = qa.load_items(dataset, name=name, data_file=path)
    assert len(items) == len(raw) == count
    assert [i.gold for i in items] == [expected_gold(dataset, r) for r in raw]
    assert Counter(i.gold for i in items) == Counter(expected_gold(dataset, r) for r in raw)
    assert [i.question for i in items] == [(r.get("question") or r.get("QUESTION")).strip() for r in raw]
    assert len({i.id for i in items}) == count  # unique, even where the file repeats rows


def test_medqa_file_fields():
    path = shared_data("medqa", "psychosis.jsonl")
    items = qa.load_items("MedQA", data_file=path)
    first, nms = items[0], items[11]
    assert (first.id, first.gold, first.gold_text, first.reference_target) == (
        "MedQA-0", "C", "Gynecomastia", "Gynecomastia")
    assert first.options == {"A": "Agranulocytosis", "B": "Shortened QT interval",
                             "C": "Gynecomastia", "D": "Weight loss"}
    assert (nms.gold, nms.options["D"]) == ("C", "Oversedation")
    assert all(i.options[i.gold] == i.gold_text == i.reference_target for i in items)


def test_medmcqa_file_fields_target_the_letter():
    path = shared_data("medmcqa", "psychosis.jsonl")
    raw = raw_rows(path)
    items = qa.load_items("MedMCQA", data_file=path)
    assert raw[0]["cop"] == 2 and raw[2]["cop"] == 1
    assert (items[0].gold, items[0].reference_target, items[0].gold_text) == ("B", "B", raw[0]["opb"])
    assert (items[2].gold, items[2].gold_text) == ("A", "Vertical hemilaryngectomy")
    assert items[0].id == raw[0]["id"] and items[0].subject == "Pathology"
    assert all(i.reference_target == i.gold for i in items)
    assert Counter(i.gold for i in items) == {"A": 133, "B": 67, "D": 63, "C": 51}


def test_medmcqa_file_repeats_rows_ids_get_suffixes():
    path = shared_data("medmcqa", "psychosis.jsonl")
    raw = raw_rows(path)
    items = qa.load_items("MedMCQA", data_file=path)
    assert raw[7] == raw[84]  # the file holds the same question twice; both are scored
    assert (items[7].id, items[84].id) == (raw[7]["id"], raw[7]["id"] + "#2")
    assert sum(i.id.endswith("#2") for i in items) == 5


def test_medmcqa_subject_filter_on_the_psychosis_file():
    path = shared_data("medmcqa", "psychosis.jsonl")
    anatomy = sum(r["subject_name"] == "Anatomy" for r in raw_rows(path))
    items = qa.load_items("MedMCQA", name="anatomy", data_file=path)
    assert len(items) == anatomy == 21
    assert {i.subject for i in items} == {"Anatomy"}
    for whole in (None, "", "psychosis", "test/professional_psychology_test"):
        assert len(qa.load_items("MedMCQA", name=whole, data_file=path)) == 314


def test_medmcqa_unknown_subject_lists_the_subjects_of_that_set():
    path = shared_data("medmcqa", "subjects", "Psychiatry.jsonl")
    with pytest.raises(InputError) as err:
        qa.load_items("MedMCQA", name="Dermatology", data_file=path)
    assert str(path) in str(err.value) and "'Dermatology'" in str(err.value)
    assert str(err.value).endswith("subjects here: Psychiatry")


def test_pubmedqa_file_fields():
    path = shared_data("pubmedqa", "test_samples.jsonl")
    raw = raw_rows(path)
    items = qa.load_items("PubMedQA", data_file=path)
    assert sum(i.gold == "yes" for i in items) == 321
    assert qa.majority_baseline(items) == ("yes", 321 / 328)
    assert {i.gold for i in items} == {"yes", "no"}
    assert [n for n, i in enumerate(items) if i.gold == "no"] == [5, 12, 51, 136, 138, 274, 320]
    first = items[0]
    assert (first.id, first.options, first.reference_target) == (raw[0]["id"], {}, "yes")
    assert first.context == "\n".join(raw[0]["CONTEXTS"])
    assert sum(i.id.endswith("#2") for i in items) == 46  # 46 rows appear twice


def test_mmlu_file_fields_and_names():
    path = shared_data("mmlu", "medical_genetics_test.jsonl")
    items = qa.load_items("MMLU", data_file=path)  # subject taken from the file name
    thymine = items[2]
    assert (thymine.gold, thymine.gold_text, thymine.subject) == ("C", "thymine.", "medical_genetics")
    assert Counter(i.gold for i in items) == {"A": 30, "B": 26, "D": 24, "C": 20}
    for name in ("medical_genetics", "medical_genetics_test", "test/medical_genetics_test"):
        assert qa.load_items("MMLU", name=name, data_file=path) == items


# ---------------------------------------------------------------- hub schemas, injected loader

MEDMCQA_ROWS = [
    {"id": "m1", "question": "Z tracking technique is used in?", "opa": "Administering long acting "
     "antipsychotic", "opb": "Lithium monitoring", "opc": "Carbamazepine monitoring",
     "opd": "Nicotine patch", "cop": 1, "subject_name": "Psychiatry", "exp": None},
    {"id": "m2", "question": "Cricoid is a", "opa": "complete ring", "opb": "C ring", "opc": "plate",
     "opd": "none", "cop": 4, "subject_name": "Anatomy", "exp": "x"},
    {"id": "m3", "question": "Lithium toxicity?", "opa": "1", "opb": "2", "opc": "3", "opd": "4",
     "cop": 3, "subject_name": "Psychiatry", "exp": None},
]


def test_medmcqa_hub_cop_from_zero_matches_the_paper_file(tmp_path):
    paper = write_jsonl(tmp_path / "paper.jsonl", MEDMCQA_ROWS)
    hub = FakeHub([dict(r, cop=r["cop"] - 1) for r in MEDMCQA_ROWS])
    from_hub = qa.load_items("MedMCQA", hub_loader=hub)
    assert hub.calls == [("openlifescienceai/medmcqa", None, "validation")]
    assert from_hub == qa.load_items("MedMCQA", data_file=paper)
    assert [i.gold for i in from_hub] == ["A", "D", "C"]


def test_medmcqa_hub_subject_filter_and_unknown_subject():
    hub = FakeHub([dict(r, cop=r["cop"] - 1) for r in MEDMCQA_ROWS])
    assert [i.id for i in qa.load_items("MedMCQA", name="PSYCHIATRY", hub_loader=hub)] == ["m1", "m3"]
    with pytest.raises(InputError) as err:
        qa.load_items("MedMCQA", name="Skin", hub_loader=hub)
    assert "openlifescienceai/medmcqa" in str(err.value)
    assert "subjects here: Anatomy, Psychiatry" in str(err.value)


def test_medmcqa_hub_cop_out_of_range_suggests_the_paper_base():
    hub = FakeHub(MEDMCQA_ROWS)  # 1-4 where the hub counts from 0
    with pytest.raises(InputError) as err:
        qa.load_items("MedMCQA", hub_loader=hub)
    assert "row 2: field 'cop' is 4" in str(err.value) and "cop_base=1" in str(err.value)
    assert [i.gold for i in qa.load_items("MedMCQA", hub_loader=hub, cop_base=1)] == ["A", "D", "C"]


def test_pubmedqa_hub_nested_context():
    row = {"pubid": 21645374, "question": "Do mitochondria play a role in remodelling lace plant leaves?",
           "context": {"contexts": ["First part.", "Second part."], "labels": ["BACKGROUND", "RESULTS"],
                       "meshes": ["Plant Leaves"]},
           "long_answer": "Yes, they do.", "final_decision": "Yes"}
    hub = FakeHub([row, dict(row, pubid=7, final_decision="maybe")])
    items = qa.load_items("PubMedQA", hub_loader=hub)
    assert hub.calls == [("qiaojin/PubMedQA", "pqa_labeled", "train")]
    assert [(i.id, i.gold, i.gold_text) for i in items] == [
        ("21645374", "yes", "yes"), ("7", "maybe", "maybe")]
    assert items[0].context == "First part.\nSecond part." and items[0].options == {}


def test_mmlu_hub_choices_and_int_answer():
    rows = [{"question": "Which is a DNA base?", "subject": "college_medicine",
             "choices": ["uracil", "ribose", "thymine", "glucose"], "answer": 2},
            {"question": "Second?", "subject": "college_medicine", "choices": ["w", "x", "y", "z"],
             "answer": 0}]
    hub = FakeHub(rows)
    items = qa.load_items("MMLU", name="test/college_medicine_test", hub_loader=hub)
    assert hub.calls == [("cais/mmlu", "college_medicine", "test")]
    assert items[0].options == {"A": "uracil", "B": "ribose", "C": "thymine", "D": "glucose"}
    assert [(i.id, i.gold, i.gold_text, i.subject) for i in items] == [
        ("MMLU-0", "C", "thymine", "college_medicine"), ("MMLU-1", "A", "w", "college_medicine")]
    assert items[0].reference_target == "thymine"


def test_mmlu_hub_answer_out_of_range():
    hub = FakeHub([{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 4}])
    with pytest.raises(InputError, match=r"cais/mmlu \[anatomy\] split test: row 1: field 'answer' is 4"):
        qa.load_items("MMLU", name="anatomy", hub_loader=hub)


def test_mmlu_unknown_subset_lists_the_names():
    assert len(qa.MMLU_SUBJECTS) == len(set(qa.MMLU_SUBJECTS)) == 57
    with pytest.raises(InputError) as err:
        qa.load_items("MMLU", name="psychology", hub_loader=FakeHub([]))
    message = str(err.value)
    assert "'psychology'" in message and "college_medicine" in message and "world_religions" in message
    with pytest.raises(InputError, match="needs a subset name"):
        qa.load_items("MMLU", hub_loader=FakeHub([]))


def test_medqa_hub_same_schema():
    row = {"question": "Q?", "answer": "Gynecomastia", "answer_idx": "C", "meta_info": "step1",
           "options": {"A": "Agranulocytosis", "B": "Shortened QT interval", "C": "Gynecomastia",
                       "D": "Weight loss"}}
    hub = FakeHub([row])
    (item,) = qa.load_items("MedQA", hub_loader=hub)
    assert hub.calls == [("GBaker/MedQA-USMLE-4-options", None, "test")]
    assert (item.gold, item.reference_target) == ("C", "Gynecomastia")


def test_hub_failure_is_one_line_with_the_offline_way_out():
    def offline(path, name=None, split=None):
        raise ConnectionError("no route to huggingface.co")
    with pytest.raises(InputError, match=r"qiaojin/PubMedQA \[pqa_labeled\].*ConnectionError.*local data file"):
        qa.load_items("PubMedQA", hub_loader=offline)


# ---------------------------------------------------------------- bad input

MEDQA_ROW = {"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "B",
             "answer": "b"}


def test_missing_file_and_unknown_dataset(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InputError, match=f"{missing}: file not found"):
        qa.load_items("MedQA", data_file=missing)
    with pytest.raises(InputError, match="unknown dataset 'MedQA-USMLE'.*MedQA, MedMCQA, PubMedQA, MMLU"):
        qa.load_items("MedQA-USMLE", data_file=missing)


def without(row, key):
    return {k: v for k, v in row.items() if k != key}


MEDMCQA_ROW = MEDMCQA_ROWS[0]


@pytest.mark.parametrize("dataset,bad_row,needle", [
    ("MedQA", without(MEDQA_ROW, "answer_idx"), "row 3: field 'answer_idx' is missing"),
    ("MedQA", dict(MEDQA_ROW, answer_idx=""), "row 3: field 'answer_idx' must be a non-empty string"),
    ("MedQA", dict(MEDQA_ROW, answer_idx="E"), "row 3: field 'answer_idx' is 'E', not one of the option"),
    ("MMLU", without(MEDQA_ROW, "options"), "row 3: field 'options' (or 'choices') is missing"),
    ("MedMCQA", dict(MEDMCQA_ROW, cop=0), "row 3: field 'cop' is 0, outside 1-4 for cop_base=1"),
    ("MedMCQA", dict(MEDMCQA_ROW, cop=-1), "row 3: field 'cop' is -1, outside 1-4 for cop_base=1 (no gold"),
    ("MedMCQA", dict(MEDMCQA_ROW, cop=None), "row 3: field 'cop' is missing"),
    ("MedMCQA", dict(MEDMCQA_ROW, cop="B"), "row 3: field 'cop' must be an integer"),
    ("MedMCQA", without(MEDMCQA_ROW, "opc"), "row 3: field 'opc' is missing"),
    ("PubMedQA", {"QUESTION": "Q?", "CONTEXTS": [], "final_decision": ""},
     "row 3: field 'final_decision' is ''"),
    ("PubMedQA", {"QUESTION": "Q?", "final_decision": "unsure"},
     "row 3: field 'final_decision' is 'unsure', expected"),
    ("PubMedQA", {"CONTEXTS": ["c"], "final_decision": "yes"},
     "row 3: field 'QUESTION' (or 'question') is missing"),
])
def test_bad_row_names_file_row_and_field(tmp_path, dataset, bad_row, needle):
    good = {"MedQA": MEDQA_ROW, "MMLU": MEDQA_ROW, "MedMCQA": MEDMCQA_ROW,
            "PubMedQA": {"QUESTION": "Q?", "CONTEXTS": ["c"], "final_decision": "yes"}}[dataset]
    path = tmp_path / "set.jsonl"
    # a blank line 2: rows are named by their line number
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad_row) + "\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        qa.load_items(dataset, data_file=path)
    assert str(err.value).startswith(f"{path}: ") and needle in str(err.value)


def test_cop_out_of_range_suggests_the_other_base(tmp_path):
    path = write_jsonl(tmp_path / "hub_dump.jsonl", [dict(r, cop=r["cop"] - 1) for r in MEDMCQA_ROWS])
    with pytest.raises(InputError) as err:
        qa.load_items("MedMCQA", data_file=path)
    assert f"{path}: row 1: field 'cop' is 0" in str(err.value) and "use cop_base=0" in str(err.value)
    assert [i.gold for i in qa.load_items("MedMCQA", data_file=path, cop_base=0)] == ["A", "D", "C"]
    with pytest.raises(InputError, match="cop_base must be 0 or 1"):
        qa.load_items("MedMCQA", data_file=path, cop_base=2)


def test_bad_json_line_and_empty_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(MEDQA_ROW) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(InputError, match=f"{path}: line 2: not valid JSON"):
        qa.load_items("MedQA", data_file=path)
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(InputError, match=f"{path}: no rows"):
        qa.load_items("MedQA", data_file=path)


def test_jsonl_rows_end_at_newline_only(tmp_path):
    # U+2028, U+2029, U+0085 are valid raw inside JSON strings; str.splitlines() would cut there
    rows = [dict(MEDQA_ROW, question=f"Q{char}two") for char in ("\u2028", "\u2029", "\u0085")]
    path = tmp_path / "raw.jsonl"
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode("utf-8"))
    items = qa.load_items("MedQA", data_file=path)
    assert [i.question for i in items] == [r["question"] for r in rows]


def test_json_list_and_csv_files(tmp_path):
    listed = tmp_path / "set.json"
    listed.write_text(json.dumps([MEDQA_ROW, dict(MEDQA_ROW, answer_idx="D", answer="d")]), encoding="utf-8")
    assert [i.gold for i in qa.load_items("MedQA", data_file=listed)] == ["B", "D"]
    table = tmp_path / "set.csv"
    table.write_text("id,question,opa,opb,opc,opd,cop,subject_name\n"
                     "x1,Q one?,a,b,c,d,2,Anatomy\nx2,\"Q, two?\",a,b,c,d,4,Anatomy\n", encoding="utf-8")
    items = qa.load_items("MedMCQA", data_file=table)
    assert [(i.id, i.question, i.gold) for i in items] == [("x1", "Q one?", "B"), ("x2", "Q, two?", "D")]


def test_parquet_file(tmp_path):
    import pyarrow  # installed with `datasets` (requirements.txt): a broken install fails here, never skips
    import pyarrow.parquet as pq
    path = tmp_path / "set.parquet"
    pq.write_table(pyarrow.Table.from_pylist([dict(r, cop=r["cop"] - 1) for r in MEDMCQA_ROWS]), path)
    assert [i.gold for i in qa.load_items("MedMCQA", data_file=path, cop_base=0)] == ["A", "D", "C"]


def test_rows_to_items_directly():
    items = qa.rows_to_items("MedQA", [MEDQA_ROW, MEDQA_ROW], "inline", cop_base=1)
    assert [i.id for i in items] == ["MedQA-0", "MedQA-1"]


# ---------------------------------------------------------------- prompts and baseline

RISPERIDONE = QAItem("MedQA-0", "This patient is at increased risk for which adverse effect?",
                     {"A": "Agranulocytosis", "B": "Shortened QT interval", "C": "Gynecomastia",
                      "D": "Weight loss"}, "C", "Gynecomastia", "Gynecomastia")
NMS = QAItem("MedQA-11", "What is the most likely diagnosis?",
             {"A": "Catatonic schizophrenia", "B": "Heat stroke", "C": "Neuroleptic malignant syndrome",
              "D": "Oversedation"}, "C", "Neuroleptic malignant syndrome", "Neuroleptic malignant syndrome")
GENETICS = QAItem("MMLU-1", "Expected frequency of affected females?",
                  {"A": "0.01", "B": "0.001", "C": "0.02", "D": "0.0001"}, "A", "0.01", "0.01")
# MedMCQA: reference_target is the gold letter (the reference's quirk)
Z_TRACK = QAItem("m1", "Z tracking technique is used in?",
                 {"A": "Administering long acting antipsychotic", "B": "Lithium monitoring",
                  "C": "Carbamazepine monitoring", "D": "Nicotine patch"}, "A",
                 "Administering long acting antipsychotic", "A")
WHO_GAP = QAItem("m2", "Provision of WHO mental action gap are all, except:",
                 {"A": "Human rights", "B": "Communication regarding care and career",
                  "C": "Screening family members", "D": "Social support"}, "C", "Screening family members", "C")
DELUSION = QAItem("m3", "A patient believes he is the most important person ... the delusion is",
                  {"A": "Delusion of grandiosity", "B": "Delusion of persecution",
                   "C": "Delusion of grandiosity and persecution",
                   "D": "Delusion of grandiosity, persecution and reference"}, "D",
                  "Delusion of grandiosity, persecution and reference", "D")

# Real MedMCQA options that start like a letter answer.
ENZYME = QAItem("m4", "A competitive inhibitor causes", {"A": "Decrease in Vmax", "B": "A.Decrease in Km",
                "C": "Increase in both Km and Vmax", "D": "No change in Vmax"}, "B", "A.Decrease in Km", "B")
AFFINITY = QAItem("m5", "Km of an enzyme indicates", {"A": "Purity of Enzyme", "B": "Physiological role",
                  "C": "The substrate concentration at half maximal velocity", "D": "Aﬃnity"},
                  "D", "Aﬃnity", "D")


def decision(gold):
    return QAItem(f"p-{gold}", "Are sleep spindles related to schizotypy?", {}, gold, gold, gold,
                  context="Background.\nResults.")


YES, NO, MAYBE = decision("yes"), decision("no"), decision("maybe")


def test_render_prompt(tmp_path):
    (tmp_path / "qa_choice.txt").write_text("{question}\nOptions:\n{options}\nOnly the letter.\n")
    (tmp_path / "qa_decision.txt").write_text("{context}{question}\nYes, No or Maybe?\n")
    prompts = Prompts(tmp_path)
    assert qa.render_prompt(RISPERIDONE, prompts) == (
        "This patient is at increased risk for which adverse effect?\nOptions:\nA. Agranulocytosis\n"
        "B. Shortened QT interval\nC. Gynecomastia\nD. Weight loss\nOnly the letter.")
    assert qa.render_prompt(YES, prompts) == "Are sleep spindles related to schizotypy?\nYes, No or Maybe?"
    assert qa.render_prompt(YES, prompts, with_context=True) == (
        "Context:\nBackground.\nResults.\n\nAre sleep spindles related to schizotypy?\nYes, No or Maybe?")


def test_benchmarks_table():
    assert list(qa.BENCHMARKS) == ["MedQA", "MedMCQA", "PubMedQA", "MMLU"]
    assert {b.template for b in qa.BENCHMARKS.values()} == {"qa_choice", "qa_decision"}
    assert [b.kind for b in qa.BENCHMARKS.values()] == ["choice", "choice", "decision", "choice"]


def test_majority_baseline_ties_and_empty():
    assert qa.majority_baseline([RISPERIDONE, NMS, GENETICS, Z_TRACK]) == ("A", 0.5)  # A 2, C 2
    assert qa.majority_baseline([DELUSION]) == ("D", 1.0)
    with pytest.raises(ValueError):
        qa.majority_baseline([])


# ---------------------------------------------------------------- rule R (faithful)

@pytest.mark.parametrize("output,item,correct", [
    ("C", RISPERIDONE, True),
    ("C.", RISPERIDONE, True),
    ("C. Gynecomastia", RISPERIDONE, True),
    ("The answer is C.", RISPERIDONE, False),  # has a ".": first character "T" is compared
    ("Answer: C", RISPERIDONE, False),  # no ".": neither is a substring of the other
    ("(C)", RISPERIDONE, False),
    ("**C**", RISPERIDONE, False),
    ("c", RISPERIDONE, False),  # case-sensitive letter
    ("Gynecomastia", RISPERIDONE, True),  # the answer text itself
    ("gynecomastia", RISPERIDONE, False),  # case-sensitive substring
    ("mast", RISPERIDONE, True),  # any substring of the answer text counts
    ("C) Gynecomastia", RISPERIDONE, True),  # no ".": the answer text is inside the output
    ("", RISPERIDONE, True),  # empty output: "" is a substring of anything
    ("  \n ", RISPERIDONE, True),
    ("A 26-year-old man should receive C", RISPERIDONE, False),
    ("D. Weight loss\n\nThe correct answer is: D. Weight loss", RISPERIDONE, False),
    ("A. Catatonic schizophrenia\n\nThe correct answer is D. Oversedation. The patient is not ...", NMS, False),
    ("0.01", GENETICS, False),  # the right value, but its "." sends it to the first-character branch
    ("Both B and C", WHO_GAP, True),  # MedMCQA compares with the gold LETTER: "C" occurs
    ("Both B and C", Z_TRACK, False),
    ("Communication regarding care and career", WHO_GAP, True),  # a wrong option holding a "C"
    ("Screening family members", WHO_GAP, False),  # the gold text, but no capital C in it
    ("Delusion of persecution", DELUSION, True),  # starts with the gold letter D
    ("Yes", YES, True),
    ("YES", YES, True),
    ("Yes.", YES, True),
    ("No, not really.", NO, True),
    ("No, not really.", YES, False),
    ("yes and no", YES, False),  # both words: wrong whatever the gold
    ("Maybe.", MAYBE, True),
    ("Maybe yes", MAYBE, True),
    ("Maybe yes", YES, True),
    ("Yes, it is known to be so.", YES, False),  # "no" inside "known"
    ("I don't know", NO, True),  # "no" inside "know"
    ("Nope", NO, True),
    ("", YES, False),
    ("Yes, I will answer without explanation. No", YES, False),  # only the text after "explanation."
    ("Yes, I will answer without explanation. No", NO, True),
    ("Explanation. No", NO, True),  # capital E: not cut, still correct
    ("Yes.\nExplanation. Not always.", YES, False),  # not cut (case-sensitive), "no" in "Not"
])
def test_score_reference(output, item, correct):
    assert qa.score_reference(output, item) is correct


# ---------------------------------------------------------------- robust extraction

@pytest.mark.parametrize("output,item,answer", [
    ("C", RISPERIDONE, "C"),
    ("C.", RISPERIDONE, "C"),
    ("(C)", RISPERIDONE, "C"),
    ("(d)", RISPERIDONE, "D"),
    ("a", RISPERIDONE, "A"),
    ("\"C\"", RISPERIDONE, "C"),
    ("C) Gynecomastia", RISPERIDONE, "C"),
    ("C: Gynecomastia", RISPERIDONE, "C"),
    ("C - Gynecomastia", RISPERIDONE, "C"),
    ("C. Gynecomastia", RISPERIDONE, "C"),
    ("Answer: C", RISPERIDONE, "C"),
    ("Answer:\nD", RISPERIDONE, "D"),
    ("The answer is C.", RISPERIDONE, "C"),
    ("The correct option is: C", RISPERIDONE, "C"),
    ("**C**", RISPERIDONE, "C"),
    ("**Answer:** B", RISPERIDONE, "B"),
    ("Correct answer: **B**", RISPERIDONE, "B"),
    ("Option C", RISPERIDONE, "C"),
    ("the answer is (c)", RISPERIDONE, "C"),
    ("Answer - (B)", RISPERIDONE, "B"),
    ("The answer is option (d)", RISPERIDONE, "D"),
    ("Gynecomastia", RISPERIDONE, "C"),
    ("gynecomastia.", RISPERIDONE, "C"),
    ("The patient is at increased risk for gynecomastia due to hyperprolactinemia.", RISPERIDONE, "C"),
    ("The answer is a tricky one, but gynecomastia.", RISPERIDONE, "C"),  # "a" is an article
    ("B) Shortened QT interval\nExplanation: risperidone prolongs ...", RISPERIDONE, "B"),
    # an explicit statement wins over a leading letter
    ("D. Weight loss\n\nThe correct answer is: D. Weight loss", RISPERIDONE, "D"),
    ("A. Catatonic schizophrenia\n\nThe correct answer is D. Oversedation. The patient is not ...", NMS, "D"),
    # the first statement wins: small models run on into made-up questions
    ("Answer: C\n\nQuestion: A 45-year-old woman has ... Answer: B", RISPERIDONE, "C"),
    ("The correct answer is (D) Oversedation", NMS, "D"),
    ("Neuroleptic malignant syndrome (NMS) is the most likely diagnosis.", NMS, "C"),
    ("A 26-year-old man should receive C", RISPERIDONE, "C"),  # leading "A" is the article
    ("A patient on risperidone may develop this.", RISPERIDONE, None),
    ("I'd go with C", RISPERIDONE, "C"),
    ("Both B and C", Z_TRACK, None),  # two letters, no statement: ambiguous
    ("The best option is B because lithium needs levels.", Z_TRACK, "B"),
    ("Nicotine patch", Z_TRACK, "D"),
    ("0.01", GENETICS, "A"),
    ("0.0001.", GENETICS, "D"),
    ("Delusion of grandiosity and persecution", DELUSION, "C"),  # exact text beats a shorter one inside
    ("He has a delusion of grandiosity, persecution and reference.", DELUSION, "D"),  # longest wins
    ("A.Decrease in Km", ENZYME, "B"),  # exactly an option's text: not the letter A
    ("Aﬃnity", AFFINITY, "D"),  # "A" then a ligature is a word, not a letter
    ("Vitamin B12 deficiency", RISPERIDONE, None),
    ("The answer is not listed.", RISPERIDONE, None),
    ("I am not sure.", RISPERIDONE, None),
    ("", RISPERIDONE, None),
    ("Yes", YES, "yes"),
    ("YES.", NO, "yes"),
    ("No, not really.", YES, "no"),
    ("yes and no", YES, "yes"),
    ("Maybe.", MAYBE, "maybe"),
    ("**Maybe**", MAYBE, "maybe"),
    ("Answer: No. Yes, some studies suggest a link.", NO, "no"),  # the statement wins
    ("Yes, some studies agree, but the answer is maybe.", MAYBE, "maybe"),
    ("Explanation. The answer is no", NO, "no"),
    ("Nope", NO, None),
    ("I don't know", NO, None),
    ("Yesterday it was unclear.", YES, None),
    ("", YES, None),
])
def test_extract_answer(output, item, answer):
    assert qa.extract_answer(output, item) == answer
