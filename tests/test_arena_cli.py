"""arena_med.py end to end against the fake OpenAI server: kill -9 and resume, fault storms, failed
sessions, bad input, secrets, and the resume skip.

Runs are kept small: one dialogue round, no decoder feedback rounds and one try per search, so a
session is 22 model calls. Most runs are real subprocesses (`python arena_med.py ...`), as a user
would start them; the bad-input checks call `arena_med.main` in the test process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI, Faults

import arena_med

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "arena_med.py"
PATIENTS = json.loads((ROOT / "data" / "sample_patients.json").read_text(encoding="utf-8"))
ALL_IDS = [p["id"] for p in PATIENTS]
PAPER_FIELDS = ("symptom", "illness", "treatment", "explain_t", "medicine", "explain_m")
SUBPROCESS_TIMEOUT = 150

EXTRACTION_REPLY = ("Treatment: cognitive behavioural therapy\nExplanation: it addresses the core beliefs\n"
                    "Medicine: sertraline\nExplanation: it eases the low mood")


# ---------------------------------------------------------------- helpers

def last_user(request: dict) -> str:
    users = [m["content"] for m in request["messages"] if m["role"] == "user"]
    return users[-1] if users else request["messages"][-1]["content"]


def make_responder(delay: float = 0.0):
    """Short replies that every parser accepts: a group number, a score, an extraction block."""
    def reply(request: dict) -> str:
        if delay:
            time.sleep(delay)
        text = last_user(request)
        if "extract the treatment" in text:
            return EXTRACTION_REPLY
        if "Choose the group" in text:
            return "2"
        return "7"
    return reply


class RequestFaults(Faults):
    """Faults chosen by the request itself: `rule(request)` names a fault kind, or None for the
    ordinary script/random behaviour. The request comes from `RoutedFakeOpenAI.record`, which the
    server's handler calls in the same thread just before it asks for a fault."""

    def __init__(self, rule, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rule = rule
        self.current = threading.local()

    def next(self) -> str | None:
        request = getattr(self.current, "request", None)
        kind = self.rule(request) if request is not None else None
        if kind is None:
            return super().next()
        self.injected.append(kind)
        return kind


class RoutedFakeOpenAI(FakeOpenAI):
    def record(self, body: dict, authorization: str | None, headers: dict | None = None) -> None:
        super().record(body, authorization, headers)
        if isinstance(self.faults, RequestFaults):
            self.faults.current.request = body


def mentions(request: dict, needle: str) -> bool:
    return needle in last_user(request)


def command(base_url: str, output: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--base_model", "fake-model", "--api_base", base_url,
            "--output_file", str(output), "--max_tries", "1", "--max_decode_rounds", "0",
            "--dialogue_rounds", "1", "--concurrency", "4", "--progress", "False", *extra]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    # offline, and light on a shared machine: the encoder needs no more than one thread here
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_cli(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env or cli_env(), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


def read_records(path: Path) -> list[dict]:
    """Every line of a finished output: whole, newline-terminated, valid JSON."""
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), "the output ends in a torn line"
    lines = raw.decode("utf-8").split("\n")[:-1]
    assert all(line.strip() for line in lines), "blank line in the output"
    return [json.loads(line) for line in lines]


def complete_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def sidecar(output: Path, suffix: str) -> Path:
    return output.with_name(output.stem + suffix)


def check_sessions(rows: list[dict], expected: list[tuple[str, int]]) -> None:
    pairs = Counter((r["patient_id"], r["sample"]) for r in rows)
    duplicated = {pair: n for pair, n in pairs.items() if n > 1}
    assert not duplicated, f"sessions written more than once: {duplicated}"
    assert sorted(pairs) == sorted(expected)
    for row in rows:
        for field in PAPER_FIELDS:
            assert isinstance(row.get(field), str), f"{row['patient_id']}: field {field!r} missing"
        assert row["treatment"] and row["medicine"]
        assert isinstance(row["transcript"], list) and len(row["transcript"]) == row["calls"] > 0
    assert len({r["settings_hash"] for r in rows}) == 1


def all_pairs(ids=ALL_IDS, samples: int = 1) -> list[tuple[str, int]]:
    return [(pid, k) for pid in ids for k in range(samples)]


# ---------------------------------------------------------------- 1. kill -9 and resume

@pytest.mark.parametrize("kill_after", [1, 5])
def test_kill_9_then_resume_writes_every_session_once(tmp_path, kill_after):
    output = tmp_path / "out.jsonl"
    with FakeOpenAI(responder=make_responder(delay=0.1)) as server:
        cmd = command(server.base_url, output, "--num_samples", "2")
        first_log = tmp_path / "first.log"
        with open(first_log, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + SUBPROCESS_TIMEOUT
                while complete_lines(output) < kill_after:
                    assert proc.poll() is None, "the run ended before the kill:\n" + first_log.read_text()
                    assert time.monotonic() < deadline, "no output in time:\n" + first_log.read_text()
                    time.sleep(0.05)
                os.kill(proc.pid, signal.SIGKILL)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, first_log.read_text()
        lock = output.with_name(output.name + ".lock")
        assert lock.exists()  # the killed run could not remove its lock file: the resume must not mind

        # What the killed run left: whole lines (and possibly a torn one); add a torn line ourselves.
        raw = output.read_bytes()
        kept = raw[: raw.rfind(b"\n") + 1]
        done_before = [json.loads(line) for line in kept.decode("utf-8").splitlines()]
        assert kill_after <= len(done_before) < 16
        with open(output, "ab") as f:
            f.write(b'{"symptom": "cut short by kill -9", "patient_id": "s-')

        requests_before = len(server.requests)
        result = run_cli(cmd)
        assert result.returncode == 0, explain(result)
        resume_requests = len(server.requests) - requests_before

    assert "incomplete last line" in result.stderr, explain(result)
    assert not lock.exists()  # the finished run removed it
    after = output.read_bytes()
    assert after.startswith(kept), "records of the killed run were changed"
    rows = read_records(output)
    check_sessions(rows, all_pairs(samples=2))
    assert len(rows) == 16
    new_rows = rows[len(done_before):]
    # the resume ran the missing sessions only, each from the start
    assert sum(r["calls"] for r in new_rows) == resume_requests
    summary = json.loads(sidecar(output, ".summary.json").read_text())
    assert summary["skipped"] == len(done_before)
    assert summary["sessions_ok"] == 16 - len(done_before)
    assert summary["sessions_failed"] == 0
    assert not sidecar(output, ".errors.jsonl").exists()


# ---------------------------------------------------------------- 2. fault storm

def test_fault_storm_completes_every_session_once(tmp_path):
    output = tmp_path / "storm.jsonl"
    faults = Faults(rate=0.3, kinds=("429:0", "500", "503", "malformed", "empty_choices", "drop"), seed=11)
    with FakeOpenAI(responder=make_responder(), faults=faults) as server:
        result = run_cli(command(server.base_url, output, "--concurrency", "8"))
        total_requests = len(server.requests)
    assert result.returncode == 0, explain(result)
    assert "Traceback" not in result.stderr
    assert len(faults.injected) >= 20, faults.injected  # the storm really happened
    assert set(faults.injected) >= {"500", "drop", "malformed"}

    rows = read_records(output)
    check_sessions(rows, all_pairs())
    summary = json.loads(sidecar(output, ".summary.json").read_text())
    assert summary["sessions_ok"] == len(PATIENTS)
    assert summary["sessions_failed"] == 0 and summary["errors_file"] is None
    base = summary["clients"]["base"]
    # every fault cost exactly one retry; every reply the server sent reached a session
    assert base["http_retries"] == len(faults.injected)
    assert base["http_requests"] == total_requests
    assert base["http_failures"] == 0
    assert summary["model_calls"] == sum(r["calls"] for r in rows) == total_requests - len(faults.injected)
    assert not sidecar(output, ".errors.jsonl").exists()


# ---------------------------------------------------------------- 3. a session that fails after retries

def test_failed_session_is_reported_and_rerun_alone(tmp_path):
    failing = PATIENTS[2]
    assert all(failing["name"] not in json.dumps(p) for p in PATIENTS if p is not failing)
    output = tmp_path / "out.jsonl"
    errors = sidecar(output, ".errors.jsonl")
    broken = {"on": True}

    def rule(request):  # 500 with Retry-After 0: retried at once, every time, until the client gives up
        return "500:0" if broken["on"] and mentions(request, failing["name"]) else None

    faults = RequestFaults(rule)
    with RoutedFakeOpenAI(responder=make_responder(), faults=faults) as server:
        cmd = command(server.base_url, output)
        result = run_cli(cmd)
        assert result.returncode == 1, explain(result)
        failing_requests = [r for r in server.requests if mentions(r, failing["name"])]

        [error] = [json.loads(line) for line in errors.read_text().splitlines()]
        assert error["patient_id"] == failing["id"] and error["sample"] == 0
        assert "ModelCallError" in error["error"] and "HTTP 500" in error["error"]
        attempts = int(error["error"].split("gave up after ")[1].split()[0])
        assert attempts > 1 and len(failing_requests) == attempts  # retried, then given up
        assert failing["id"] in result.stderr  # the log line names the session

        rows = read_records(output)
        check_sessions(rows, [(pid, 0) for pid in ALL_IDS if pid != failing["id"]])
        summary = json.loads(sidecar(output, ".summary.json").read_text())
        assert (summary["sessions_ok"], summary["sessions_failed"]) == (len(PATIENTS) - 1, 1)
        assert summary["errors_file"] == str(errors)

        # The server heals; the same command runs the failed session and nothing else.
        broken["on"] = False
        before = len(server.requests)
        again = run_cli(cmd)
        assert again.returncode == 0, explain(again)
        rerun_requests = len(server.requests) - before

    rows = read_records(output)
    check_sessions(rows, all_pairs())
    assert rows[-1]["patient_id"] == failing["id"]
    assert rows[-1]["calls"] == rerun_requests
    summary = json.loads(sidecar(output, ".summary.json").read_text())
    assert (summary["sessions_ok"], summary["sessions_failed"], summary["skipped"]) == (1, 0, len(PATIENTS) - 1)
    assert not errors.exists(), "the errors file must describe the latest run only"


# ---------------------------------------------------------------- 4. bad input

TORN_OUTPUT = b'{"patient_id": "s-1", "sample": 0, "settings_hash": "x"}\n{"patient_id": "s-2", "sam'


def _patients_without_coping(tmp_path: Path) -> tuple[list[str], list[str]]:
    entries = json.loads(json.dumps(PATIENTS))
    del entries[2]["coping_strategies"]
    path = tmp_path / "my_patients.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return ["--patients_file", str(path)], ["my_patients.json", "entry 2", PATIENTS[2]["id"], "coping_strategies"]


def _unknown_feedback_mode(tmp_path: Path) -> tuple[list[str], list[str]]:
    return ["--feedback_mode", "loud"], ["--feedback_mode", "steer", "reference", "loud"]


def _unknown_score_parser(tmp_path: Path) -> tuple[list[str], list[str]]:
    return ["--score_parser", "first_integer"], ["--score_parser must be one of robust, reference, not 'first_integer'"]


def _principles_missing_column(tmp_path: Path) -> tuple[list[str], list[str]]:
    path = tmp_path / "my_principles.csv"
    path.write_text("CreatorID,Text\n0,Be vague at first.\n", encoding="utf-8")
    return ["--principles_file", str(path)], ["my_principles.csv: line 1 (header)", 'column "Principles"']


@pytest.mark.parametrize("case", [_patients_without_coping, _unknown_feedback_mode, _unknown_score_parser,
                                  _principles_missing_column],
                         ids=["patient-missing-field", "unknown-feedback-mode", "unknown-score-parser",
                              "principles-missing-column"])
def test_bad_input_is_one_error_line_and_touches_nothing(tmp_path, capsys, monkeypatch, case):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    args, expected = case(tmp_path)
    output = tmp_path / "out.jsonl"
    output.write_bytes(TORN_OUTPUT)  # even a torn line must survive: nothing is read or repaired
    with FakeOpenAI(responder=make_responder()) as server:
        code = arena_med.main(["--base_model", "fake-model", "--api_base", server.base_url,
                               "--output_file", str(output), "--progress", "False", *args])
        assert server.requests == []
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert "Traceback" not in captured.out + captured.err
    assert output.read_bytes() == TORN_OUTPUT
    assert not sidecar(output, ".summary.json").exists()
    assert not sidecar(output, ".errors.jsonl").exists()


def test_output_made_with_other_settings_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / "out.jsonl"
    with FakeOpenAI(responder=make_responder()) as server:
        args = ["--base_model", "fake-model", "--api_base", server.base_url, "--output_file", str(output),
                "--limit", "1", "--max_tries", "1", "--max_decode_rounds", "0", "--dialogue_rounds", "1",
                "--progress", "False"]
        assert arena_med.main(args) == 0
        capsys.readouterr()
        before, requests = output.read_bytes(), len(server.requests)
        errors_file = sidecar(output, ".errors.jsonl")
        code = arena_med.main(args + ["--temperature", "0.5"])
        assert len(server.requests) == requests
    captured = capsys.readouterr()
    assert code == 2
    # the error is one line, and the last (the test below checks that it is the only one)
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and captured.err.rstrip("\n").endswith(errors[0]), captured.err
    assert f"{output}: line 1: made with other settings" in errors[0]
    assert "--output_file" in errors[0]
    assert "Traceback" not in captured.err
    assert output.read_bytes() == before
    assert not errors_file.exists()


def _other_patients(tmp_path: Path) -> list[str]:
    entries = json.loads(json.dumps(PATIENTS))
    entries[-1]["situation"] += " (edited)"  # a profile the run never reaches (--limit 1) still counts
    path = tmp_path / "edited_patients.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return ["--patients_file", str(path)]


def _other_principles(tmp_path: Path) -> list[str]:
    from mentalarena.selfplay.data import DEFAULT_PRINCIPLES_FILE
    path = tmp_path / "edited_principles.csv"
    path.write_text(Path(DEFAULT_PRINCIPLES_FILE).read_text(encoding="utf-8") + '99,"Mention the weather."\n',
                    encoding="utf-8")
    return ["--principles_file", str(path)]


@pytest.mark.parametrize("change", [
    lambda tmp: ["--max_context_tokens", "4000"],
    lambda tmp: ["--top_p", "0.9"],
    lambda tmp: ["--top_k", "40"],
    lambda tmp: ["--illness_prompt", "reference"],
    lambda tmp: ["--score_parser", "reference"],
    lambda tmp: ["--judge_backend", "embedded"],  # the same judge name, now a local model
    _other_patients,
    _other_principles,
], ids=["max_context_tokens", "top_p", "top_k", "illness_prompt", "score_parser", "judge-runs-locally",
        "patients-content", "principles-content"])
def test_what_shapes_a_session_is_in_the_hash_and_more_of_the_same_extends(tmp_path, capsys, monkeypatch, change):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    output = tmp_path / "out.jsonl"
    with FakeOpenAI(responder=make_responder()) as server:
        args = ["--base_model", "fake-model", "--api_base", server.base_url, "--output_file", str(output),
                "--max_tries", "1", "--max_decode_rounds", "0", "--dialogue_rounds", "1", "--progress", "false"]
        assert arena_med.main(args + ["--limit", "1"]) == 0
        before, requests = output.read_bytes(), len(server.requests)
        capsys.readouterr()
        assert arena_med.main(args + ["--limit", "1"] + change(tmp_path)) == 2
        assert f"{output}: line 1: made with other settings" in capsys.readouterr().err
        assert output.read_bytes() == before and len(server.requests) == requests
        # more of the same: a larger --limit and another sample per patient extend the output
        assert arena_med.main(args + ["--limit", "2", "--num_samples", "2"]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted((r["patient_id"], r["sample"]) for r in rows) == sorted(
        (p, k) for p in ALL_IDS[:2] for k in range(2))
    assert len({r["settings_hash"] for r in rows}) == 1


def test_a_local_run_in_another_dtype_is_refused(tmp_path, capsys):
    from conftest import embedded_tokenizer, make_tiny_llama
    tiny = make_tiny_llama(tmp_path / "tiny", embedded_tokenizer(), max_position_embeddings=4096)
    output = tmp_path / "out.jsonl"
    args = ["--base_model", tiny, "--output_file", str(output), "--limit", "1", "--max_new_tokens", "4",
            "--max_tries", "1", "--max_decode_rounds", "0", "--dialogue_rounds", "1", "--progress", "false"]
    assert arena_med.main(args + ["--dtype", "float32"]) == 0
    before = output.read_bytes()
    assert json.loads(before.decode().splitlines()[0])["settings"]["dtype"] == "float32"
    capsys.readouterr()
    assert arena_med.main(args + ["--dtype", "bfloat16"]) == 2
    assert "made with other settings" in capsys.readouterr().err and output.read_bytes() == before


def test_output_with_other_settings_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / "out.jsonl"
    # a torn tail too: a refused run must not even repair it
    content = b'{"patient_id": "s-1", "sample": 0, "settings_hash": "0123456789abcdef"}\n{"patient_id": "s-2'
    output.write_bytes(content)
    with FakeOpenAI(responder=make_responder()) as server:
        code = arena_med.main(["--base_model", "fake-model", "--api_base", server.base_url,
                               "--output_file", str(output), "--progress", "False"])
        assert server.requests == []
    captured = capsys.readouterr()
    assert code == 2 and output.read_bytes() == content
    assert len(captured.err.splitlines()) == 1, captured.err


def _prompt_dir_with(tmp_path: Path, name: str, text: str) -> Path:
    import shutil

    from mentalarena.prompts import PROMPT_DIR
    folder = tmp_path / "my_prompts"
    shutil.copytree(PROMPT_DIR, folder)
    (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    ("template", "text", "expected"),
    [
        # used only from the second try on, and only in steer mode after a decoder round: still found
        ("treatment_next", "Try another one for {illness} and {severity}.", ["treatment_next.txt", "{severity}"]),
        ("doctor_feedback", "{doctor_system}\nJudge says: {feedback} {mood}", ["doctor_feedback.txt", "{mood}"]),
        ("final_illness", "Which one? {review} {}", ["final_illness.txt", "bad template"]),
        ("symptom", "History: {history} {unclosed", ["symptom.txt", "bad template"]),
    ],
    ids=["slot-used-late", "slot-in-feedback", "positional-slot", "unclosed-brace"],
)
def test_prompt_with_unknown_slot_is_refused_before_anything_loads(tmp_path, capsys, monkeypatch, template,
                                                                   text, expected):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    import mentalarena.engines.backends as backends

    def no_model(*args, **kwargs):
        raise AssertionError("a backend was built before the prompts were checked")
    monkeypatch.setattr(backends, "make_backend", no_model)
    monkeypatch.setattr(arena_med, "Encoder", no_model)
    prompts = _prompt_dir_with(tmp_path, template, text)
    output = tmp_path / "run" / "out.jsonl"
    code = arena_med.main(["--output_file", str(output), "--prompt_dir", str(prompts), "--progress", "False"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert not output.parent.exists()  # not even the folder or the lock file


def test_missing_api_key_is_one_line_before_anything_is_touched(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    import mentalarena.engines.backends as backends

    def no_model(*args, **kwargs):
        raise AssertionError("a backend was built without a key")
    monkeypatch.setattr(backends, "make_backend", no_model)
    monkeypatch.setattr(arena_med, "Encoder", no_model)
    output = tmp_path / "out.jsonl"
    output.write_bytes(TORN_OUTPUT)
    for args in (["--base_model", "gpt-3.5-turbo"],
                 ["--base_model", "fake-model", "--api_base", "http://127.0.0.1:9/v1",
                  "--judge_model", "gpt-4-turbo", "--judge_api_base", "https://api.openai.com/v1"]):
        code = arena_med.main([*args, "--output_file", str(output), "--progress", "False"])
        captured = capsys.readouterr()
        assert code == 2
        lines = captured.err.splitlines()
        assert len(lines) == 1 and "OPENAI_API_KEY" in lines[0] and lines[0].startswith("error: "), captured.err
        assert "Traceback" not in captured.out + captured.err
    assert output.read_bytes() == TORN_OUTPUT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no lock, summary or errors file


# ---------------------------------------------------------------- 5. secrets

def test_api_key_reaches_the_server_and_nothing_else(tmp_path):
    secret = "sk-test-SECRET-" + uuid.uuid4().hex
    rejected = PATIENTS[1]
    output = tmp_path / "out.jsonl"
    # one patient's requests are refused (422: that request only, not retried): the error path must not leak either
    faults = RequestFaults(lambda request: "422" if mentions(request, rejected["name"]) else None,
                           rate=0.15, kinds=("500:0", "429:0", "malformed"), seed=3)
    # and every error body quotes the Authorization header back, as some servers and proxies do
    with RoutedFakeOpenAI(responder=make_responder(), faults=faults, echo_key=True) as server:
        # the server's key is named for it; OPENAI_API_KEY (another secret) belongs to the OpenAI API only
        result = run_cli(command(server.base_url, output, "--limit", "3", "--api_key_env", "SERVED_KEY"),
                         cli_env(SERVED_KEY=secret, OPENAI_API_KEY="sk-openai-SECRET-elsewhere"))
        headers = list(server.auth_headers)
    assert result.returncode == 1, explain(result)
    assert headers and all(h == f"Bearer {secret}" for h in headers)
    # the key was offered back in every error body: each injected status (422, 500, 429), not the malformed 200s
    assert server.echoed == sum(kind != "malformed" for kind in faults.injected) > 0

    assert secret not in result.stdout and secret not in result.stderr
    assert "SECRET" not in result.stdout + result.stderr
    errors = sidecar(output, ".errors.jsonl")
    [error] = [json.loads(line) for line in errors.read_text().splitlines()]
    assert error["patient_id"] == rejected["id"] and "not retried" in error["error"]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {output, errors, sidecar(output, ".summary.json")} <= set(written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), f"the key leaked into {path.name}"
    check_sessions(read_records(output), [(p["id"], 0) for p in PATIENTS[:3] if p is not rejected])


# ---------------------------------------------------------------- 6. resume skip

def test_rerunning_a_finished_command_makes_no_requests(tmp_path):
    output = tmp_path / "out.jsonl"
    with FakeOpenAI(responder=make_responder()) as server:
        cmd = command(server.base_url, output, "--limit", "2")
        first = run_cli(cmd)
        assert first.returncode == 0, explain(first)
        requests, content = len(server.requests), output.read_bytes()
        summary = sidecar(output, ".summary.json").read_bytes()
        second = run_cli(cmd)
        assert second.returncode == 0, explain(second)
        assert len(server.requests) == requests
    assert "2 done, 0 to run" in second.stdout, explain(second)
    assert output.read_bytes() == content
    assert sidecar(output, ".summary.json").read_bytes() == summary
    check_sessions(read_records(output), all_pairs(ALL_IDS[:2]))
