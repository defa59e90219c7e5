"""The local engine's loading and its use of transformers: the cache of dequantized GGUF weights
(`mentalarena/engines/gguf_cache.py`), the transformers floor, and no deprecated transformers API.

The GGUF tests use a real GGUF file cut from the embedded one (2 of its 30 layers, its first 4,096
tokens, the quantized blocks copied as they are), which transformers converts in a few seconds."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import ROOT, embedded_tokenizer, make_tiny_llama
from mentalarena.engines import gguf_cache, hf_backend
from mentalarena.errors import InputError

SMALL = "small.Q4_1.gguf"


def write_small_gguf(path: Path, layers: int = 2, vocab: int = 4096) -> None:
    """The embedded GGUF cut down: its metadata, tokenizer and quantized blocks as they are, but
    `layers` blocks and the first `vocab` tokens (with the merges among them)."""
    import gguf

    reader = gguf.GGUFReader(Path(hf_backend.embedded_model_dir(), hf_backend.EMBEDDED_GGUF))
    arch = reader.fields["general.architecture"].contents()
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    known = set(tokens)
    merges = [m for m in reader.fields["tokenizer.ggml.merges"].contents()
              if all(part in known for part in m.split(" ")) and m.replace(" ", "") in known]
    changed = {f"{arch}.block_count": layers, f"{arch}.vocab_size": vocab, "tokenizer.ggml.tokens": tokens,
               "tokenizer.ggml.token_type": reader.fields["tokenizer.ggml.token_type"].contents()[:vocab],
               "tokenizer.ggml.merges": merges}
    writer = gguf.GGUFWriter(str(path), arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, changed.get(field.name, field.contents()), field.types[0], sub_type=sub_type)
    kept = [(t, t.data[:vocab] if t.name == "token_embd.weight" else t.data) for t in reader.tensors
            if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < layers]
    for tensor, data in kept:
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data in kept:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("small-gguf")
    write_small_gguf(folder / SMALL)
    return str(folder)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(root))
    return root


@pytest.fixture
def conversions(monkeypatch) -> list:
    """Every GGUF conversion the cache makes, in this process."""
    calls = []
    real = gguf_cache.convert

    def spy(base, gguf_file):
        calls.append((base, gguf_file))
        return real(base, gguf_file)
    monkeypatch.setattr(gguf_cache, "convert", spy)
    return calls


PROBE = "The patient says she has slept badly for weeks and worries about work."


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def fresh_from_gguf(folder: str, dtype: torch.dtype):
    """The model and tokenizer as transformers loads the GGUF file itself, no cache involved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMALL, dtype=dtype).eval(),
            AutoTokenizer.from_pretrained(folder, gguf_file=SMALL))


def cached_folders(root: Path) -> list[Path]:
    return [p for p in (root / "gguf").iterdir() if p.is_dir() and not p.name.startswith(".")]


def test_the_cache_is_written_once_then_reused_with_the_same_model(small_gguf, cache, conversions):
    tokenizer, model = hf_backend._load(small_gguf, SMALL, "cpu", "float32")
    assert len(conversions) == 1
    (folder,) = cached_folders(cache)
    manifest = json.loads((folder / gguf_cache.MANIFEST).read_text())
    assert manifest["gguf_sha256"] == gguf_cache.file_sha256(Path(small_gguf, SMALL))
    assert folder.name.startswith(manifest["gguf_sha256"][:32])
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    tokenizer2, model2 = hf_backend._load(small_gguf, SMALL, "cpu", "float32")
    assert len(conversions) == 1  # read back, not converted again
    assert cached_folders(cache) == [folder]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written  # and not rewritten

    fresh, fresh_tokenizer = fresh_from_gguf(small_gguf, torch.float32)
    assert tokenizer2(PROBE)["input_ids"] == fresh_tokenizer(PROBE)["input_ids"]
    chat = [{"role": "system", "content": "You are a doctor."}, {"role": "user", "content": PROBE}]
    assert tokenizer2.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        fresh_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert hf_backend._eos_ids(tokenizer2, model2) == hf_backend._eos_ids(fresh_tokenizer, fresh)
    torch.testing.assert_close(logits(model2, tokenizer2), logits(fresh, fresh_tokenizer), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model, tokenizer), logits(model2, tokenizer2), rtol=0, atol=0)

    # Another dtype is cast from the same float32 copy, as transformers casts the dequantized GGUF.
    tokenizer16, model16 = hf_backend._load(small_gguf, SMALL, "cpu", "bfloat16")
    fresh16, _ = fresh_from_gguf(small_gguf, torch.bfloat16)
    assert len(conversions) == 1 and model16.dtype == torch.bfloat16
    torch.testing.assert_close(logits(model16, tokenizer16), logits(fresh16, fresh_tokenizer), rtol=1e-2, atol=1e-2)


def _flip(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        chunk = f.read(64)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))


