"""Shared test helpers: the repo root on sys.path, the shared data folder, a scripted backend."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from mentalarena.backends import ChatBackend, Reply  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one; run them where one is lent)")


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

    from mentalarena.hf_backend import EMBEDDED_GGUF, embedded_model_dir
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


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: the reference data folder ../shared/data is absent")
    return path
