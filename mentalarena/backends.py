"""Chat backends: one interface, a batch of conversations in, one reply per conversation out."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterator

from .errors import InputError, ModelCallError


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: bool = False  # the conversation was cut to fit the context window


class ChatBackend:
    """`generate` takes conversations (lists of {"role", "content"} dicts) and returns one Reply each.

    `batched` backends want many conversations per call (local models); the others are called
    with one conversation at a time from many threads (remote APIs).
    """

    name: str = "backend"
    batched: bool = False
    context_limit: int | None = None  # tokens; None: never truncate

    def count_tokens(self, messages: list[dict]) -> int:
        """A rough count (4 characters a token) for backends without a tokenizer at hand."""
        return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)

    def generate(self, conversations: list[list[dict]]) -> list[Reply]:
        raise NotImplementedError

    def stream(self, conversations: list[list[dict]], seeds: list[int] | None = None,
               chat: bool = True) -> Iterator[tuple[int, Reply | Exception]]:
        """(index, reply) pairs in completion order, for many independent requests. A request that
        failed after every retry yields its exception instead of a reply. `seeds` (one per request)
        and `chat=False` (raw text prompts) are honoured by backends that can."""
        step = getattr(self, "max_batch_size", 1)
        for start in range(0, len(conversations), step):
            chunk = conversations[start:start + step]
            try:
                replies = self.generate(chunk)
            except ModelCallError as err:
                replies = [err] * len(chunk)
            yield from enumerate(replies, start)

    def stats(self) -> dict:
        """Backend-specific counters for the run summary."""
        return {}

    def close(self) -> None:
        pass


BACKENDS = ("auto", "embedded", "hf", "openai")


def resolve_backend(model: str | None, backend: str = "auto", api_base: str | None = None) -> str:
    """Which backend serves `model`. The `auto` rule, in order:
    no model (or "embedded") -> embedded; an --api_base -> openai (served names may contain '/');
    an existing local path -> hf; an `org/name` hub id -> hf; anything else (gpt-4o, gpt-3.5-turbo,
    ft:...) -> openai."""
    if backend not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend != "auto":
        return backend
    if model in (None, "", "embedded"):
        return "embedded"
    if api_base:
        return "openai"
    if os.path.exists(model) or re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        return "hf"
    return "openai"


def make_backend(model: str | None, backend: str = "auto", api_base: str | None = None, *,
                 temperature: float, max_new_tokens: int, seed: int, max_parallel: int = 16,
                 device: str | None = None, dtype: str | None = None, max_batch_size: int = 16,
                 max_context_tokens: int | None = None, prefix_cache_gb: float = 8.0) -> ChatBackend:
    """Build the backend for one model; heavy imports happen only for the backend chosen."""
    kind = resolve_backend(model, backend, api_base)
    if kind == "openai":
        from .openai_backend import OpenAIBackend
        if not model:
            raise InputError("--backend openai needs --base_model (the served model name)")
        backend_obj = OpenAIBackend(model, api_base=api_base, temperature=temperature,
                                    max_new_tokens=max_new_tokens, max_parallel=max_parallel, seed=seed)
        backend_obj.context_limit = max_context_tokens
        return backend_obj
    from .hf_backend import EMBEDDED_GGUF, HFBackend, embedded_model_dir
    local = dict(temperature=temperature, max_new_tokens=max_new_tokens, device=device, dtype=dtype,
                 max_batch_size=max_batch_size, max_context_tokens=max_context_tokens, seed=seed,
                 prefix_cache_gb=prefix_cache_gb)
    if kind == "embedded":
        return HFBackend(embedded_model_dir(), gguf_file=EMBEDDED_GGUF,
                         name="embedded:SmolLM2-135M-Instruct", **local)
    return HFBackend(model, **local)
