"""Every OpenAI SDK client of the project, built one way, and how their errors are read.

- Keys: `OPENAI_API_KEY` goes to the OpenAI API only (api.openai.com, or the `OPENAI_BASE_URL` the
  user set). Any other server gets the key of the environment variable named for its route
  (`--api_key_env VLLM_KEY`, `--judge_api_key_env ...`), or none at all; the OpenAI organisation and
  project headers the SDK would read from the environment go nowhere else either. A key sent over
  plain http to a host that is not this machine is one warning line.
- Redirects are not followed: the SDK's client would re-send the whole chat body (patient text) to
  whatever address a 307/308 names. A redirect is an error naming both addresses.
- Deadlines: every request has an overall deadline, not only per-read timeouts, so a server that
  accepts and then trickles a byte every few seconds cannot hang a run. The deadline is enforced on
  every socket read, write and connect of the request (headers and body alike).
- Errors: `classify` says what a failed request means (retry, give up on this request, stop the
  run), `describe` gives a short, secret-free description; the backend and data_process.py share both.
"""
from __future__ import annotations

import email.utils
import ipaddress
import logging
import math
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping
from urllib.parse import urlsplit

import openai

from mentalarena.cli import public_url
from mentalarena.errors import InputError

try:  # the transport stack of the SDK installed: httpx2/httpcore2 (openai >= 3), else httpx/httpcore
    import httpcore2 as _httpcore
    import httpx2 as _httpx
except ImportError:  # pragma: no cover - older SDKs
    import httpcore as _httpcore  # type: ignore[no-redef]
    import httpx as _httpx  # type: ignore[no-redef]

log = logging.getLogger("mentalarena.openai")

OPENAI_API = "https://api.openai.com/v1"
OPENAI_KEY = "OPENAI_API_KEY"
# Servers without a key: the SDK refuses to build a client with none; this is sent instead (not a secret).
PLACEHOLDER_KEY = "not-needed"
DEFAULT_REQUEST_TIMEOUT = 600.0  # seconds for one whole request: a long local generation fits in it
PREFLIGHT_TIMEOUT = 10.0         # seconds for each preflight request
CONNECT_TIMEOUT = 30.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SAFE_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MAX_RETRY_AFTER_S = 600.0  # a longer Retry-After is a misbehaving server; waiting that long would look like a hang
# 400s that concern this one request's text (a provider's content filter), not the run
_CONTENT_CODES = {"content_filter", "content_policy_violation", "invalid_prompt"}


# ---------------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class Credentials:
    """What one server is sent: a key and the variable it came from (None: no key, a placeholder)."""
    key: str
    source: str | None
    openai_api: bool  # the OpenAI API itself (or OPENAI_BASE_URL): its organisation/project headers may go too


def default_base() -> str:
    """Where the SDK sends requests when no server is named: OPENAI_BASE_URL, else the OpenAI API."""
    return os.environ.get("OPENAI_BASE_URL") or OPENAI_API


def is_openai_api(url: str | None) -> bool:
    """The OpenAI API: no server named, api.openai.com, or the OPENAI_BASE_URL the user set."""
    if url is None:
        return True
    if (urlsplit(url).hostname or "").lower() == "api.openai.com":
        return True
    base = os.environ.get("OPENAI_BASE_URL")
    return bool(base) and _normal(base) == _normal(url)


def _normal(url: str) -> str:
    return url.strip().rstrip("/").lower()


def check_key_env(name: str | None, flag: str) -> None:
    """A --*_api_key_env value names a variable; a key pasted there instead is refused unread."""
    if name is not None and not (isinstance(name, str) and _ENV_NAME.fullmatch(name)):
        raise InputError(f"--{flag} takes the name of an environment variable that holds the key "
                         "(e.g. VLLM_KEY), not the key itself")


