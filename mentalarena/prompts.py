"""Prompt templates: `prompts/<name>.txt` with `{slot}` fields, rendered by one helper.

Editing a file changes the next run; no code change. `{{` and `}}` give literal braces. The file's
final newline is not part of the prompt.
"""
from __future__ import annotations

import string
from pathlib import Path

from mentalarena.errors import InputError
from mentalarena.store.inputs import read_text

PROMPT_DIR = Path(__file__).resolve().parent.parent / "prompts"


class Prompts:
    """Loads each template once from `prompt_dir` and renders it, failing loudly on a missing slot."""

    def __init__(self, prompt_dir: str | Path | None = None):
        self.dir = Path(prompt_dir) if prompt_dir else PROMPT_DIR
        self._cache: dict[str, str] = {}

    def template(self, name: str) -> str:
        if name not in self._cache:
            path = self.dir / f"{name}.txt"
            if not path.is_file():
                raise InputError(f"{path}: prompt file not found")
            # newlines as text mode reads them (a prompt saved on Windows renders, and hashes, the same)
            text = read_text(path).replace("\r\n", "\n").replace("\r", "\n")
            self._cache[name] = text.removesuffix("\n")
        return self._cache[name]

    def slots(self, name: str) -> set[str]:
        try:
            return {field for _, field, _, _ in string.Formatter().parse(self.template(name)) if field}
        except ValueError as exc:
            raise InputError(f"{self.dir / (name + '.txt')}: bad template ({exc}); "
                             "write literal braces as {{ and }}") from exc

    def render(self, name: str, /, **values) -> str:
        missing = self.slots(name) - values.keys()
        if missing:
            raise InputError(f"{self.dir / (name + '.txt')}: no value for slot(s) "
                             + ", ".join("{" + m + "}" for m in sorted(missing)))
        try:
            return self.template(name).format(**values)
        except (ValueError, IndexError, KeyError) as exc:
            raise InputError(f"{self.dir / (name + '.txt')}: bad template ({exc}); "
                             "write literal braces as {{ and }}") from exc

    def check(self, names: list[str]) -> None:
        """Read every template the run needs before any model loads."""
        for name in names:
            self.template(name)