DAMAGE = {
    "bytes flipped in the weights": lambda folder: _flip(folder / "model.safetensors"),
    "weights truncated": lambda folder: os.truncate(folder / "model.safetensors", 1000),
    "weights missing": lambda folder: (folder / "model.safetensors").unlink(),
    "manifest missing (a partial copy)": lambda folder: (folder / gguf_cache.MANIFEST).unlink(),
    "manifest garbled": lambda folder: (folder / gguf_cache.MANIFEST).write_text('{"format": '),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_is_ignored_and_rebuilt(small_gguf, cache, conversions, damage):
    tokenizer, model = hf_backend._load(small_gguf, SMALL, "cpu", "float32")
    expected = logits(model, tokenizer)
    (folder,) = cached_folders(cache)
    DAMAGE[damage](folder)
    leftover = folder.parent / f".{folder.name}.tmp-dead"  # of a converter killed mid-write
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")

    tokenizer, model = hf_backend._load(small_gguf, SMALL, "cpu", "float32")
    assert len(conversions) == 2
    torch.testing.assert_close(logits(model, tokenizer), expected, rtol=0, atol=0)
    assert cached_folders(cache) == [folder] and not leftover.exists()
    assert gguf_cache._valid(folder, gguf_cache.file_sha256(Path(small_gguf, SMALL)))
    hf_backend._load(small_gguf, SMALL, "cpu", "float32")
    assert len(conversions) == 2


def test_two_processes_starting_together_convert_once(small_gguf, cache):
    """Both load the model; the second waits for the first one's conversion, then reads it."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from mentalarena.engines.hf_backend import _load; "
            "_load(sys.argv[2], sys.argv[3], 'cpu', 'float32'); print('loaded')")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ROOT), small_gguf, SMALL], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert [out.strip() for out, _ in results] == ["loaded", "loaded"]
    assert sum(err.count("dequantizing the GGUF weights once") for _, err in results) == 1
    assert len(cached_folders(cache)) == 1


def test_an_unwritable_cache_loads_the_gguf_file_directly(small_gguf, tmp_path, monkeypatch, caplog, conversions):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(blocker / "cache"))  # under a file: cannot be made
    with caplog.at_level(logging.WARNING, logger="mentalarena.engines.gguf_cache"):
        tokenizer, model = hf_backend._load(small_gguf, SMALL, "cpu", "float32")
    assert "cannot write the model cache" in caplog.text and not conversions
    fresh, fresh_tokenizer = fresh_from_gguf(small_gguf, torch.float32)
    torch.testing.assert_close(logits(model, tokenizer), logits(fresh, fresh_tokenizer), rtol=0, atol=0)


def test_the_cache_can_be_turned_off(small_gguf, tmp_path, monkeypatch, conversions):
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    hf_backend._load(small_gguf, SMALL, "cpu", "float32")
    assert not conversions and not (tmp_path / "xdg").exists()


def test_cache_folder_rule(tmp_path, monkeypatch):
    monkeypatch.delenv(gguf_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.cache_root() == tmp_path / "xdg" / "mentalarena"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG rule: relative paths are ignored
    assert gguf_cache.cache_root() == Path.home() / ".cache" / "mentalarena"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert gguf_cache.cache_root() == Path.home() / ".cache" / "mentalarena"
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "mine"))
    assert gguf_cache.cache_root() == tmp_path / "mine"
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "off")
    assert gguf_cache.cache_root() is None


def test_an_older_transformers_is_refused_in_one_line(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.23.0")
    with pytest.raises(InputError, match=r"needs transformers>=5\.24, found 5\.23\.0"):
        hf_backend._load("unused", None, "cpu", "float32")
    monkeypatch.setattr(transformers, "__version__", "5.24.0.dev0")
    hf_backend.check_transformers()  # a development build of the floor is the floor


def test_generation_uses_no_deprecated_transformers_api(tmp_path):
    """Every local path (prefix-reuse batches, continuous batching, transformers' own generate)
    runs with transformers' FutureWarning and DeprecationWarning turned into errors, and logs no
    deprecation either (transformers reports some renames through its logger, once per process)."""
    from transformers.utils import logging as hf_logging

    backend = hf_backend.HFBackend(make_tiny_llama(tmp_path / "tiny", embedded_tokenizer()), temperature=0,
                                   max_new_tokens=4, dtype="float32")
    convs = [[{"role": "user", "content": "Name one colour."}], [{"role": "user", "content": "Say hello, kindly."}]]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    hf_logging.warning_once.cache_clear()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            first = backend.generate(convs)
            grown = [c + [{"role": "assistant", "content": r.text}, {"role": "user", "content": "Go on."}]
                     for c, r in zip(convs, first)]
            backend.generate(grown)  # from the cached prefixes
            assert backend.cache.hits >= len(grown)
            assert len(list(backend.stream(convs))) == len(convs)
            backend.prefix_reuse = False
            backend.generate(convs)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()] == []


class _Stop(Exception):
    pass


@pytest.mark.parametrize("flag, expected", [("auto", None), ("float32", "float32"), ("bfloat16", "bfloat16")])
def test_self_play_takes_the_dtype_rule_of_the_evaluations(tmp_path, monkeypatch, flag, expected):
    """`auto` (the default) is `cli.auto_dtype`: bfloat16 where the device has it (measured faster
    for self-play too: benchmarks/bench_dtype.py), else float32; an explicit dtype is kept."""
    import arena_med
    import mentalarena.engines.backends as backends
    from mentalarena.cli import auto_dtype

    asked = []

    def record(*args, **kwargs):
        asked.append(kwargs["dtype"])
        raise _Stop
    monkeypatch.setattr(backends, "make_backend", record)
    flags = {} if flag == "auto" else {"dtype": flag}
    with pytest.raises(_Stop):
        arena_med.run(output_file=str(tmp_path / "out.jsonl"), limit=1, progress=False, **flags)
    assert asked == [expected or auto_dtype("auto", None)]


def test_a_bad_dtype_is_refused_before_anything_is_touched(tmp_path):
    import arena_med

    out = tmp_path / "run" / "out.jsonl"
    with pytest.raises(InputError, match=r"--dtype must be auto or a torch dtype name .*'float33'"):
        arena_med.run(output_file=str(out), dtype="float33", progress=False)
    assert not out.parent.exists()
