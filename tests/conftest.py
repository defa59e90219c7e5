"""Shared test helpers: the repo root on sys.path, the shared data folder, a scripted backend."""
from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from mentalarena.engines.chat import ChatBackend, Reply  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one; run them where one is lent)")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Dense copies of GGUF models (mentalarena/engines/gguf_cache.py) go to a folder of this test session,
    never the user's cache: the embedded model is converted once per session, then read back.
    Subprocesses inherit the variable. Removed at the end (it holds ~0.5 GB)."""
    import shutil

    folder = tmp_path_factory.mktemp("model-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("MENTALARENA_CACHE", str(folder))
    yield folder
    patch.undo()
    shutil.rmtree(folder, ignore_errors=True)


class ScriptedBackend(ChatBackend):
    """Answers by rules on the last user message; records every conversation it was sent."""

    batched = True

    def __init__(self, rules=None, default="I am not sure.", name="scripted"):
        self.rules = list(rules or [])
        self.default = default
        self.name = name
        self.seen: list[list[dict]] = []
        self.seeds: list[int | None] = []  # the seed each conversation came with, in `seen`'s order
        self.batches: list[int] = []

    def reply_for(self, messages: list[dict]) -> str:
        last = messages[-1]["content"]
        for needle, answer in self.rules:
            if needle in last:
                return answer(messages) if callable(answer) else answer
        return self.default

    def generate(self, conversations, seeds=None):
        self.batches.append(len(conversations))
        out = []
        for i, conv in enumerate(conversations):
            self.seen.append([dict(m) for m in conv])
            self.seeds.append(None if seeds is None else seeds[i])
            text = self.reply_for(conv)
            out.append(Reply(text, prompt_tokens=sum(len(m["content"]) for m in conv) // 4,
                             completion_tokens=len(text) // 4))
        return out


def embedded_tokenizer():
    """The embedded SmolLM2 tokenizer, read offline from its GGUF file."""
    from transformers import AutoTokenizer

    from mentalarena.engines.embedded import EMBEDDED_GGUF, embedded_model_dir
    return AutoTokenizer.from_pretrained(embedded_model_dir(), gguf_file=EMBEDDED_GGUF)


def make_tiny_llama(folder: Path, tokenizer, **config) -> str:
    """A randomly initialised Llama of 2 layers, hidden size 32, with `tokenizer`, saved to `folder`:
    a real model of the real architecture that runs in milliseconds on a CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = {"max_position_embeddings": 2048, **config}
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def reply_token_ids(monkeypatch, backend) -> dict[str, list[tuple[int, ...]]]:
    """The token ids behind each reply text a local HFBackend decodes (through its `_text`), for
    comparisons that a text cannot carry. Each text maps to the distinct id sequences that gave it."""
    seen: dict[str, list[tuple[int, ...]]] = {}
    decode = backend._text

    def text(ids):
        out = decode(ids)
        key = tuple(int(t) for t in ids)
        if key not in seen.setdefault(out, []):
            seen[out].append(key)
        return out

    monkeypatch.setattr(backend, "_text", text)
    return seen


def assert_same_up_to_a_tie(got: list, want: list, scores, tol: float = 1e-3, end=()) -> None:
    """`got` and `want`: the greedy tokens of one prompt decoded in two batch shapes, each followed by
    None where it stopped on an end token (one of `end`). The same logits computed in another batch
    shape differ in their last digits (float32: about 1e-5 here), so two greedy decodes may part where
    the best two choices were tied to within that: `scores(step)` are the logits `want`'s token at
    `step` was chosen from, and wherever the two part, both choices must score within `tol` of each
    other there. Anything after the parting may differ; a parting that is no tie fails."""
    def value(row, token):
        return float(max(row[e] for e in end)) if token is None else float(row[token])

    for step, (a, b) in enumerate(zip(got, want)):
        if a == b:
            if a is None:
                return
            continue
        row = scores(step)
        gap = abs(value(row, a) - value(row, b))
        assert gap <= tol, (f"step {step}: token {a} against {b}, whose logits are {gap:.2e} apart: no tie, "
                            f"a real difference (got {got}, want {want})")
        return
    assert len(got) == len(want), f"one decode stops early without an end token: got {got}, want {want}"


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: the reference data folder ../shared/data is absent")
    return path


FAKE_OPENAI_KEY = "sk-proj-UNIT0TEST0KEY0abcdef123456"  # a key-shaped secret the tests look for in every output


@pytest.fixture
def openai_cwd(monkeypatch, tmp_path):
    """OPENAI_API_KEY set to the test key, no OPENAI_BASE_URL, and a fresh folder as the working directory."""
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_OPENAI_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded tokenizer, once per test module."""
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tokenizer):
    """A tiny random Llama for training tests (the fine-tuning and DPO ones). Weights a little larger
    than usual, so that a few LoRA steps move the (frozen) output layer's logits."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer, max_position_embeddings=512,
                           initializer_range=0.2)


# ---------------------------------------------------------------------------------- timing, by its mechanism
# No test is timed: where a behaviour is "fast" or "waits", the tests read what makes it so, never a clock.
def backend_sleeps(monkeypatch) -> list[float]:
    """Every wait the OpenAI backend asks for from now on (its module's `time.sleep`: a backoff or a
    Retry-After), recorded and not slept; the clock it reads stays the real one."""
    from mentalarena.engines import openai_backend

    asked: list[float] = []
    monkeypatch.setattr(openai_backend, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=asked.append))
    return asked


def request_deadlines(monkeypatch) -> list[float]:
    """The overall deadline (seconds, to 0.01) each request of every SDK client built from now on was
    given, read where `openai_client` sets it, as the request starts: the preflight's short one, or
    the client's request timeout."""
    from mentalarena.engines import openai_client

    given: list[float] = []
    real = openai_client._start_clock

    def start_clock(seconds):
        hook = real(seconds)

        def recording(request):
            before = time.monotonic()
            hook(request)
            given.append(round(openai_client._deadlines.end - before, 2))
        return recording

    monkeypatch.setattr(openai_client, "_start_clock", start_clock)
    return given
