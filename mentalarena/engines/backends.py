"""The factory that names engines: `make_backend` builds the engine a route asks for, importing
only that one. The interface (chat.py) and the routing rules (routes.py) live apart from it, so the
engines never import this module; their names are re-exported here for the scripts."""
from __future__ import annotations

from mentalarena.engines.chat import ChatBackend, Reply
from mentalarena.engines.embedded import EMBEDDED_GGUF, embedded_model_dir
from mentalarena.errors import InputError
from mentalarena.engines.routes import (BACKENDS, Route, check_loadable, describe_routes, endpoint_list, judge_route,  # noqa: F401
                     require_credentials, require_keys, resolve_backend, route, runs_on)

__all__ = ["BACKENDS", "ChatBackend", "Reply", "Route", "check_loadable", "describe_routes", "endpoint_list",
           "judge_route", "make_backend", "require_credentials", "require_keys", "resolve_backend", "route",
           "runs_on"]


def make_backend(model: str | None, backend: str = "auto", api_base: str | None = None, *,
                 temperature: float, max_new_tokens: int, seed: int, max_parallel: int = 16,
                 device: str | None = None, dtype: str | None = None, max_batch_size: int = 16,
                 max_context_tokens: int | None = None, prefix_cache_gb: float = 8.0,
                 top_p: float | None = None, top_k: int | None = None, key_env: str | None = None,
                 key_flag: str = "api_key_env", request_timeout: float | None = None) -> ChatBackend:
    """Build the backend for one model; heavy imports happen only for the backend chosen.
    `key_env`, `key_flag` and `request_timeout` concern served models only (see openai_client)."""
    kind = resolve_backend(model, backend, api_base)
    if kind == "openai":
        from mentalarena.engines.openai_backend import OpenAIBackend
        from mentalarena.engines.openai_client import DEFAULT_REQUEST_TIMEOUT
        if not model:
            raise InputError("--backend openai needs --base_model (the served model name)")
        return OpenAIBackend(model, api_base=api_base, temperature=temperature, max_new_tokens=max_new_tokens,
                             max_parallel=max_parallel, seed=seed, context_limit=max_context_tokens,
                             top_p=top_p, top_k=top_k, key_env=key_env, key_flag=key_flag,
                             request_timeout=request_timeout or DEFAULT_REQUEST_TIMEOUT)
    from mentalarena.engines.hf_backend import HFBackend
    local = dict(temperature=temperature, max_new_tokens=max_new_tokens, device=device, dtype=dtype,
                 max_batch_size=max_batch_size, max_context_tokens=max_context_tokens, seed=seed,
                 prefix_cache_gb=prefix_cache_gb, top_p=top_p, top_k=top_k)
    if kind == "embedded":
        return HFBackend(embedded_model_dir(), gguf_file=EMBEDDED_GGUF,
                         name="embedded:SmolLM2-135M-Instruct", **local)
    return HFBackend(model, **local)
