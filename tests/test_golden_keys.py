"""Golden values: every hash, seed, key, folder and file name that names work already on users' disks.

A run resumes by finding these again: arena_med.py compares the settings hash in every record and keys
sessions by (patient id, sample); the evaluations key answers by a settings hash and a row key and seed
every request from them; llama_finetune.py keys checkpoints and finished runs by a settings hash;
data_process.py reuses a fine-tuning job whose recorded settings match; iterate.py keys state.json by
step and compares each recorded step's stage commands and input digests. Each value below is the one
the code had on 2026-12-02, written out as a literal: if a test here fails, outputs users already have
no longer resume (or are silently redone, or an OpenAI job is paid for twice). Change a literal only
for a change that is meant to break resumption, and say so in the release notes.

Every test calls the real function (or runs the real script) on fixed inputs: prompts, patients and
data written here, never the bundled files, so that editing a bundled prompt does not fail these tests.
"""
from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from fake_openai import FakeOpenAI, Faults

import arena_med
import Counsel_eval
import data_process
import IMHI_eval
import iterate
import llama_finetune
import MedQA_eval
from mentalarena.store import keys
from mentalarena.evaluation import counsel, qa
from mentalarena.engines.backends import Reply, route
from mentalarena.store.jsonl import read_jsonl
from mentalarena.prompts import Prompts

# Every literal marked PINNED is the value the code had on 2026-12-02; a change means users' existing
# outputs no longer resume.


