"""Chat backends: one interface, a batch of conversations in, one reply per conversation out."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

from .cli import public_url
from .errors import InputError, ModelCallError


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: bool = False  # the conversation was cut to fit the context window
    endpoint: str | None = None  # the server that answered (remote backends), without credentials


class ChatBackend:
    """`generate` takes conversations (lists of {"role", "content"} dicts) and returns one Reply each.

    `batched` backends want many conversations per call (local models); the others are called
    with one conversation at a time from many threads (remote APIs).
    """

    name: str = "backend"
    batched: bool = False
    context_limit: int | None = None  # tokens; None: never truncate
    # top_p / top_k actually used, and where each came from (flag, generation_config, ...)
    sampling: dict | None = None

    def count_tokens(self, messages: list[dict]) -> int:
        """A rough count (4 characters a token) for backends without a tokenizer at hand."""
        return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)

    def generate(self, conversations: list[list[dict]], seeds: list[int] | None = None) -> list[Reply]:
        """One reply per conversation; `seeds` (one per conversation) fix each sampled reply on its
        own, whatever else shares the batch."""
        raise NotImplementedError

    def check(self) -> list[str]:
        """Before any work: can this backend be used at all? Raises EndpointError if not; returns
        notes for the start-up lines. Local backends have nothing to check."""
        return []

    def stream(self, conversations: list[list[dict]], seeds: list[int] | None = None,
               chat: bool = True) -> Iterator[tuple[int, Reply | Exception]]:
        """(index, reply) pairs in completion order, for many independent requests. A request that
        failed after every retry yields its exception instead of a reply. `seeds` (one per request)
        and `chat=False` (raw text prompts) are honoured by backends that can."""
        step = getattr(self, "max_batch_size", 1)
        for start in range(0, len(conversations), step):
            chunk = conversations[start:start + step]
            try:
                replies = self.generate(chunk, None if seeds is None else seeds[start:start + step])
            except ModelCallError as err:
                replies = [err] * len(chunk)
            yield from enumerate(replies, start)

    def stats(self) -> dict:
        """Backend-specific counters for the run summary."""
        return {}

    def close(self) -> None:
        pass


BACKENDS = ("auto", "embedded", "hf", "openai")


def endpoint_list(api_base) -> list[str]:
    """The servers of an --api_base: one URL, or several (replicas of one model) as a comma list."""
    if not api_base:
        return []
    items = api_base if isinstance(api_base, (list, tuple)) else str(api_base).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


@dataclass(frozen=True)
class Route:
    """Where one role's calls go: a local model, or an OpenAI-compatible API at `servers`
    (none given: the OpenAI API itself, or OPENAI_BASE_URL)."""
    model: str | None
    kind: str
    servers: tuple[str, ...] = ()

    @property
    def api_base(self) -> str | None:
        return ",".join(self.servers) or None

    def where(self) -> str:
        if self.kind != "openai":
            return "a local model in this process"
        if self.servers:
            return ", ".join(public_url(s) for s in self.servers)
        default = public_url(os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1")
        return f"the OpenAI API ({default})"


def route(model: str | None, backend: str = "auto", api_base=None) -> Route:
    kind = resolve_backend(model, backend, ",".join(endpoint_list(api_base)) or None)
    return Route(model, kind, tuple(endpoint_list(api_base)) if kind == "openai" else ())


def runs_on(r: Route) -> str:
    """Where a role runs, as far as it shapes the replies: a local model ("embedded", "hf"), the
    OpenAI API, or a model served elsewhere ("served": which replicas answer does not count)."""
    if r.kind != "openai":
        return r.kind
    return "served" if r.servers else "openai-api"


def require_credentials(r: Route) -> None:
    """The OpenAI API needs a key: its absence is bad input, found before anything loads."""
    official = not r.servers or any(urlsplit(s).hostname == "api.openai.com" for s in r.servers)
    if r.kind == "openai" and official and not os.environ.get("OPENAI_API_KEY"):
        raise InputError(f"model {r.model!r} goes to {r.where()}, which needs OPENAI_API_KEY: export it, "
                         "or pass --api_base for an OpenAI-compatible server")


def judge_route(base: Route, judge_model: str | None, judge_backend: str = "auto", judge_api_base=None) -> Route | None:
    """Where a judge's calls go; None when the judge *is* the base model (same client, shared batches).

    A judge naming the base model, with no other backend or server, is the base model. Any other
    judge takes --judge_backend / --judge_api_base when given; without --judge_api_base a judge
    served over the API goes where the base model is served (--api_base), never elsewhere by
    itself: the OpenAI API is reached from a served base only when named (--judge_api_base
    https://api.openai.com/v1). With no --api_base at all, the ordinary rule applies (gpt-4-turbo:
    the OpenAI API; a path or org/name: a local model)."""
    servers = endpoint_list(judge_api_base)
    if judge_model in (None, base.model) and judge_backend in ("auto", base.kind) and \
            (not servers or tuple(servers) == base.servers):
        return None
    if not servers and judge_backend in ("auto", "openai"):
        servers = list(base.servers)
    return route(judge_model or base.model, judge_backend, servers)


def describe_routes(base: Route, judge: Route | None) -> str:
    """The start-up line that says which server each role uses."""
    line = f"base model {base.model or 'embedded'!r} -> {base.where()}"
    if judge is None:
        return line + "; judge -> the base model (same client, shared batches)"
    line += f"; judge {judge.model!r} -> {judge.where()}"
    if base.servers and judge.servers != base.servers:
        line += " (not --api_base: the judge's calls and the data in them go there)"
    return line


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
                 max_context_tokens: int | None = None, prefix_cache_gb: float = 8.0,
                 top_p: float | None = None, top_k: int | None = None) -> ChatBackend:
    """Build the backend for one model; heavy imports happen only for the backend chosen."""
    kind = resolve_backend(model, backend, api_base)
    if kind == "openai":
        from .openai_backend import OpenAIBackend
        if not model:
            raise InputError("--backend openai needs --base_model (the served model name)")
        return OpenAIBackend(model, api_base=api_base, temperature=temperature, max_new_tokens=max_new_tokens,
                             max_parallel=max_parallel, seed=seed, context_limit=max_context_tokens,
                             top_p=top_p, top_k=top_k)
    from .hf_backend import EMBEDDED_GGUF, HFBackend, embedded_model_dir
    local = dict(temperature=temperature, max_new_tokens=max_new_tokens, device=device, dtype=dtype,
                 max_batch_size=max_batch_size, max_context_tokens=max_context_tokens, seed=seed,
                 prefix_cache_gb=prefix_cache_gb, top_p=top_p, top_k=top_k)
    if kind == "embedded":
        return HFBackend(embedded_model_dir(), gguf_file=EMBEDDED_GGUF,
                         name="embedded:SmolLM2-135M-Instruct", **local)
    return HFBackend(model, **local)
