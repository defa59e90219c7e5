"""IMHI_eval.py end to end: hand-made answer folders scored exactly by both rule sets, the oracle on
every shared file, generation with resume through a scripted backend, bad input, a tiny classifier,
a tiny BART (seq2seq generation and BART-score), the text metrics, and one run of the embedded model."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import ROOT, ScriptedBackend, assert_same_up_to_a_tie, embedded_tokenizer, make_tiny_llama, shared_data

import IMHI_eval as ev
from mentalarena.evaluation import imhi
from mentalarena.errors import ModelCallError
from mentalarena.store.jsonl import read_jsonl
from mentalarena.engines.seq2seq_backend import Seq2SeqBackend, target_log_likelihood

SAMPLE_DIR = ROOT / "data" / "imhi_sample"
YES = "Yes, the poster suffers from stress. Reasoning: deadlines."
NO = "No, the poster does not suffer from stress. Reasoning: a calm post."
# gold 1, 0, 1, 0. Reference: 1, 0 ("no" in "not"), 0 ("no" in "know"), 1 ("yes" in "eyes");
# fixed: 1, 0, OOD -> 0, 0 ("No" stated first, "eyes" is no "yes").
DREADDIT = [(YES, "Yes, the poster suffers from stress."), (NO, "The poster does not suffer from stress."),
            (YES, "I don't know."), (NO, "No, she only rests her eyes.")]
# gold 6 (instruction wording the reference cannot read: dropped there), 4, 0.
# Reference: OOD ("emotion turmoil" is no "emotional"), 4 ("work" in "homework"), 0; fixed: 6, 0, 0.
SAD = [("This post shows the stress cause related to emotion turmoil. Reasoning: a",
        "This post shows the stress cause related to emotion turmoil."),
       ("This post shows the stress cause related to work. Reasoning: b", "The stress comes from homework."),
       ("This post shows the stress cause related to school. Reasoning: c",
        "This post shows the stress cause related to school.")]


def _generated_dir(path, files: dict[str, list[tuple[str, str]]]):
    for name, pairs in files.items():
        imhi.write_generated_csv(path / f"{name}.csv", [g for g, _ in pairs], [t for _, t in pairs])
    return path


def _results(out_dir, dataset: str) -> dict:
    return json.loads(next(out_dir.rglob(f"{dataset}.results.json")).read_text())


def _main(*argv) -> int:
    return ev.main([str(a) for a in argv] + ["--progress", "False"])


# ---------------------------------------------------------------------------------- scoring only
def test_hand_made_answers_score_exactly_under_both_rule_sets(tmp_path):
    folder = _generated_dir(tmp_path / "answers", {"dreaddit": DREADDIT, "SAD": SAD})
    (folder / "notes.txt").write_text("not a CSV: skipped")
    assert _main("--generated_dir", folder, "--output_dir", tmp_path / "out") == 0
    dreaddit, sad = _results(tmp_path / "out", "dreaddit"), _results(tmp_path / "out", "SAD")
    # reference: 2 of 4 right; F1 yes 2*1/(2+2), no 2*1/(2+2)
    assert dreaddit["scores"]["reference"] == {"accuracy": 50.0, "weighted_f1": 50.0, "micro_f1": 50.0,
                                               "macro_f1": 50.0, "ood": 0, "dropped": 0, "n": 4}
    # fixed: 3 of 4; F1 no 2*2/(3+2) = 0.8, yes 2*1/(1+2) = 2/3 -> weighted and macro 0.7333
    assert dreaddit["scores"]["fixed"] == {"accuracy": 75.0, "weighted_f1": 73.33, "micro_f1": 75.0,
                                           "macro_f1": 73.33, "ood": 1, "dropped": 0, "n": 4}
    assert sad["scores"]["reference"] == {"accuracy": 100.0, "weighted_f1": 100.0, "micro_f1": 100.0,
                                          "macro_f1": 100.0, "ood": 1, "dropped": 1, "n": 2}
    # fixed: gold 6, 4, 0 vs 6, 0, 0 -> F1 6: 1, 4: 0, 0: 2/3 -> weighted = macro = 5/9
    assert sad["scores"]["fixed"] == {"accuracy": 66.67, "weighted_f1": 55.56, "micro_f1": 66.67,
                                      "macro_f1": 55.56, "ood": 0, "dropped": 0, "n": 3}
    assert any("SAD: 1 golden" in w for w in sad["warnings"])
    # majority of 6, 4, 0: a three-way tie, the smaller id (school) wins; F1 school 2*1/(1+3)
    assert sad["majority_baseline"]["label_name"] == "school" and sad["majority_baseline"]["weighted_f1"] == 16.67
    report = (tmp_path / "out" / "answers" / "report.md").read_text()
    assert "| – | dreaddit | 4 | 50.00 | 50.00 | 50.00 | 0 | 0 | 75.00 | 73.33 | 73.33 | 1 | 50.00 | 33.33 |" in report
    assert "| – | SAD | 3 | 100.00 | 100.00 | 100.00 | 1 | 1 | 66.67 | 55.56 | 55.56 | 0 | 33.33 | 16.67 |" in report
    # the figure beside the report, named in it, drawn from the table's numbers
    figure = tmp_path / "out" / "answers" / "report_scores.png"
    assert figure.read_bytes().startswith(b"\x89PNG") and figure.stat().st_size > 5000
    assert "![IMHI scores](report_scores.png)" in report
    rows = sorted((_results(tmp_path / "out", d) for d in ("dreaddit", "SAD")), key=lambda r: r["dataset"])
    f1, accuracy = ev.figure_panels(rows)
    assert f1["groups"] == accuracy["groups"] == ["SAD", "dreaddit"]
    assert [(s["label"], s["values"]) for s in f1["series"]] == [
        ("reference", {"SAD": 100.0, "dreaddit": 50.0}), ("fixed", {"SAD": 55.56, "dreaddit": 73.33}),
        ("published: MentaLLaMA-chat-13B (classifier)", {"SAD": 63.62, "dreaddit": 75.79})]
    assert [(s["label"], s["values"]) for s in accuracy["series"]] == [
        ("reference", {"SAD": 100.0, "dreaddit": 50.0}), ("fixed", {"SAD": 66.67, "dreaddit": 75.0})]
    assert f1["baseline"] == {"SAD": 16.67, "dreaddit": 33.33}
    assert accuracy["baseline"] == {"SAD": 33.33, "dreaddit": 50.0}


def test_figure_with_several_models_test_sets_and_missing_scores(tmp_path):
    def result(model, test_set, dataset, scores, majority=None):
        return {"model": model, "test_set": test_set, "dataset": dataset, "rows": 3, "answered": 3 if scores else 0,
                "complete": bool(scores), "missing_answers": 0 if scores else 3, "scores": scores,
                **({"majority_baseline": majority} if majority else {})}

    rows = [result("a", "IMHI", "CAMS", {"fixed": {"accuracy": 40.0, "weighted_f1": 30.5}},
                   {"accuracy": 50.0, "weighted_f1": 33.0}),
            result("a", "expert", "CAMS", {"fixed": {"accuracy": 10.0, "weighted_f1": None}}),
            result("b", "IMHI", "CAMS", {}),  # nothing answered yet: no scores, no majority baseline
            result("b", "IMHI", "swmh", {"reference": {"accuracy": 20.0, "weighted_f1": 12.25}})]
    for i, row in enumerate(rows):
        (tmp_path / f"{i}.results.json").write_text(json.dumps(row))
    report = ev.report(str(tmp_path))
    assert (tmp_path / "report_scores.png").stat().st_size > 0 and "report_scores.png" in report
    f1, accuracy = ev.figure_panels(rows)
    assert f1["groups"] == ["IMHI/CAMS", "expert/CAMS", "IMHI/swmh"]
    assert [(s["label"], s["values"]) for s in f1["series"]] == [
        ("a: reference", {"IMHI/CAMS": None, "expert/CAMS": None}),
        ("b: reference", {"IMHI/CAMS": None, "IMHI/swmh": 12.25}),
        ("a: fixed", {"IMHI/CAMS": 30.5, "expert/CAMS": None}),
        ("b: fixed", {"IMHI/CAMS": None, "IMHI/swmh": None}),
        # the published numbers are IMHI test set ones: none for the expert set
        ("published: MentaLLaMA-chat-13B (classifier)", {"IMHI/CAMS": 45.52, "IMHI/swmh": 71.70})]
    assert f1["baseline"] == {"IMHI/CAMS": 33.0, "expert/CAMS": None, "IMHI/swmh": None}
    assert accuracy["series"][2]["values"] == {"IMHI/CAMS": 40.0, "expert/CAMS": 10.0}


def test_one_rule_set_datasets_and_limit(tmp_path):
    folder = _generated_dir(tmp_path / "answers", {"dreaddit": DREADDIT, "SAD": SAD})
    assert _main("--generated_dir", folder, "--output_dir", tmp_path / "out", "--rules", "fixed",
                 "--datasets", "dreaddit", "--limit", 2) == 0
    assert [p.name for p in (tmp_path / "out" / "answers").glob("*.results.json")] == ["dreaddit.results.json"]
    result = _results(tmp_path / "out", "dreaddit")
    assert list(result["scores"]) == ["fixed"] and result["scores"]["fixed"]["accuracy"] == 100.0
    assert result["rows"] == 2


@pytest.mark.parametrize("folder", ["test_instruction", "test_complete", "expert"])
def test_oracle_through_the_cli_on_every_shared_file(folder, tmp_path):
    answers = tmp_path / folder
    files = sorted(shared_data("imhi", folder).glob("*.csv"))
    for path in files:
        goldens = [row["golden"] for row in imhi.read_imhi_csv(path)]
        imhi.write_generated_csv(answers / path.name, goldens, goldens)
    assert _main("--generated_dir", answers, "--output_dir", tmp_path / "out") == 0
    for path in files:
        result = _results(tmp_path / "out", path.stem)
        fixed, reference = result["scores"]["fixed"], result["scores"]["reference"]
        assert (fixed["accuracy"], fixed["weighted_f1"], fixed["ood"], fixed["dropped"]) == (100.0, 100.0, 0, 0)
        # the reference reads back every golden it can read; it drops (here: would crash on) only
        # the instruction wordings of CAMS and SAD
        assert reference["accuracy"] == 100.0 and reference["weighted_f1"] == 100.0, path
        expected_drops = {"CAMS": 107, "SAD": 142} if folder == "test_instruction" else {}
        if folder != "expert":
            assert reference["dropped"] == expected_drops.get(path.stem, 0), path
        assert reference["n"] + reference["dropped"] == result["rows"]


# ---------------------------------------------------------------------------------- generation
class RawScripted(ScriptedBackend):
    """Scripted answers through `stream`, raw prompts included; may fail chosen rows."""

    def __init__(self, rules, fail=()):
        super().__init__(rules)
        self.fail = set(fail)
        self.chat_flags: list[bool] = []
        self.asked: list = []

    def stream(self, conversations, seeds=None, chat=True):
        self.chat_flags.append(chat)
        for index, conversation in enumerate(conversations):
            self.asked.append(conversation)
            messages = conversation if chat else [{"role": "user", "content": conversation}]
            if any(needle in messages[-1]["content"] for needle in self.fail):
                yield index, ModelCallError("scripted failure")
            else:
                yield index, self.generate([messages])[0]


def _sample_rows(name: str) -> list[dict]:
    return imhi.read_imhi_csv(SAMPLE_DIR / f"{name}.csv")


def _oracle_rules() -> list[tuple[str, str]]:
    return [(row["query"], row["golden"]) for name in ("CAMS", "dreaddit") for row in _sample_rows(name)]


@pytest.fixture()
def scripted(monkeypatch):
    """Every backend the CLI builds is the next scripted one of the list."""
    backends: list[RawScripted] = []
    monkeypatch.setattr(ev, "_backend", lambda settings, batch_size, device, *served: backends.pop(0))
    monkeypatch.setattr(ev, "is_encoder_decoder", lambda model: False)  # no hub look-up for "scripted/model"
    return backends


def test_generation_resumes_and_rewrites_the_csv(scripted, tmp_path):
    rows = _sample_rows("dreaddit")
    failing = RawScripted(_oracle_rules(), fail={rows[1]["query"], rows[4]["query"]})
    full, idle = RawScripted(_oracle_rules()), RawScripted(_oracle_rules())
    scripted += [failing, full, idle]
    argv = ["--model", "scripted/model", "--datasets", "dreaddit", "--output_dir", tmp_path]
    assert _main(*argv) == 1  # incomplete
    out = tmp_path / "scripted--model" / "IMHI"
    first = _results(tmp_path, "dreaddit")
    assert (first["complete"], first["answered"], first["missing_answers"], first["failed_requests"]) == (False, 4, 2, 2)
    assert failing.chat_flags == [False] and failing.asked == [row["query"] for row in rows]  # raw queries
    assert imhi.read_generated_csv(out / "generated" / "dreaddit.csv")[0] == [
        rows[i]["golden"] for i in (0, 2, 3, 5)]
    assert _main(*argv) == 0
    assert full.asked == [rows[1]["query"], rows[4]["query"]]  # only the missing rows
    goldens, generated = imhi.read_generated_csv(out / "generated" / "dreaddit.csv")
    assert goldens == generated == [row["golden"] for row in rows]  # in row order, each once
    samples = read_jsonl(out / "dreaddit.samples.jsonl")
    assert len(samples) == 6 and len({s["key"] for s in samples}) == 6
    csv_bytes = (out / "generated" / "dreaddit.csv").read_bytes()
    assert _main(*argv) == 0 and idle.asked == []
    assert (out / "generated" / "dreaddit.csv").read_bytes() == csv_bytes  # rewritten, not appended
    result = _results(tmp_path, "dreaddit")
    assert result["complete"] and result["scores"]["fixed"]["accuracy"] == 100.0
    assert result["settings"]["prompting"] == "raw" and result["settings"]["max_new_tokens"] is None


def test_chat_prompting_other_settings_and_an_edited_row(scripted, tmp_path):
    backend = RawScripted(_oracle_rules())
    scripted.append(backend)
    argv = ["--model", "scripted/model", "--datasets", "CAMS", "--output_dir", tmp_path, "--prompting", "chat"]
    assert _main(*argv) == 0
    assert backend.chat_flags == [True] and backend.asked[0] == [{"role": "user", "content": _sample_rows("CAMS")[0]["query"]}]
    result = _results(tmp_path, "CAMS")
    assert result["scores"]["reference"]["dropped"] == 1 and result["scores"]["fixed"]["accuracy"] == 100.0
    assert _main(*argv, "--max_new_tokens", 8) == 2  # other settings never mix, and stop before any model loads
    # a test file whose row changed: only that row is asked again
    edited = tmp_path / "edited"
    edited.mkdir()
    text = (SAMPLE_DIR / "CAMS.csv").read_text().replace("laid off in March", "laid off in May")
    (edited / "CAMS.csv").write_text(text)
    again = RawScripted([(r["query"].replace("March", "May"), r["golden"]) for r in _sample_rows("CAMS")])
    scripted.append(again)
    assert _main(*argv, "--test_dir", edited) == 0
    assert len(again.asked) == 1 and "laid off in May" in again.asked[0][0]["content"]


def test_all_test_sets_from_one_command(scripted, tmp_path):
    backend = RawScripted([])
    backend.default = "Yes."
    scripted.append(backend)
    assert _main("--model", "scripted/model", "--test_dataset", "all", "--test_dir", shared_data("imhi"),
                 "--limit", 1, "--output_dir", tmp_path) == 0
    folders = {p.parent.name: sorted(x.stem.split(".")[0] for x in p.parent.glob("*.results.json"))
               for p in (tmp_path / "scripted--model").rglob("*.results.json")}
    assert folders == {"IMHI": ["CAMS", "DR", "SAD", "dreaddit", "loneliness", "t-sid"],
                       "IMHI-completion": ["CAMS", "DR", "SAD", "t-sid"],
                       "expert": sorted(imhi.DATASETS)}
    assert len(backend.asked) == 19
    report = (tmp_path / "scripted--model" / "report.md").read_text()
    assert "| IMHI-completion | t-sid | 1 |" in report and "| expert | swmh | 1 |" in report


def test_a_local_answer_may_run_until_prompt_and_answer_fill_2048_tokens(tmp_path, monkeypatch):
    """The reference's generate(max_length=2048) on a causal model: prompt + answer <= 2048 tokens, so a
    row of L prompt tokens may get exactly 2048 - L new ones. A tiny Llama of 4096 positions (its own
    limit is not the one met) that never ends on its own (EOS taken away), and two long raw prompts."""
    import csv

    tokenizer = embedded_tokenizer()
    model = make_tiny_llama(tmp_path / "tiny", tokenizer, max_position_embeddings=4096)
    head, tail = "Consider this post: ", " Question: Does the poster suffer from stress?"
    queries = [head + "word " * n + tail for n in (1990, 2030)]
    lengths = [len(tokenizer(q, add_special_tokens=True)["input_ids"]) for q in queries]
    assert 1990 < lengths[0] < lengths[1] < 2048  # so each answer gets a different, small budget
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    with open(test_dir / "dreaddit.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["query", "gpt-3.5-turbo"])
        writer.writerows([q, "Yes, the poster suffers from stress. Reasoning: long."] for q in queries)
    real = ev._backend

    def never_ending(settings, batch_size, device, *served):  # the window, not an EOS, must end each answer
        chat = real(settings, batch_size, device, *served)
        chat.eos_ids = set()
        return chat

    monkeypatch.setattr(ev, "_backend", never_ending)
    (result,) = ev.run(model=model, test_dir=str(test_dir), batch_size=2, dtype="float32", device="cpu",
                       output_dir=str(tmp_path / "out"), progress=False)
    assert result["complete"] and result["settings"]["max_new_tokens"] is None  # the reference's default
    samples = read_jsonl(next((tmp_path / "out").rglob("dreaddit.samples.jsonl")))
    by_row = {s["row"]: s for s in samples}
    assert [by_row[i]["prompt_tokens"] for i in (0, 1)] == lengths
    assert [by_row[i]["completion_tokens"] for i in (0, 1)] == [2048 - n for n in lengths]


@pytest.mark.parametrize("make, argv, needle", [
    (lambda d: (d / "DR.csv").write_text("query,answer\nq,yes\n"), ["--test_dir", "{d}"], 'column "gpt-3.5-turbo" is missing'),
    (lambda d: (d / "DR.csv").write_text("goldens,text\nyes.,yes\n"), ["--generated_dir", "{d}"], 'column "generated_text"'),
    (lambda d: None, ["--test_dir", "{d}"], "no CSV files, and no test_instruction/"),
    (lambda d: None, ["--generated_dir", "{d}"], "no CSV files"),
    (lambda d: None, ["--datasets", "CAMS,foo"], "unknown IMHI dataset 'foo' (known: CAMS, DR,"),
    (lambda d: None, ["--datasets", "SAD"], "no SAD.csv (found: CAMS.csv, dreaddit.csv)"),
    (lambda d: (d / "notes.csv").write_text("query,gpt-3.5-turbo\nq,yes\n"), ["--test_dir", "{d}"], "unknown IMHI dataset 'notes'"),
    (lambda d: None, ["--test_dataset", "IMHI-complete"], "--test_dataset must be one of"),
    (lambda d: None, ["--test_dataset", "IMHI,expert"], "holds CSV files itself"),
    (lambda d: None, ["--rules", "loose"], "--rules must be one of reference, fixed"),
    (lambda d: None, ["--prompting", "fancy"], "--prompting must be one of raw, chat"),
    (lambda d: None, ["--model", "gpt-4o", "--prompting", "raw"], "--prompting raw needs a local model"),
    (lambda d: None, ["--explanation_metrics", "bart"], "needs --bart_model"),
    (lambda d: None, ["--explanation_metrics", "meteor"], "--explanation_metrics must be one of"),
    (lambda d: None, ["--label_model_dir", "{d}"], "no classifier for CAMS"),
    (lambda d: None, ["--limit", "0"], "--limit must be a whole number of at least 1, not 0"),
    (lambda d: None, ["report", "--output_dir", "{d}"], "no *.results.json"),
])
def test_bad_input_is_one_line_and_exit_2(make, argv, needle, tmp_path, capsys):
    make(tmp_path)
    assert ev.main([a.format(d=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


# ---------------------------------------------------------------------------------- classifiers
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"yes no the poster suffers from stress this post shows "
         "reasoning depression ptsd suicide mental disorders".split(), *"abcdefghijklmnopqrstuvwxyz.,"]


def _tiny_bert(folder, num_labels: int, always: int | None = None):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=512, num_labels=num_labels)
    model = BertForSequenceClassification(config)
    if always is not None:  # a classifier that always answers one id
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.nn.functional.one_hot(torch.tensor(always), num_labels) * 5.0)
    model.save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}, model_max_length=512).save_pretrained(folder)
    return folder


TSID = [("This post shows no mental disorders. Reasoning: a", "no mental disorders " * 300),  # > 512 tokens
        ("This post shows no mental disorders. Reasoning: b", "the poster"),
        ("This post shows depression. Reasoning: c", "depression"),
        ("This post shows PTSD. Reasoning: d", "")]


def test_classifier_labels_follow_the_reference_id_order(tmp_path):
    classifiers = tmp_path / "classifiers"
    _tiny_bert(classifiers / "t-sid", 4, always=3)  # t-sid id 3 is "control": rule label 0
    _tiny_bert(classifiers / "dreaddit", 2, always=1)  # yes
    folder = _generated_dir(tmp_path / "answers", {"t-sid": TSID, "dreaddit": DREADDIT})
    assert _main("--generated_dir", folder, "--output_dir", tmp_path / "out", "--label_model_dir", classifiers) == 0
    # t-sid: gold 0, 0, 2, 3, all predicted 0 -> F1 0: 2*2/(2+4), others 0; weighted 2/3*2/4, macro 2/3/3
    assert _results(tmp_path / "out", "t-sid")["scores"]["classifier"] == {
        "accuracy": 50.0, "weighted_f1": 33.33, "micro_f1": 50.0, "macro_f1": 22.22, "ood": 0, "dropped": 0, "n": 4}
    # dreaddit: gold 1, 0, 1, 0, all predicted yes -> F1 yes 2*2/(2+4)
    assert _results(tmp_path / "out", "dreaddit")["scores"]["classifier"]["weighted_f1"] == 33.33
    report = (tmp_path / "out" / "answers" / "report.md").read_text()
    assert "classifier w-F1" in report and "| 50.00 | 33.33 | 22.22 |" in report


# Completion wording "none" is unread by label_inference.py's gold keywords ("no causes"): dropped there.
CAMS = [("none. Reasoning: a", "none"), ("This post shows no causes of depression. Reasoning: b", "none"),
        ("jobs and career. Reasoning: c", "the poster"), ("medication. Reasoning: d", "no")]


def test_classifier_goldens_are_read_by_each_rule_set(tmp_path):
    classifiers = tmp_path / "classifiers"
    _tiny_bert(classifiers / "CAMS", 6, always=0)  # "none"
    folder = _generated_dir(tmp_path / "answers", {"CAMS": CAMS})
    assert _main("--generated_dir", folder, "--output_dir", tmp_path / "out", "--label_model_dir", classifiers) == 0
    results = _results(tmp_path / "out", "CAMS")
    # reference goldens 0, 2, 3 (row 1 dropped), all predicted 0: F1 of 0 is 2*1/(1+3) -> weighted and macro 0.5/3
    assert results["scores"]["classifier"] == {
        "accuracy": 33.33, "weighted_f1": 16.67, "micro_f1": 33.33, "macro_f1": 16.67, "ood": 0, "dropped": 1, "n": 3}
    # fixed goldens 0, 0, 2, 3: F1 of 0 is 2*2/(2+4) -> weighted 2/3*2/4, macro 2/3/3
    assert results["scores"]["classifier_fixed"] == {
        "accuracy": 50.0, "weighted_f1": 33.33, "micro_f1": 50.0, "macro_f1": 22.22, "ood": 0, "dropped": 0, "n": 4}
    assert "CAMS: 1 golden(s) match no label_inference.py gold keyword (rows 1); dropped from both label lists" \
        in results["warnings"]
    report = (tmp_path / "out" / "answers" / "report.md").read_text()
    assert "| classifier acc | classifier w-F1 | classifier m-F1 | classifier dropped | classifier_fixed acc |" in report
    assert "| 33.33 | 16.67 | 16.67 | 1 | 50.00 | 33.33 | 22.22 |" in report
    for rules, keys in (("reference", {"reference", "classifier"}), ("fixed", {"fixed", "classifier_fixed"})):
        out = tmp_path / f"out-{rules}"
        assert _main("--generated_dir", folder, "--output_dir", out, "--label_model_dir", classifiers, "--rules", rules) == 0
        assert set(_results(out, "CAMS")["scores"]) == keys


def test_classifier_with_the_wrong_number_of_labels(tmp_path, capsys):
    _tiny_bert(tmp_path / "classifiers" / "dreaddit", 3)
    folder = _generated_dir(tmp_path / "answers", {"dreaddit": DREADDIT})
    assert _main("--generated_dir", folder, "--label_model_dir", tmp_path / "classifiers",
                 "--output_dir", tmp_path / "out") == 2
    assert "a classifier with 3 labels; dreaddit needs 2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- a tiny BART
CORPUS = [" yes yes the poster suffers from stress", " no the post shows no causes of depression",
          " Reasoning: the poster feels tired and alone", " Consider this post: Question: Does it?"] * 20


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory):
    """A randomly initialised BART with a byte-level BPE tokenizer trained here, saved to a folder."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=320, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", mask_token="<mask>", model_max_length=96)
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_position_embeddings=96, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                        decoder_start_token_id=2, forced_eos_token_id=2)
    folder = tmp_path_factory.mktemp("tiny_bart")
    BartForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _yes_sayer(tiny_bart, folder):
    """The tiny BART made to answer " yes" at every step (a large bias on that token)."""
    from transformers import AutoTokenizer, BartForConditionalGeneration

    shutil.copytree(tiny_bart, folder)
    (yes,) = AutoTokenizer.from_pretrained(folder).encode(" yes", add_special_tokens=False)
    model = BartForConditionalGeneration.from_pretrained(folder)
    model.final_logits_bias[0, yes] = 100.0
    model.save_pretrained(folder)
    return folder


