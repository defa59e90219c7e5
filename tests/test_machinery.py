"""Context fitting, system merging, crash-safe JSONL, prompt rendering, backend choice, batching."""
from __future__ import annotations

import asyncio
import json

import pytest
from conftest import ScriptedBackend

from mentalarena.engines.backends import resolve_backend
from mentalarena.engines.context import fit_messages, merge_system
from mentalarena.engines.engine import Gate, ModelClient
from mentalarena.errors import InputError
from mentalarena.store.jsonl import append_jsonl, read_jsonl, repair_torn_tail
from mentalarena.prompts import Prompts


def msgs(*sizes):
    return [{"role": "user" if i % 2 else "system", "content": "x" * n} for i, n in enumerate(sizes)]


def length(messages):
    return sum(len(m["content"]) for m in messages)


@pytest.mark.parametrize("sizes,budget,dropped", [
    ((10, 10, 10, 10, 10, 10), 100, 0),   # fits: untouched
    ((10, 10, 30, 30, 10, 10), 60, 2),    # drops the oldest middle messages first
    ((10, 10, 30, 30, 10, 10), 50, 2),
    ((10, 10, 30, 30, 10, 10), 40, 2),
    ((10, 10, 30, 30, 10, 10), 30, 2),    # cannot go below head + last two: returned minimal
    ((50, 50), 10, 0),                    # nothing droppable
])
def test_fit_messages_keeps_first_and_latest(sizes, budget, dropped):
    messages = msgs(*sizes)
    fitted, n = fit_messages(messages, length, budget, keep_first=2, block=1)
    assert n == dropped
    assert fitted[:2] == messages[:2] and fitted[-2:] == messages[-2:]
    assert fitted == messages[:2] + messages[2 + n:]


def test_fit_messages_drops_whole_blocks_so_the_cut_stays_put():
    conversation = msgs(*([10] * 30))
    cuts = []
    for end in range(22, 31, 2):  # the conversation grows by two messages per call
        fitted, n = fit_messages(conversation[:end], length, 200, keep_first=2, block=8)
        assert length(fitted) <= 200 and n % 8 == 0
        cuts.append(n)
    assert cuts == [8, 8, 8, 8, 16]


def test_merge_system_alternates_roles():
    history = [{"role": "user", "content": "persona"}, {"role": "system", "content": "Patient: hi"},
               {"role": "system", "content": "doctor rules"}, {"role": "user", "content": "continue"},
               {"role": "assistant", "content": "ok"}, {"role": "system", "content": "tail"}]
    merged = merge_system(history)
    assert [m["role"] for m in merged] == ["user", "assistant", "user"]
    assert merged[0]["content"] == "persona\nPatient: hi\ndoctor rules\ncontinue"
    assert merged[-1]["content"] == "tail"
    assert history[1]["role"] == "system"  # the caller's list is not mutated


def test_append_and_repair_torn_line(tmp_path):
    path = tmp_path / "out.jsonl"
    append_jsonl(path, {"a": 1})
    append_jsonl(path, {"a": "é\n2"})
    with open(path, "ab") as f:
        f.write(b'{"a": 3, "trunc')  # a write cut short by kill -9
    with pytest.raises(InputError, match="incomplete"):
        read_jsonl(path)
    size = path.stat().st_size
    assert read_jsonl(path, allow_torn_tail=True) == [{"a": 1}, {"a": "é\n2"}]
    assert path.stat().st_size == size  # reading never changes the file
    assert repair_torn_tail(path) == len(b'{"a": 3, "trunc') and path.read_bytes().endswith(b"\n")
    assert repair_torn_tail(path) == 0
    append_jsonl(path, {"a": 4})
    assert [r["a"] for r in read_jsonl(path)] == [1, "é\n2", 4]


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(InputError, match=r"out.jsonl: line 2"):
        read_jsonl(path, allow_torn_tail=True)


# Every character str.splitlines() breaks on besides "\n" and "\r" (json.dumps escapes those two).
LINE_BREAKS = ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]


