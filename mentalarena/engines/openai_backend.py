"""Chat backend for the OpenAI API and OpenAI-compatible servers (vLLM, llama.cpp server, Ollama).

All retrying happens in `OpenAIBackend._complete`; the SDK clients (built by `openai_client.make_client`:
each server's own key only, no redirects, an overall deadline per request) never retry by themselves,
so that retries, backoff and their logging live in one place, with one reading of errors
(`openai_client.classify`): transient faults are retried, a refused service stops the run
(`ServiceRefused`), anything else fails the one request.

Several endpoints (`api_base="URL1,URL2"`, replicas of one model) share the requests: each request goes
to the endpoint with the fewest requests outstanding; an endpoint that fails `remove_after` times in a
row leaves the rotation for `cooldown` seconds, then takes one request at a time until one succeeds
(while every endpoint is cooling down or probing, `_take` gives a request to one of them all the same),
and its requests are retried on the others at once.

Models that refuse a sampling parameter (OpenAI's reasoning models reject `max_tokens` and any
temperature but their default) are learned from their first 400: the request is sent again as the
model accepts it, once said in a warning, and what is sent is kept in `sampling["sent"]` and the stats.
"""
from __future__ import annotations

import logging
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import openai
from openai import OpenAI
from openai.types.chat import ChatCompletion

from mentalarena.engines.chat import ChatBackend, Reply
from mentalarena.engines.routes import endpoint_list
from mentalarena.cli import public_url
from mentalarena.errors import ContextOverflow, EndpointError, InputError, ModelCallError, ServiceRefused
from mentalarena.engines.openai_client import (DEFAULT_REQUEST_TIMEOUT, PREFLIGHT_TIMEOUT, RETRY, STOP, Credentials, classify,
                            connection_cause, credentials, deadline, default_base, describe, make_client,
                            plain_http_warning, retry_after, server_fault, stop_reason, warn)

log = logging.getLogger("mentalarena.openai")

# Context windows (prompt + reply, tokens) of OpenAI's chat models, as OpenAI's model pages give
# them; a name takes the entry of its longest matching prefix, a fine-tuned "ft:<base>:org::id" that
# of its base. Used when neither --max_context_tokens nor the server says otherwise.
KNOWN_WINDOWS = {
    "gpt-3.5-turbo": 16385, "gpt-3.5-turbo-0613": 4096, "gpt-3.5-turbo-0301": 4096,
    "gpt-3.5-turbo-instruct": 4096, "gpt-4": 8192, "gpt-4-32k": 32768, "gpt-4-turbo": 128000,
    "gpt-4-1106": 128000, "gpt-4-0125": 128000, "gpt-4o": 128000, "gpt-4.1": 1047576,
    "gpt-4.5": 128000, "gpt-5": 400000, "o1": 200000, "o1-mini": 128000, "o3": 200000, "o4-mini": 200000,
}


def known_window(model: str) -> int | None:
    """The context window of an OpenAI model by name (KNOWN_WINDOWS), or None."""
    name = model.split(":")[1] if model.startswith("ft:") and model.count(":") >= 1 else model
    matches = [k for k in KNOWN_WINDOWS if name == k or name.startswith(k + "-")]
    return KNOWN_WINDOWS[max(matches, key=len)] if matches else None


# With tools, a null content is expected; without them it means the server sent a broken message.
_TOOL_FINISH_REASONS = {"tool_calls", "function_call"}
# vLLM states a context overflow only in its message: "maximum context length is 4096 tokens ...
# (4900 in the messages, ...)" or "... your request has 4900 input tokens". Only the numbers are read.
_WINDOW_SAID = re.compile(r"maximum context length is (\d+)")
_PROMPT_SAID = re.compile(r"(\d+) (?:in the messages|input tokens)|messages resulted in (\d+) tokens")
# Sampling parameters a model may refuse (400 unsupported_parameter / unsupported_value): left out then.
_DROPPABLE = ("temperature", "top_p", "top_k", "seed")


