"""Faithful by default (issue 21): the reference's fine-tuning questions, its conversion row for row
(--reference_glue), its rendering of emotions (--emotion_format reference), and the paper's two runs
as presets of iterate.py with Table 2's layout.

The reference's converters are restated here from its data_process.py / llama_finetune.py (plain
loops over the six fields), independently of mentalarena/training/sft.py, and run on the reference's own
records in ../shared/data/arena_outputs."""
from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import ScriptedBackend, shared_data

import arena_med as am
import data_process
import iterate
from mentalarena.loop import paper
from mentalarena.training import preference, sft
from mentalarena.selfplay.data import DEFAULT_PRINCIPLES_FILE, load_patients, load_principles
from mentalarena.engines.engine import Gate, ModelClient
from mentalarena.prompts import Prompts

SYSTEM = "You are a psychiatric expert."
REFERENCE_QUESTIONS = {"diagnosis": "What is the most likely diagnosis in this patient?",
                       "treatment": "What is the most appropriate treatment for the patient?",
                       "medication": "What is the proper medication for this patient?"}
STOP_WORDS = ["None", "N/A", "Not", "Explanation"]
RECORD = {"symptom": "Patient History: sleeps badly.", "illness": "Depression", "treatment": "CBT",
          "explain_t": "It helps.", "medicine": "Sertraline", "explain_m": "An SSRI."}


def reference_pairs(item: dict) -> list[tuple[str, str]]:
    """The reference's (input, output) pairs of one record, in its order."""
    s = item["symptom"]
    pairs = [(f"{s}\n{REFERENCE_QUESTIONS['diagnosis']}", item["illness"]),
             (f"{s}{REFERENCE_QUESTIONS['treatment']}", f"{item['treatment']}. {item['explain_t']}")]
    medicine = item["medicine"]
    if len(medicine) > 0 and not [w for w in STOP_WORDS if w in medicine]:
        pairs.append((f"{s}\n{REFERENCE_QUESTIONS['medication']}", f"{medicine}. {item['explain_m']}"))
    return pairs