def _decoded_rows(monkeypatch, backend) -> dict[str, list[list[int]]]:
    """The decoder's output rows (start token, answer, EOS; a batch's padding after it dropped) behind
    each answer text of a Seq2SeqBackend, each distinct row once."""
    rows: dict[str, list[list[int]]] = {}
    decode, pad = backend.tokenizer.decode, backend.tokenizer.pad_token_id

    def recording(ids, *args, **kwargs):
        text = decode(ids, *args, **kwargs)
        row = list(ids)
        while len(row) > 1 and row[-1] == pad:
            row.pop()
        if row not in rows.setdefault(text.strip(), []):
            rows[text.strip()].append(row)
        return text

    monkeypatch.setattr(backend.tokenizer, "decode", recording)
    return rows


def test_seq2seq_batches_like_single_rows_and_keeps_the_whole_answer(tiny_bart, tmp_path, monkeypatch):
    texts = ["Consider this post: the poster feels tired. Question: Does it?" * 5, "yes", "the post shows no causes"]
    batched = Seq2SeqBackend(str(tiny_bart), max_new_tokens=6, max_batch_size=3, dtype="float32")
    single = Seq2SeqBackend(str(tiny_bart), max_new_tokens=6, max_batch_size=1, dtype="float32")
    rows_batched, rows_single = _decoded_rows(monkeypatch, batched), _decoded_rows(monkeypatch, single)
    got, want = dict(batched.stream(texts, chat=False)), dict(single.stream(texts, chat=False))
    eos = single.model.config.eos_token_id

    def answer(row):  # the tokens after the decoder's start token, None for the EOS that ends them
        tokens = [None if t == eos else t for t in row[1:]]
        return tokens[:tokens.index(None) + 1] if None in tokens else tokens

    for i, text in enumerate(texts):
        # what the encoder read does not depend on the batch ...
        assert (got[i].prompt_tokens, got[i].truncated) == (want[i].prompt_tokens, want[i].truncated)
        # ... nor, up to a tie (right-padded encoder inputs round differently), what the decoder wrote
        [row_got], [row_want] = rows_batched[got[i].text], rows_single[want[i].text]
        encoded = single.tokenizer([text], return_tensors="pt", truncation=True, max_length=single.context_limit)
        with torch.no_grad():  # the logits each step of the single row chose from, teacher-forced
            logits = single.model(**encoded, decoder_input_ids=torch.tensor([row_want[:-1]])).logits[0]
        assert_same_up_to_a_tie(answer(row_got), answer(row_want), logits.__getitem__, end=(eos,))
    replies = dict(batched.stream(texts, chat=False))
    assert replies[0].truncated and replies[0].prompt_tokens == 96 and not replies[1].truncated
    saying_yes = Seq2SeqBackend(_yes_sayer(tiny_bart, tmp_path / "yes"), max_new_tokens=4, dtype="float32")
    # the prompt is far longer than the answer: slicing the output by prompt length would leave nothing
    assert [r.text for _, r in saying_yes.stream(texts, chat=False)] == ["yes yes yes"] * 3
    longest = Seq2SeqBackend(str(tiny_bart), dtype="float32")  # the reference's 2048, capped by the positions
    assert longest.max_new_tokens == 95
    assert [r.completion_tokens <= 95 for _, r in longest.stream(texts[1:2], chat=False)] == [True]


def test_a_seq2seq_model_is_found_from_its_config_and_scored(tiny_bart, tmp_path):
    model = _yes_sayer(tiny_bart, tmp_path / "MentalBART-tiny")
    assert _main("--model", model, "--test_dataset", "IMHI-completion", "--datasets", "dreaddit",
                 "--max_new_tokens", 4, "--output_dir", tmp_path / "out", "--dtype", "float32") == 0
    result = _results(tmp_path / "out", "dreaddit")
    assert result["backend"] == "seq2seq" and result["test_set"] == "IMHI-completion"
    # every answer "yes yes yes"; gold yes, no, yes, no, yes, no -> F1 yes 2*3/(3+6), no 0
    for rules in ("reference", "fixed"):
        assert (result["scores"][rules]["accuracy"], result["scores"][rules]["weighted_f1"]) == (50.0, 33.33)
    assert _main("--model", model, "--prompting", "chat", "--output_dir", tmp_path / "out") == 2


def test_bart_score_is_the_mean_log_likelihood_of_the_golden_given_the_answer(tiny_bart, tmp_path):
    from transformers import AutoTokenizer, BartForConditionalGeneration

    folder = _generated_dir(tmp_path / "answers", {"dreaddit": DREADDIT})
    assert _main("--generated_dir", folder, "--output_dir", tmp_path / "out", "--explanation_metrics", "bart",
                 "--bart_model", tiny_bart) == 0
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_bart), BartForConditionalGeneration.from_pretrained(tiny_bart)
    expected = []
    for golden, answer in DREADDIT:  # one pair at a time, no padding: minus the model's own mean loss
        with torch.no_grad():
            loss = model(**tokenizer(answer, return_tensors="pt"), labels=tokenizer(golden, return_tensors="pt")["input_ids"]).loss
        expected.append(-loss.item())
    result = _results(tmp_path / "out", "dreaddit")
    assert result["explanations"]["bart_score"] == pytest.approx(sum(expected) / 4, abs=1e-4)
    batched = target_log_likelihood(model, tokenizer, [a for _, a in DREADDIT], [g for g, _ in DREADDIT], batch_size=3)
    assert batched == pytest.approx(expected, abs=1e-5)
    assert "BART-score" in (tmp_path / "out" / "answers" / "report.md").read_text()


