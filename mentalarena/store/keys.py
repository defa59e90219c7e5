"""What names and keys work on disk: settings hashes, per-request seeds, folder names and
fingerprints of models, and the rule for settings added after outputs existed. Every value here is
pinned by tests/test_golden_keys.py: changing one makes existing outputs unreadable to a resume."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def settings_hash(obj) -> str:
    """12 hex digits naming a settings dict; answers on file carry it so runs never mix. Which
    servers answer (`api_base`: one, or replicas) does not change the answers, so only whether the
    model is served counts: a run may resume on more, fewer or other replicas."""
    if isinstance(obj, dict) and obj.get("api_base"):
        obj = {**obj, "api_base": "served"}
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def request_seed(*parts) -> int:
    """A seed per request: a sampled answer does not depend on which others share its batch."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def model_tag(model: str) -> str:
    """A folder name for a model: `org--name` for a hub id or an API model name; for a local path its
    last part and 8 hex digits of its absolute path, so that two checkpoints that share a name
    (`a/merged`, `b/merged`, `checkpoint-500`) never write into one folder."""
    tail = model.rstrip("/").replace(":", "-")
    if Path(model).exists():
        where = hashlib.sha256(str(Path(model).resolve()).encode()).hexdigest()[:8]
        tail = f"{tail.split('/')[-1]}-{where}"
    else:
        tail = tail.replace("/", "--")
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in tail)


# What makes a local model answer as it does: its config, generation config, tokenizer and weights.
_FINGERPRINTED = ("*.json", "*.safetensors", "*.bin", "*.gguf", "*.model", "*.txt", "*.jinja", "*.pt")


def _derived(relative: Path) -> bool:
    """Inside an adapter folder of llama_finetune.py: its trainer checkpoints and its merged copy,
    which are not what loads when the folder is given as the model."""
    return any(part.startswith("checkpoint") or part == "merged" for part in relative.parts[:-1])


def model_fingerprint(model: str | None) -> str | None:
    """16 hex digits of the content of a local model folder (or file) - the model is retrained into
    the same folder: another fingerprint, so answers of the old weights are never taken for its own.
    None for a hub id, an API model or the embedded model (their names say which weights they are).
    Every byte is read (a LoRA merge changes only some tensors; about 1.5 GB/s)."""
    if not model or not Path(model).exists():
        return None
    path = Path(model)
    files = [path] if path.is_file() else sorted({f for pattern in _FINGERPRINTED for f in path.rglob(pattern)
                                                   if f.is_file() and not _derived(f.relative_to(path))})
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()[:16]


def added_later(settings: dict, before: dict) -> dict:
    """`settings` without each setting added after outputs existed that still has the value that
    reproduces how they were made (`before`: name -> that value), so that their hash is unchanged
    and they resume; a setting moved off that value counts, and the hash changes."""
    return {k: v for k, v in settings.items() if not (k in before and v == before[k])}
