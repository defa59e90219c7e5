"""Chat backend for the OpenAI API and OpenAI-compatible local servers (vLLM, llama.cpp server, Ollama).

All retrying happens in `OpenAIBackend._complete`; the SDK client is built with `max_retries=0` so that
retries, backoff and their logging live in one place.
"""
from __future__ import annotations

import email.utils
import logging
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Mapping

import openai
from openai import OpenAI
from openai.types.chat import ChatCompletion

from .backends import ChatBackend, Reply
from .errors import InputError, ModelCallError

log = logging.getLogger("mentalarena.openai")

# Local servers ignore the key, but the SDK refuses to build a client without one.
LOCAL_PLACEHOLDER_KEY = "not-needed"
# 408 request timeout and 429 rate limit heal by waiting, as do 5xx; other 4xx mean the request is wrong.
_RETRYABLE_4XX = {408, 429}
# With tools, a null content is expected; without them it means the server sent a broken message.
_TOOL_FINISH_REASONS = {"tool_calls", "function_call"}
# A Retry-After longer than this is a misbehaving server; waiting that long would look like a hang.
_MAX_RETRY_AFTER_S = 600.0
# Server-chosen error codes are quoted in messages only when they look like identifiers, never free text.
_SAFE_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class _MalformedResponse(Exception):
    """The server answered 200 but the body is not a usable chat completion."""


class OpenAIBackend(ChatBackend):
    """Sends each conversation as one chat.completions request; many conversations go out in parallel."""

    batched = False

    def __init__(self, model: str, api_base: str | None = None, temperature: float = 0.8,
                 max_new_tokens: int = 256, max_retries: int = 8, timeout: float = 120.0,
                 max_parallel: int = 16, backoff_base: float = 1.0, backoff_max: float = 60.0,
                 seed: int | None = None) -> None:
        self.model = model
        self.name = f"openai:{model}"
        self.api_base = api_base
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.seed = seed
        # The key goes straight into the client and is not kept on self, so it cannot leak through repr/vars.
        self._client = OpenAI(api_key=_api_key(api_base), base_url=api_base, max_retries=0, timeout=timeout)
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="openai")
        self._stats_lock = threading.Lock()
        self.counters = {"requests": 0, "retries": 0, "failures": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, api_base={self.api_base!r})"

    def generate(self, conversations: list[list[dict]]) -> list[Reply]:
        if len(conversations) == 1:  # the common case (callers already run many threads): skip the pool hop
            return [self._complete(conversations[0])]
        return list(self._pool.map(self._complete, conversations))

    def stream(self, conversations, seeds=None, chat=True):
        if not chat:
            raise InputError(f"{self.name}: raw-text prompting needs a local model; this backend takes chat messages")
        futures = {self._pool.submit(self._complete, c): i for i, c in enumerate(conversations)}
        try:
            for future in as_completed(futures):
                err = future.exception()
                if err is not None and not isinstance(err, ModelCallError):
                    raise err
                yield futures[future], err or future.result()
        finally:
            for future in futures:
                future.cancel()

    def stats(self) -> dict:
        with self._stats_lock:
            return {"http_" + k: v for k, v in self.counters.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def _complete(self, conversation: list[dict]) -> Reply:
        """One conversation, with every retry of this backend. Returns a Reply or raises ModelCallError."""
        messages = [dict(m) for m in conversation]  # the caller's dicts never reach the SDK
        last_error = "none"
        for attempt in range(self.max_retries + 1):
            self._count(requests=1)
            try:
                reply = self._request(messages)
            except (openai.OpenAIError, _MalformedResponse) as err:
                last_error = _describe(err)
                if not _is_retryable(err):
                    self._count(failures=1)
                    raise ModelCallError(f"{self.name}: request rejected ({last_error}); not retried") from err
                if attempt < self.max_retries:
                    self._sleep_before_retry(attempt, err, last_error)
                continue
            self._count(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
            return reply
        self._count(failures=1)
        raise ModelCallError(
            f"{self.name}: gave up after {self.max_retries + 1} attempts; last error: {last_error}")

    def _request(self, messages: list[dict]) -> Reply:
        options: dict[str, Any] = {"model": self.model, "messages": messages,
                                   "temperature": self.temperature, "max_tokens": self.max_new_tokens}
        if self.seed is not None:
            options["seed"] = self.seed
        try:
            completion = self._client.chat.completions.create(**options)
        except ValueError as err:
            # The SDK lets a 200 body that is not JSON escape as a bare JSONDecodeError (a ValueError).
            raise _MalformedResponse(f"undecodable body: {type(err).__name__}") from err
        return _parse(completion)

    def _sleep_before_retry(self, attempt: int, err: Exception, reason: str) -> None:
        delay = _retry_after(err)
        if delay is None:  # exponential backoff with jitter, so parallel callers don't retry in lockstep
            delay = min(self.backoff_max, self.backoff_base * 2 ** attempt) * random.uniform(0.5, 1.0)
        log.warning("%s: %s; retry %d/%d in %.2fs", self.name, reason, attempt + 1, self.max_retries, delay)
        self._count(retries=1)
        time.sleep(delay)

    def _count(self, **amounts: int) -> None:
        with self._stats_lock:
            for key, amount in amounts.items():
                self.counters[key] += amount


def _api_key(api_base: str | None) -> str:
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if api_base is None:
        raise ModelCallError("OPENAI_API_KEY is not set: export it, or pass --api_base for a local "
                             "OpenAI-compatible server")
    return LOCAL_PLACEHOLDER_KEY


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
    return Reply(content, _token_count(usage, "prompt_tokens"), _token_count(usage, "completion_tokens"))


def _token_count(usage: object, field: str) -> int:
    # Some local servers omit usage or fill it oddly; a missing count must not fail a good reply.
    value = getattr(usage, field, None)
    return value if isinstance(value, int) else 0


def _is_retryable(err: Exception) -> bool:
    if isinstance(err, (_MalformedResponse, openai.APIConnectionError, openai.APIResponseValidationError)):
        return True  # APIConnectionError covers APITimeoutError, refused and dropped connections
    if isinstance(err, openai.APIStatusError):
        return err.status_code in _RETRYABLE_4XX or err.status_code >= 500
    return False


def _describe(err: Exception) -> str:
    """Short, secret-free error description: type, HTTP status and error code, never the server's text."""
    if isinstance(err, _MalformedResponse):
        return f"malformed response ({err})"
    if isinstance(err, openai.APIStatusError):
        code = f" {err.code}" if err.code and _SAFE_CODE.match(err.code) else ""
        return f"HTTP {err.status_code} {type(err).__name__}{code}"
    return type(err).__name__


def _retry_after(err: Exception) -> float | None:
    if not isinstance(err, openai.APIStatusError):
        return None
    return parse_retry_after(err.response.headers)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), clamped to [0, 600];
    None when absent or unreadable. `headers` must look up case-insensitively (or use lower-case keys)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        date = email.utils.parsedate_tz(value)
        if date is None:
            return None
        seconds = email.utils.mktime_tz(date) - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER_S)