@pytest.mark.parametrize("char", LINE_BREAKS, ids=[f"U+{ord(c):04X}" for c in LINE_BREAKS])
def test_unicode_line_breaks_survive_write_read_resume(tmp_path, char):
    path = tmp_path / "out.jsonl"
    rows = [{"reply": f"one{char}two", f"k{char}": [char, "x"]}, {"reply": char * 3}]
    for row in rows:
        append_jsonl(path, row)
    assert read_jsonl(path) == rows
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2  # escaped: naive readers see 2 lines too
    with open(path, "ab") as f:
        f.write(f'{{"reply": "cut{char}'.encode())  # killed mid-write
    assert read_jsonl(path, allow_torn_tail=True) == rows
    assert repair_torn_tail(path) > 0
    more = {"reply": f"after resume{char}", "n": 3}
    append_jsonl(path, more)
    assert read_jsonl(path) == rows + [more]


@pytest.mark.parametrize("char", LINE_BREAKS[:3], ids=[f"U+{ord(c):04X}" for c in LINE_BREAKS[:3]])
def test_raw_unicode_line_breaks_from_older_files_are_read(tmp_path, char):
    # files written before the escaping (or by other tools) hold U+2028, U+2029, U+0085 raw (valid
    # JSON; the ASCII ones are control characters JSON never holds raw)
    path = tmp_path / "old.jsonl"
    rows = [{"reply": f"a{char}b"}, {"reply": "c"}]
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    assert read_jsonl(path) == rows
    append_jsonl(path, {"reply": char})
    assert read_jsonl(path) == rows + [{"reply": char}]
    path.write_text('{"a": 1}\n' + f'{{"a": "{char}"\n')  # a bad line is still named by its number
    with pytest.raises(InputError, match=r"old.jsonl: line 2: not valid JSON"):
        read_jsonl(path)


def test_prompt_files_render_and_fail_loudly(tmp_path):
    (tmp_path / "greet.txt").write_text("Hello {name}, {{literal}} {mood}\n")
    prompts = Prompts(tmp_path)
    assert prompts.render("greet", name="Ann", mood="fine") == "Hello Ann, {literal} fine"
    with pytest.raises(InputError, match=r"greet.txt: no value for slot\(s\) \{mood\}"):
        prompts.render("greet", name="Ann")
    with pytest.raises(InputError, match="missing.txt: prompt file not found"):
        prompts.render("missing")


@pytest.mark.parametrize("model,backend,api_base,expected", [
    (None, "auto", None, "embedded"),
    ("embedded", "auto", None, "embedded"),
    ("gpt-3.5-turbo", "auto", None, "openai"),
    ("gpt-4-turbo-2024-04-09", "auto", None, "openai"),
    ("ft:gpt-3.5-turbo-0125:org::abc", "auto", None, "openai"),
    ("meta-llama/Meta-Llama-3-8B", "auto", None, "hf"),
    ("klyang/MentaLLaMA-chat-7B", "auto", None, "hf"),
    ("meta-llama/Meta-Llama-3-8B-Instruct", "auto", "http://127.0.0.1:8000/v1", "openai"),
    ("my-7b-model", "auto", None, "openai"),   # no substring rules: "7b" changes nothing
    ("gpt-4o", "hf", None, "hf"),
])
def test_backend_rule(model, backend, api_base, expected):
    assert resolve_backend(model, backend, api_base) == expected


def test_backend_rule_local_path(tmp_path):
    assert resolve_backend(str(tmp_path), "auto") == "hf"
    with pytest.raises(InputError, match="--backend must be one of"):
        resolve_backend("x", "vllm")


def test_requests_of_concurrent_sessions_are_batched():
    backend = ScriptedBackend(default="ok")
    gate = Gate()
    client = ModelClient(backend, gate, max_new_tokens=8)

    async def session(i):
        gate.active += 1
        try:
            for turn in range(3):
                reply = await client.chat([{"role": "user", "content": f"s{i} t{turn}"}])
                assert reply.text == "ok"
        finally:
            gate.active -= 1
            gate.notify()

    async def main():
        await asyncio.gather(*(session(i) for i in range(6)))

    asyncio.run(main())
    assert backend.batches == [6, 6, 6]
    assert client.stats.calls == 18 and client.stats.batches == 3