class _MalformedResponse(Exception):
    """The server answered 200 but the body is not a usable chat completion."""


@dataclass
class Endpoint:
    """One server of the rotation, with its own client and counters."""
    shown: str                 # its address without credentials, for messages and summaries
    client: OpenAI
    creds: Credentials
    outstanding: int = 0
    in_a_row: int = 0          # failures since the last success
    back_at: float = 0.0       # time.monotonic() when it rejoins the rotation
    probation: bool = False    # back from a cool-down: one request at a time until one succeeds
    counts: dict = field(default_factory=lambda: {"requests": 0, "ok": 0, "errors": 0, "removed": 0,
                                                  "prompt_tokens": 0, "completion_tokens": 0})


class OpenAIBackend(ChatBackend):
    """Sends each conversation as one chat.completions request; many conversations go out in parallel."""

    batched = False

    def __init__(self, model: str, api_base: str | list[str] | None = None, temperature: float = 0.8,
                 max_new_tokens: int = 256, max_retries: int = 8, request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 max_parallel: int = 16, backoff_base: float = 1.0, backoff_max: float = 60.0,
                 seed: int | None = None, context_limit: int | None = None, remove_after: int = 3,
                 cooldown: float = 30.0, top_p: float | None = None, top_k: int | None = None,
                 key_env: str | None = None, key_flag: str = "api_key_env") -> None:
        self.model = model
        self.name = f"openai:{model}"
        self.api_base = api_base
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.seed = seed
        self.request_timeout = request_timeout
        self.key_flag = key_flag
        # None: not sent, the server's default applies (OpenAI: top_p 1; vLLM: the checkpoint's
        # generation config). top_k is not an OpenAI API parameter: sent only when asked for.
        self.top_p, self.top_k = top_p, top_k
        # what each request carries, as the model accepts it (see _adapt); shown in `sampling`
        self.sent: dict[str, Any] = {"token_limit": "max_tokens", "dropped": []}
        self.sampling = {"top_p": top_p, "top_k": top_k,
                         "source": {k: "flag" if v is not None else "server_default"
                                    for k, v in (("top_p", top_p), ("top_k", top_k))}, "sent": self.sent}
        self.context_limit = context_limit  # None: learned from the server by `check()` where it says
        self.remove_after, self.cooldown = remove_after, cooldown
        self.endpoints = []
        for url in endpoint_list(api_base) or [None]:
            creds = credentials(url, key_env, key_flag)  # the key is kept by the client only, never on self
            note = plain_http_warning(url, creds)
            if note:
                warn(note)
            self.endpoints.append(Endpoint(public_url(url) or public_url(default_base()),
                                           make_client(url, creds, request_timeout), creds))
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="openai")
        self._stats_lock = threading.Lock()
        self.counters = {"requests": 0, "retries": 0, "failures": 0, "prompt_tokens": 0, "completion_tokens": 0}
        # set by the first refusal no retry can fix (no credit, a revoked key): from then on no request
        # of this backend is sent or retried, each raises the same refusal (see _complete)
        self._refused: str | None = None

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, endpoints={self.where!r})"

    @property
    def where(self) -> str:
        return ", ".join(e.shown for e in self.endpoints)

    # ---- the interface --------------------------------------------------------------------
    def generate(self, conversations: list[list[dict]], seeds: list[int] | None = None) -> list[Reply]:
        seeds = seeds if seeds is not None else [self.seed] * len(conversations)
        if len(conversations) == 1:  # the common case (callers already run many threads): skip the pool hop
            return [self._complete(conversations[0], seeds[0])]
        return list(self._pool.map(self._complete, conversations, seeds))

    def stream(self, conversations, seeds=None, chat=True):
        """A refused service (`ServiceRefused`) is raised, not yielded: the run stops, every request
        not yet sent is cancelled."""
        if not chat:
            raise InputError(f"{self.name}: raw-text prompting needs a local model; this backend takes chat messages")
        seeds = seeds if seeds is not None else [self.seed] * len(conversations)
        futures = {self._pool.submit(self._complete, c, s): i for i, (c, s) in enumerate(zip(conversations, seeds))}
        try:
            for future in as_completed(futures):
                err = future.exception()
                if err is not None and (not isinstance(err, ModelCallError) or isinstance(err, ServiceRefused)):
                    raise err
                yield futures[future], err or future.result()
        finally:
            for future in futures:
                future.cancel()

    def stats(self) -> dict:
        with self._stats_lock:
            out: dict[str, Any] = {"http_" + k: v for k, v in self.counters.items()}
            out["endpoints"] = {e.shown: dict(e.counts, in_rotation=e.back_at <= time.monotonic())
                                for e in self.endpoints}
            out["sent"] = {**self.sent, "dropped": list(self.sent["dropped"])}
            return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for endpoint in self.endpoints:
            endpoint.client.close()

    # ---- preflight ------------------------------------------------------------------------
    def check(self, timeout: float = PREFLIGHT_TIMEOUT) -> list[str]:
        """Reach every endpoint once before any work: the server answers, takes the key and serves
        the model, each request within `timeout` seconds in all. Raises EndpointError (one line naming
        the server) otherwise; returns notes worth showing. Learns the context window from servers that
        publish it (vLLM's `max_model_len`, llama.cpp's `n_ctx`) unless one was given."""
        notes, windows = [], []
        with deadline(min(timeout, self.request_timeout)):
            for endpoint in self.endpoints:
                try:
                    listed = list(endpoint.client.models.list().data)
                except (openai.NotFoundError, openai.PermissionDeniedError):
                    listed = None  # no GET /models there, or a key not allowed to list: the probe below decides
                except (openai.OpenAIError, ValueError) as err:
                    raise EndpointError(self._unusable(endpoint, err)) from None
                entry = next((m for m in listed or [] if self.model in (m.id, *(_extra(m, "aliases") or []))), None)
                if entry is None:
                    self._probe(endpoint, listed)
                    if listed is not None:
                        notes.append(f"{endpoint.shown} does not list model {self.model!r} but answered it "
                                     f"(a server of one model, as llama.cpp's, answers to any name; it lists "
                                     f"{_names(listed)})")
                    entry = listed[0] if listed and len(listed) == 1 else None
                window = _window(entry)
                if window:
                    windows.append(window)
        if self.context_limit is None and windows:
            self.context_limit = min(windows)
            notes.append(f"{self.name}: context window {self.context_limit} tokens, as the server reports; "
                         "longer conversations are cut (--max_context_tokens sets another)")
        elif self.context_limit is None and known_window(self.model):
            self.context_limit = known_window(self.model)
            notes.append(f"{self.name}: context window {self.context_limit} tokens, OpenAI's published window "
                         "for this model; longer conversations are cut (--max_context_tokens sets another)")
        return notes

    def _probe(self, endpoint: Endpoint, listed: list | None) -> None:
        """One 1-token request: does the server answer this model name at all? (Sent as a real call
        would be, so a model that refuses a parameter teaches it here.)"""
        try:
            for _ in range(len(_DROPPABLE) + 2):  # a parameter the model refuses is learned here already
                try:
                    self._request(endpoint, [{"role": "user", "content": "Hi"}], None, max_tokens=1)
                    break
                except openai.BadRequestError as err:
                    if not self._adapt(err):
                        raise
        except openai.APIStatusError as err:
            if err.status_code in (400, 404) and listed is not None and classify(err) == STOP:
                raise EndpointError(f"{endpoint.shown}: no model {self.model!r} there (it serves "
                                    f"{_names(listed)}); name one of those") from None
            if err.status_code == 404:
                raise EndpointError(f"{endpoint.shown}: no OpenAI-compatible API there (HTTP 404 on /models and "
                                    "/chat/completions); the address usually ends in /v1") from None
            raise EndpointError(self._unusable(endpoint, err)) from None
        except (openai.OpenAIError, ValueError, _MalformedResponse) as err:
            raise EndpointError(self._unusable(endpoint, err)) from None

    def _unusable(self, endpoint: Endpoint, err: Exception) -> str:
        """The preflight's one line: which server, and why it cannot be used."""
        if isinstance(err, openai.APIStatusError) and classify(err) == STOP:
            return stop_reason(err, endpoint.shown, endpoint.creds, self.key_flag)
        if isinstance(err, openai.APITimeoutError):
            return (f"{endpoint.shown}: no complete answer within the preflight's {min(PREFLIGHT_TIMEOUT, self.request_timeout):g} s "
                    "(the server accepts connections but does not answer, or trickles); is it overloaded or stuck?")
        if isinstance(err, openai.APIConnectionError):
            return f"{endpoint.shown}: server unreachable ({connection_cause(err)}); is it running, and is the address right?"
        return f"{endpoint.shown}: the server cannot be used ({describe(err)})"

    # ---- one request, every retry ---------------------------------------------------------
    def _complete(self, conversation: list[dict], seed: int | None = None) -> Reply:
        """One conversation, with every retry of this backend. Returns a Reply or raises ModelCallError
        (ServiceRefused when no retry can help)."""
        messages = [dict(m) for m in conversation]  # the caller's dicts never reach the SDK
        last_error, tried = "none", set()
        endpoint = self.endpoints[0]
        attempt = adaptations = 0
        while attempt <= self.max_retries:
            if self._refused is not None:  # another request was refused: the run is stopping
                raise ServiceRefused(self._refused)
            endpoint = self._take(tried)
            try:
                reply = self._request(endpoint, messages, seed)
            except (openai.OpenAIError, _MalformedResponse) as err:
                last_error = describe(err) if not isinstance(err, _MalformedResponse) else f"malformed response ({err})"
                self._give_back(endpoint, err)
                overflow = _context_overflow(err)
                if overflow is not None:  # the caller may cut the conversation and ask again
                    raise ContextOverflow(f"{self.name} at {endpoint.shown}: the prompt does not fit the context "
                                          f"window ({last_error})", *overflow) from err
                # the model refused a parameter: send it again as the model accepts (each can go once)
                if adaptations <= len(_DROPPABLE) and self._adapt(err):
                    adaptations += 1
                    continue
                kind = RETRY if isinstance(err, _MalformedResponse) else classify(err)
                if kind == STOP:
                    self._count(failures=1)
                    self._refused = self._refused or (
                        f"{self.name}: " + stop_reason(err, endpoint.shown, endpoint.creds, self.key_flag)
                        + "; stopped (retrying cannot fix this)")
                    raise ServiceRefused(self._refused) from err
                if kind != RETRY:
                    self._count(failures=1)
                    raise ModelCallError(f"{self.name} at {endpoint.shown}: request rejected ({last_error}); "
                                         "not retried") from err
                tried.add(id(endpoint))
                if self._refused is not None:  # no backoff wait for a run that is stopping
                    raise ServiceRefused(self._refused) from err
                if attempt < self.max_retries:
                    self._before_retry(attempt, err, endpoint, last_error, tried)
                attempt += 1
                continue
            self._give_back(endpoint, None, reply)
            return reply
        self._count(failures=1)
        raise ModelCallError(f"{self.name}: gave up after {self.max_retries + 1} attempts; last error at "
                             f"{endpoint.shown}: {last_error}")

    def _request(self, endpoint: Endpoint, messages: list[dict], seed: int | None,
                 max_tokens: int | None = None) -> Reply:
        options: dict[str, Any] = {"model": self.model, "messages": messages,
                                   self.sent["token_limit"]: max_tokens or self.max_new_tokens}
        extra = {}
        for name, value in (("temperature", self.temperature), ("seed", seed), ("top_p", self.top_p),
                            ("top_k", self.top_k)):
            if value is None or name in self.sent["dropped"]:
                continue
            if name == "top_k":  # not an OpenAI parameter: vLLM, llama.cpp and SGLang read it from the body
                extra["top_k"] = value
            else:
                options[name] = value
        if extra:
            options["extra_body"] = extra
        try:
            completion = endpoint.client.chat.completions.create(**options)
        except ValueError as err:
            # The SDK lets a 200 body that is not JSON escape as a bare JSONDecodeError (a ValueError).
            raise _MalformedResponse(f"undecodable body: {type(err).__name__}") from err
        reply = _parse(completion)
        reply.endpoint = endpoint.shown
        return reply

    def _adapt(self, err: Exception) -> bool:
        """A 400 naming a sampling parameter this model does not take: change what is sent (once,
        with a warning) and say to send again. False for any other error."""
        if not isinstance(err, openai.BadRequestError):
            return False
        body = err.body if isinstance(err.body, dict) else {}
        param = str(getattr(err, "param", None) or body.get("param") or "")
        code = str(getattr(err, "code", None) or body.get("code") or "")
        if code not in ("unsupported_parameter", "unsupported_value"):
            return False
        with self._stats_lock:
            if param == "max_tokens" and self.sent["token_limit"] == "max_tokens":
                self.sent["token_limit"] = "max_completion_tokens"
                change = "does not take max_tokens; sending max_completion_tokens instead"
            elif param in _DROPPABLE and param not in self.sent["dropped"]:
                self.sent["dropped"].append(param)
                change = f"does not take {param} {getattr(self, param, '')!s}; sending none (the model's own default applies)"
            elif param == "max_tokens" or param in self.sent["dropped"]:
                return True  # another thread adapted already
            else:
                return False
        warn(f"warning: {self.name} {change} (HTTP 400 {code}); recorded in the run's settings")
        return True

    def _take(self, tried: set[int]) -> Endpoint:
        """The endpoint for the next attempt: in the rotation and not yet tried since the last pause,
        fewest requests outstanding first (then fewest sent). One back from a cool-down takes one
        request at a time until one succeeds. When every one is out of the rotation, the one that
        returns first."""
        with self._stats_lock:
            now = time.monotonic()
            ready = [e for e in self.endpoints if e.back_at <= now and not (e.probation and e.outstanding)]
            pool = [e for e in ready if id(e) not in tried] or ready
            waiting = [e for e in self.endpoints if e.back_at > now] or self.endpoints
            endpoint = (min(pool, key=lambda e: (e.outstanding, e.counts["requests"])) if pool
                        else min(waiting, key=lambda e: (e.back_at, e.outstanding)))
            endpoint.outstanding += 1
            endpoint.counts["requests"] += 1
            self.counters["requests"] += 1
            return endpoint

    def _give_back(self, endpoint: Endpoint, err: Exception | None, reply: Reply | None = None) -> None:
        with self._stats_lock:
            endpoint.outstanding -= 1
            if err is None:
                endpoint.in_a_row = 0
                endpoint.probation = False
                endpoint.counts["ok"] += 1
                for key in ("prompt_tokens", "completion_tokens"):
                    endpoint.counts[key] += getattr(reply, key)
                    self.counters[key] += getattr(reply, key)
                return
            endpoint.counts["errors"] += 1
            if not (isinstance(err, _MalformedResponse) or server_fault(err)):
                return
            endpoint.in_a_row += 1
            failed_probe = endpoint.probation and endpoint.back_at <= time.monotonic()
            if (endpoint.in_a_row >= self.remove_after or failed_probe) and endpoint.back_at <= time.monotonic() \
                    and len(self.endpoints) > 1:
                endpoint.back_at = time.monotonic() + self.cooldown
                endpoint.probation = True
                endpoint.counts["removed"] += 1
                log.warning("%s: %s left the rotation for %.0f s after %s (last: %s); "
                            "its requests go to the others", self.name, endpoint.shown, self.cooldown,
                            "its probe request failed" if failed_probe else f"{endpoint.in_a_row} failures in a row",
                            describe(err) if not isinstance(err, _MalformedResponse) else "malformed response")

    def _before_retry(self, attempt: int, err: Exception, endpoint: Endpoint, reason: str, tried: set[int]) -> None:
        """Another endpoint not yet tried: retry there at once. Otherwise wait (Retry-After, or
        exponential backoff with jitter so parallel callers don't retry in lockstep) and start over."""
        self._count(retries=1)
        with self._stats_lock:
            untried = any(id(e) not in tried and e.back_at <= time.monotonic() for e in self.endpoints)
        if untried:
            log.warning("%s: %s at %s; retry %d/%d on another endpoint", self.name, reason, endpoint.shown,
                        attempt + 1, self.max_retries)
            return
        delay = retry_after(err)
        if delay is None:
            delay = min(self.backoff_max, self.backoff_base * 2 ** attempt) * random.uniform(0.5, 1.0)
        log.warning("%s: %s at %s; retry %d/%d in %.2fs", self.name, reason, endpoint.shown, attempt + 1,
                    self.max_retries, delay)
        tried.clear()
        time.sleep(delay)

    def _count(self, **amounts: int) -> None:
        with self._stats_lock:
            for key, amount in amounts.items():
                self.counters[key] += amount


