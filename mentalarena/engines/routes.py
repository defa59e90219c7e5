"""Where each role's calls go (a local model, or servers and the key they get), the `auto` backend
rule, and the checks a route must pass before anything loads. No engine is imported here."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from mentalarena.cli import public_url
from mentalarena.engines.embedded import embedded_model_dir
from mentalarena.errors import InputError


BACKENDS = ("auto", "embedded", "hf", "openai")


def endpoint_list(api_base) -> list[str]:
    """The servers of an --api_base: one URL, or several (replicas of one model) as a comma list.
    `env:NAME` stands for the URL(s) in the environment variable NAME, so that an address with
    credentials in it (`https://user:pw@host/v1`) never has to be on a command line (iterate.py
    hands such addresses to its stages this way)."""
    if not api_base:
        return []
    items = api_base if isinstance(api_base, (list, tuple)) else str(api_base).split(",")
    out = []
    for item in (str(item).strip() for item in items):
        if item.startswith("env:"):
            value = os.environ.get(item[4:].strip())
            if not value:
                raise InputError(f"--api_base {item}: the environment variable {item[4:].strip()} is not set")
            out += [part.strip() for part in value.split(",") if part.strip()]
        elif item:
            out.append(item)
    return out


@dataclass(frozen=True)
class Route:
    """Where one role's calls go: a local model, or an OpenAI-compatible API at `servers`
    (none given: the OpenAI API itself, or OPENAI_BASE_URL). `key_env` names the environment
    variable whose key those servers get (None: OPENAI_API_KEY for the OpenAI API, no key elsewhere);
    `key_flag` is the flag that names it, for messages."""
    model: str | None
    kind: str
    servers: tuple[str, ...] = ()
    key_env: str | None = None
    key_flag: str = "api_key_env"

    @property
    def api_base(self) -> str | None:
        return ",".join(self.servers) or None

    def where(self) -> str:
        """Where the calls go and which key goes with them (the variable's name, never the key)."""
        if self.kind != "openai":
            return "a local model in this process"
        from mentalarena.engines.openai_client import OPENAI_KEY, default_base, is_openai_api
        official = all(is_openai_api(s) for s in self.servers or (None,))
        key = f"key ${self.key_env}" if self.key_env else f"key ${OPENAI_KEY}" if official else "no key"
        if self.servers:
            return ", ".join(public_url(s) for s in self.servers) + f" ({key})"
        return f"the OpenAI API ({public_url(default_base())}, {key})"


def route(model: str | None, backend: str = "auto", api_base=None, key_env: str | None = None,
          key_flag: str = "api_key_env") -> Route:
    from mentalarena.engines.openai_client import check_key_env
    check_key_env(key_env, key_flag)
    kind = resolve_backend(model, backend, ",".join(endpoint_list(api_base)) or None)
    served = kind == "openai"
    return Route(model, kind, tuple(endpoint_list(api_base)) if served else (), key_env if served else None, key_flag)


def runs_on(r: Route) -> str:
    """Where a role runs, as far as it shapes the replies: a local model ("embedded", "hf"), the
    OpenAI API, or a model served elsewhere ("served": which replicas answer does not count)."""
    if r.kind != "openai":
        return r.kind
    return "served" if r.servers else "openai-api"


def require_credentials(r: Route) -> None:
    """Every key the route's servers are to get is there (OPENAI_API_KEY for the OpenAI API, the
    variable named by --*_api_key_env elsewhere): its absence is bad input, found before anything loads."""
    if r.kind != "openai":
        return
    from mentalarena.engines.openai_client import credentials
    try:
        for server in r.servers or (None,):
            credentials(server, r.key_env, r.key_flag)
    except InputError as exc:
        raise InputError(f"model {r.model!r}: {exc}") from None


def judge_route(base: Route, judge_model: str | None, judge_backend: str = "auto", judge_api_base=None,
                judge_key_env: str | None = None, key_flag: str = "judge_api_key_env") -> Route | None:
    """Where a judge's calls go; None when the judge *is* the base model (same client, shared batches).

    A judge naming the base model, with no other backend or server, is the base model. Any other
    judge takes --judge_backend / --judge_api_base when given; without --judge_api_base a judge
    served over the API goes where the base model is served (--api_base), never elsewhere by
    itself: the OpenAI API is reached from a served base only when named (--judge_api_base
    https://api.openai.com/v1). With no --api_base at all, the ordinary rule applies (gpt-4-turbo:
    the OpenAI API; a path or org/name: a local model). A judge served where the base model is
    gets the base model's key (`key_env`) unless it names its own."""
    servers = endpoint_list(judge_api_base)
    if judge_model in (None, base.model) and judge_backend in ("auto", base.kind) and \
            (not servers or tuple(servers) == base.servers) and judge_key_env in (None, base.key_env):
        return None
    if not servers and judge_backend in ("auto", "openai"):
        servers = list(base.servers)
        if servers and judge_key_env is None:
            judge_key_env, key_flag = base.key_env, base.key_flag
    return route(judge_model or base.model, judge_backend, servers, judge_key_env, key_flag)


def check_loadable(r: Route) -> None:
    """A local model can be loaded at all: the embedded package is installed, a local folder holds a
    model (config.json, or a LoRA adapter's adapter_config.json). A hub id is left to the loader."""
    if r.kind == "embedded":
        embedded_model_dir()
    elif r.kind != "openai" and r.model and os.path.exists(r.model):
        if not os.path.isdir(r.model) or not any(
                os.path.isfile(os.path.join(r.model, name)) for name in ("config.json", "adapter_config.json")):
            raise InputError(f"{r.model}: not a model folder (no config.json or adapter_config.json in it)")


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


def require_keys(settings: dict, api_key_env: str | None) -> None:
    """An evaluation of a served model: the key its server is to get is there (require_credentials)."""
    from mentalarena.engines.openai_client import check_key_env
    check_key_env(api_key_env, "api_key_env")
    if settings["backend"] == "openai":
        require_credentials(Route(settings["model"], "openai", tuple(endpoint_list(settings["api_base"])), api_key_env))
