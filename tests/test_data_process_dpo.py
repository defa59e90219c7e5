"""data_process.py --method dpo against the fake OpenAI server: preference pairs from scored records,
the DPO job (n_epochs, beta), job reuse and what makes a new job, key hygiene, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAKE_OPENAI_KEY as KEY
from conftest import shared_data
from fake_openai import FakeOpenAI, Faults
from test_data_process import run as run_sft

import data_process
from data_process import main
from mentalarena.training.preference import validate_openai_file

SYSTEM = "You are a psychiatric expert."
QUESTION = {"diagnosis": "What is the most likely diagnosis in this patient?",
            "treatment": "What is the most appropriate treatment for the patient?",
            "medication": "What is the proper medication for this patient?"}
DIAGNOSES = ["Major depressive disorder.", "Generalized anxiety disorder."]


def scored(i: int) -> dict:
    """An arena_med.py record: the six SFT fields plus the doctors' diagnoses and both searches' tries.
    The final illness names a doctor (odd records the second), so no sentence encoder is needed."""
    return {"symptom": f"Patient {i} feels low.", "illness": f"Doctor {1 + i % 2} is right: "
            + DIAGNOSES[i % 2].lower(), "treatment": "BA", "explain_t": "x", "medicine": "Sertraline",
            "explain_m": "y", "diagnoses": DIAGNOSES,
            "treatment_search": {"tries": [{"candidate": f" CBT for {i} ", "score": 3},
                                           {"candidate": f"Behavioural activation for {i}", "score": 8},
                                           {"candidate": "no number in the judge's reply", "score": 0}]},
            "medicine_search": {"tries": [{"candidate": "Sertraline", "score": 7},
                                          {"candidate": "Diazepam", "score": 6}]}}


def row(kind: str, i: int, chosen: str, rejected: str) -> dict:
    return {"input": {"messages": [{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": f"Patient {i} feels low.\n{QUESTION[kind]}"}]},
            "preferred_output": [{"role": "assistant", "content": chosen}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}]}


def expected(n: int, diagnosis: bool = True, medication: bool = False) -> list[dict]:
    """Per record: the named doctor's diagnosis over the other, the best try over the worst scored one
    (gap 5); the medication tries are 1 apart, under the default margin of 2."""
    rows = []
    for i in range(n):
        if diagnosis:
            rows.append(row("diagnosis", i, DIAGNOSES[i % 2], DIAGNOSES[1 - i % 2]))
        rows.append(row("treatment", i, f"Behavioural activation for {i}", f"CBT for {i}"))
        if medication:
            rows.append(row("medication", i, "Sertraline", "Diazepam"))
    return rows


def write_records(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps(scored(i)) + "\n" for i in range(n)), encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(server: FakeOpenAI | None, *args: str) -> int:
    """data_process.py as the SFT tests run it (records.jsonl -> ft.jsonl, the fake server), with --method dpo."""
    return run_sft(server, "--method", "dpo", *args)


def state(openai_cwd: Path) -> dict:
    return json.loads((openai_cwd / "ft.jsonl.job.json").read_text())


# ---------------------------------------------------------------------------------- conversion
def test_convert_only_writes_exactly_the_expected_pairs(openai_cwd, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    write_records(openai_cwd / "records.jsonl", 4)
    result = data_process.run("records.jsonl", method="dpo", convert_only=True)
    out = Path(result["finetune_file"])
    assert out.name == "records.openai_dpo.jsonl"  # the SFT file (.openai.jsonl) is another one
    assert read_rows(out) == expected(4)
    assert validate_openai_file(out) == []
    assert (result["method"], result["pairs"], result["job_id"]) == ("dpo", 8, None)
    assert result["report"]["kinds"] == {"diagnosis": 4, "treatment": 4}
    assert result["report"]["dropped_margin"] == 4 and result["report"]["unscored"] == 4
    captured = capsys.readouterr()
    assert "4 records (0 without scores or diagnoses)" in captured.out and "8 pairs" in captured.out
    assert "wrote 8 preference pairs -> records.openai_dpo.jsonl" in captured.out
    # fewer than OpenAI's minimum is only a warning when nothing is uploaded
    assert "8 preference pairs; OpenAI fine-tuning needs at least 10" in captured.err
    assert not out.with_name(out.name + ".job.json").exists()


@pytest.mark.parametrize("args, rows", [
    (("--diagnosis_pairs", "false"), expected(3, diagnosis=False)),
    (("--min_margin", "1"), expected(3, medication=True)),
    (("--min_margin", "6"), expected(3, diagnosis=True)[::2]),  # the treatment gap (5) is now too small
])
def test_the_pair_flags_reach_the_builder(openai_cwd, monkeypatch, args, rows):
    monkeypatch.delenv("OPENAI_API_KEY")
    write_records(openai_cwd / "records.jsonl", 3)
    assert run(None, "--convert_only", *args) == 0
    assert read_rows(openai_cwd / "ft.jsonl") == rows


def test_all_pairs_through_the_command_line(openai_cwd, monkeypatch):
    """--all_pairs: every two scored tries at least --min_margin apart, the better one chosen, in try
    order, where the default pairs only the best with the worst. A third scored treatment try (5,
    between 3 and 8) makes the difference."""
    monkeypatch.delenv("OPENAI_API_KEY")
    records = []
    for i in range(2):
        record = scored(i)
        record["treatment_search"]["tries"].append({"candidate": f"Sleep diary for {i}", "score": 5})
        records.append(record)
    (openai_cwd / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    def pairs(i: int, treatments: list[tuple[str, str]]) -> list[dict]:
        return [row("diagnosis", i, DIAGNOSES[i % 2], DIAGNOSES[1 - i % 2]),
                *[row("treatment", i, chosen, rejected) for chosen, rejected in treatments],
                row("medication", i, "Sertraline", "Diazepam")]

    assert run(None, "--convert_only", "--min_margin", "1") == 0
    assert read_rows(openai_cwd / "ft.jsonl") == [
        r for i in range(2) for r in pairs(i, [(f"Behavioural activation for {i}", f"CBT for {i}")])]
    assert run(None, "--convert_only", "--min_margin", "1", "--all_pairs") == 0
    assert read_rows(openai_cwd / "ft.jsonl") == [r for i in range(2) for r in pairs(i, [
        (f"Behavioural activation for {i}", f"CBT for {i}"),        # tries 2 > 1 (8 > 3)
        (f"Behavioural activation for {i}", f"Sleep diary for {i}"),  # tries 2 > 3 (8 > 5)
        (f"Sleep diary for {i}", f"CBT for {i}")])]                 # tries 3 > 1 (5 > 3)
    assert run(None, "--convert_only", "--min_margin", "3", "--all_pairs", "true") == 0  # 5 - 3 is under 3
    assert read_rows(openai_cwd / "ft.jsonl") == [r for i in range(2) for r in [
        row("diagnosis", i, DIAGNOSES[i % 2], DIAGNOSES[1 - i % 2]),
        row("treatment", i, f"Behavioural activation for {i}", f"CBT for {i}"),
        row("treatment", i, f"Behavioural activation for {i}", f"Sleep diary for {i}")]]


def test_sft_stays_the_default_and_keeps_its_file_name(openai_cwd, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    write_records(openai_cwd / "records.jsonl", 2)
    result = data_process.run("records.jsonl", convert_only=True)
    assert result["finetune_file"] == "records.openai.jsonl" and result["method"] == "sft" and "pairs" not in result
    assert all("messages" in r for r in read_rows(openai_cwd / "records.openai.jsonl"))


def test_the_reference_records_carry_no_scores(openai_cwd, capsys):
    reference = shared_data("arena_outputs", "gpt_iter1_output.jsonl")
    with FakeOpenAI() as server:
        assert main(["--input_file", str(reference), "--finetune_file", "ft.jsonl", "--method", "dpo",
                     "--api_base", server.base_url]) == 2
        assert server.uploads == [] and server.job_creates == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {reference}: no preference pairs: ")
    assert "none of the 257 records carries try-and-reflect scores" in err
    assert not (openai_cwd / "ft.jsonl").exists()


# ---------------------------------------------------------------------------------- the job
def test_the_dpo_job_carries_its_method_epochs_and_beta_and_a_rerun_reuses_it(openai_cwd, capsys):
    write_records(openai_cwd / "records.jsonl", 6)
    with FakeOpenAI() as server:
        assert run(server, "--n_epochs", "3", "--beta", "0.2") == 0
        (upload,), (create,) = server.uploads, server.job_creates
        assert upload["content"] == (openai_cwd / "ft.jsonl").read_bytes() and validate_openai_file(openai_cwd / "ft.jsonl") == []
        tag = create.pop("metadata")["mentalarena_request"]  # the request's tag: found again after a lost answer
        assert len(tag) == 32 and state(openai_cwd)["pending_request"] is None
        assert create == {"training_file": upload["id"], "model": "gpt-4.1-mini-2025-04-14",
                          "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 3, "beta": 0.2}}}}
        job_id = state(openai_cwd)["job_id"]
        assert server.jobs[job_id]["job"]["hyperparameters"] == {"n_epochs": 3, "beta": 0.2}
        assert (state(openai_cwd)["method"], state(openai_cwd)["beta"]) == ("dpo", 0.2)
        assert "wrote 12 preference pairs" in capsys.readouterr().out

        assert run(server, "--n_epochs", "3", "--beta", "0.2", "--wait") == 0  # the same job, waited for
        out = capsys.readouterr().out
        assert "reusing it" in out and f"fine-tuned model ft:gpt-4.1-mini-2025-04-14:fake::{job_id}" in out
        assert len(server.job_creates) == 1 and len(server.uploads) == 1
        result = data_process.run("records.jsonl", "ft.jsonl", method="dpo", n_epochs=3, beta=0.2,
                                  api_base=server.base_url)
        assert (result["job_id"], result["status"], result["pairs"]) == (job_id, "succeeded", 12)
        assert len(server.job_creates) == 1


def test_a_changed_beta_or_method_makes_a_new_job(openai_cwd, capsys):
    write_records(openai_cwd / "records.jsonl", 6)
    with FakeOpenAI() as server:
        assert run(server, "--beta", "0.2") == 0
        assert run(server, "--beta", "0.5") == 0  # same data: the upload is reused
        assert (len(server.uploads), len(server.job_creates)) == (1, 2)
        assert "beta changed since job" in capsys.readouterr().out
        assert run(server, "--beta", "auto") == 0  # OpenAI chooses: no beta sent
        assert server.job_creates[-1]["method"] == {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 4}}}
        assert server.jobs[state(openai_cwd)["job_id"]]["job"]["hyperparameters"] == {"n_epochs": 4, "beta": "auto"}
        assert len(server.job_creates) == 3

        # the same file name for SFT: other data, other method, another job on the SFT default model
        assert main(["--input_file", "records.jsonl", "--finetune_file", "ft.jsonl", "--api_base", server.base_url]) == 0
        assert "data_sha256, base_model, method changed since job" in capsys.readouterr().out
        assert (len(server.uploads), len(server.job_creates)) == (2, 4)
        assert server.job_creates[-1]["model"] == "gpt-3.5-turbo-0125"
        assert server.job_creates[-1]["method"]["type"] == "supervised"
        assert len(state(openai_cwd)["previous_jobs"]) == 3


def test_a_job_recorded_before_method_existed_is_an_sft_job_and_reused(openai_cwd, capsys):
    write_records(openai_cwd / "records.jsonl", 6)
    argv = ["--input_file", "records.jsonl", "--finetune_file", "ft.jsonl", "--poll_seconds", "0.01"]
    with FakeOpenAI() as server:
        assert main([*argv, "--api_base", server.base_url]) == 0
        old = {k: v for k, v in state(openai_cwd).items() if k not in ("method", "beta")}  # as written before --method
        (openai_cwd / "ft.jsonl.job.json").write_text(json.dumps(old))
        assert main([*argv, "--api_base", server.base_url]) == 0
        assert "reusing it" in capsys.readouterr().out and len(server.job_creates) == 1
        assert run(server) == 0  # but DPO on the same file name is another job
        assert len(server.job_creates) == 2


def test_the_key_never_leaks(openai_cwd, capsys, monkeypatch):
    monkeypatch.setenv("FT_KEY", KEY)  # named for the servers below with --api_key_env
    write_records(openai_cwd / "records.jsonl", 6)
    with FakeOpenAI(require_key=KEY) as server:
        assert run(server, "--wait", "--api_key", KEY) == 0
        with FakeOpenAI(require_key="sk-another-key-entirely") as refusing:  # quotes the key it got in its 401
            assert run(refusing, "--api_key_env", "FT_KEY") == 1
        # takes the key, but its 400 quotes the whole Authorization header back (the message is printed)
        with FakeOpenAI(ft_faults=Faults(["ok", "400"]), echo_key=True) as echoing:
            assert run(echoing, "--beta", "0.1", "--api_key_env", "FT_KEY") == 1
            assert echoing.echoed == 1 and echoing.job_creates == []
    out, err = capsys.readouterr()
    assert "--api_key puts the key in your shell history" in err
    assert "the server refused the key in FT_KEY (HTTP 401)" in err
    assert "creating the fine-tuning job: HTTP 400 BadRequestError fake_400: injected 400 (request had " in err
    written = b"".join(p.read_bytes() for p in openai_cwd.rglob("*") if p.is_file())
    for text in (out, err, written.decode()):
        assert KEY not in text and KEY[8:20] not in text


def test_a_gpt_3_5_model_is_warned_about_not_refused(openai_cwd, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    write_records(openai_cwd / "records.jsonl", 6)
    assert run(None, "--convert_only", "--base_model", "gpt-3.5-turbo-0125") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "DPO" in line]
    assert warnings == ["warning: OpenAI offers DPO for the gpt-4.1 models, not gpt-3.5-turbo-0125; the job will "
                        "likely be refused (--base_model gpt-4.1-mini-2025-04-14)"]


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("lines, args, message", [
    ([scored(i) for i in range(6)], ("--beta", "0"), "--beta must be a positive number or auto, not 0"),
    ([scored(i) for i in range(6)], ("--beta", "-1.5"), "--beta must be a positive number or auto"),
    ([scored(i) for i in range(6)], ("--beta", "strong"), "--beta must be a positive number or auto, not 'strong'"),
    ([scored(i) for i in range(6)], ("--method", "ppo"), "--method must be one of sft, dpo, not 'ppo'"),
    ([scored(i) for i in range(6)], ("--min_margin", "0"), "--min_margin must be a positive number"),
    ([scored(i) for i in range(6)], ("--diagnosis_margin", "3"), "--diagnosis_margin must be a cosine-similarity gap"),
    ([scored(i) for i in range(3)], (), "records.jsonl: 6 preference pairs; OpenAI fine-tuning needs at least 10"),
    ([scored(0), {**scored(1), "treatment_search": 3}], (), 'records.jsonl: line 2: field "treatment_search" must be'),
    ([{"messages": [{"role": "user", "content": "q"}]}], (), "records.jsonl: line 1: an SFT row"),
])
def test_bad_input_exits_2_with_one_line_and_calls_nothing(openai_cwd, capsys, lines, args, message):
    (openai_cwd / "records.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (openai_cwd / "ft.jsonl").write_text("earlier output\n")
    with FakeOpenAI() as server:
        assert run(server, *args) == 2
        assert server.uploads == [] and server.job_creates == []
    assert (openai_cwd / "ft.jsonl").read_text() == "earlier output\n"
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]


def test_beta_belongs_to_dpo(openai_cwd, capsys):
    write_records(openai_cwd / "records.jsonl", 6)
    assert main(["--input_file", "records.jsonl", "--convert_only", "--beta", "0.1"]) == 2
    assert capsys.readouterr().err == "error: --beta is for --method dpo (the strength of DPO's preference penalty)\n"
    assert not (openai_cwd / "records.openai.jsonl").exists()