def credentials(url: str | None, key_env: str | None = None, flag: str = "api_key_env") -> Credentials:
    """The key for one server: from `key_env` when named, OPENAI_API_KEY for the OpenAI API, else none."""
    check_key_env(key_env, flag)
    official = is_openai_api(url)
    where = public_url(url) if url else f"the OpenAI API ({public_url(default_base())})"
    if key_env:
        value = os.environ.get(key_env)
        if not value:
            raise InputError(f"--{flag} {key_env}: that environment variable is not set (or empty); "
                             f"export it with the key for {where}")
        return Credentials(value, key_env, official)
    if official:
        value = os.environ.get(OPENAI_KEY)
        if not value:
            raise InputError(f"{where} needs {OPENAI_KEY}: export it (or pass --api_base for an "
                             "OpenAI-compatible server)")
        return Credentials(value, OPENAI_KEY, True)
    return Credentials(PLACEHOLDER_KEY, None, False)


def plain_http_warning(url: str | None, creds: Credentials) -> str | None:
    """The warning for a key that would cross the network unencrypted, or None."""
    if creds.source is None or not url:
        return None
    parts = urlsplit(url if "://" in url else "//" + url)
    if (parts.scheme or "http").lower() != "http" or _loopback(parts.hostname or ""):
        return None
    return (f"warning: the key in {creds.source} goes to {public_url(url)} over plain http, unencrypted; "
            "use https (or an SSH tunnel) for a server on another machine")


