"""Dense copies of GGUF models, made once: later starts skip the dequantizing.

transformers loads a GGUF file in Python: it parses the metadata (the 49k-token vocabulary
dominates) once for the tokenizer, once for the config and once for the weights, then dequantizes
every tensor. That costs the embedded 135M model 14-30 s on a 2-core CPU at every start, depending
on the machine's load, and yields the same dense weights every time. The first load therefore saves
them (float32 safetensors: the exact dequantized values, whatever dtype is asked for later) with
the tokenizer into a folder of the user cache; later loads read that folder in about 2 s
(`benchmarks/bench_load.py`).

- Where: `$MENTALARENA_CACHE` if set (`off` turns the cache off), else
  `$XDG_CACHE_HOME/mentalarena`, else `~/.cache/mentalarena`; under it `gguf/<key>`.
- Key: the sha256 of the GGUF file's bytes (about 1.6 GB/s here: 0.06 s for the embedded file,
  a few seconds for an 8B one, against minutes of dequantizing) and the transformers version,
  which decides how the weights are unpacked. A file replaced under the same name, even with its
  size and time kept, gets a new key; nothing relies on file names or times.
- Writing: into a temporary folder next to the final one, files flushed to disk, a manifest with
  the size and sha256 of every file written last, then one rename into place, so a reader sees a
  whole folder or none. Converting holds a lock (`flock`, released by the kernel if the process
  dies), so two processes starting together convert once: the second waits, then reads.
- Reading: a folder is used only if its manifest matches and every file has its recorded size and
  sha256 (0.3 s for the embedded model's 540 MB; a flipped byte is caught too). Anything else (a
  partial copy, a corrupted or truncated file, a missing manifest) is ignored and rebuilt under
  the lock, never an error. A cache that cannot be written (read-only home, full disk) is
  reported in one warning line and the model is loaded from the GGUF file directly, as before.
- Size: 4 bytes a parameter (517 MiB for the embedded model). Folders of older transformers
  versions are not removed; deleting the cache folder at any time is safe.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("mentalarena.engines.gguf_cache")

CACHE_ENV = "MENTALARENA_CACHE"
MANIFEST = "mentalarena_gguf_cache.json"
FORMAT = 1  # bump when the folder's layout changes: older folders then count as absent


def cache_root() -> Path | None:
    """The cache folder, or None when `$MENTALARENA_CACHE` is `off`."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return None if override.strip().lower() == "off" else Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"  # XDG: relative paths are ignored
    return base / "mentalarena"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # in blocks (hashlib.file_digest is Python 3.11+)
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def dense_folder(base: str, gguf_file: str) -> Path | None:
    """A folder that `from_pretrained` loads as the dense model and tokenizer of `gguf_file` (found
    as transformers finds it: in the folder or hub repository `base`), converted on first use.
    None when the cache is off or cannot be written: the caller then loads the GGUF file itself."""
    root = cache_root()
    source = _locate(base, gguf_file)
    if root is None or source is None:
        return None
    import transformers

    digest = file_sha256(source)
    key = f"{digest[:32]}-transformers-{transformers.__version__}"
    folder = root / "gguf" / key
    if _valid(folder, digest):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(folder.parent / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        return _unwritable(root, exc)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting the same file: wait for it
        if _valid(folder, digest):
            return folder
        _remove_leftovers(folder)  # of converters that died: only the lock holder converts
        print(f"[mentalarena] {source.name}: dequantizing the GGUF weights once; later starts read "
              f"{folder}", file=sys.stderr, flush=True)
        tokenizer, model = convert(base, gguf_file)
        try:
            _write(folder, tokenizer, model, digest, source.name)
        except OSError as exc:
            return _unwritable(root, exc)
        return folder
    finally:
        os.close(lock)


def convert(base: str, gguf_file: str):
    """The tokenizer and the dense float32 model of a GGUF file, through transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(base, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(base, gguf_file=gguf_file, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    # Every weight is dense now, but transformers keeps a GGUF "quantizer" marker that refuses to
    # save the model (training.dense_model does the same for training).
    model.hf_quantizer = None
    if "quantization_config" in vars(model.config):
        delattr(model.config, "quantization_config")
    return tokenizer, model


def _locate(base: str, gguf_file: str) -> Path | None:
    for candidate in (Path(base, gguf_file), Path(gguf_file)):
        if candidate.is_file():
            return candidate
    try:  # a hub repository: the file is in the hub cache once downloaded
        from transformers.utils import cached_file
        found = cached_file(base, gguf_file)
    except (OSError, ValueError):
        return None  # not found: the plain load reports it
    return Path(found) if found else None


def _valid(folder: Path, digest: str) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT or manifest.get("gguf_sha256") != digest:
            return False
        files = manifest["files"]
        if "config.json" not in files or not any(name.endswith(".safetensors") for name in files):
            return False
        for name, meta in files.items():
            path = folder / name
            if path.stat().st_size != meta["size"] or file_sha256(path) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # absent, being replaced, or damaged: rebuilt under the lock


def _write(folder: Path, tokenizer, model, digest: str, name: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[str(path.relative_to(tmp))] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
        import transformers
        manifest = {"format": FORMAT, "gguf_file": name, "gguf_sha256": digest,
                    "transformers": transformers.__version__, "files": files}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if folder.exists():  # an invalid copy (checked under the lock): out of the way first
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.rename(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, folder)
        _fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left there after the rename


def _remove_leftovers(folder: Path) -> None:
    for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.old-*"):
        for path in folder.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unwritable(root: Path, exc: OSError) -> None:
    log.warning("cannot write the model cache %s (%s); loading the GGUF file directly "
                "(set %s to a writable folder, or to off)", root, exc, CACHE_ENV)
    return None