# ---------------------------------------------------------------------------------- text metrics
def test_rouge_and_bleu(tmp_path):
    import sacrebleu
    from rouge_score import rouge_scorer

    # (golden, generated); the answer of pair 1 is one word short, so BLEU's brevity penalty counts too
    pairs = [("the poster is very happy today", "the poster is very sad"),
             ("no stress here at all", "no stress here at all")]
    goldens, generated = [g for g, _ in pairs], [a for _, a in pairs]
    folder = _generated_dir(tmp_path / "answers", {"DR": pairs})
    assert _main("--generated_dir", folder, "--output_dir", tmp_path / "out", "--explanation_metrics", "rouge,bleu") == 0
    got = _results(tmp_path / "out", "DR")["explanations"]
    # ROUGE, by hand: pair 1 shares 4 unigrams of 5 / 6 -> F 8/11; 3 bigrams of 4 / 5 -> F 2/3; LCS 4 -> 8/11;
    # pair 2 is 1 throughout; the mean over pairs, x100
    assert got == pytest.approx({"n": 2, "rouge1": 86.36, "rouge2": 83.33, "rougeL": 86.36, "bleu": 75.79})
    # ... and by rouge-score itself, called here
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(g, a) for g, a in pairs]
    for key in ("rouge1", "rouge2", "rougeL"):
        assert got[key] == pytest.approx(100 * sum(s[key].fmeasure for s in scores) / 2, abs=0.005)
    # BLEU, by hand: corpus n-gram precisions 9/10, 7/8, 5/6, 3/4 (the answers' 10 words against 11),
    # brevity penalty exp(1 - 11/10) -> 75.79 ...
    by_hand = 100 * (9 / 10 * 7 / 8 * 5 / 6 * 3 / 4) ** 0.25 * math.exp(1 - 11 / 10)
    assert got["bleu"] == pytest.approx(by_hand, abs=0.005)
    # ... and by sacrebleu itself (13a tokens, 4-grams, no smoothing: `evaluate`'s "bleu")
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(generated, [goldens], smooth_method="none").score,
                                        abs=0.005)
    assert ev.bleu(["no stress here at all"], ["no stress here at all"]) == 100.0
    assert ev.bleu(["no stress here at all"], ["completely different words said"]) == 0.0