def _loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------- clients
_deadlines = threading.local()  # per thread: when the request in flight must be over


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Requests made in this block by this thread get `seconds` each (the preflight's short deadline)."""
    before = getattr(_deadlines, "override", None)
    _deadlines.override = seconds
    try:
        yield
    finally:
        _deadlines.override = before


def make_client(url: str | None, creds: Credentials, request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> openai.OpenAI:
    """An SDK client for one server: its own key only, no redirects, an overall deadline per request,
    no retries of its own (retrying is the caller's, with the caller's rules)."""
    http = openai.DefaultHttpxClient(
        timeout=_httpx.Timeout(request_timeout, connect=min(CONNECT_TIMEOUT, request_timeout)),
        follow_redirects=False, event_hooks={"request": [_start_clock(request_timeout)]})
    _enforce_deadlines(http)
    headers = {} if creds.openai_api else {"OpenAI-Organization": openai.Omit(), "OpenAI-Project": openai.Omit()}
    return openai.OpenAI(api_key=creds.key, base_url=url, max_retries=0, timeout=request_timeout,
                         http_client=http, default_headers=headers)


def _start_clock(seconds: float):
    def hook(request) -> None:  # runs in the thread that sends the request, before any byte goes out
        _deadlines.end = time.monotonic() + (getattr(_deadlines, "override", None) or seconds)
    return hook


def _enforce_deadlines(http) -> None:
    """Every connection pool of the client (the direct one and those of proxies) reads and writes
    through `_DeadlineBackend`."""
    transports = [http._transport, *(t for t in http._mounts.values() if t is not None)]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        if pool is None or not hasattr(pool, "_network_backend"):
            raise RuntimeError(f"cannot enforce request deadlines on {type(transport).__name__}: "
                               "the HTTP library changed; pin openai to a tested release")
        if not isinstance(pool._network_backend, _DeadlineBackend):
            pool._network_backend = _DeadlineBackend(pool._network_backend)


def _left(timeout: float | None) -> float | None:
    """The per-operation timeout, cut to what is left of the request's deadline."""
    end = getattr(_deadlines, "end", None)
    if end is None:
        return timeout
    left = end - time.monotonic()
    if left <= 0:
        raise _httpcore.ReadTimeout("the request's overall deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(_httpcore.NetworkStream):
    def __init__(self, stream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _left(timeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, _left(timeout)))

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _DeadlineBackend(_httpcore.NetworkBackend):
    def __init__(self, backend):
        self._backend = backend

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return _DeadlineStream(self._backend.connect_tcp(host, port, _left(timeout), local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return _DeadlineStream(self._backend.connect_unix_socket(path, _left(timeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


# ---------------------------------------------------------------------------------- errors
RETRY, FAIL, STOP = "retry", "fail", "stop"  # what a failed request means


def classify(err: Exception) -> str:
    """RETRY a transient fault (timeouts, dropped connections, 408, 429 rate limits, 5xx, a body
    that is no completion); STOP the run for what no retry can fix (a redirect, 401/403, 429
    insufficient_quota, 404, a 400 invalid request); FAIL only this request otherwise (a provider's
    content filter, 413, 422, ...)."""
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        if 300 <= status < 400 or status in (401, 403, 404):
            return STOP
        if status == 429:
            return STOP if _code(err) == "insufficient_quota" else RETRY
        if status == 408 or status >= 500:
            return RETRY
        if status == 400:
            return FAIL if _code(err) in _CONTENT_CODES else STOP
        return FAIL
    if isinstance(err, (openai.APIConnectionError, openai.APIResponseValidationError)):
        return RETRY
    return FAIL


def server_fault(err: Exception) -> bool:
    """A failure that says the server is unwell (not a rate limit, not a bad request)."""
    if isinstance(err, openai.APIStatusError):
        return err.status_code >= 500
    return isinstance(err, (openai.APIConnectionError, openai.APIResponseValidationError))


def _code(err: openai.APIStatusError) -> str | None:
    body = err.body if isinstance(err.body, dict) else {}
    code = err.code or body.get("code") or body.get("type")
    return str(code) if code else None


def server_message(err: Exception, secrets: tuple[str, ...] = ()) -> str:
    """The server's own message of an HTTP error, one line, with anything key-like hidden."""
    body = getattr(err, "body", None)
    text = body.get("message") if isinstance(body, dict) else None
    return redact(text, secrets) if isinstance(text, str) and text.strip() else ""


def redact(text: str, secrets: tuple[str, ...] = (), limit: int = 300) -> str:
    """Servers quote keys back in part ("Incorrect API key provided: sk-ab***yz"): hide any of it."""
    for secret in secrets:
        if secret and secret != PLACEHOLDER_KEY:
            text = text.replace(secret, "***")
    text = re.sub(r"sk-[A-Za-z0-9_*\-]+", "sk-***", text)
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def describe(err: Exception) -> str:
    """Short, secret-free description: the HTTP status and error code, or the connection's fate."""
    if isinstance(err, openai.APIStatusError):
        code = _code(err)
        code = f" {code}" if code and _SAFE_CODE.match(code) else ""
        where = redirect_target(err)
        return f"HTTP {err.status_code} {type(err).__name__}{code}" + (f" to {where}" if where else "")
    if isinstance(err, openai.APIConnectionError):
        return connection_cause(err)
    return type(err).__name__


def redirect_target(err: Exception) -> str | None:
    """Where a 3xx answer points, without credentials; None for anything else."""
    if not isinstance(err, openai.APIStatusError) or not 300 <= err.status_code < 400:
        return None
    return public_url(err.response.headers.get("location") or "") or "(no Location header)"


def stop_reason(err: openai.APIStatusError, shown: str, creds: Credentials, flag: str) -> str:
    """The one line that stops a run: what the server said no to, and what to change."""
    status = err.status_code
    detail = server_message(err, (creds.key,))
    if 300 <= status < 400:
        return (f"{shown} answered HTTP {status}, a redirect to {redirect_target(err)}; requests are not re-sent to "
                "another address: if that is the right server, name it instead")
    if status in (401, 403):
        if creds.source is None:
            return (f"{shown} wants an API key (HTTP {status}): export the key in an environment variable and "
                    f"name that variable with --{flag}")
        return f"{shown} refused the key in {creds.source} (HTTP {status}): check that variable's key"
    if status == 429:
        key = f"the key in {creds.source}" if creds.source else "the key"
        return f"{shown}: {key} has no credit left (HTTP 429 insufficient_quota); add credit or use another key"
    if status == 404:
        return f"{shown}: not found (HTTP 404): no such model or API path there" + (f" ({detail})" if detail else "")
    return f"{shown} rejected the request as invalid (HTTP {status})" + (f": {detail}" if detail else "")


def connection_cause(err: BaseException) -> str:
    """What lies under an APIConnectionError: refused, no such host, timed out, dropped."""
    if isinstance(err, openai.APITimeoutError):
        return "timed out"
    seen = err
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if type(seen).__name__ == "gaierror":
            return "host name not found"
        if type(seen).__name__ in ("RemoteProtocolError", "ReadError") or isinstance(seen, ConnectionResetError):
            return "connection dropped by the server"
        if type(seen).__name__.endswith("Timeout") or isinstance(seen, TimeoutError):
            return "timed out"
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()
        seen = seen.__cause__ or seen.__context__
    return f"connection error ({type(err).__name__})"


def retry_after(err: Exception) -> float | None:
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


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