# ---------------------------------------------------------------------------------- fixed inputs
def _write_prompts(folder: Path, texts: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# The templates a self-play run reads (every variant's), each a fixed text without slots.
ARENA_TEMPLATES = (
    "patient_cbt", "patient_imagine", "principles_header", "principle_choice", "doctor_system", "doctor_continue",
    "doctor_feedback", "decode_intermediate_belief", "decode_intermediate_belief_depression",
    "decode_coping_strategies", "decode_situation", "decode_principles", "judge_cognitive_feedback",
    "judge_principle_feedback", "diagnosis_system", "diagnosis_first", "diagnosis_second", "patient_review",
    "treatment_system", "treatment_first", "treatment_next", "medicine_first", "medicine_next",
    "patient_after_treatment", "patient_after_medicine", "judge_health_score", "symptom", "decoder_truth_situation",
    "roles_opening", "patient_neutral", "final_illness", "final_illness_reference", "extraction",
    "extraction_reference")


def _patient(ident: str, name: str) -> dict:
    return {"id": ident, "name": name, "history": "h", "intermediate_belief": "ib",
            "intermediate_belief_depression": "ibd", "coping_strategies": "cs", "situation": "s",
            "auto_thought": "at", "behavior": "b", "emotion": ["anxious, worried", "sad"]}


def _arena_inputs(tmp_path: Path) -> dict:
    """The flags of a self-play run on fixed prompts, two patients and two principle groups."""
    prompts = _write_prompts(tmp_path / "arena_prompts", {name: f"<{name}>" for name in ARENA_TEMPLATES})
    patients = tmp_path / "patients.json"
    patients.write_text(json.dumps([_patient("p1", "Alex"), _patient("p2", "Sam")]), encoding="utf-8")
    principles = tmp_path / "principles.json"
    principles.write_text(json.dumps({"c1": ["Speak softly."], "c2": ["Ask about sleep."]}), encoding="utf-8")
    return {"prompt_dir": str(prompts), "patients_file": str(patients), "principles_file": str(principles)}


class _ConstantClient:
    """Answers every session call with "1" (as arena_med's own dry run does), at once."""
    name = "constant"

    async def chat(self, messages, seed=None):
        return Reply("1")


class _FlatEncoder:
    """Every text the same vector, every pair similarity 0: all groups tie, every decoder item fails."""
    name = "flat"

    def encode(self, texts):
        return np.ones((len(texts), 3), dtype=np.float32) / np.sqrt(3)

    def similarities(self, pairs):
        return [0.0] * len(pairs)


class _FakeChat:
    """A backend for the evaluation loops: answers "A" to everything and records what it was asked."""

    def __init__(self):
        self.asked: list = []
        self.seeds: list = []

    def stream(self, conversations, seeds=None, chat=True):
        for i, conversation in enumerate(conversations):
            self.asked.append(conversation)
            self.seeds.append(None if seeds is None else seeds[i])
            yield i, Reply("A")

    def stats(self) -> dict:
        return {}


# ---------------------------------------------------------------------------------- shared (mentalarena/store/keys.py)
def test_settings_hash_of_a_fixed_dict():
    """keys.settings_hash names the settings of every evaluation answer and every training run: sorted-key
    JSON, sha256, 12 hex digits; any api_base counts as "served" (replicas may change on resume)."""
    settings = {"model": "gpt-4o", "temperature": 0.0, "seed": 0, "api_base": None, "list": [1, "a"]}
    assert keys.settings_hash(settings) == "da0347343a02"  # PINNED
    served = {**settings, "api_base": "http://10.0.0.1:8000/v1,http://10.0.0.2:8000/v1"}
    assert keys.settings_hash(served) == "8698526758b2"  # PINNED
    assert keys.settings_hash({**settings, "api_base": "http://elsewhere:1/v1"}) == keys.settings_hash(served)


def test_request_seed_values():
    """keys.request_seed: the seed of every sampled request (self-play calls, evaluation answers, judge
    calls), stored in each row; another seed for the same request is another answer."""
    got = [keys.request_seed(0, "p1", 0, "opening.patient"), keys.request_seed(0, "MedQA-0", 3),
           keys.request_seed(42, "CAMS", "0:abcdef012345"), keys.request_seed(0, "judge", "0123456789abcdef")]
    assert got == [3392713110992711456, 8614368821225868402, 5734972987465181250, 1828875292450948050]  # PINNED


def test_model_tag_folder_names(tmp_path):
    """keys.model_tag: the folder under --output_dir that holds one model's answers (MedQA, IMHI, Counsel)."""
    assert keys.model_tag("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama--Meta-Llama-3-8B-Instruct"  # PINNED
    assert keys.model_tag("gpt-4o-2024-08-06") == "gpt-4o-2024-08-06"  # PINNED
    assert keys.model_tag("ft:gpt-3.5-turbo-0125:org::abc123") == "ft-gpt-3.5-turbo-0125-org--abc123"  # PINNED
    assert keys.model_tag("embedded:SmolLM2-135M-Instruct") == "embedded-SmolLM2-135M-Instruct"  # PINNED
    # a local folder: its last name, "-", 8 hex digits of the sha256 of its absolute path
    folder = tmp_path / "runs" / "merged"
    folder.mkdir(parents=True)
    where = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
    assert keys.model_tag(str(folder)) == f"merged-{where}"
    assert keys.model_tag(str(folder) + "/") == f"merged-{where}"


def _model_folder(folder: Path) -> Path:
    """A fixed "local model": config, weights, tokenizer, and the trainer's leftovers that do not count."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}', encoding="utf-8")
    (folder / "notes.md").write_text("not part of the model", encoding="utf-8")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"old weights")
    (folder / "merged").mkdir()
    (folder / "merged" / "config.json").write_text("{}", encoding="utf-8")
    return folder


def test_model_fingerprint_of_a_fixed_folder(tmp_path):
    """keys.model_fingerprint: the content of a local model folder, hashed into the settings of every
    script (a model retrained in place is another model); checkpoint-*/ and merged/ do not count."""
    folder = _model_folder(tmp_path / "model")
    assert keys.model_fingerprint(str(folder)) == "51a24821a0dc8392"  # PINNED
    assert keys.model_fingerprint(str(folder / "model.safetensors")) == "de063935628141db"  # PINNED
    assert keys.model_fingerprint("meta-llama/Meta-Llama-3-8B") is None


# ---------------------------------------------------------------------------------- arena_med.py
def _arena_settings(**fields) -> arena_med.Settings:
    base = dict(base_model="meta-llama/Meta-Llama-3-8B", judge_model="gpt-4-turbo-2024-04-09",
                encoder="all-MiniLM-L6-v2 (bundled)", similarity_threshold=0.5, prompts_hash="0123456789abcdef",
                base_runs_on="hf", judge_runs_on="openai-api", dtype="bfloat16", patients_hash="fedcba9876543210",
                principles_hash="00112233445566ff")
    return arena_med.Settings(**{**base, **fields})


@pytest.mark.parametrize(("fields", "want"), [
    ({}, "9595a35977b38025"),  # PINNED
    ({"symptom_encoder": "off"}, "91e4169fdccfef96"),  # PINNED
    ({"symptom_decoder": "off"}, "b390505d1ea505be"),  # PINNED
    ({"score_parser": "reference"}, "3cf47ea9a6bf694a"),  # PINNED
    ({"emotion_format": "reference"}, "7b5d41237588d473"),  # PINNED
    ({"base_fingerprint": "0123456789abcdef"}, "a8ef14e3a15849cd"),  # PINNED
    ({"base_model": "embedded", "judge_model": "embedded", "base_runs_on": "embedded", "judge_runs_on": "embedded",
      "dtype": "float32"}, "5e536249354bfac7"),  # PINNED
], ids=["defaults", "encoder-off", "decoder-off", "score-parser-reference", "emotion-format-reference",
        "local-fingerprint", "embedded"])
def test_settings_digest(fields, want):
    """Settings.digest(): the settings hash in every self-play record; pending_sessions refuses (never
    mixes) an output whose records carry another."""
    assert _arena_settings(**fields).digest() == want


def test_settings_digest_leaves_out_fields_at_their_old_defaults():
    """Fields added after records existed are out of the hash at the value that reproduces the old runs."""
    plain = _arena_settings().digest()
    assert _arena_settings(symptom_encoder="on", symptom_decoder="on", emotion_format="joined", base_fingerprint="",
                     judge_fingerprint="").digest() == plain
    assert _arena_settings(score_parser="reference").digest() != plain  # robust (the default) is hashed


def test_prompt_names_and_content_hash():
    """What arena_med.run hashes into prompts_hash (the templates, in this order) and patients_hash /
    principles_hash (content_hash of the loaded data)."""
    assert arena_med.prompt_names("name") == [  # PINNED
        "patient_cbt", "patient_imagine", "principles_header", "principle_choice", "doctor_system", "doctor_continue",
        "doctor_feedback", "decode_intermediate_belief", "decode_intermediate_belief_depression",
        "decode_coping_strategies", "decode_situation", "decode_principles", "judge_cognitive_feedback",
        "judge_principle_feedback", "diagnosis_system", "diagnosis_first", "diagnosis_second", "patient_review",
        "treatment_system", "treatment_first", "treatment_next", "medicine_first", "medicine_next",
        "patient_after_treatment", "patient_after_medicine", "judge_health_score", "symptom", "decoder_truth_situation",
        "roles_opening", "final_illness", "extraction"]
    assert arena_med.prompt_names("reference", "reference", "off", "off") == [  # PINNED
        "doctor_system", "doctor_continue", "diagnosis_system", "diagnosis_first", "diagnosis_second", "patient_review",
        "treatment_system", "treatment_first", "treatment_next", "medicine_first", "medicine_next",
        "patient_after_treatment", "patient_after_medicine", "judge_health_score", "symptom", "roles_opening",
        "patient_neutral", "final_illness_reference", "extraction_reference"]
    assert arena_med.content_hash([_patient("p1", "Alex")]) == "2cc41b3b965e63c7"  # PINNED
    assert arena_med.content_hash({"c1": ["Speak softly, é."]}) == "e7ec7ab98bd85ed7"  # PINNED


@pytest.mark.parametrize(("flags", "want"), [
    ({"base_model": "meta-llama/Meta-Llama-3-8B", "judge_model": "gpt-4-turbo-2024-04-09"}, "6c16b6132df8b668"),  # PINNED
    ({"base_model": "meta-llama/Meta-Llama-3-8B", "judge_model": "gpt-4-turbo-2024-04-09",
      "symptom_encoder": "off"}, "efb006e9a6889235"),  # PINNED
    ({"base_model": "meta-llama/Meta-Llama-3-8B", "judge_model": "gpt-4-turbo-2024-04-09",
      "score_parser": "reference"}, "0b823123c1869ec3"),  # PINNED
    ({"base_model": "meta-llama/Meta-Llama-3-8B", "judge_model": "gpt-4-turbo-2024-04-09",
      "emotion_format": "reference"}, "21dad7dd51df8d38"),  # PINNED
    ({}, "10f81a5833e6d990"),  # PINNED: the embedded model as both roles
    ({"base_model": "model"}, "158360aa7b68bc64"),  # PINNED: a local model folder (fingerprinted), relative to the cwd
], ids=["models", "encoder-off", "score-parser-reference", "emotion-format-reference", "embedded", "local-model"])
def test_arena_run_resumes_a_record_of_today(tmp_path, monkeypatch, flags, want):
    """arena_med.run on fixed inputs: an output holding a record with this settings hash for
    (patient p1, sample 0) is complete, so nothing loads and nothing runs."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-golden-test")
    monkeypatch.chdir(tmp_path)
    _model_folder(tmp_path / "model")
    output = _jsonl(tmp_path / "out.jsonl", [{"patient_id": "p1", "sample": 0, "settings_hash": want}])
    summary = arena_med.run(**_arena_inputs(tmp_path), **flags, output_file=str(output), limit=1, dtype="float32",
                            progress=False)
    assert summary == {"sessions_ok": 0, "sessions_failed": 0, "skipped": 1}


def test_arena_resume_key_is_patient_id_and_sample(tmp_path):
    """pending_sessions: a session is done when a record has its (patient id as text, sample)."""
    patients = [_patient("p1", "Alex"), _patient("7", "Sam")]
    output = _jsonl(tmp_path / "out.jsonl", [{"patient_id": "p1", "sample": 1, "settings_hash": "h"},
                                             {"patient_id": 7, "sample": 0, "settings_hash": "h"}])
    todo, done = arena_med.pending_sessions(patients, 2, output, "h")
    assert [(p["id"], k) for p, k in todo] == [("p1", 0), ("7", 1)] and done == 2


def test_arena_session_steps_and_seeds(tmp_path):
    """The step names of a session's calls and their seeds (request_seed(--seed, patient id, sample,
    step)), stored in every record's transcript: a resumed or re-run session samples the same."""
    settings = _arena_settings(dialogue_rounds=1, max_decode_rounds=1, max_tries=1, seed=7)
    groups = {"c1": ["Speak softly."], "c2": ["Ask about sleep."]}
    prompts = Prompts(_arena_inputs(tmp_path)["prompt_dir"])
    client = _ConstantClient()
    arena = arena_med.Arena(settings, prompts, client, client, _FlatEncoder(), groups)
    record = asyncio.run(arena_med.run_session(_patient("p1", "Alex"), 1, arena))
    steps = [t["step"] for t in record["transcript"]]
    assert steps == [  # PINNED
        "principles.choice", "opening.patient", "dialogue.1.doctor", "dialogue.1.patient",
        "decode.0.intermediate_belief", "decode.0.intermediate_belief_depression", "decode.0.coping_strategies",
        "decode.0.situation", "decode.0.principles", "decode.0.feedback", "decode.0.principle_feedback",
        "decode.1.doctor", "decode.1.patient", "decode.1.intermediate_belief", "decode.1.intermediate_belief_depression",
        "decode.1.coping_strategies", "decode.1.situation", "decode.1.principles", "decode.1.feedback",
        "decode.1.principle_feedback", "diagnosis.1", "diagnosis.2", "diagnosis.review", "diagnosis.final",
        "treatment.1.doctor", "treatment.1.patient", "treatment.1.score", "medicine.1.doctor", "medicine.1.patient",
        "medicine.1.score", "extraction"]
    assert all(t["seed"] == keys.request_seed(7, "p1", 1, t["step"]) for t in record["transcript"])
    assert [t["seed"] for t in record["transcript"][:2]] == [6708518347782775843, 1877392501361250043]  # PINNED
    assert record["settings_hash"] == settings.digest()
    assert (record["patient_id"], record["sample"]) == ("p1", 1)


def test_arena_output_file_names(tmp_path, monkeypatch):
    """A run's side files, named from --output_file: <stem>.errors.jsonl (failed sessions) and
    <stem>.summary.json; the record written by a served run carries this settings hash."""
    monkeypatch.setattr(arena_med, "Encoder", lambda name=None: _FlatEncoder())
    output = tmp_path / "run" / "out.jsonl"
    with FakeOpenAI(faults=Faults(["422"])) as server:  # the first call (patient p1's) is rejected
        summary = arena_med.run(**_arena_inputs(tmp_path), base_model="fake-model", api_base=server.base_url,
                                output_file=str(output), concurrency=1, dialogue_rounds=1, max_decode_rounds=1,
                                max_tries=1, progress=False)
    errors, written = output.parent / "out.errors.jsonl", output.parent / "out.summary.json"
    assert summary["sessions_ok"] == 1 and summary["sessions_failed"] == 1
    assert summary["errors_file"] == str(errors) and summary["output_file"] == str(output)
    assert [(e["patient_id"], e["sample"]) for e in read_jsonl(errors)] == [("p1", 0)]
    assert json.loads(written.read_text(encoding="utf-8"))["sessions_ok"] == 1
    (record,) = read_jsonl(output)
    assert record["settings_hash"] == "7d02a849428ddb96"  # PINNED
    assert record["transcript"][0]["seed"] == 5743660884033154640  # PINNED


# ---------------------------------------------------------------------------------- MedQA_eval.py
@pytest.mark.parametrize(("args", "want"), [
    (("gpt-4o", "auto", None, None, None, 256, 5, 0, False), "9001e725c882"),  # PINNED
    ((None, "auto", None, None, None, 256, 5, 0, False, "float32"), "dfb8e1804d33"),  # PINNED: the embedded model
    (("fake-model", "auto", "http://127.0.0.1:9/v1", None, None, 256, 5, 0, False), "180a75cef4a8"),  # PINNED: served
], ids=["api", "embedded", "served"])
def test_medqa_settings_hash(args, want):
    """MedQA_eval._settings: what results files record and what the answers' run hash starts from."""
    assert keys.settings_hash(MedQA_eval._settings(*args)) == want


QA_PROMPTS = {"qa_system": "You are an expert.", "qa_choice": "Q: {question}\n{options}\nAnswer:",
              "qa_decision": "{context}Q: {question}\nAnswer:"}
QA_ROWS = [{"id": "q1", "question": "Which?", "options": {"A": "one", "B": "two"}, "answer_idx": "A"},
           {"id": "q2", "question": "Which else?", "options": {"A": "three", "B": "four"}, "answer_idx": "B"}]


def test_medqa_answers_of_today_are_resumed(tmp_path):
    """MedQA_eval.evaluate: an answer row keyed (id, repeat), made under this run hash (settings, data
    source, templates) for the question as it now renders, is not asked again; the others are asked with
    request_seed(--seed, id, repeat). Files: <output_dir>/<model_tag>/<stem>.samples.jsonl, .results.json."""
    prompts = Prompts(_write_prompts(tmp_path / "prompts", QA_PROMPTS))
    items = qa.rows_to_items("MedQA", QA_ROWS, "test file")
    job = {"dataset": "MedQA", "subset": None, "items": items, "source": "hub:GBaker/MedQA-USMLE-4-options",
           "limit": None, "source_sha256": None}
    settings = MedQA_eval._settings("gpt-4o", "auto", None, None, None, 256, 1, 0, False)
    samples = tmp_path / "out" / "gpt-4o" / "MedQA.samples.jsonl"
    samples.parent.mkdir(parents=True)
    run_hash = "54cc65eefb0d"  # PINNED
    _jsonl(samples, [{"id": "q1", "repeat": 0, "prompt": "Q: Which?\nA. one\nB. two\nAnswer:", "output": "A",
                      "settings_hash": run_hash}])
    chat = _FakeChat()
    results = MedQA_eval.evaluate(chat, job, prompts, settings, tmp_path / "out", progress=False)
    assert [c[1]["content"] for c in chat.asked] == ["Q: Which else?\nA. three\nB. four\nAnswer:"]
    assert chat.seeds == [keys.request_seed(0, "q2", 0)] == [6488438041998629535]  # PINNED
    assert results["settings_hash"] == run_hash and results["samples_file"] == "MedQA.samples.jsonl"
    assert (samples.parent / "MedQA.results.json").is_file()
    assert [(r["id"], r["repeat"], r["settings_hash"]) for r in read_jsonl(samples)] == [
        ("q1", 0, run_hash), ("q2", 0, run_hash)]


def test_medqa_question_ids_and_sources(tmp_path):
    """Question ids (half of the resume key): the row's id/pubid, else <dataset>-<index from 0>; a
    repeated row gets #2, #3. A job's source (in the run hash): the data file's absolute path, or hub:<id>."""
    rows = [{"question": "Which?", "options": {"A": "x", "B": "y"}, "answer_idx": "A"},
            {"question": "Other?", "options": {"A": "x", "B": "y"}, "answer_idx": "B"},
            {"id": "q7", "question": "Again?", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}]
    rows.append(rows[-1])  # the paper's files repeat whole rows
    assert [i.id for i in qa.rows_to_items("MedQA", rows, "f")] == ["MedQA-0", "MedQA-1", "q7", "q7#2"]  # PINNED
    assert [i.id for i in qa.rows_to_items("PubMedQA", [{"pubid": 123, "QUESTION": "q", "final_decision": "yes"}],
                                           "f")] == ["123"]
    data = _jsonl(tmp_path / "medqa.jsonl", QA_ROWS)
    assert MedQA_eval._job("MedQA", None, str(data), None, None)["source"] == str(data.resolve())
    assert {d: qa.benchmark(d).hub_id for d in qa.BENCHMARKS} == {  # PINNED
        "MedQA": "GBaker/MedQA-USMLE-4-options", "MedMCQA": "openlifescienceai/medmcqa", "PubMedQA": "qiaojin/PubMedQA",
        "MMLU": "cais/mmlu"}
    assert MedQA_eval._stem({"dataset": "MMLU", "subset": "college_medicine"}) == "MMLU-college_medicine"


# ---------------------------------------------------------------------------------- IMHI_eval.py
@pytest.mark.parametrize(("args", "want"), [
    (("gpt-4o", "auto", None, None, 0.0, None, 0, "auto", None), "8d87496f223d"),  # PINNED
    ((None, "auto", None, None, 0.0, None, 0, "float32", None), "02d939d1fa75"),  # PINNED: the embedded model
], ids=["api", "embedded"])
def test_imhi_settings_hash(args, want):
    """IMHI_eval._settings, hashed: the run hash of every IMHI answer row."""
    assert keys.settings_hash(IMHI_eval._settings(*args)) == want


def test_imhi_row_key():
    """IMHI_eval._row_key: <row index>:<12 hex of query NUL golden>, the resume key of an IMHI answer."""
    assert IMHI_eval._row_key(3, "a post", "its golden") == "3:ff788873676a"  # PINNED


def _imhi_csv(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "CAMS.csv").write_text('query,gpt-3.5-turbo\n"Post one?",Golden one.\n"Post two?",Golden two.\n',
                                     encoding="utf-8")
    return folder


def test_imhi_run_resumes_answers_of_today(tmp_path):
    """IMHI_eval.run against a served model: an answer on file with this row key and run hash is kept, the
    other row is asked with request_seed(--seed, dataset, key). Files: <output_dir>/<model_tag>/<test set>/
    <dataset>.samples.jsonl, generated/<dataset>.csv, <dataset>.results.json, and report.md."""
    tests = _imhi_csv(tmp_path / "imhi")
    model_dir = tmp_path / "out" / "fake-model"
    samples = model_dir / "IMHI" / "CAMS.samples.jsonl"
    samples.parent.mkdir(parents=True)
    run_hash = "3a119220ea8b"  # PINNED
    _jsonl(samples, [{"row": 0, "key": IMHI_eval._row_key(0, "Post one?", "Golden one."), "query": "Post one?",
                      "golden": "Golden one.", "generated_text": "an answer", "settings_hash": run_hash}])
    with FakeOpenAI() as server:
        (results,) = IMHI_eval.run(model="fake-model", api_base=server.base_url, test_dir=str(tests),
                                   output_dir=str(tmp_path / "out"), progress=False)
        asked = [r["messages"][-1]["content"] for r in server.requests]
    assert asked == ["Post two?"]
    assert results["settings_hash"] == run_hash and results["files"] == {
        "samples": "CAMS.samples.jsonl", "generated": "generated/CAMS.csv"}
    rows = read_jsonl(samples)
    assert rows[1]["key"] == IMHI_eval._row_key(1, "Post two?", "Golden two.")
    assert rows[1]["seed"] == keys.request_seed(0, "CAMS", rows[1]["key"]) == 6073481704521297205  # PINNED
    for name in ("IMHI/generated/CAMS.csv", "IMHI/CAMS.results.json", "report.md"):
        assert (model_dir / name).is_file(), name


# ---------------------------------------------------------------------------------- Counsel_eval.py
GENERATION = {"system": "You are a therapist.", "temperature": 0.7, "max_new_tokens": 512, "seed": 0, "dtype": "auto",
              "device": None, "request_timeout": 600.0}


def test_counsel_settings_hash():
    """Counsel_eval._settings, hashed: the run hash of every response row of one model."""
    assert keys.settings_hash(Counsel_eval._settings(route("gpt-4o"), GENERATION)) == "bba89a5e6b64"  # PINNED
    served = route("fake-model", "auto", "http://127.0.0.1:9/v1")
    assert keys.settings_hash(Counsel_eval._settings(served, GENERATION)) == "382e49f55b5f"  # PINNED


def test_counsel_row_keys():
    """counsel.row_key: <statement id>:<12 hex of the stripped text>, the id of a response row;
    counsel.digest: the id of judge rows (kind, judge hash, prompt) and reward rows (statement, response)."""
    assert counsel.row_key("s1", "  I feel low.  ") == "s1:92975a4d6147"  # PINNED
    assert counsel.digest("rubric", "0123456789ab", "a prompt") == "5de2a03dab58a404"  # PINNED
    assert counsel.digest("I feel low.", "I hear you.") == "60a18290f77119c4"  # PINNED


COUNSEL_PROMPTS = {"counsel_system": "You are a therapist.",
                   "counsel_principles": "empathy: Empathy. It shows the client was heard.",
                   "counsel_rubric": "Rate.\n{principles}\n{statement}\n{response}\n{score_lines}",
                   "counsel_pairwise": "Compare.\n{principles}\n{statement}\n{response_a}\n{response_b}"}


def test_counsel_run_resumes_answers_of_today(tmp_path):
    """Counsel_eval.run against a served model (judging itself, rubric): a response on file with this row
    key and run hash is kept; the other statement is asked with request_seed(--seed, dataset, key), the
    judge with request_seed(--seed, "judge", judge row id). Files under <output_dir>/<model_tag>/:
    <data stem>.samples.jsonl, .judge.jsonl, .scored.jsonl, .results.json; report.md in <output_dir>."""
    prompts = _write_prompts(tmp_path / "prompts", COUNSEL_PROMPTS)
    data = _jsonl(tmp_path / "statements.jsonl", [{"id": "s1", "statement": "I feel low."},
                                                   {"id": "s2", "statement": "I cannot sleep."}])
    model_dir = tmp_path / "out" / "fake-model"
    model_dir.mkdir(parents=True)
    run_hash = "382e49f55b5f"  # PINNED
    _jsonl(model_dir / "statements.samples.jsonl", [{"id": counsel.row_key("s1", "I feel low."), "row": 0,
                                                     "response": "I hear you.", "settings_hash": run_hash}])
    with FakeOpenAI() as server:
        results = Counsel_eval.run(model="fake-model", api_base=server.base_url, data_file=str(data),
                                   scorers="rubric", prompt_dir=str(prompts), output_dir=str(tmp_path / "out"),
                                   progress=False)
        asked = [r["messages"][-1]["content"] for r in server.requests if r["messages"][0]["role"] == "system"]
    assert asked == ["I cannot sleep."]
    assert results["files"] == {"samples": "statements.samples.jsonl", "judge": "statements.judge.jsonl",
                                "reward": "statements.reward.jsonl", "scored": "statements.scored.jsonl"}
    responses = read_jsonl(model_dir / "statements.samples.jsonl")
    assert responses[1]["id"] == counsel.row_key("s2", "I cannot sleep.")
    assert responses[1]["seed"] == keys.request_seed(0, "statements", responses[1]["id"]) == 3943407770595040957  # PINNED
    judged = read_jsonl(model_dir / "statements.judge.jsonl")
    assert {j["settings_hash"] for j in judged} == {"4b5c31bfdbf3"}  # PINNED: the rubric judge's hash
    assert sorted((j["key"], j["id"]) for j in judged) == [  # PINNED
        ("s1:92975a4d6147", "30477ae941f75d1e"), ("s2:b0299a3b93a3", "81e7aea756affd9e")]
    assert all(j["seed"] == keys.request_seed(0, "judge", j["id"]) for j in judged)
    for name in ("fake-model/statements.scored.jsonl", "fake-model/statements.results.json", "report.md"):
        assert (tmp_path / "out" / name).is_file(), name


def test_counsel_dataset_names(tmp_path):
    """The <dataset> part of Counsel_eval's file names: the data file's stem (-<split> when given), or
    records-<model_tag of the first records file's stem> for --from_records."""
    data = _jsonl(tmp_path / "my statements.jsonl", [{"statement": "I feel low."}])
    assert Counsel_eval._statements(str(data), None, None, None, None, None)[2] == "my statements"
    record = {"patient_id": "p1", "sample": 0, "transcript": [
        {"step": "opening.patient", "speaker": "patient", "reply": "I feel low."}]}
    records = _jsonl(tmp_path / "iter1 records.jsonl", [record])
    assert Counsel_eval._statements(None, str(records), None, None, None, None)[2] == "records-iter1_records"
    rows = Counsel_eval._statements(None, str(records), None, None, None, None)[0]
    assert [r["id"] for r in rows] == ["p1/0/opening.patient"]


# ---------------------------------------------------------------------------------- llama_finetune.py
SFT_PROMPTS = {"sft_system": "You are an expert.", "sft_diagnosis": "{symptom}\nDiagnosis?",
               "sft_treatment": "{symptom}\nTreatment?", "sft_medication": "{symptom}\nMedication?",
               "sft_diagnosis_project": "{symptom}\nWhat is it?", "sft_treatment_project": "{symptom}\nWhat helps?",
               "sft_medication_project": "{symptom}\nWhich medicine?"}
SFT_RECORD = {"symptom": "Low mood for weeks.", "illness": "Depression", "treatment": "CBT",
              "explain_t": "It helps.", "medicine": "Sertraline", "explain_m": "An SSRI."}
FINETUNE_HASH = "e5c58a573b54"  # PINNED: the default SFT run below


@pytest.mark.parametrize(("flags", "want"), [
    ({}, FINETUNE_HASH),
    # running flags, the DPO stage's flags, the selection's without --select and the question flags'
    # folder: none of them is in an SFT run's hash
    ({"save_steps": 5, "logging_steps": 1, "save_total_limit": 1, "gradient_checkpointing": True}, FINETUNE_HASH),
    ({"beta": 0.5, "min_margin": 3.0, "dpo_lr": 1e-5, "all_pairs": True}, FINETUNE_HASH),
    ({"iqr_factor": 2.0}, FINETUNE_HASH),
    ({"prompt_dir": "same_prompts"}, FINETUNE_HASH),
    ({"lora_r": 8}, "4e9c8a350791"),  # PINNED
    ({"sft_questions": "project"}, "bcb7f102a819"),  # PINNED: other rows, so another rows_sha256
], ids=["defaults", "running-flags", "dpo-flags", "select-flags", "prompt-dir", "lora-r", "project-questions"])
def test_finetune_settings_hash_keys_a_finished_run(tmp_path, monkeypatch, flags, want):
    """llama_finetune.run: <output_dir>/<new_name>/finetune_config.json with this settings hash is this
    training, finished: it is not trained again (another hash is refused). Paths are relative to the cwd,
    as the user gave them, and are part of the hash."""
    monkeypatch.chdir(tmp_path)
    _write_prompts(tmp_path / "prompts", SFT_PROMPTS)
    _write_prompts(tmp_path / "same_prompts", SFT_PROMPTS)
    _jsonl(tmp_path / "records.jsonl", [SFT_RECORD])
    out = tmp_path / "models" / "run1"
    out.mkdir(parents=True)
    (out / "finetune_config.json").write_text(json.dumps({"settings_hash": want, "summary": {"ok": True}}))
    summary = llama_finetune.run(**{"new_name": "run1", "data_files": "records.jsonl", "method": "lora",
                                    "dtype": "float32", "prompt_dir": "prompts", **flags})
    assert summary["skipped"] is True


def test_finetune_flag_groups():
    """The flags kept out of the training settings hash (each group's rule is in llama_finetune._stage)."""
    assert llama_finetune.RUNNING_FLAGS == (  # PINNED
        "output_dir", "resume", "merge", "logging_steps", "save_steps", "save_total_limit", "gradient_checkpointing")
    assert llama_finetune.QUESTION_FLAGS == ("sft_questions", "prompt_dir")  # PINNED
    assert llama_finetune.DPO_FLAGS == (  # PINNED
        "objective", "beta", "dpo_lr", "dpo_nepoch", "dpo_loss", "min_margin", "all_pairs", "diagnosis_pairs",
        "diagnosis_margin")
    assert llama_finetune.SELECT_FLAGS == ("select", "select_size", "iqr_factor", "select_model")  # PINNED


# ---------------------------------------------------------------------------------- data_process.py
def test_finetune_file_default_names(tmp_path, monkeypatch):
    """data_process.py: the fine-tuning file is <first input>.openai.jsonl (dpo: .openai_dpo.jsonl), its
    job record <finetune file>.job.json."""
    assert data_process.SUFFIXES == {"sft": ".openai.jsonl", "dpo": ".openai_dpo.jsonl"}  # PINNED
    monkeypatch.chdir(tmp_path)
    _write_prompts(tmp_path / "prompts", SFT_PROMPTS)
    _jsonl(tmp_path / "records.jsonl", [SFT_RECORD])
    result = data_process.run(input_file="records.jsonl", prompt_dir="prompts", convert_only=True, min_examples=0)
    assert result["finetune_file"] == "records.openai.jsonl"


def test_job_record_of_today_is_reused(tmp_path, monkeypatch):
    """data_process.py: a job record with these settings (the data's sha256, the server, base model,
    method, epochs, beta, suffix, selection) for the same file is reused, not paid for again."""
    monkeypatch.chdir(tmp_path)
    _write_prompts(tmp_path / "prompts", SFT_PROMPTS)
    _jsonl(tmp_path / "records.jsonl", [SFT_RECORD])
    flags = {"input_file": "records.jsonl", "prompt_dir": "prompts", "min_examples": 0}
    with FakeOpenAI() as server:
        first = data_process.run(**flags, api_base=server.base_url)
        # PINNED: data_sha256, the converted file's content
        record = {"data_sha256": "e835616a5dbb6f8d81b0e2f5348cc93ed2069b714e22bca3dde37df2b55b5db8",
                  "api_base": server.base_url, "base_model": "gpt-3.5-turbo-0125", "method": "sft", "n_epochs": 4,
                  "beta": None, "suffix": None, "selection": None, "finetune_file": "records.openai.jsonl",
                  "file_id": server.uploads[0]["id"], "job_id": first["job_id"], "status": "validating_files",
                  "fine_tuned_model": None, "pending_request": None, "previous_jobs": []}
        assert json.loads(Path("records.openai.jsonl.job.json").read_text(encoding="utf-8")) == record
        Path("records.openai.jsonl.job.json").write_text(json.dumps(record), encoding="utf-8")
        again = data_process.run(**flags, api_base=server.base_url)
        assert again["job_id"] == first["job_id"] and len(server.job_creates) == 1
        # a record of before --method (no method, no beta) is an SFT job: reused too
        Path("records.openai.jsonl.job.json").write_text(json.dumps(
            {k: v for k, v in record.items() if k not in ("method", "beta")}), encoding="utf-8")
        assert data_process.run(**flags, api_base=server.base_url)["job_id"] == first["job_id"]
        assert len(server.job_creates) == 1
    assert data_process.LEGACY_STATE == {"method": "sft", "beta": None}


# ---------------------------------------------------------------------------------- iterate.py
def _plan(tmp_path: Path, **flags) -> iterate.Plan:
    defaults = {name: p.default for name, p in inspect.signature(iterate.run).parameters.items()}
    return iterate.make_plan(**{**defaults, "work_dir": str(tmp_path / "work"), **flags})


def test_iterate_state_keys_and_files(tmp_path):
    """state.json's step keys ("<iteration>/<step>"), the steps in order, and each step's files under
    <work_dir>/iter<K>/ (what --restart removes)."""
    plan = _plan(tmp_path, epochs="4,5")
    assert plan.state_file == plan.work_dir / "state.json"
    assert [iterate._key(k, s) for k, s in plan.steps()] == [  # PINNED
        "0/eval_qa", "0/eval_imhi", "1/generate", "1/finetune", "1/eval_qa", "1/eval_imhi", "2/generate", "2/finetune",
        "2/eval_qa", "2/eval_imhi"]
    assert iterate.OPENAI_DATA == {"sft": "finetune.openai.jsonl", "dpo": "finetune.openai_dpo.jsonl"}  # PINNED
    folder = tmp_path / "iter1"
    assert {step: [str(p.relative_to(folder)) for p in iterate._step_files(folder, step)]
            for step in iterate.STEPS} == {  # PINNED
        "generate": ["records.jsonl", "records.errors.jsonl", "records.summary.json"],
        "finetune": ["model", "finetune.openai.jsonl", "finetune.openai.jsonl.job.json", "finetune.openai_dpo.jsonl",
                     "finetune.openai_dpo.jsonl.job.json"],
        "eval_qa": ["eval/qa"], "eval_imhi": ["eval/imhi"], "eval_counsel": ["eval/counsel"]}


def _recorded(plan: iterate.Plan, iteration: int, step: str, model=None) -> list[dict]:
    calls = [c.record(plan.work_dir) for c in iterate.calls_for(plan, iteration, step, model)]
    return json.loads(json.dumps(calls).replace(str(ROOT), "<ROOT>"))


def test_iterate_recorded_stage_calls(tmp_path, monkeypatch):
    """The stage commands state.json records for each step; a re-run compares them (bar the stages'
    RUNNING_FLAGS) and refuses a step recorded with others."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-golden-test")
    plan = _plan(tmp_path)
    got = {step: _recorded(plan, 1, step) for step in ("generate", "finetune", "eval_qa", "eval_imhi")}
    assert got == {  # PINNED
        "generate": [{"script": "arena_med.py", "command": None, "args": {"output_file": "<work_dir>/iter1/records.jsonl"}}],
        "finetune": [{"script": "llama_finetune.py", "command": None, "args": {
            "new_name": "model", "output_dir": "<work_dir>/iter1", "data_files": "<work_dir>/iter1/records.jsonl",
            "nepoch": 4, "merge": True}}],
        "eval_qa": [{"script": "MedQA_eval.py", "command": None, "args": {
                        "dataset": "MedQA", "data_file": "<ROOT>/data/qa_sample/medqa.jsonl",
                        "output_dir": "<work_dir>/iter1/eval/qa"}},
                    {"script": "MedQA_eval.py", "command": None, "args": {
                        "dataset": "PubMedQA", "data_file": "<ROOT>/data/qa_sample/pubmedqa.jsonl",
                        "output_dir": "<work_dir>/iter1/eval/qa"}}],
        "eval_imhi": [{"script": "IMHI_eval.py", "command": None, "args": {"output_dir": "<work_dir>/iter1/eval/imhi"}}]}
    gpt = _plan(tmp_path, backend="openai", eval="none")
    assert _recorded(gpt, 1, "finetune", "gpt-3.5-turbo-0125") == [{  # PINNED
        "script": "data_process.py", "command": None, "args": {
            "input_file": "<work_dir>/iter1/records.jsonl", "base_model": "gpt-3.5-turbo-0125",
            "finetune_file": "<work_dir>/iter1/finetune.openai.jsonl", "n_epochs": 4, "wait": True}}]


def test_iterate_input_digests(tmp_path):
    """iterate.input_digests: the content of each input a step read (a file, or a folder such as a merged
    model), recorded in state.json and compared on resume; the outputs' flags are left out."""
    data = tmp_path / "records.jsonl"
    data.write_bytes(b'{"a": 1}\n')
    model = tmp_path / "merged"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_bytes(b"{}")
    (model / "sub" / "w.bin").write_bytes(bytes(range(64)))
    call = iterate.Call("llama_finetune.py", {"data_files": str(data), "base_model": str(model), "nepoch": 4,
                                              "output_dir": str(tmp_path), "new_name": "model", "merge": True})
    assert iterate.input_digests(call, {}) == {"data_files": "fa06f9e632edb64c", "base_model": "ed7780d396d89533"}  # PINNED


def test_iterate_running_flags_of_every_stage():
    """The stage flags a re-run of iterate.py may change without a recorded step being refused."""
    assert {script: tuple(flags) for script, flags in iterate.RUNNING_FLAGS.items()} == {  # PINNED
        "arena_med.py": ("progress", "concurrency", "max_batch_size", "prefix_cache_gb", "device", "request_timeout",
                         "api_key_env", "judge_api_key_env"),
        "llama_finetune.py": ("output_dir", "resume", "merge", "logging_steps", "save_steps", "save_total_limit",
                              "gradient_checkpointing"),
        "data_process.py": ("poll_seconds", "request_timeout", "api_key_env"),
        "MedQA_eval.py": ("progress", "batch_size", "device", "request_timeout", "api_key_env"),
        "IMHI_eval.py": ("progress", "batch_size", "device", "request_timeout", "api_key_env"),
        "Counsel_eval.py": ("progress", "batch_size", "reward_batch_size", "device", "request_timeout", "api_key_env",
                            "judge_api_key_env", "baseline_api_key_env")}
    assert iterate.OUTPUT_FLAGS == frozenset({"output_dir", "new_name", "finetune_file", "output_file"})  # PINNED