def test_bertscore_with_a_local_model(tmp_path):
    import bert_score  # noqa: F401  - in requirements-test.txt: a broken install fails here, never skips
    model = _tiny_bert(tmp_path / "tiny-bert", 2)
    folder = _generated_dir(tmp_path / "answers", {"DR": [("yes the poster", "yes the poster"), ("no stress", "")]})
    assert _main("--generated_dir", folder, "--output_dir", tmp_path / "out", "--explanation_metrics", "bertscore",
                 "--bertscore_model", model) == 0
    assert _results(tmp_path / "out", "DR")["explanations"]["bertscore_f1"] == 50.0  # identical 100, empty 0


def test_a_missing_metric_package_is_named(monkeypatch, tmp_path, capsys):
    real = ev.importlib.util.find_spec
    monkeypatch.setattr(ev.importlib.util, "find_spec", lambda name, *a: None if name == "rouge_score" else real(name, *a))
    folder = _generated_dir(tmp_path / "answers", {"DR": DREADDIT})
    assert _main("--generated_dir", folder, "--explanation_metrics", "rouge", "--output_dir", tmp_path) == 2
    assert "needs the PyPI package rouge-score: pip install rouge-score" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- the embedded model
def test_the_embedded_model_on_two_rows(tmp_path):
    """Real model, real loop: two rows of the project's sample, raw prompts, greedy."""
    (result,) = ev.run(datasets="dreaddit", limit=2, max_new_tokens=8, batch_size=2, output_dir=str(tmp_path),
                       progress=False)
    assert result["complete"] and result["rows"] == 2 and result["backend"] == "embedded"
    assert result["settings"]["prompting"] == "raw" and result["settings"]["temperature"] == 0.0
    out = tmp_path / "embedded-SmolLM2-135M-Instruct" / "IMHI"
    samples = read_jsonl(out / "dreaddit.samples.jsonl")
    assert [s["row"] for s in sorted(samples, key=lambda s: s["row"])] == [0, 1]
    assert all(s["completion_tokens"] <= 8 and s["prompt_tokens"] > 0 for s in samples)
    goldens, generated = imhi.read_generated_csv(out / "generated" / "dreaddit.csv")
    assert goldens == [row["golden"] for row in _sample_rows("dreaddit")[:2]]
    assert result["scores"]["fixed"] == imhi.score("dreaddit", goldens, generated, "fixed")