def test_backend_failure_reaches_every_waiting_session():
    class Broken(ScriptedBackend):
        def generate(self, conversations, seeds=None):
            raise RuntimeError("device lost")

    gate = Gate()
    client = ModelClient(Broken(), gate, max_new_tokens=8)

    async def main():
        gate.active = 2
        return await asyncio.gather(*(client.chat([{"role": "user", "content": "x"}]) for _ in range(2)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)


def test_truncation_is_counted():
    backend = ScriptedBackend(default="ok")
    backend.context_limit = 40  # with max_new_tokens 8: 32 tokens of prompt
    client = ModelClient(backend, Gate(), max_new_tokens=8)
    long = [{"role": "user", "content": "y" * 40}] * 2 + [{"role": "user", "content": "z" * 200}] * 4
    client.gate.active = 1
    reply = asyncio.run(client.chat(long))
    assert reply.truncated and client.stats.truncated_calls == 1 and client.stats.dropped_messages > 0
    sent = backend.seen[-1]
    assert sent[:2] == long[:2] and len(sent) < len(long)
    json.dumps(client.stats.as_dict())


def test_prefix_cache_longest_match_and_superseded_entries():
    import torch

    from mentalarena.engines.hf_backend import PrefixCache
    cache = PrefixCache(budget_tokens=100, slack=2)
    t = lambda *xs: torch.tensor(xs)  # noqa: E731
    cache.add(t(1, 2, 3, 4, 5), ["kv-a"])
    cache.add(t(9, 9, 9), ["kv-b"])
    assert cache.lookup(t(1, 2, 3, 7)) == (["kv-a"], 3)
    assert cache.lookup(t(9, 9, 1)) == (["kv-b"], 2)
    assert cache.lookup(t(5, 5)) == (None, 0)
    # the same conversation one call later: the old entry differs only in its last 2 tokens
    cache.add(t(1, 2, 3, 6, 6, 8, 8), ["kv-c"])
    assert len(cache.entries) == 2 and cache.tokens == 10
    assert cache.lookup(t(1, 2, 3, 6, 6, 1)) == (["kv-c"], 5)
    # least recently used entries go first when over budget
    small = PrefixCache(budget_tokens=6)
    small.add(t(1, 1, 1), ["x"])
    small.add(t(2, 2, 2), ["y"])
    small.lookup(t(1, 1))
    small.add(t(3, 3, 3), ["z"])
    assert small.lookup(t(2, 2)) == (None, 0) and small.lookup(t(1, 1))[0] == ["x"]


def test_seeded_sampling_follows_the_distribution_and_never_picks_a_zero_probability_token():
    from types import SimpleNamespace

    import torch

    from mentalarena.engines.hf_backend import HFBackend
    fake = SimpleNamespace(temperature=1.0, top_p=1.0, top_k=0, generator=None)
    logits = torch.log(torch.tensor([[0.2, 0.0, 0.8, 0.0]])).repeat(4000, 1)
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]
    picks = HFBackend._sample(fake, logits, generators)
    counts = torch.bincount(picks, minlength=4).tolist()
    assert counts[1] == counts[3] == 0
    assert abs(counts[0] / 4000 - 0.2) < 0.03 and abs(counts[2] / 4000 - 0.8) < 0.03
    again = HFBackend._sample(fake, logits, [torch.Generator().manual_seed(i) for i in range(4000)])
    assert torch.equal(picks, again)  # same seeds, same draws


@pytest.mark.parametrize("argv, expected", [
    (["--progress", "false"], ["--progress", "False"]),
    (["--progress=FALSE", "--merge_system", "true"], ["--progress=False", "--merge_system", "True"]),
    (["--base_model", "false"], ["--base_model", "false"]),      # not a bool flag: left as written
    (["--progress", "0"], ["--progress", "0"]),
    (["false"], ["false"]),
])
def test_bool_words_for_bool_flags_only(argv, expected):
    import arena_med
    from mentalarena.cli import bool_words
    assert bool_words(arena_med.run, argv) == expected
