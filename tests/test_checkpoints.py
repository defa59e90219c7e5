"""Which checkpoint a run resumes from (mentalarena/training/checkpoints.py), on folders built by hand as the
trainer leaves them: marked complete, from older runs without the marker, and cut short by a kill or a
power cut at each point of a save. The end-to-end run is in test_llama_finetune.py."""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest

from mentalarena.training.checkpoints import is_complete, mark_complete, newest_complete


def safetensors(path: Path, values: int = 4) -> None:
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "w": {"dtype": "F32", "shape": [values], "data_offsets": [0, 4 * values]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * (4 * values))


def torch_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:  # what torch.save writes: a zip whose directory comes last
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00." * 50)
        z.writestr("archive/version", b"3\n")


def checkpoint(folder: Path, step: int, marked: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    safetensors(path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text("{}")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        torch_zip(path / name)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    if marked:
        mark_complete(path)
    return path


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# damage -> whether the checkpoint still counts
CASES = {
    "marked": (True, lambda p: None),
    "marked, optimizer.pt cut short (power cut after the marker)": (True, lambda p: cut(p / "optimizer.pt")),
    "marked, a file gone": (True, lambda p: (p / "rng_state.pth").unlink()),
    "marker torn": (True, lambda p: cut(p / "complete.json")),
    "legacy, whole": (False, lambda p: None),
    "legacy, stopped before trainer_state.json": (False, lambda p: (p / "trainer_state.json").unlink()),
    "legacy, trainer_state.json torn": (False, lambda p: cut(p / "trainer_state.json")),
    "legacy, trainer_state.json without its step": (False, lambda p: (p / "trainer_state.json").write_text("{}")),
    "legacy, optimizer.pt cut short": (False, lambda p: cut(p / "optimizer.pt", 0.9)),
    "legacy, optimizer.pt empty": (False, lambda p: cut(p / "optimizer.pt", 0)),
    "legacy, optimizer.pt never written": (False, lambda p: (p / "optimizer.pt").unlink()),
    "legacy, weights cut short": (False, lambda p: cut(p / "adapter_model.safetensors", 0.95)),
    "legacy, no weights": (False, lambda p: (p / "adapter_model.safetensors").unlink()),
}
WHOLE = {"marked", "legacy, whole"}


@pytest.mark.parametrize("case", CASES)
def test_complete_checkpoints_are_told_from_cut_short_ones(tmp_path, case):
    marked, damage = CASES[case]
    path = checkpoint(tmp_path, 10, marked=marked)
    damage(path)
    assert is_complete(path) == (case in WHOLE)


def test_a_sharded_model_counts_only_with_every_shard_whole(tmp_path):
    path = checkpoint(tmp_path, 10, marked=False)
    (path / "adapter_model.safetensors").unlink()
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        safetensors(path / shard, values=64)
    assert is_complete(path)
    cut(path / "model-00002-of-00002.safetensors")
    assert not is_complete(path)


def test_newer_incomplete_checkpoints_are_named_and_moved_aside(tmp_path):
    checkpoint(tmp_path, 20)
    checkpoint(tmp_path, 30)
    (checkpoint(tmp_path, 40) / "complete.json").unlink()
    (tmp_path / "checkpoint-40" / "trainer_state.json").unlink()  # killed before the trainer's last file
    older = tmp_path / "incomplete-checkpoint-40"
    older.mkdir()  # left by an earlier stop at the same step: replaced
    (tmp_path / "checkpoint-50").write_text("not a folder")

    # the other ranks of a multi-GPU run only look
    assert newest_complete(tmp_path, move_aside=False)[0] == str(tmp_path / "checkpoint-30")
    assert (tmp_path / "checkpoint-40").is_dir()

    last, notes = newest_complete(tmp_path)
    assert last == str(tmp_path / "checkpoint-30")
    assert notes == ["checkpoint-40 is incomplete (the run was stopped while saving it); moved aside to "
                     "incomplete-checkpoint-40, resuming from checkpoint-30"]
    assert not (tmp_path / "checkpoint-40").exists() and (older / "optimizer.pt").is_file()
    # the trainer's own patterns (resume: transformers' _re_checkpoint; rotation: a glob) pass it by
    assert not re.match(r"^checkpoint\-(\d+)$", older.name) and older not in tmp_path.glob("checkpoint-*")
    assert newest_complete(tmp_path) == (last, [])


def test_without_a_complete_checkpoint_the_run_starts_again(tmp_path):
    (checkpoint(tmp_path, 2, marked=False) / "optimizer.pt").write_bytes(b"")
    assert newest_complete(tmp_path) == (None, [
        "checkpoint-2 is incomplete (the run was stopped while saving it); moved aside to "
        "incomplete-checkpoint-2, starting from step 0"])
    assert newest_complete(tmp_path / "missing") == (None, [])
