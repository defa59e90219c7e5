"""What the scripts share: the CLI entry of the evaluation scripts, comma lists, settings hashes,
per-request seeds, folder names for models and the dtype rule."""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

from mentalarena.errors import InputError, ServiceRefused, StorageError
from mentalarena.store.jsonl import read_jsonl, repair_torn_tail


def main(commands: dict[str, Callable], default: Callable, exit_code: Callable[[Callable, object], int],
         argv: list[str] | None = None, failures: tuple[type[Exception], ...] = ()) -> int:
    """`script.py [command] --flag ...` through fire; a command that is not named is `default`.
    Bad input is one line and exit 2; a service that refused the run (`ServiceRefused`), an output
    that could not be written (`StorageError`) or an exception in `failures` (a remote service that
    failed) is one line and exit 1; otherwise `exit_code(command, result)` decides (0 complete, 1 not)."""
    import fire
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = commands[argv.pop(0)] if argv and argv[0] in commands else default
    argv = bool_words(command, argv)
    try:
        out = fire.Fire(command, command=argv, serialize=lambda _: None)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ServiceRefused, StorageError, *failures) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return exit_code(command, out)


def bool_words(command: Callable, argv: list[str]) -> list[str]:
    """fire knows only True/False: `--resume false` (as documented) arrives as the string 'false',
    which is truthy. For the command's bool flags, true/false in any case become True/False."""
    import inspect
    flags = {name for name, p in inspect.signature(command).parameters.items()
             if str(p.annotation).split(" |")[0] in ("bool", str(bool))}
    out = []
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if eq and name.startswith("--") and name[2:].replace("-", "_") in flags and value.lower() in ("true", "false"):
            arg = f"{name}={value.capitalize()}"
        elif (not eq and i and arg.lower() in ("true", "false") and argv[i - 1].startswith("--")
              and argv[i - 1][2:].replace("-", "_") in flags):
            arg = arg.capitalize()
        out.append(arg)
    return out


def checked(backend, tag: str):
    """The backend, once its preflight passed (servers reached, key and model name accepted: see
    `ChatBackend.check`); its notes are printed. A backend that fails it is closed."""
    try:
        notes = backend.check()
    except BaseException:
        backend.close()
        raise
    for note in notes:
        print(f"[{tag}] {note}", file=sys.stderr, flush=True)
    return backend


def names(value) -> list[str]:
    """A comma list from the command line: fire turns "a,b" into a tuple but "t-sid,DR" into a string."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


# Query parameters that carry credentials in the addresses people paste (`?api_key=...`, `?token=...`).
_SECRET_PARAMS = re.compile(r"(?i)(api[-_]?key|x-api-key|key|token|access[-_]?token|auth|password|passwd|secret|"
                            r"sig|signature)")


def public_url(url: str | None) -> str | None:
    """A server address (or a comma list of them) without credentials, fit for logs, results and
    state files: no user:password part (with or without a scheme), no key-like query parameters, no
    fragment."""
    if not url or not isinstance(url, str):
        return url
    if "," in url:
        return ",".join(public_url(part.strip()) for part in url.split(","))
    scheme_less = "://" not in url
    parts = urlsplit("//" + url if scheme_less else url)
    query = "&".join(pair for pair in parts.query.split("&")
                     if pair and not _SECRET_PARAMS.fullmatch(pair.split("=")[0].strip()))
    shown = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query=query, fragment=""))
    return shown[2:] if scheme_less else shown


def has_credentials(url: str | None) -> bool:
    """The address carries something `public_url` would cut (a user:password part, a key parameter)."""
    return bool(url) and isinstance(url, str) and public_url(url) != url.strip()


def public_settings(settings: dict) -> dict:
    """Settings as they are printed and recorded: server addresses without credentials."""
    return {**settings, "api_base": public_url(settings.get("api_base"))} if settings.get("api_base") else settings


def auto_dtype(dtype: str | None, device: str | None) -> str | None:
    """`auto`: bfloat16 where it is fast (CUDA, or CPUs with native bf16); else float32. The reference
    loaded its weights in bfloat16 on any device (`--dtype bfloat16` does that anywhere)."""
    import torch
    if dtype not in (None, "auto"):
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise InputError(f"--dtype must be auto or a torch dtype name (float32, bfloat16, float16), not {dtype!r}")
        return dtype
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def answers_on_file(samples: Path, run_hash: str, fields: tuple[str, ...]) -> list[dict]:
    """The rows of a per-answer samples file (a torn last line is cut off first). A row without
    `fields` is not this script's; a row of other settings stops the run rather than mix."""
    repair_torn_tail(samples)
    rows = read_jsonl(samples)
    named = "/".join(f'"{name}"' for name in fields)
    for number, row in enumerate(rows, 1):
        if any(name not in row for name in fields):
            raise InputError(f"{samples}: line {number}: fields {named} missing "
                             "(not a samples file of this script); choose another --output_dir")
        if row.get("settings_hash") != run_hash:
            raise InputError(f"{samples}: line {number}: made with other settings (hash {row.get('settings_hash')} "
                             f"!= {run_hash}); use another --output_dir or delete the file")
    return rows
