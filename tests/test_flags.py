"""Every numeric flag of every script is range-checked first (mentalarena/flags.py): a bad value is
one line, exit status 2, before any file is read or written and before any model loads."""
from __future__ import annotations

import asyncio
import math

import pytest
from conftest import ScriptedBackend

import arena_med
import Counsel_eval
import data_process
import IMHI_eval
import iterate
import llama_finetune
import MedQA_eval
from mentalarena.selfplay.data import DEFAULT_PATIENTS_FILE, DEFAULT_PRINCIPLES_FILE, load_patients, load_principles
from mentalarena.engines.engine import Gate, ModelClient
from mentalarena.errors import InputError
from mentalarena.flags import (OVERRIDES, RANGES, Range, check_numbers, command_name, has_range, numeric_flags,
                               range_of, whole)
from mentalarena.prompts import Prompts

COMMANDS = [arena_med.run, arena_med.report, data_process.run, llama_finetune.run, iterate.run, MedQA_eval.run,
            MedQA_eval.suite, MedQA_eval.report, IMHI_eval.run, IMHI_eval.report, Counsel_eval.run, Counsel_eval.report]
MAINS = {"arena_med": arena_med.main, "data_process": data_process.main, "llama_finetune": llama_finetune.main,
         "iterate": iterate.main, "MedQA_eval": MedQA_eval.main, "IMHI_eval": IMHI_eval.main,
         "Counsel_eval": Counsel_eval.main}


# ---------------------------------------------------------------------------------- the table
@pytest.mark.parametrize("command", COMMANDS, ids=command_name)
def test_every_numeric_flag_of_every_command_has_a_range(command):
    """A flag added later without an entry in flags.RANGES (or OVERRIDES) fails here."""
    missing = [name for name in numeric_flags(command) if not has_range(command, name)]
    assert missing == [], f"{command_name(command)}: no range for --{', --'.join(missing)} in mentalarena/flags.py"


def test_the_commands_have_numeric_flags_and_every_override_names_one():
    assert {"max_tries", "limit", "request_timeout", "top_p"} <= set(numeric_flags(arena_med.run))
    by_name = {command_name(c): c for c in COMMANDS}
    for script_command, flag in OVERRIDES:
        assert flag in numeric_flags(by_name[script_command]), (script_command, flag)


@pytest.mark.parametrize("rule, value, admitted", [
    (whole(1), 1, True), (whole(1), 0, False), (whole(1), -1, False), (whole(1), 1.5, False), (whole(1), 2.0, False),
    (whole(1), True, False), (whole(1), "3", False), (whole(1), (1, 2), False), (whole(1), 10**12, True),
    (RANGES["temperature"], 0, True), (RANGES["temperature"], 0.0, True), (RANGES["temperature"], -0.01, False),
    (RANGES["temperature"], math.inf, False), (RANGES["temperature"], math.nan, False),
    (RANGES["top_p"], 1, True), (RANGES["top_p"], 1e-9, True), (RANGES["top_p"], 0, False), (RANGES["top_p"], 1.01, False),
    (RANGES["top_k"], 0, True), (RANGES["target_score"], 10, True), (RANGES["target_score"], 11, False),
    (RANGES["target_score"], 0, False), (RANGES["similarity_threshold"], -1, True),
    (RANGES["similarity_threshold"], 1.0, True), (RANGES["similarity_threshold"], 1.2, False),
    (RANGES["lora_dropout"], 0, True), (RANGES["lora_dropout"], 0.999, True), (RANGES["lora_dropout"], 1, False),
    (RANGES["diagnosis_margin"], 2, False), (RANGES["seed"], 2**32 - 1, True), (RANGES["seed"], 2**32, False),
    (RANGES["n_epochs"], "auto", True), (RANGES["n_epochs"], "Auto", False), (RANGES["n_epochs"], 3, True),
    (RANGES["cop_base"], 0, True), (RANGES["cop_base"], 2, False), (RANGES["request_timeout"], 0, False),
])
def test_a_range_admits(rule, value, admitted):
    assert rule.admits(value) is admitted


