"""data_process.py end to end against the fake OpenAI server: convert, upload, create, wait, reuse, failures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAKE_OPENAI_KEY as KEY
from fake_openai import FakeOpenAI, Faults

import data_process
from data_process import main, validate_chat_file


def record(i: int) -> dict:
    return {"symptom": f"Patient {i} feels low.", "illness": "Depression", "treatment": "CBT",
            "explain_t": "Beliefs.", "medicine": "Sertraline" if i % 2 else "None", "explain_m": "SSRI."}


def write_records(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps(record(i)) + "\n" for i in range(n)), encoding="utf-8")
    return path


def run(server: FakeOpenAI | None, *args: str) -> int:
    base = ["--api_base", server.base_url, "--poll_seconds", "0.01"] if server else []
    return main(["--input_file", "records.jsonl", "--finetune_file", "ft.jsonl", *base, *args])


def test_convert_only_writes_a_valid_file_and_calls_nothing(openai_cwd, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    write_records(openai_cwd / "records.jsonl", 6)
    assert run(None, "--convert_only") == 0
    rows = [json.loads(line) for line in (openai_cwd / "ft.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 6 * 2 + 3  # three odd records keep their medication pair
    assert validate_chat_file(openai_cwd / "ft.jsonl") == []
    assert "6 records" in capsys.readouterr().out
    assert not (openai_cwd / "ft.jsonl.job.json").exists()


def test_upload_create_wait_and_a_rerun_reuses_the_job(openai_cwd, capsys):
    write_records(openai_cwd / "records.jsonl", 6)
    with FakeOpenAI() as server:
        assert run(server, "--n_epochs", "3", "--suffix", "iter1") == 0
        assert len(server.uploads) == 1 and len(server.job_creates) == 1
        upload, create = server.uploads[0], server.job_creates[0]
        assert upload["purpose"] == "fine-tune" and upload["content"] == (openai_cwd / "ft.jsonl").read_bytes()
        tag = create.pop("metadata")["mentalarena_request"]  # the request's tag: found again after a lost answer
        assert len(tag) == 32
        assert create == {"training_file": upload["id"], "model": "gpt-3.5-turbo-0125", "suffix": "iter1",
                          "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}}}
        state = json.loads((openai_cwd / "ft.jsonl.job.json").read_text())
        assert (state["file_id"], state["status"]) == (upload["id"], "validating_files")
        assert server.retrieves == []
        capsys.readouterr()

        assert run(server, "--n_epochs", "3", "--suffix", "iter1", "--wait") == 0  # resumes waiting on the same job
        out = capsys.readouterr().out
        job_id = state["job_id"]
        assert "reusing it" in out and f"fine-tuned model ft:gpt-3.5-turbo-0125:fake::{job_id}" in out
        assert len(server.job_creates) == 1 and len(server.uploads) == 1
        assert set(server.retrieves) == {job_id}
        state = json.loads((openai_cwd / "ft.jsonl.job.json").read_text())
        assert (state["status"], state["fine_tuned_model"]) == ("succeeded", f"ft:gpt-3.5-turbo-0125:fake::{job_id}")

        assert run(server, "--n_epochs", "3", "--suffix", "iter1") == 0  # done: still no second job
        assert len(server.job_creates) == 1


def test_wait_follows_the_statuses_to_the_model_id(openai_cwd, capsys):
    write_records(openai_cwd / "records.jsonl", 6)
    with FakeOpenAI() as server:
        assert run(server, "--wait") == 0
        out = capsys.readouterr().out
        statuses = [line.rsplit(": ", 1)[1] for line in out.splitlines() if line.startswith("[data_process] job ftjob-")]
        assert statuses[:3] == ["validating_files", "queued", "running"]
        assert statuses[3].startswith("succeeded, fine-tuned model ft:gpt-3.5-turbo-0125:fake::ftjob-")


def test_new_data_or_settings_make_a_new_job(openai_cwd, capsys):
    write_records(openai_cwd / "records.jsonl", 6)
    with FakeOpenAI() as server:
        assert run(server) == 0
        first = json.loads((openai_cwd / "ft.jsonl.job.json").read_text())["job_id"]
        assert run(server, "--n_epochs", "6") == 0  # same data: the upload is reused
        assert (len(server.uploads), len(server.job_creates)) == (1, 2)
        assert "n_epochs changed since job" in capsys.readouterr().out
        write_records(openai_cwd / "records.jsonl", 7)
        assert run(server, "--n_epochs", "6") == 0
        assert (len(server.uploads), len(server.job_creates)) == (2, 3)
        state = json.loads((openai_cwd / "ft.jsonl.job.json").read_text())
        assert state["previous_jobs"][0] == first and len(state["previous_jobs"]) == 2
        assert "data_sha256 changed" in capsys.readouterr().out


def test_a_failed_job_exits_1_and_a_rerun_starts_again(openai_cwd, capsys):
    write_records(openai_cwd / "records.jsonl", 6)
    with FakeOpenAI(job_statuses=("queued", "running", "failed")) as server:
        assert run(server, "--wait") == 1
        assert "failed (The job failed (scripted by the fake server).)" in capsys.readouterr().out
        server.job_statuses = ["queued", "succeeded"]
        assert run(server, "--wait") == 0
        assert "ended failed: creating a new one" in capsys.readouterr().out
        assert len(server.job_creates) == 2 and len(server.uploads) == 1


def test_the_key_never_leaks(openai_cwd, capsys, monkeypatch):
    monkeypatch.setenv("FT_KEY", KEY)  # named for the servers below with --api_key_env
    write_records(openai_cwd / "records.jsonl", 6)
    with FakeOpenAI(require_key=KEY) as server:
        assert run(server, "--wait", "--api_key", KEY) == 0
        with FakeOpenAI(require_key="sk-another-key-entirely") as refusing:  # quotes the key it got in its 401
            assert run(refusing, "--api_key_env", "FT_KEY") == 1
        # takes the key, but its 400 quotes the whole Authorization header back (the message is printed)
        with FakeOpenAI(ft_faults=Faults(["400"]), echo_key=True) as echoing:
            assert run(echoing, "--api_key_env", "FT_KEY") == 1
            assert echoing.echoed == 1 and echoing.uploads == []
    out, err = capsys.readouterr()
    assert "--api_key puts the key in your shell history" in err
    assert "the server refused the key in FT_KEY (HTTP 401)" in err
    assert "uploading ft.jsonl: HTTP 400 BadRequestError fake_400: injected 400 (request had Authorization: Bearer " in err
    written = b"".join(p.read_bytes() for p in openai_cwd.rglob("*") if p.is_file())
    for text in (out, err, written.decode()):
        assert KEY not in text and KEY[8:20] not in text


def test_api_errors_are_one_line_and_exit_1(openai_cwd, capsys):
    write_records(openai_cwd / "records.jsonl", 6)
    with FakeOpenAI(ft_faults=Faults(["400"])) as server:
        assert run(server) == 1
        err = capsys.readouterr().err.strip()
        assert err == f"error: {server.base_url}: uploading ft.jsonl: HTTP 400 BadRequestError fake_400: injected 400"
        assert not (openai_cwd / "ft.jsonl.job.json").exists()
        assert run(server) == 0  # nothing was recorded, so the re-run simply does it all


def test_an_upload_is_reused_when_the_job_creation_failed(openai_cwd, capsys):
    write_records(openai_cwd / "records.jsonl", 6)
    with FakeOpenAI(ft_faults=Faults(["ok", "400"])) as server:
        assert run(server) == 1
        assert "creating the fine-tuning job: HTTP 400" in capsys.readouterr().err
        state = json.loads((openai_cwd / "ft.jsonl.job.json").read_text())
        assert state["file_id"] == server.uploads[0]["id"] and state["job_id"] is None
        assert run(server) == 0
        assert len(server.uploads) == 1 and server.job_creates[0]["training_file"] == state["file_id"]


@pytest.mark.parametrize("lines, args, message", [
    (None, (), "records.jsonl: file not found"),
    ([record(0), "{oops"], (), "records.jsonl: line 2: not valid JSON"),
    ([{"prompt": "x"}], (), "records.jsonl: line 1: neither a self-play record"),
    ([record(i) for i in range(3)], (), "records.jsonl: 7 examples; OpenAI fine-tuning needs at least 10"),
    ([record(0)], ("--n_epochs", "0"), "--n_epochs must be a whole number"),
    ([record(0)], ("--poll_seconds", "0"), "--poll_seconds must be a positive number, not 0"),
    ([{"symptom": "x"}], (), "records.jsonl: no training examples"),
    ([record(0)], ("--select", "kcenter"), "--select kcenter needs --select_size"),
    ([record(0)], ("--select", "ppl_iqr", "--method", "dpo"), "--select picks SFT examples; --method dpo uploads"),
    ([record(0)], ("--select_size", "3"), "--select_size is the number of rows kcenter keeps"),
])
def test_bad_input_exits_2_with_one_line_and_calls_nothing(openai_cwd, capsys, lines, args, message):
    if lines is not None:
        (openai_cwd / "records.jsonl").write_text("".join(x if isinstance(x, str) else json.dumps(x) + "\n" for x in lines))
    (openai_cwd / "ft.jsonl").write_text("earlier output\n")
    with FakeOpenAI() as server:
        assert run(server, *args) == 2
        assert server.uploads == [] and server.job_creates == []
    assert (openai_cwd / "ft.jsonl").read_text() == "earlier output\n"
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]


def test_no_key_or_a_broken_state_file_is_bad_input_found_before_writing(openai_cwd, capsys, monkeypatch):
    write_records(openai_cwd / "records.jsonl", 6)
    (openai_cwd / "ft.jsonl.job.json").write_text("{torn")
    assert run(None) == 2
    assert "ft.jsonl.job.json: not valid JSON (delete it to start a new job)" in capsys.readouterr().err
    monkeypatch.delenv("OPENAI_API_KEY")
    assert run(None) == 2
    assert "needs OPENAI_API_KEY: export it" in capsys.readouterr().err
    assert not (openai_cwd / "ft.jsonl").exists()


def test_selection_uploads_the_kept_examples_and_records_its_settings(openai_cwd, capsys, tiny_base):
    """--select ppl_iqr,kcenter (perplexity under --select_model, here a tiny random Llama): 5 of the
    15 examples are uploaded; the counts are in the result, the settings in the job record; the same
    flags again reuse the job (the selection is deterministic), another size makes a new one."""
    write_records(openai_cwd / "records.jsonl", 6)
    flags = ["--select", "ppl_iqr,kcenter", "--select_size", "5", "--select_model", tiny_base, "--min_examples", "0"]
    with FakeOpenAI() as server:
        assert run(server, *flags) == 0
        (upload,) = server.uploads
        assert len(upload["content"].splitlines()) == 5
        state = json.loads((openai_cwd / "ft.jsonl.job.json").read_text())
        assert state["selection"]["methods"] == ["ppl_iqr", "kcenter"] and state["selection"]["select_size"] == 5
        assert state["selection"]["perplexity_model"] == tiny_base and state["selection"]["format"] == "chat_template"
        assert "[data_process] selection: 15 rows -> 5 kept: ppl_iqr kept" in capsys.readouterr().out
        assert run(server, *flags) == 0
        assert "reusing it" in capsys.readouterr().out and len(server.job_creates) == 1
        assert run(server, *flags[:3], "4", *flags[4:]) == 0
        assert len(server.job_creates) == 2 and len(server.uploads[-1]["content"].splitlines()) == 4
    result = data_process.run("records.jsonl", finetune_file="sel.jsonl", convert_only=True, select="ppl_iqr,kcenter",
                              select_size=5, select_model=tiny_base)
    ppl, kcenter = result["selection"]["steps"]
    assert ppl["in"] == 15 and ppl["kept"] + ppl["dropped"] == 15 and (kcenter["in"], kcenter["kept"]) == (ppl["kept"], 5)
    assert (openai_cwd / "sel.jsonl").read_bytes() == upload["content"]
    assert data_process.run("records.jsonl", convert_only=True)["selection"] is None


def test_several_inputs_as_a_comma_list(openai_cwd):
    write_records(openai_cwd / "a.jsonl", 6)
    (openai_cwd / "b.jsonl").write_text(json.dumps(record(6)) + "\n" + json.dumps({"illness": "x"}) + "\n")
    result = data_process.run("a.jsonl,b.jsonl", convert_only=True)
    assert result["finetune_file"] == "a.openai.jsonl"
    assert result["report"]["records"] == 8 and result["report"]["rows"] == 15 + 2
    assert result["report"]["problems"] == ['b.jsonl: line 2: field "symptom" is missing']


@pytest.mark.parametrize("row, problem", [
    ({"messages": []}, 'field "messages" must be a non-empty list'),
    ({"messages": [{"role": "tool", "content": "x"}]}, "every message needs a role"),
    ({"messages": [{"role": "user", "content": None}]}, 'needs a text "content"'),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ([1, 2], 'field "messages" must be a non-empty list'),
])
def test_chat_format_validation(tmp_path, row, problem):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "ft.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    problems = validate_chat_file(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: line 2: ") and problem in problems[0]
