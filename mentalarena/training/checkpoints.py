"""Which trainer checkpoint a run may resume from.

The transformers Trainer writes `checkpoint-N/` in place, file by file (weights, optimizer.pt,
scheduler.pt, rng_state.pth, trainer_state.json last), with no temporary folder: a run killed while
saving leaves a partial checkpoint-N that `get_last_checkpoint` would hand to `train()`. Here a
checkpoint counts once it is complete: `mark_complete` (after each save) syncs its files and records
their sizes in `complete.json`; a checkpoint of an older run without that file counts when its
trainer_state.json reads back and its weights and optimizer state end where their formats say. A
newer incomplete one is named and moved aside to `incomplete-checkpoint-N`: never loaded, never deleted.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from itertools import takewhile
from pathlib import Path

from mentalarena.store.files import write_json_atomic

MARKER = "complete.json"
ASIDE = "incomplete-"  # a prefix, so the trainer's own checkpoint-N patterns (resume, rotation) pass it by
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # transformers.trainer_utils._re_checkpoint


def newest_complete(folder: Path, move_aside: bool = True) -> tuple[str | None, list[str]]:
    """The newest complete checkpoint in `folder` (None: start from step 0) and one line for each
    newer incomplete one, which is moved aside unless `move_aside` is False (the other ranks)."""
    steps = sorted(((int(m[1]), folder / m[0]) for m in map(_CHECKPOINT.match, _names(folder)) if m), reverse=True)
    found = [path for _, path in steps if path.is_dir()]
    broken = list(takewhile(lambda path: not is_complete(path), found))
    path = found[len(broken)] if len(broken) < len(found) else None
    start = f"resuming from {path.name}" if path else "starting from step 0"
    notes = []
    for bad in broken:
        aside = bad.with_name(ASIDE + bad.name)
        if move_aside:
            if aside.exists():  # left by an earlier stop at the same step
                shutil.rmtree(aside)
            bad.rename(aside)
        notes.append(f"{bad.name} is incomplete (the run was stopped while saving it); moved aside to {aside.name}, {start}")
    return (str(path) if path else None), notes


def is_complete(path: Path) -> bool:
    """Every file `complete.json` lists, at its size; without it (older runs), the legacy rule."""
    try:
        sizes = json.loads((path / MARKER).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return _legacy_complete(path)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(sizes, dict) and all(_size(path / name) == size for name, size in sizes.items())


def mark_complete(path: Path) -> None:
    """Called once the trainer finished saving `path`: its files synced, then their sizes recorded."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MARKER and not p.name.startswith("."))
    for file in files:
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    write_json_atomic(path / MARKER, {"files": {str(p.relative_to(path)): p.stat().st_size for p in files}})


def marker_callback():
    """A TrainerCallback that marks each checkpoint complete after the trainer saved it."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if args.should_save and path.is_dir():  # the process that wrote trainer_state.json
                mark_complete(path)

    return MarkComplete()


def _legacy_complete(path: Path) -> bool:
    try:
        step = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*model*.bin"))
    return isinstance(step, int) and bool(weights) and all(_whole(p) for p in [*weights, path / "optimizer.pt"])


def _whole(path: Path) -> bool:
    """A file that ends where its format says: safetensors (its header gives the data's length) or
    torch.save's zip (whose directory is written last)."""
    try:
        if path.suffix != ".safetensors":
            return zipfile.is_zipfile(path)
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + length + end
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []
