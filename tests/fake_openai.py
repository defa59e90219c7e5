"""A fake OpenAI-compatible chat server for tests: standard library only, 127.0.0.1, with fault injection.

    with FakeOpenAI(faults=Faults(["429:0", "500", "drop"])) as server:
        backend = OpenAIBackend("fake-model", api_base=server.base_url)

Fault kinds, consumed one per request (scripted ones first, then random ones at `rate`):
  "<status>"        that HTTP status with a JSON error body, e.g. "400", "401", "429", "500", "503"
  "<status>:<v>"    the same with a `Retry-After: <v>` header, e.g. "429:0", "429:1" or an HTTP date
  "stall"           sleep `stall_seconds` (longer than the client's timeout), then answer normally
  "malformed"       200, Content-Type application/json, body that is not JSON
  "html"            200, Content-Type text/html, an error page (what a broken proxy sends)
  "empty_choices"   200, a chat.completion with `choices: []`
  "null_content"    200, a chat.completion whose message content is null and finish_reason "stop"
  "drop"            close the connection without sending any response
  "quota"           429 with OpenAI's `insufficient_quota` error (a key without credit)
  "redirect"        307 to `redirect_to` (another host), with the Location header
  "trickle"         200, then the body one byte every `trickle_seconds` (a server that never quite answers)
  "ok"              no fault: answer normally (to fail a later request of a script)

`reject_params` (as OpenAI's reasoning models): {"max_tokens": "unsupported_parameter", "temperature":
"unsupported_value"} answers a chat request carrying such a parameter with OpenAI's 400 naming it.
`trickle_models`: GET /v1/models trickles too (a preflight against a stuck server).

Fine-tuning, as `data_process.py` uses it: `POST /v1/files` (multipart upload), `POST /v1/fine_tuning/jobs`
(method "supervised" or "dpo"; the job reports its n_epochs, and for dpo its beta; `metadata` kept),
`GET /v1/fine_tuning/jobs` (newest first, `limit`, `metadata[k]=v` filters), `GET /v1/fine_tuning/jobs/<id>`.
`ft_faults` also take "drop" (no job made, connection closed) and "drop_after" (the job IS made, then the
connection is closed before the answer: what a timeout during creation looks like to the client).
Each job walks through `job_statuses` (copied when it is created), one step per retrieve; "succeeded" sets
`fine_tuned_model`, "failed" sets an error. `ft_faults` (status kinds only) fail these requests; with
`require_key`, a wrong key gets a 401 that quotes it back, as OpenAI's does (on every route: models, chat and
fine-tuning).

Keys in error bodies: with `echo_key`, every error this server sends (injected statuses, 404s, the window's
400, the HTML error page) quotes the request's whole Authorization header in its message, as some servers
and proxies do; a client that prints the server's text then prints the key.

Models: `GET /v1/models` lists `model` (a 403 with `models_forbidden`, as OpenAI gives a key restricted to
chat). With `strict_model` (as vLLM), a chat request for any other model
gets a 404; without it (as llama.cpp), any name is answered. `window` (tokens, counted as words) makes a
longer prompt a 400 in llama.cpp's form (`exceed_context_size_error`, `n_prompt_tokens`, `n_ctx`), or with
`window_style="openai"` in OpenAI's (`context_length_exceeded`, the numbers only in the message, no window listed).
"""
from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import random
import threading
import time
import urllib.parse
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Sequence

RANDOM_KINDS = ("429", "429:0", "500", "503", "stall", "malformed", "html", "empty_choices", "null_content", "drop")


def echo_responder(request: dict) -> str:
    """Deterministic reply derived from the last user message, so tests can check replies stay in order."""
    last_user = [m["content"] for m in request["messages"] if m["role"] == "user"][-1]
    return "ECHO: " + last_user[-40:]


class Faults:
    """Thread-safe source of faults: a script consumed in order, then random kinds with probability `rate`."""

    def __init__(self, script: Iterable[str] = (), rate: float = 0.0,
                 kinds: Sequence[str] = RANDOM_KINDS, seed: int = 0) -> None:
        self._script = deque(script)
        self._rate = rate
        self._kinds = tuple(kinds)
        self._rng = random.Random(seed)  # seeded so a failing storm can be replayed
        self._lock = threading.Lock()
        self.injected: list[str] = []

    def push(self, *kinds: str) -> None:
        with self._lock:
            self._script.extend(kinds)

    def next(self) -> str | None:
        with self._lock:
            if self._script:
                kind = self._script.popleft()
            elif self._rate and self._rng.random() < self._rate:
                kind = self._rng.choice(self._kinds)
            else:
                return None
            self.injected.append(kind)
            return kind


class FakeOpenAI:
    """The server; a context manager that runs it in a daemon thread. `base_url` ends in /v1."""

    def __init__(self, responder: Callable[[dict], str] = echo_responder, faults: Faults | None = None,
                 stall_seconds: float = 1.5, model: str = "fake-model",
                 job_statuses: Sequence[str] = ("validating_files", "queued", "running", "succeeded"),
                 ft_faults: Faults | None = None, require_key: str | None = None, strict_model: bool = False,
                 window: int | None = None, models_forbidden: bool = False, echo_key: bool = False,
                 window_style: str = "llama.cpp", reject_params: dict[str, str] | None = None,
                 trickle_seconds: float = 0.5, trickle_models: bool = False,
                 redirect_to: str = "http://203.0.113.9:8000/v1/chat/completions") -> None:
        self.responder = responder
        self.faults = faults or Faults()
        self.stall_seconds = stall_seconds
        self.model = model
        self.requests: list[dict] = []  # every chat request body received, faulted ones included
        self.auth_headers: list[str | None] = []
        self.request_headers: list[dict] = []  # every chat request's headers, names lower-cased
        self.job_statuses = list(job_statuses)
        self.ft_faults = ft_faults or Faults()
        self.require_key = require_key
        self.strict_model = strict_model
        self.window = window
        # "llama.cpp": its 400 and n_ctx; "openai": OpenAI's context_length_exceeded, no window listed
        self.window_style = window_style
        self.models_forbidden = models_forbidden  # GET /v1/models answers 403, as for a restricted key
        self.reject_params = dict(reject_params or {})
        self.trickle_seconds, self.trickle_models, self.redirect_to = trickle_seconds, trickle_models, redirect_to
        self.model_list_auth: list[str | None] = []  # the Authorization header of every GET /v1/models
        self.echo_key = echo_key  # error bodies quote the Authorization header they came with
        self.echoed = 0  # error bodies sent that quoted one (a test's proof that a leak was on offer)
        self.model_lists = 0  # GET /v1/models requests
        self.uploads: list[dict] = []  # {"id", "filename", "purpose", "content": bytes}
        self.job_creates: list[dict] = []  # every job-creation body that made a job
        self.retrieves: list[str] = []  # job ids, one per retrieve
        self.jobs: dict[str, dict] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self  # type: ignore[attr-defined]  # how handlers reach this object
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        # a short poll interval keeps shutdown (once per test) fast
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def record(self, body: dict, authorization: str | None, headers: dict | None = None) -> None:
        with self._lock:
            self.requests.append(body)
            self.auth_headers.append(authorization)
            self.request_headers.append({k.lower(): v for k, v in (headers or {}).items()})

    def completion(self, request: dict, content: str | None, choices: bool = True) -> dict:
        text = content or ""
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in request["messages"])
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        return {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": request.get("model", self.model), "choices": [choice] if choices else [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                      "total_tokens": prompt_tokens + len(text.split())},
        }


    # ---------------------------------------------------------------- fine-tuning
    def upload(self, fields: dict[str, tuple[str | None, bytes]]) -> tuple[int, dict]:
        filename, content = fields.get("file", (None, b""))
        purpose = fields.get("purpose", (None, b""))[1].decode()
        with self._lock:
            file_id = f"file-{next(self._ids)}"
            self.uploads.append({"id": file_id, "filename": filename, "purpose": purpose, "content": content})
        return 200, {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                     "filename": filename, "purpose": purpose, "status": "processed"}

    def create_job(self, body: dict) -> tuple[int, dict]:
        with self._lock:
            if body.get("training_file") not in {u["id"] for u in self.uploads}:
                return 400, {"error": {"message": "invalid training_file", "type": "invalid_request_error",
                                       "param": "training_file", "code": "invalid_file"}}
            self.job_creates.append(body)
            job_id = f"ftjob-{next(self._ids)}"
            # the deprecated top-level hyperparameters, or those of the method ("supervised" or "dpo")
            method = body.get("method") or {}
            hyper = body.get("hyperparameters") or (method.get(method.get("type")) or {}).get("hyperparameters", {})
            recorded = {"n_epochs": hyper.get("n_epochs", "auto")}
            if method.get("type") == "dpo":  # as OpenAI reports it: beta "auto" unless one was given
                recorded["beta"] = hyper.get("beta", "auto")
            self.jobs[job_id] = {"job": {
                "id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "model": body.get("model"),
                "training_file": body["training_file"], "validation_file": None, "organization_id": "org-fake",
                "hyperparameters": recorded, "method": body.get("method"),
                "result_files": [], "seed": 0, "trained_tokens": None, "finished_at": None, "error": None,
                "fine_tuned_model": None, "user_provided_suffix": body.get("suffix"),
                "metadata": body.get("metadata"),
                "status": self.job_statuses[0]}, "statuses": list(self.job_statuses), "step": 0}
            return 200, dict(self.jobs[job_id]["job"])

    def list_jobs(self, query: dict[str, list[str]]) -> tuple[int, dict]:
        wanted = {k[len("metadata["):-1]: v[0] for k, v in query.items() if k.startswith("metadata[")}
        limit = int(query.get("limit", ["20"])[0])
        with self._lock:
            jobs = [dict(e["job"]) for e in reversed(self.jobs.values())
                    if all((e["job"].get("metadata") or {}).get(k) == v for k, v in wanted.items())]
        return 200, {"object": "list", "data": jobs[:limit], "has_more": len(jobs) > limit}

    def retrieve_job(self, job_id: str) -> tuple[int, dict]:
        with self._lock:
            self.retrieves.append(job_id)
            if job_id not in self.jobs:
                return 404, {"error": {"message": f"no job {job_id}", "type": "invalid_request_error", "code": "not_found"}}
            entry = self.jobs[job_id]
            entry["step"] = min(entry["step"] + 1, len(entry["statuses"]) - 1)
            job = entry["job"]
            job["status"] = entry["statuses"][entry["step"]]
            if job["status"] == "succeeded":
                job.update(fine_tuned_model=f"ft:{job['model']}:fake::{job_id}", finished_at=int(time.time()),
                           trained_tokens=1000)
            elif job["status"] == "failed":
                job["error"] = {"code": "invalid_training_file", "param": "training_file",
                                "message": "The job failed (scripted by the fake server)."}
            return 200, dict(job)

    def key_refused(self, authorization: str | None) -> dict | None:
        """OpenAI's 401 quotes the key it got; here it quotes all of it, the worst case for a leak."""
        if self.require_key is None or authorization == f"Bearer {self.require_key}":
            return None
        given = (authorization or "").removeprefix("Bearer ")
        return {"error": {"message": f"Incorrect API key provided: {given}.", "type": "invalid_request_error",
                          "code": "invalid_api_key"}}


def parse_multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body, with the standard library's MIME parser."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


class _Server(ThreadingHTTPServer):
    # The default listen backlog (5) overflows when 16 clients connect at once; the kernel then drops
    # SYNs and the retransmit (1 s) looks like a timeout that no fault caused.
    request_queue_size = 128


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive like real servers, so dropped connections hit a pooled client
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean

    def do_GET(self) -> None:
        fake: FakeOpenAI = self.server.fake  # type: ignore[attr-defined]
        path, _, query = self.path.partition("?")
        path = path.rstrip("/")
        if path == "/v1/fine_tuning/jobs":
            return self._fine_tuning(lambda: fake.list_jobs(urllib.parse.parse_qs(query)))
        if path.startswith("/v1/fine_tuning/jobs/"):
            return self._fine_tuning(lambda: fake.retrieve_job(path.rsplit("/", 1)[1]))
        if path != "/v1/models":
            return self._send(404, {"error": {"message": "not found" + self._echo(), "code": "not_found"}})
        fake.model_lists += 1
        with fake._lock:
            fake.model_list_auth.append(self.headers.get("Authorization"))
        refused = fake.key_refused(self.headers.get("Authorization"))
        if refused:
            return self._send(401, refused)
        if fake.models_forbidden:
            return self._send(403, {"error": {"message": "missing scope model.read" + self._echo(),
                                              "type": "invalid_request_error",
                                              "code": "insufficient_permissions"}})
        entry = {"id": fake.model, "object": "model", "created": 0, "owned_by": "fake"}
        if fake.window and fake.window_style != "openai":
            entry["max_model_len"] = fake.window
        if fake.trickle_models:
            return self._trickle(json.dumps({"object": "list", "data": [entry]}).encode())
        self._send(200, {"object": "list", "data": [entry]})

    def do_POST(self) -> None:
        fake: FakeOpenAI = self.server.fake  # type: ignore[attr-defined]
        raw = self._body()
        path = self.path.rstrip("/")
        if path == "/v1/files":
            return self._fine_tuning(lambda: fake.upload(parse_multipart(self.headers.get("Content-Type", ""), raw)))
        if path == "/v1/fine_tuning/jobs":
            return self._fine_tuning(lambda: fake.create_job(json.loads(raw)))
        if path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": "not found" + self._echo(), "code": "not_found"}})
        request = json.loads(raw)
        fake.record(request, self.headers.get("Authorization"), dict(self.headers))
        refused = fake.key_refused(self.headers.get("Authorization"))
        if refused:
            return self._send(401, refused)
        if fake.strict_model and request.get("model") != fake.model:
            return self._send(404, {"error": {"message": f"The model `{request.get('model')}` does not exist."
                                              + self._echo(),
                                              "type": "NotFoundError", "param": None, "code": 404}})
        prompt = sum(len(str(m.get("content", "")).split()) for m in request["messages"])
        if fake.window and prompt > fake.window and fake.window_style == "openai":
            return self._send(400, {"error": {
                "message": f"This model's maximum context length is {fake.window} tokens. However, your messages "
                           f"resulted in {prompt} tokens. Please reduce the length of the messages." + self._echo(),
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})
        if fake.window and prompt > fake.window:
            return self._send(400, {"error": {"code": 400, "message": f"request ({prompt} tokens) exceeds the "
                                              f"available context size ({fake.window} tokens)" + self._echo(),
                                              "type": "exceed_context_size_error", "n_prompt_tokens": prompt,
                                              "n_ctx": fake.window}})
        for name, code in fake.reject_params.items():
            if name in request:
                value = request[name]
                message = (f"Unsupported parameter: '{name}' is not supported with this model. Use "
                           "'max_completion_tokens' instead." if code == "unsupported_parameter" and name == "max_tokens"
                           else f"Unsupported value: '{name}' does not support {value} with this model. Only the "
                                "default (1) value is supported.")
                return self._send(400, {"error": {"message": message, "type": "invalid_request_error",
                                                  "param": name, "code": code}})
        kind = fake.faults.next()
        if kind == "drop":
            self.close_connection = True
            return
        if kind == "quota":
            return self._send(429, {"error": {"message": "You exceeded your current quota, please check your plan "
                                              "and billing details." + self._echo(), "type": "insufficient_quota",
                                              "param": None, "code": "insufficient_quota"}})
        if kind == "redirect":
            return self._send_raw(307, b"", "text/plain", {"Location": fake.redirect_to})
        if kind == "trickle":
            return self._trickle(json.dumps(fake.completion(request, fake.responder(request))).encode())
        if kind == "stall":
            time.sleep(fake.stall_seconds)
        if kind and kind.split(":")[0].isdigit():
            return self._send_status_fault(kind)
        if kind == "malformed":
            return self._send_raw(200, b'{"id": "chatcmpl-x", "choices": [', "application/json")
        if kind == "html":
            page = f"<html><body>502 Bad Gateway{self._echo()}</body></html>"
            return self._send_raw(200, page.encode(), "text/html")
        if kind == "empty_choices":
            return self._send(200, fake.completion(request, "", choices=False))
        if kind == "null_content":
            return self._send(200, fake.completion(request, None))
        self._send(200, fake.completion(request, fake.responder(request)))

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        self.rfile.readline()
        return b"".join(chunks)

    def _fine_tuning(self, answer: Callable[[], tuple[int, dict]]) -> None:
        fake: FakeOpenAI = self.server.fake  # type: ignore[attr-defined]
        refused = fake.key_refused(self.headers.get("Authorization"))
        if refused:
            return self._send(401, refused)
        kind = fake.ft_faults.next()
        if kind and kind.split(":")[0].isdigit():
            return self._send_status_fault(kind)
        if kind == "drop":
            self.close_connection = True
            return
        answered = answer()
        if kind == "drop_after":  # made, but the client never hears it
            self.close_connection = True
            return
        self._send(*answered)

    def _trickle(self, payload: bytes) -> None:
        """200 with the whole length announced, then one byte every `trickle_seconds`."""
        fake: FakeOpenAI = self.server.fake  # type: ignore[attr-defined]
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            for byte in payload:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(fake.trickle_seconds)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what a deadline is for

    def _echo(self) -> str:
        """With `echo_key`: the request's Authorization header, for an error message to quote."""
        fake: FakeOpenAI = self.server.fake  # type: ignore[attr-defined]
        if not fake.echo_key:
            return ""
        with fake._lock:
            fake.echoed += 1
        return f" (request had Authorization: {self.headers.get('Authorization')})"

    def _send_status_fault(self, kind: str) -> None:
        status, _, retry_after = kind.partition(":")
        body = {"error": {"message": f"injected {status}{self._echo()}", "type": "fake_error",
                          "code": f"fake_{status}"}}
        self._send(int(status), body, {"Retry-After": retry_after} if retry_after else {})

    def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(body).encode(), "application/json", headers)

    def _send_raw(self, status: int, payload: bytes, content_type: str,
                  headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (it timed out during a stall); nothing to answer