def reference_openai_rows(path: Path) -> list[dict]:
    """data_process.revert of the reference: every row, duplicates kept."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for question, answer in reference_pairs(json.loads(line)):
            rows.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}]})
    return rows


def reference_text_rows(path: Path) -> list[dict]:
    """llama_finetune.data_process then remove_redun of the reference: text rows, first occurrences in order."""
    texts = [f"### System: {SYSTEM} Question: {q}\n ### Answer: {a}"
             for line in path.read_text(encoding="utf-8").splitlines() for q, a in reference_pairs(json.loads(line))]
    return [{"text": t} for t in dict.fromkeys(texts)]


def canonical(rows: list[dict]) -> set[str]:
    return {json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows}


# ---------------------------------------------------------------------------------- the questions
def test_the_reference_questions_are_the_default_and_the_rewording_one_flag_away():
    diagnosis, treatment, medication = sft.record_pairs(RECORD)
    assert diagnosis.question == RECORD["symptom"] + "\n" + REFERENCE_QUESTIONS["diagnosis"]
    assert treatment.question == RECORD["symptom"] + "\n" + REFERENCE_QUESTIONS["treatment"]
    assert medication.question == RECORD["symptom"] + "\n" + REFERENCE_QUESTIONS["medication"]
    assert {p.system for p in (diagnosis, treatment, medication)} == {SYSTEM}
    project = sft.record_pairs(RECORD, questions=sft.Questions(wording="project"))
    prompts = Prompts()
    for pair, kind in zip(project, sft.QUESTION_KINDS):
        assert pair.question == prompts.render(f"sft_{kind}_project", symptom=RECORD["symptom"])
        assert REFERENCE_QUESTIONS[kind] not in pair.question
    with pytest.raises(sft.InputError, match="--sft_questions must be one of reference, project"):
        sft.Questions(wording="paper")


@pytest.mark.parametrize("wording", ["reference", "project"])
@pytest.mark.parametrize("glue", [False, True])
def test_preference_pairs_ask_exactly_the_sft_question_of_their_kind(tmp_path, wording, glue):
    record = {**RECORD, "treatment_search": {"tries": [{"candidate": "CBT.", "score": 8},
                                                       {"candidate": "Rest.", "score": 2}]},
              "medicine_search": {"tries": [{"candidate": "Sertraline.", "score": 9},
                                            {"candidate": "Diazepam.", "score": 3}]}}
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(record) + "\n")
    questions = sft.Questions(wording=wording, glue=glue)
    pairs, _ = preference.load_preferences(path, diagnosis=False, questions=questions)
    want = {p.kind: p.question for p in sft.record_pairs(record, questions=questions)}
    assert {p.kind: p.question for p in pairs} == {k: want[k] for k in ("treatment", "medication")}
    assert (REFERENCE_QUESTIONS["treatment"] in pairs[0].question) == (wording == "reference")
    assert ("\n" in pairs[0].question) == (not glue)  # the symptom has no newline of its own


def test_reference_glue_converts_the_references_records_exactly_as_its_converter(tmp_path, capsys):
    records = shared_data("arena_outputs", "gpt_iter1_output.jsonl")
    out = tmp_path / "ft.jsonl"
    code = data_process.main(["--input_file", str(records), "--finetune_file", str(out), "--convert_only",
                              "--reference_glue"])
    assert code == 0, capsys.readouterr().err
    ours = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    theirs = reference_openai_rows(records)
    assert canonical(ours) == canonical(theirs)  # as a set: the reference does not drop duplicates
    assert len(ours) == len(canonical(theirs)) < len(theirs)  # ours are the distinct rows, each once
    # without the glue only the treatment rows differ (by the newline)
    plain, _ = sft.convert([records], "openai")
    differ = canonical(plain) ^ canonical(theirs)
    assert differ and all(REFERENCE_QUESTIONS["treatment"] in json.loads(r)["messages"][1]["content"] for r in differ)


def test_reference_glue_text_rows_equal_the_references_llama_rows_in_order():
    records = shared_data("arena_outputs", "llama3_iter4_output_1.jsonl")
    rows, report = sft.convert([records], "text", questions=sft.Questions(glue=True))
    assert rows == reference_text_rows(records)  # remove_redun keeps first occurrences in order, as we do
    assert report.rows == len(rows)


def test_data_process_takes_the_wording_and_a_prompt_folder(tmp_path, capsys):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({**RECORD, "symptom": f"Patient {i}."}) + "\n" for i in range(3)))
    folder = tmp_path / "prompts"
    folder.mkdir()
    for name in ("sft_system", *(f"sft_{k}" for k in sft.QUESTION_KINDS)):
        text = (Path(am.__file__).parent / "prompts" / f"{name}.txt").read_text()
        (folder / f"{name}.txt").write_text("You are a careful psychiatrist.\n" if name == "sft_system" else text)
    out = tmp_path / "ft.jsonl"

    def rows(*flags):
        assert data_process.main(["--input_file", str(path), "--finetune_file", str(out), "--convert_only",
                                  *flags]) == 0, capsys.readouterr().err
        return [json.loads(line)["messages"] for line in out.read_text().splitlines()]

    assert {m[0]["content"] for m in rows("--prompt_dir", str(folder))} == {"You are a careful psychiatrist."}
    assert rows()[0][1]["content"] == "Patient 0.\n" + REFERENCE_QUESTIONS["diagnosis"]
    assert rows("--sft_questions", "project")[0][1]["content"] == Prompts().render("sft_diagnosis_project",
                                                                                 symptom="Patient 0.")
    capsys.readouterr()
    assert data_process.main(["--input_file", str(path), "--convert_only", "--sft_questions", "paper"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --sft_questions must be one of reference, project, not 'paper'"]
    (folder / "sft_treatment.txt").unlink()  # a folder without a template the run needs: one line, nothing written
    before = out.read_bytes()
    assert data_process.main(["--input_file", str(path), "--finetune_file", str(out), "--convert_only",
                              "--prompt_dir", str(folder)]) == 2
    assert "sft_treatment.txt: prompt file not found" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_llama_finetune_checks_the_wording_before_anything_loads(capsys):
    import llama_finetune
    assert llama_finetune.main(["--new_name", "x", "--data_files", "nowhere.jsonl", "--sft_questions", "x"]) == 2
    assert "--sft_questions must be one of reference, project" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- the emotions
def test_reference_emotions_give_every_symptom_of_the_references_records_character_for_character():
    profiles = load_patients(shared_data("patient_psi_cm", "Patient-Psi-CM_dataset.json"))
    records = shared_data("arena_outputs", "gpt_iter1_output.jsonl").read_text(encoding="utf-8").splitlines()
    theirs = {json.loads(line)["symptom"] for line in records}
    prompts = Prompts()
    ours = [prompts.render("symptom", **am.profile_slots(p, "reference")) for p in profiles]
    assert len(ours) == 106 and set(ours) == theirs
    joined = {prompts.render("symptom", **am.profile_slots(p)) for p in profiles}
    assert not joined & theirs  # the default differs from the reference in every profile, on purpose


class Replies(ScriptedBackend):
    def __init__(self):
        super().__init__([("number of the best group", "Group 1"), ("Rate this health state", "7"),
                          ("extract", "Treatment: CBT\nExplanation: helps\nMedicine: sertraline\nExplanation: SSRI")],
                         default="I feel low.")


class Similar:
    """Every pair passes (no feedback rounds); the texts compared are kept."""
    name = "fixed"

    def __init__(self):
        self.pairs = []

    def similarities(self, pairs):
        self.pairs += list(pairs)
        return [1.0] * len(pairs)


@pytest.mark.parametrize("emotion_format", ["joined", "reference"])
def test_a_session_writes_the_emotions_as_the_flag_says_everywhere(emotion_format):
    patient = {"id": "p1", "name": "Ann", "history": "h", "intermediate_belief": "ib",
               "intermediate_belief_depression": "ibd", "coping_strategies": "cs", "situation": "s",
               "auto_thought": "at", "emotion": ["anxious, worried", "sad"], "behavior": "b", "type": ["plain"]}
    settings = am.Settings(base_model="scripted", judge_model="scripted", encoder="fixed", similarity_threshold=0.5,
                           max_tries=1, emotion_format=emotion_format)
    backend = Replies()
    client = ModelClient(backend, Gate(), 256)
    encoder = Similar()
    arena = am.Arena(settings, Prompts(), client, client, encoder, load_principles(DEFAULT_PRINCIPLES_FILE))
    arena.rank_groups = lambda text, k: [(g, 1.0) for g in list(arena.groups)[:k]]
    client.gate.active = 1
    record = asyncio.run(am.run_session(patient, 0, arena))
    want = "['anxious, worried', 'sad']" if emotion_format == "reference" else "anxious, worried; sad"
    other = "anxious, worried; sad" if emotion_format == "reference" else "['anxious, worried', 'sad']"
    assert f"Emotions: {want}\n" in record["symptom"]
    sent = [m["content"] for conv in backend.seen for m in conv]
    personas = [t for t in sent if "Emotions:" in t]
    assert personas and all(want in t and other not in t for t in personas)
    truths = [b for _, b in encoder.pairs if "Emotions:" in b]  # the decoder's truth for the situation item
    assert truths and all(want in t for t in truths)


def test_the_default_emotion_format_hashes_as_before_the_flag_existed():
    settings = am.Settings(base_model="m", judge_model="m", encoder="e", similarity_threshold=0.5)
    values = asdict(settings)
    for key in ("symptom_encoder", "symptom_decoder", "base_fingerprint", "judge_fingerprint", "emotion_format"):
        values.pop(key)  # as digest() leaves them out at their defaults
    before = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
    assert settings.digest() == before
    assert am.Settings(**{**asdict(settings), "emotion_format": "reference"}).digest() != before


# ---------------------------------------------------------------------------------- the presets
@pytest.fixture
def data(tmp_path):
    patients, principles = tmp_path / "patients.json", tmp_path / "principles.csv"
    patients.write_text("[]")
    principles.write_text("CreatorID,Principles\n")
    (tmp_path / "qa").mkdir()
    (tmp_path / "imhi").mkdir()
    return ["--patients_file", str(patients), "--principles_file", str(principles), "--qa_data_dir",
            str(tmp_path / "qa"), "--imhi_test_dir", str(tmp_path / "imhi")]


def imhi_results(args: dict) -> None:
    """IMHI_eval.py results of the three Table 2 sets: the reference rules and the fixed ones disagree."""
    out = Path(args["output_dir"]) / "m" / "IMHI"
    out.mkdir(parents=True, exist_ok=True)
    k = int(Path(args["output_dir"]).parent.parent.name.removeprefix("iter"))
    for i, name in enumerate(paper.IMHI_COLUMNS):
        (out / f"{name}.results.json").write_text(json.dumps({
            "test_set": "IMHI", "dataset": name,
            "scores": {"reference": {"weighted_f1": 1.0, "accuracy": 2.0},
                       "fixed": {"weighted_f1": 30.0, "accuracy": 40.0 + 10 * k + i}}}))


def test_the_llama_preset_sets_the_papers_run_and_prints_table_2(tmp_path, data, monkeypatch, capsys):
    from test_iterate import FAKES, Stages
    monkeypatch.setitem(FAKES, "IMHI_eval.py", imhi_results)
    stages = Stages()
    monkeypatch.setattr(iterate, "run_stage", stages)
    work = tmp_path / "w"
    code = iterate.main(["--preset", "paper_llama", "--work_dir", str(work), *data, "--epochs", "1",
                         "--method", "lora", "--arena_args", '{"max_tries": 2}'])
    out = capsys.readouterr().out
    assert code == 0
    arena, = stages.of("arena_med.py")
    assert arena["base_model"] == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert arena["judge_model"] == paper.PAPER_JUDGE and arena["num_samples"] == 4
    assert arena["emotion_format"] == "reference" and arena["feedback_mode"] == "reference"
    assert arena["encoder_model"] == "bert-base-uncased" and arena["max_tries"] == 2  # the user's key kept
    assert arena["principles_file"] == data[3]
    finetune, = stages.of("llama_finetune.py")
    assert finetune["method"] == "lora" and finetune["nepoch"] == 1  # given flags win over the preset
    assert finetune["sft_questions"] == "reference" and finetune["reference_glue"] is True
    assert finetune["lr_scheduler"] == "constant" and finetune["add_eos"] is False
    qa = stages.of("MedQA_eval.py")[0]
    assert qa["tables"] == "main" and qa["repeats"] == 5
    imhi = stages.of("IMHI_eval.py")[0]
    assert imhi["datasets"] == "CAMS,dreaddit,Irf" and imhi["test_dataset"] == "IMHI"
    assert "--method = 'lora'  [you]" in out and "--num_samples = 4  [preset]" in out
    assert "--epochs = 1  [you]" in out and "sessions per patient: 4 (inferred:" in out
    table = (work / "summary.md").read_text().split("## Table 2")[1]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0] == "|  | MedQA | MedMCQA | PubMedQA | CAMS | dreaddit | Irf | AVG |"
    # iteration 1: QA rule R from the fake (15, 16, 19), IMHI fixed accuracy (50, 51, 52), and their mean
    assert lines[3] == "| iteration 1 | 15.00 | 16.00 | 19.00 | 50.00 | 51.00 | 52.00 | 33.83 |"
    assert lines[2].startswith("| iteration 0 (start) | – | – | – | 40.00 | 41.00 | 42.00 | – |")
    assert lines[-1] == "| paper: Llama-3-8B + MentalArena (iter 4) | 78.03 | 50.32 | 92.68 | 29.60 | 65.46 | 52.25 | 61.39 |"
    assert lines[-2] == "| paper: Llama-3-8B | 70.52 | 42.04 | 86.59 | 25.12 | 58.45 | 45.76 | 54.75 |"


def test_a_preset_needs_the_data_it_cannot_bring(tmp_path, capsys):
    assert iterate.main(["--preset", "paper_llama", "--work_dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--patients_file, --principles_file, --qa_data_dir, --imhi_test_dir" in err[0]
    assert not (tmp_path / "w").exists()
    assert iterate.main(["--preset", "paper_t5", "--work_dir", str(tmp_path / "w")]) == 2
    assert "--preset must be one of paper_llama, paper_gpt" in capsys.readouterr().err


def test_the_gpt_preset_fine_tunes_through_openai_with_the_papers_epochs(tmp_path, data, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-preset")
    plan = iterate.make_plan(**_flags(tmp_path, data, "paper_gpt"))
    assert plan.backend == "openai" and plan.base_model == "gpt-3.5-turbo-0125" and plan.epochs == [4, 6]
    assert plan.arena["num_samples"] == 16 and plan.arena["judge_model"] == paper.PAPER_JUDGE
    assert plan.finetune == {"sft_questions": "reference", "reference_glue": True}
    rows = paper.table2_rows([], *paper.PRESETS["paper_gpt"].rows)
    assert rows[0][0] == "paper: GPT-3.5-turbo" and rows[1][-1] == 68.28  # the paper's AVG, recomputed


def _flags(tmp_path, data, name):
    import inspect
    flags = {k: p.default for k, p in inspect.signature(iterate.run).parameters.items()}
    flags.update(work_dir=str(tmp_path / "w"), preset=name, **dict(zip(data[::2], data[1::2])))
    flags = {k.removeprefix("--"): v for k, v in flags.items()}
    iterate.apply_preset(flags)
    return flags
