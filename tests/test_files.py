"""Files that are safe to write (mentalarena/store/files.py and its users): no write through a symbolic link
planted at an output, lock or temporary path; new files readable by their owner only (or the group,
by setting); a full disk is one line and leaves what was written before whole (a real kernel EFBIG
through RLIMIT_FSIZE in a subprocess); a file system without flock is one warning line."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import subprocess
import sys
import textwrap
from contextlib import ExitStack
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI

from mentalarena.reports import figures

from mentalarena.evaluation import imhi
from mentalarena.errors import InputError, StorageError
from mentalarena.store.jsonl import append_jsonl, read_jsonl, repair_torn_tail, write_json_atomic
from mentalarena.store.locks import OutputLock, hold_all
from mentalarena.training.sft import write_rows

ROOT = Path(__file__).resolve().parent.parent
VICTIM = b"someone else's file\n"
FULL_DISK = ("no space left on the device (or quota/size limit); what was written before is intact: "
             "free space and re-run to resume")


def held_lock(path: Path) -> None:
    with OutputLock(path):
        pass


# name -> a call that writes `path` the way the scripts do
WRITERS = {
    "append_jsonl": lambda p: append_jsonl(p, {"a": 1}),
    "write_json_atomic": lambda p: write_json_atomic(p, {"a": 1}),
    "write_rows": lambda p: write_rows(p, [{"a": 1}]),
    "write_generated_csv": lambda p: imhi.write_generated_csv(p, ["x"], ["y"]),
    "figure": lambda p: figures.training_curves([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], p, "t"),
}
ATOMIC = ("write_json_atomic", "write_rows", "write_generated_csv", "figure")


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def plant(link: Path, tmp_path: Path) -> Path:
    victim = tmp_path / "elsewhere" / "victim.txt"
    victim.parent.mkdir(exist_ok=True)
    victim.write_bytes(VICTIM)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)
    return victim


# ---------------------------------------------------------------------------------- planted links
@pytest.mark.parametrize("writer", [*WRITERS, "repair_torn_tail", "lock"])
def test_a_link_planted_at_an_output_or_lock_is_refused_and_its_target_untouched(tmp_path, writer):
    out = tmp_path / "shared" / ("out.png" if writer == "figure" else "out.jsonl")
    link = out.with_name(out.name + ".lock") if writer == "lock" else out
    victim = plant(link, tmp_path)
    if writer == "repair_torn_tail":
        victim.write_bytes(VICTIM + b'{"torn')  # a torn line to cut, at the link's target
    before = victim.read_bytes()
    call = {"repair_torn_tail": repair_torn_tail, "lock": held_lock}.get(writer) or WRITERS[writer]
    with pytest.raises(StorageError) as caught:
        call(out)
    assert str(caught.value).startswith(f"{link} is a symbolic link; refusing to write through it")
    assert "\n" not in str(caught.value)
    assert victim.read_bytes() == before and link.is_symlink()


@pytest.mark.parametrize("writer, old_temp", [
    ("write_json_atomic", "{name}.tmp"),         # the fixed name write_json_atomic used
    ("write_rows", ".{name}.{pid}.tmp"),         # write_rows' pid-named one
    ("figure", ".{stem}.{pid}.tmp.png"),         # figures.save's
])
def test_links_planted_at_predictable_temporary_names_are_left_alone(tmp_path, writer, old_temp):
    out = tmp_path / "shared" / ("out.png" if writer == "figure" else "out.json")
    link = out.with_name(old_temp.format(name=out.name, stem=out.stem, pid=os.getpid()))
    victim = plant(link, tmp_path)
    WRITERS[writer](out)
    assert victim.read_bytes() == VICTIM and link.is_symlink()
    assert out.is_file() and not out.is_symlink() and out.stat().st_size > 0
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, link.name])  # no temp file left


# ---------------------------------------------------------------------------------- modes
@pytest.mark.parametrize("setting, mode", [(None, 0o600), ("group", 0o640), ("owner", 0o600)])
@pytest.mark.parametrize("writer", [*WRITERS, "lock"])
def test_new_files_are_owner_only_unless_the_group_setting(tmp_path, monkeypatch, umask022, writer, setting, mode):
    if setting is None:
        monkeypatch.delenv("MENTALARENA_FILE_MODE", raising=False)
    else:
        monkeypatch.setenv("MENTALARENA_FILE_MODE", setting)
    out = tmp_path / "out.png"
    if writer == "lock":
        with OutputLock(out) as lock:
            assert stat.S_IMODE(lock.path.stat().st_mode) == mode
        return
    WRITERS[writer](out)
    assert stat.S_IMODE(out.stat().st_mode) == mode


@pytest.mark.parametrize("writer", WRITERS)
def test_an_existing_file_keeps_its_mode(tmp_path, umask022, writer):
    out = tmp_path / "out.png"
    out.write_bytes(b"")
    out.chmod(0o604)  # the user's own choice, whatever it is
    WRITERS[writer](out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o604


def test_a_bad_mode_setting_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MENTALARENA_FILE_MODE", "world")
    with pytest.raises(InputError, match=r"^MENTALARENA_FILE_MODE='world': must be owner .* or group"):
        append_jsonl(tmp_path / "out.jsonl", {"a": 1})
    assert not (tmp_path / "out.jsonl").exists()


# ---------------------------------------------------------------------------------- a full disk
def run_limited(code: str, limit: int, cwd: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter whose files may not grow past `limit` bytes: a write past it is
    the kernel's EFBIG, as a full disk's ENOSPC would be (SIGXFSZ ignored, so the write fails
    instead of killing the process)."""
    prelude = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from mentalarena.evaluation import imhi
        from mentalarena.errors import StorageError
        from mentalarena.store.jsonl import append_jsonl, write_json_atomic
        from mentalarena.training.sft import write_rows
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    """)
    script = prelude + "try:\n    " + code + "\nexcept StorageError as exc:\n    print(exc)\n    sys.exit(3)\n"
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_a_full_disk_cuts_the_append_back_and_says_so_in_one_line(tmp_path):
    out = tmp_path / "out.jsonl"
    append_jsonl(out, {"row": 1})
    append_jsonl(out, {"row": 2})
    before = out.read_bytes()
    result = run_limited(f"append_jsonl({str(out)!r}, {{'row': 3, 'text': 'x' * 20000}})", 4096, tmp_path)
    assert result.returncode == 3, result.stderr
    assert result.stdout == f"{out}: {FULL_DISK}\n"
    assert out.read_bytes() == before  # no torn row: the next run appends to whole rows
    append_jsonl(out, {"row": 3})
    assert [r["row"] for r in read_jsonl(out)] == [1, 2, 3]


@pytest.mark.parametrize("writer", ["write_json_atomic", "write_rows", "write_generated_csv"])
def test_a_full_disk_leaves_the_old_file_of_a_rewrite_whole(tmp_path, writer):
    out = tmp_path / "out.json"
    out.write_text('{"old": true}\n')
    big = "'x' * 20000"
    call = {"write_json_atomic": f"write_json_atomic({str(out)!r}, {{'new': {big}}})",
            "write_rows": f"write_rows({str(out)!r}, [{{'new': {big}}}])",
            "write_generated_csv": f"imhi.write_generated_csv({str(out)!r}, ['g'], [{big}])"}[writer]
    result = run_limited(call, 4096, tmp_path)
    assert result.returncode == 3, result.stderr
    assert result.stdout == f"{out}: {FULL_DISK}\n"
    assert out.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # its temporary file removed


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_sync_the_disk_refuses_also_cuts_the_append_back(tmp_path, monkeypatch, code):
    """Network file systems may take the write and report the full disk (or quota) at fsync."""
    out = tmp_path / "out.jsonl"
    append_jsonl(out, {"row": 1})
    before = out.read_bytes()

    def refuse(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(StorageError, match="no space left on the device"):
        append_jsonl(out, {"row": 2})
    monkeypatch.undo()
    assert out.read_bytes() == before


def test_a_script_stopped_by_a_full_disk_says_one_line_and_resumes(tmp_path):
    """MedQA_eval.py against the fake server, its files limited to 1500 bytes: the samples file
    fills, the run stops with one line (exit 1), and a re-run asks only what is missing."""
    data = tmp_path / "medqa.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q{i}: which one?", "options": {"A": "a", "B": "b"},
                                        "answer_idx": "A", "answer": "a"}) + "\n" for i in range(6)))
    with FakeOpenAI(responder=lambda request: "A") as server:
        args = ["--model", "fake-model", "--api_base", server.base_url, "--dataset", "MedQA", "--data_file", str(data),
                "--repeats", "1", "--batch_size", "1", "--output_dir", str(tmp_path / "eval"), "--progress", "False"]
        code = f"import MedQA_eval; code = MedQA_eval.main({args!r}); sys.exit(code)"
        first = run_limited(code, 1500, tmp_path)
        samples = next((tmp_path / "eval").rglob("*.samples.jsonl"))
        kept = read_jsonl(samples)  # whole rows only: a torn one would fail here
        assert first.returncode == 1, first.stderr
        assert first.stderr.strip().splitlines()[-1] == f"error: {samples}: {FULL_DISK}"
        assert 0 < len(kept) < 6
        asked = len(server.requests)
        second = subprocess.run([sys.executable, str(ROOT / "MedQA_eval.py"), *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        chats = [r for r in server.requests[asked:] if r.get("messages")]
    assert len(read_jsonl(samples)) == 6 and len(chats) == 6 - len(kept)


# ---------------------------------------------------------------------------------- no flock
@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL])
def test_a_file_system_without_flock_is_one_warning_line_and_the_run_goes_on(tmp_path, monkeypatch, caplog, code):
    def no_locks(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    first, second = tmp_path / "a.samples.jsonl", tmp_path / "b.samples.jsonl"
    with ExitStack() as held:
        hold_all(held, [first, second])
        append_jsonl(first, {"row": 1})
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{first}.lock: this file system does not support locks (flock): two runs writing {first} "
                        "at once would corrupt it; make sure only one runs"]
    assert read_jsonl(first) == [{"row": 1}]


def test_a_lock_removes_the_folders_it_made_only_when_nothing_else_went_there(tmp_path):
    with OutputLock(tmp_path / "new" / "deeper" / "out.jsonl"):  # a run stopped by bad input
        pass
    assert not (tmp_path / "new").exists()
    with OutputLock(tmp_path / "new" / "deeper" / "out.jsonl"):
        append_jsonl(tmp_path / "new" / "deeper" / "out.jsonl", {"row": 1})
    assert [p.name for p in (tmp_path / "new" / "deeper").iterdir()] == ["out.jsonl"]