def _parse(completion: object) -> Reply:
    """Reply from a completion, or _MalformedResponse: the SDK does not validate bodies, so check here."""
    if not isinstance(completion, ChatCompletion):  # e.g. a text/html error page arrives as a plain str
        raise _MalformedResponse(f"body is a {type(completion).__name__}, not a chat completion")
    choices = completion.choices
    if not isinstance(choices, list) or not choices:
        raise _MalformedResponse("no choices")
    choice = choices[0]
    content = getattr(choice.message, "content", None)
    if content is None and getattr(choice, "finish_reason", None) in _TOOL_FINISH_REASONS:
        content = ""
    if not isinstance(content, str):
        raise _MalformedResponse(f"message content is {type(content).__name__}")
    usage = completion.usage
    # Stripped as the reference stripped every reply, and as the local backends decode theirs.
    return Reply(content.strip(), _token_count(usage, "prompt_tokens"), _token_count(usage, "completion_tokens"))


def _token_count(usage: object, field: str) -> int:
    # Some local servers omit usage or fill it oddly; a missing count must not fail a good reply.
    value = getattr(usage, field, None)
    return value if isinstance(value, int) else 0


def _context_overflow(err: Exception) -> tuple[int | None, int | None] | None:
    """(prompt tokens, window) when the server refused the prompt as longer than its context window
    (each None where the server did not say); None for any other error."""
    if not isinstance(err, openai.APIStatusError) or err.status_code not in (400, 413):
        return None
    body = err.body if isinstance(err.body, dict) else {}
    if body.get("type") == "exceed_context_size_error":  # llama.cpp
        return _int(body.get("n_prompt_tokens")), _int(body.get("n_ctx"))
    # vLLM and OpenAI give their numbers only in the message; OpenAI also names the error's code
    message = str(body.get("message") or "")
    window, prompt = _WINDOW_SAID.search(message), _PROMPT_SAID.search(message)
    if not window and err.code != "context_length_exceeded":
        return None
    return (int(next(g for g in prompt.groups() if g)) if prompt else None), (int(window.group(1)) if window else None)


def _int(value) -> int | None:
    return value if isinstance(value, int) else None


def _extra(model: object, key: str):
    """A field a server adds to its model entries (vLLM's max_model_len, llama.cpp's meta)."""
    extra = getattr(model, "model_extra", None) or {}
    return extra.get(key, getattr(model, key, None))


def _window(entry) -> int | None:
    if entry is None:
        return None
    window = _extra(entry, "max_model_len") or (_extra(entry, "meta") or {}).get("n_ctx")
    return window if isinstance(window, int) and window > 0 else None


def _names(listed: list) -> str:
    shown = [repr(m.id) for m in listed[:5]]
    return ", ".join(shown) + (f" and {len(listed) - 5} more" if len(listed) > 5 else "") if shown else "no models"