@pytest.mark.parametrize("rule, words", [
    (whole(1), "a whole number of at least 1"), (whole(0), "a whole number of at least 0"),
    (Range(0, above=True), "a positive number"), (Range(0), "a number of at least 0"),
    (RANGES["top_p"], "a number in (0, 1]"), (RANGES["warmup_ratio"], "a number in [0, 1)"),
    (RANGES["target_score"], "a whole number from 1 to 10"), (RANGES["cop_base"], "0 or 1"),
    (RANGES["similarity_threshold"], "a cosine similarity in [-1, 1]"),
    (RANGES["diagnosis_margin"], "a cosine-similarity gap in [0, 2)"),
    (RANGES["n_epochs"], "a whole number of at least 1 or auto"),
    (range_of(data_process.run, "beta"), "a positive number or auto"), (range_of(llama_finetune.run, "beta"),
                                                                        "a positive number"),
])
def test_a_range_says_what_it_takes(rule, words):
    assert rule.describe() == words


def test_none_passes_only_where_the_default_is_none():
    def command(limit: int | None = None, temperature: float = 0.8, name: str = "x", flag: bool = False):
        pass

    check_numbers(command, {"limit": None, "temperature": 0, "name": -1, "flag": True})  # text and bools: not numbers
    with pytest.raises(InputError, match=r"^--temperature must be a number of at least 0, not None$"):
        check_numbers(command, {"limit": 3, "temperature": None})
    with pytest.raises(InputError, match=r"^--arena_args: --limit must be a whole number of at least 1, not 0$"):
        check_numbers(command, {"limit": 0}, "--arena_args: ")


# ---------------------------------------------------------------------------------- through each script's main
LINE_1 = "a whole number of at least 1"
BAD = [
    # the cases (arena_med.py)
    ("arena_med", ["--max_tries", "0"], f"--max_tries must be {LINE_1}, not 0"),
    ("arena_med", ["--limit", "-1"], f"--limit must be {LINE_1}, not -1"),
    ("arena_med", ["--num_samples", "0"], f"--num_samples must be {LINE_1}, not 0"),
    ("arena_med", ["--concurrency", "0"], f"--concurrency must be {LINE_1}, not 0"),
    ("arena_med", ["--temperature", "-1"], "--temperature must be a number of at least 0, not -1"),
    ("arena_med", ["--max_new_tokens", "0"], f"--max_new_tokens must be {LINE_1}, not 0"),
    # the rest of arena_med.py, and what fire hands over for text, a bare flag and None
    ("arena_med", ["--target_score", "11"], "--target_score must be a whole number from 1 to 10, not 11"),
    ("arena_med", ["--top_p", "0"], "--top_p must be a number in (0, 1], not 0"),
    ("arena_med", ["--similarity_threshold", "1.5"], "--similarity_threshold must be a cosine similarity in [-1, 1], not 1.5"),
    ("arena_med", ["--dialogue_rounds", "-1"], "--dialogue_rounds must be a whole number of at least 0, not -1"),
    ("arena_med", ["--seed", "-3"], "--seed must be a whole number from 0 to 4294967295, not -3"),
    ("arena_med", ["--request_timeout", "0"], "--request_timeout must be a positive number, not 0"),
    ("arena_med", ["--max_context_tokens", "lots"], f"--max_context_tokens must be {LINE_1}, not 'lots'"),
    ("arena_med", ["--limit", "2.5"], f"--limit must be {LINE_1}, not 2.5"),
    ("arena_med", ["--max_tries"], f"--max_tries must be {LINE_1}, not True"),
    ("arena_med", ["--temperature", "None"], "--temperature must be a number of at least 0, not None"),
    ("arena_med", ["report", "--input_file", "r.jsonl", "--max_records", "0"], f"--max_records must be {LINE_1}, not 0"),
    ("data_process", ["--input_file", "r.jsonl", "--request_timeout", "-5"],
     "--request_timeout must be a positive number, not -5"),
    ("data_process", ["--input_file", "r.jsonl", "--min_examples", "-1"],
     "--min_examples must be a whole number of at least 0, not -1"),
    ("llama_finetune", ["--new_name", "x", "--data_files", "r.jsonl", "--save_total_limit", "0"],
     f"--save_total_limit must be {LINE_1}, not 0"),
    ("llama_finetune", ["--new_name", "x", "--data_files", "r.jsonl", "--lora_dropout", "1"],
     "--lora_dropout must be a number in [0, 1), not 1"),
    ("llama_finetune", ["--new_name", "x", "--data_files", "r.jsonl", "--dpo_nepoch", "0"],
     "--dpo_nepoch must be a positive number, not 0"),
    ("iterate", ["--work_dir", "run", "--iterations", "0"], f"--iterations must be {LINE_1}, not 0"),
    # a stage's flags in the loop's dicts: stopped before the loop's first step, named with their dict
    ("iterate", ["--work_dir", "run", "--arena_args", '{"max_tries": 0}'],
     f"--arena_args: --max_tries must be {LINE_1}, not 0"),
    ("iterate", ["--work_dir", "run", "--finetune_args", '{"warmup_ratio": 1.5}'],
     "--finetune_args: --warmup_ratio must be a number in [0, 1), not 1.5"),
    ("iterate", ["--work_dir", "run", "--qa_args", '{"repeats": 0}'], f"--qa_args: --repeats must be {LINE_1}, not 0"),
    ("MedQA_eval", ["--cop_base", "2"], "--cop_base must be 0 or 1, not 2"),
    ("MedQA_eval", ["suite", "--request_timeout", "0"], "--request_timeout must be a positive number, not 0"),
    ("MedQA_eval", ["--temperature", "-0.1"], "--temperature must be a number of at least 0, not -0.1"),
    ("IMHI_eval", ["--max_new_tokens", "0"], f"--max_new_tokens must be {LINE_1}, not 0"),
    ("IMHI_eval", ["--temperature", "-1"], "--temperature must be a number of at least 0, not -1"),
    ("Counsel_eval", ["--bootstrap", "-1"], "--bootstrap must be a whole number of at least 0, not -1"),
    ("Counsel_eval", ["--judge_temperature", "-2"], "--judge_temperature must be a number of at least 0, not -2"),
    ("Counsel_eval", ["--reward_max_length", "0"], f"--reward_max_length must be {LINE_1}, not 0"),
]
OUTPUTS = {"arena_med": ["--output_file", "out/arena.jsonl"], "data_process": ["--finetune_file", "out/ft.jsonl"],
           "llama_finetune": ["--output_dir", "out"], "iterate": [], "MedQA_eval": ["--output_dir", "out"],
           "IMHI_eval": ["--output_dir", "out"], "Counsel_eval": ["--output_dir", "out"]}


@pytest.mark.parametrize("script, argv, message", BAD, ids=[f"{s} {' '.join(a)}" for s, a, _ in BAD])
def test_a_bad_number_is_one_line_exit_2_and_nothing_is_written(tmp_path, monkeypatch, capsys, script, argv, message):
    monkeypatch.chdir(tmp_path)  # the scripts' default outputs land here too
    outputs = [] if argv[0] == "report" else OUTPUTS[script]
    assert MAINS[script]([*argv, *outputs]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- the ranges' low ends run
class _Counting(ScriptedBackend):
    def reply_for(self, messages):
        last = messages[-1]["content"]
        if "Rate this health state" in last:
            return "3"
        return "Group 1" if "number of the best group" in last else "A reply."


def test_a_session_runs_at_the_low_end_of_every_session_range():
    """0 dialogue rounds (the opening, then the decoder), 0 decoder rounds, 1 try, 1 principle group,
    target 1: a complete record. (0 tries had no candidate to keep: an IndexError.)"""
    settings = arena_med.Settings(base_model="s", judge_model="s", encoder="fixed", similarity_threshold=-1,
                                  dialogue_rounds=0, max_decode_rounds=0, max_tries=1, num_principle_groups=1,
                                  target_score=1, temperature=0)
    client = ModelClient(_Counting(), Gate(), 1)
    groups = load_principles(DEFAULT_PRINCIPLES_FILE)
    arena = arena_med.Arena(settings, Prompts(), client, client, _Similar(), groups)
    arena.rank_groups = lambda text, k: [(g, 1.0) for g in list(groups)[:k]]
    client.gate.active = 1
    record = asyncio.run(arena_med.run_session(load_patients(DEFAULT_PATIENTS_FILE)[0], 0, arena))
    steps = [t["step"] for t in record["transcript"]]
    assert not any(s.startswith("dialogue.") for s in steps) and steps[1].startswith("opening.")
    assert record["feedback_rounds"] == 0 and len(record["treatment_search"]["tries"]) == 1
    assert len(record["principles"]["candidates"]) == 1 and record["illness"] == "A reply."


class _Similar:
    name = "fixed"

    def similarities(self, pairs):
        return [1.0] * len(pairs)  # every item passes: no feedback
