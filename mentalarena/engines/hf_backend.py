"""Local transformers backend: batched sampling with reuse of cached prompt prefixes.

Self-play conversations grow by appending, so consecutive calls of a session share a long token
prefix (and the fresh calls share the patient persona). Re-reading that prefix dominates the cost on
a CPU: prefill runs at a few hundred tokens/s whatever the batch size. This backend therefore keeps
the key/value cache of recent sequences and, for each new prompt, feeds only the tokens after the
longest cached prefix. Rows of one batch may start from caches of different lengths: each row's
cache is right-aligned, the gaps are masked out, and position ids come from the row's own length.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import torch

from mentalarena.engines.chat import ChatBackend, Reply
from mentalarena.engines.embedded import EMBEDDED_GGUF, embedded_model_dir  # noqa: F401 (their old home)
from mentalarena.engines.batcher import ContinuousBatcher
from mentalarena.errors import InputError
from mentalarena.engines.halving import run_halving
from mentalarena.engines.sampling import SeededSampler, checkpoint_sampling, row_generators, sample_rows

log = logging.getLogger("mentalarena.hf")

# The first transformers with the `cache=` argument (and output field) the engine uses; it also
# relies on StaticLayer.lazy_initialization(keys, values) and its `cumulative_length` tensor.
MIN_TRANSFORMERS = (5, 24)
# A plain layout for models without a chat template (base checkpoints such as Meta-Llama-3-8B).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class PrefixCache:
    """Key/value tensors of recent token sequences, evicted least-recently-used by token count."""

    def __init__(self, budget_tokens: int, slack: int = 0):
        self.budget = budget_tokens
        self.slack = slack  # an entry matching a newer one up to its last `slack` tokens is superseded
        self.entries: OrderedDict[int, tuple[torch.Tensor, list]] = OrderedDict()
        self.tokens = 0
        self._next = 0
        self.hits = self.reused_tokens = 0

    def lookup(self, ids: torch.Tensor) -> tuple[list | None, int]:
        """The cached layers and the length of the longest prefix of `ids` they cover."""
        best, best_len = None, 0
        for key, (seq, _) in self.entries.items():
            common = _common_prefix(seq, ids)
            if common > best_len:
                best, best_len = key, common
        if best is None:
            return None, 0
        self.entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += best_len
        return self.entries[best][1], best_len

    def add(self, ids: torch.Tensor, kv: list) -> None:
        if self.budget <= 0 or len(ids) > self.budget:
            return
        # A conversation's previous call differs from this one only in how its last reply was
        # rendered: keeping both would double the memory for no extra reuse.
        for key in [k for k, (seq, _) in self.entries.items()
                    if len(seq) <= len(ids) and _superseded(_common_prefix(seq, ids), len(seq), self.slack)]:
            self.tokens -= len(self.entries.pop(key)[0])
        self.entries[self._next] = (ids, kv)
        self._next += 1
        self.tokens += len(ids)
        while self.tokens > self.budget:
            _, (old, _) = self.entries.popitem(last=False)
            self.tokens -= len(old)


def _superseded(common: int, length: int, slack: int) -> bool:
    """Shares a real prefix with the newer sequence and differs only in its last `slack` tokens."""
    return common > slack and common >= length - slack


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if len(diff) else n


class HFBackend(ChatBackend):
    """Any local folder or hub id loadable by transformers, a GGUF file, or a peft LoRA adapter."""

    batched = True

    def __init__(self, model_name_or_path: str, gguf_file: str | None = None,
                 temperature: float = 0.8, max_new_tokens: int = 256, top_p: float | None = None,
                 top_k: int | None = None,
                 device: str | None = None, dtype: str | None = None, max_batch_size: int = 16,
                 max_context_tokens: int | None = None, prefix_cache_gb: float = 8.0,
                 attention_budget: int = 1 << 27, seed: int = 0, name: str | None = None):
        self.name = name or f"hf:{model_name_or_path}"
        self.temperature = temperature
        self.max_new_tokens, self.max_batch_size = max_new_tokens, max_batch_size
        self.attention_budget = attention_budget
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer, self.model = _load(model_name_or_path, gguf_file, self.device, dtype)
        config = self.model.config.get_text_config()
        self.context_limit = max_context_tokens or getattr(config, "max_position_embeddings", None)
        self.eos_ids = _eos_ids(self.tokenizer, self.model)
        # None: the checkpoint's generation config, as the reference's pipeline inherited it
        self.sampling = checkpoint_sampling(self.model.generation_config, top_p, top_k)
        self.top_p, self.top_k = self.sampling["top_p"], self.sampling["top_k"]
        self.pad_id = self.tokenizer.pad_token_id
        self.cache = PrefixCache(_cache_budget_tokens(self.model, prefix_cache_gb), slack=max_new_tokens + 64)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.prefix_reuse = _full_attention_only(config)
        self._lock = threading.Lock()  # one generate at a time per model
        self.prefilled_tokens = 0
        self.prefill_seconds = self.decode_seconds = 0.0

    def stats(self) -> dict:
        return {"prefix_cache_hits": self.cache.hits, "prefix_reused_tokens": self.cache.reused_tokens,
                "prefilled_tokens": self.prefilled_tokens, "prefill_seconds": round(self.prefill_seconds, 1),
                "decode_seconds": round(self.decode_seconds, 1)}

    # ---- tokens -------------------------------------------------------------------------
    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, messages: list[dict]) -> list[int]:
        return self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"]

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.encode(messages))

    # ---- generation ---------------------------------------------------------------------
    def generate(self, conversations: list[list[dict]], seeds: list[int] | None = None) -> list[Reply]:
        """One reply per conversation; `seeds` gives each its own sampling stream (without them,
        seeds are drawn from the backend's generator: sampled, but not reproducible one by one)."""
        prompts = [torch.tensor(self.encode(c), dtype=torch.long) for c in conversations]
        generators = row_generators(self._seeds(seeds, len(prompts)), self.device)
        replies: list[Reply | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.max_batch_size):
                chunk = order[start:start + self.max_batch_size]
                batch = self._generate_batch([prompts[i] for i in chunk], [generators[i] for i in chunk])
                for i, reply in zip(chunk, batch):
                    replies[i] = reply
        return replies

    def _seeds(self, seeds: list[int] | None, n: int) -> list[int]:
        if seeds is None:
            seeds = torch.randint(0, 1 << 62, (n,), generator=self.generator).tolist()
        return list(seeds)

    def stream(self, conversations: list[list[dict]], seeds: list[int] | None = None,
               chat: bool = True) -> Iterator[tuple[int, Reply]]:
        """(index, reply) pairs as answers finish, by continuous batching (`batcher.py`); for many
        independent prompts. `chat=False` feeds the strings of `conversations` as raw text, with
        no chat template. `seeds` gives each request its own sampling stream, so an answer does
        not depend on which others share its batch. A request that failed after every retry
        yields its exception (a ModelCallError) instead of a reply: running out of memory is
        retried with fewer requests at once (halving.py, batcher.py), and only a request that
        does not fit alone fails."""
        prompts = [self.encode(c) if chat else self.tokenizer(c, add_special_tokens=True)["input_ids"]
                   for c in conversations]
        seeds = self._seeds(seeds, len(prompts))
        if not self.prefix_reuse:  # sliding-window / recurrent layers: plain batches through generate
            def run(rows: list[int]) -> list[Reply]:  # fresh generators each attempt: a retried row samples anew
                with self._lock, torch.inference_mode():
                    return self._generate_plain([torch.tensor(prompts[i], dtype=torch.long) for i in rows],
                                                row_generators([seeds[i] for i in rows], self.device))
            for start in range(0, len(prompts), self.max_batch_size):
                chunk = list(range(start, min(start + self.max_batch_size, len(prompts))))
                yield from zip(chunk, run_halving(run, chunk, self.name))
            return
        batcher = ContinuousBatcher(
            self.model, self.eos_ids, decode=self._text, sample=self._sample, slots=self.max_batch_size,
            max_new_tokens=self.max_new_tokens, context_limit=self.context_limit)
        with self._lock, torch.inference_mode():
            try:
                yield from batcher.run(prompts, seeds)
            finally:
                self.prefilled_tokens += batcher.prefilled_tokens

    def _generate_batch(self, prompts: list[torch.Tensor], generators: list[torch.Generator]) -> list[Reply]:
        if not self.prefix_reuse:
            return self._generate_plain(prompts, generators)
        hits = [self.cache.lookup(p) for p in prompts]
        # Feed at least the last prompt token so there are logits to sample from.
        reuse = [min(n, len(p) - 1) if kv is not None else 0 for (kv, n), p in zip(hits, prompts)]
        suffixes = [p[r:] for p, r in zip(prompts, reuse)]
        cache, mask = self._init_cache([kv for kv, _ in hits], reuse, max(len(s) for s in suffixes))
        positions = torch.tensor(reuse, device=self.device)
        self.prefilled_tokens += sum(len(s) for s in suffixes)
        start = time.perf_counter()
        logits, positions, mask = self._prefill(cache, mask, positions, suffixes)
        middle = time.perf_counter()
        replies = self._decode(prompts, cache, mask, positions, logits, generators)
        self.prefill_seconds += middle - start
        self.decode_seconds += time.perf_counter() - middle
        return replies

    def _init_cache(self, kvs: list, reuse: list[int], new_tokens: int):
        """A preallocated cache (appending to a dynamic one copies it at every step) holding each
        row's reused prefix right-aligned; the mask marks the real slots."""
        from transformers import StaticCache

        width, rows = max(reuse), len(reuse)
        cache = StaticCache(config=self.model.config, max_cache_len=width + new_tokens + self.max_new_tokens)
        mask = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        if width == 0:
            return cache, mask
        template = next(kv for kv, r in zip(kvs, reuse) if r > 0)
        for layer, (k0, v0) in zip(cache.layers, template):
            layer.lazy_initialization(k0.new_empty(rows, k0.shape[0], 0, k0.shape[2]),
                                      v0.new_empty(rows, v0.shape[0], 0, v0.shape[2]))
            layer.cumulative_length.fill_(width)
        for row, (kv, r) in enumerate(zip(kvs, reuse)):
            if r:
                mask[row, width - r:] = 1
                for layer, (k, v) in zip(cache.layers, kv):
                    layer.keys[row, :, width - r:width] = k[:, :r]
                    layer.values[row, :, width - r:width] = v[:, :r]
        return cache, mask

    def _generate_plain(self, prompts: list[torch.Tensor], generators: list[torch.Generator]) -> list[Reply]:
        """transformers' own generate, for models whose caches are not plain full-attention layers;
        sampled through `SeededSampler`, so each row draws from its own generator as on the fast paths."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
        sampler = [SeededSampler(self.temperature, self.top_p, generators, self.top_k)] if self.temperature > 0 else []
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id,
                                  eos_token_id=sorted(self.eos_ids), do_sample=False, top_k=None, top_p=None,
                                  temperature=None, logits_processor=sampler)
        replies = []
        for p, row in zip(prompts, out[:, width:].tolist()):
            tokens = [t for t in row if t != self.pad_id]
            tokens = tokens[:next((i for i, t in enumerate(tokens) if t in self.eos_ids), len(tokens))]
            replies.append(Reply(self._text(tokens),
                                 prompt_tokens=len(p), completion_tokens=len(tokens)))
        return replies

    def _prefill(self, cache, mask, positions, suffixes: list[torch.Tensor]):
        """Feed each row's new tokens, left-padded, in chunks that bound attention memory."""
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(suffixes), width), self.pad_id, dtype=torch.long)
        new_mask = torch.zeros(len(suffixes), width, dtype=torch.long)
        for row, s in enumerate(suffixes):
            ids[row, width - len(s):] = s
            new_mask[row, width - len(s):] = 1
        ids, new_mask = ids.to(self.device), new_mask.to(self.device)
        heads = self.model.config.get_text_config().num_attention_heads
        total = cache.layers[0].max_cache_len
        step = max(16, self.attention_budget // max(1, len(suffixes) * heads * total))
        logits = None
        for start in range(0, width, step):
            part = new_mask[:, start:start + step]
            logits, positions, mask = self._forward(cache, mask, positions, ids[:, start:start + step], part)
        return logits, positions, mask

    def _forward(self, cache, mask, positions, ids, new_mask):
        """One forward pass; positions count only real tokens of each row (pads repeat the last)."""
        offsets = new_mask.cumsum(-1)
        pos = (positions[:, None] + offsets - 1).clamp(min=0)
        past = mask.shape[1]
        mask = torch.cat([mask, new_mask], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                         use_cache=True, cache_position=torch.arange(past, past + ids.shape[1], device=self.device))
        return out.logits[:, -1, :].float(), positions + offsets[:, -1], mask

    def _decode(self, prompts, cache, mask, positions, logits, generators) -> list[Reply]:
        rows = list(range(len(prompts)))  # batch row -> request index, shrinks as rows finish
        generated: list[list[int]] = [[] for _ in prompts]
        replies: list[Reply | None] = [None] * len(prompts)
        ones = torch.ones(len(rows), 1, dtype=torch.long, device=self.device)
        while rows:
            tokens = self._sample(logits, [generators[r] for r in rows])
            done = []
            for row, (req, tok) in enumerate(zip(rows, tokens.tolist())):
                if tok in self.eos_ids:
                    done.append(row)
                    continue
                generated[req].append(tok)
                if len(generated[req]) >= self.max_new_tokens:
                    done.append(row)
            for row in done:
                req = rows[row]
                self._remember(prompts[req], generated[req], cache, mask, row)
                replies[req] = Reply(self._text(generated[req]),
                                     prompt_tokens=len(prompts[req]), completion_tokens=len(generated[req]))
            if done:
                finished = set(done)
                keep = [r for r in range(len(rows)) if r not in finished]
                if not keep:
                    break
                index = torch.tensor(keep, device=self.device)
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[index], layer.values[index]
                mask, positions, tokens = mask[index], positions[index], tokens[index]
                rows = [rows[r] for r in keep]
                ones = ones[: len(rows)]
            logits, positions, mask = self._forward(cache, mask, positions, tokens[:, None], ones)
        return replies

    def _sample(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        return sample_rows(logits, self.temperature, self.top_p, generators, self.top_k)

    def _remember(self, prompt, generated, cache, mask, row) -> None:
        """Store the row's cache for prompt + reply (all but the last token were fed)."""
        if self.cache.budget <= 0:
            return
        seq = torch.cat([prompt, torch.tensor(generated, dtype=torch.long)])
        real = mask[row].nonzero().squeeze(-1)
        n = min(len(real), len(seq))
        real = real[:n]
        layers = [(layer.keys[row][:, real].clone(), layer.values[row][:, real].clone())
                  for layer in cache.layers]
        self.cache.add(seq[:n], layers)


def _full_attention_only(config) -> bool:
    """Prefix reuse and right-aligned rows need plain full-attention layers: no sliding windows,
    no recurrent state."""
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return all(t == "full_attention" for t in getattr(config, "layer_types", None) or [])


def _eos_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def _cache_budget_tokens(model, gigabytes: float) -> int:
    """How many tokens of key/value tensors fit in `gigabytes` for this model."""
    config = model.config.get_text_config()
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize
    return int(gigabytes * (1 << 30)) // per_token


def recorded_gguf(folder: str | Path) -> str | None:
    """The GGUF file of the base an adapter folder of `llama_finetune.py` was trained on: the
    adapter's own config names only the base folder, which a GGUF base cannot be loaded from alone."""
    path = Path(folder, "finetune_config.json")
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("base_gguf_file")


def check_transformers() -> None:
    """An older transformers would ignore the `cache=` argument or miss the cache internals used here."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__).release[:2] < MIN_TRANSFORMERS:
        floor = ".".join(map(str, MIN_TRANSFORMERS))
        raise InputError(f"the local engine needs transformers>={floor}, found {transformers.__version__}: "
                         "pip install -r requirements.txt")


def _load(path: str, gguf_file: str | None, device: str, dtype: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_transformers()
    adapter = Path(path, "adapter_config.json")
    base = path
    if adapter.is_file():  # a LoRA adapter folder: load its base, then merge for plain-speed decoding
        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        gguf_file = gguf_file or recorded_gguf(path)
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    kwargs = {"dtype": torch_dtype}
    if device == "cuda":
        kwargs["device_map"] = "auto"
    try:
        if gguf_file:  # dequantized once, then read from the user cache (gguf_cache.py)
            from mentalarena.engines.gguf_cache import dense_folder
            dense = dense_folder(base, gguf_file)
            if dense is not None:
                base, gguf_file = str(dense), None
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        # a fine-tuned adapter folder usually carries its tokenizer; otherwise the base model's
        own_tokenizer = adapter.is_file() and Path(path, "tokenizer_config.json").is_file()
        source = path if own_tokenizer else base  # a GGUF file holds the tokenizer of its base only
        tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file and source == base else {}))
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except OSError as exc:
        raise InputError(f"cannot load model {path!r}: {str(exc).splitlines()[0]}") from exc
    if adapter.is_file():
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    if device != "cuda":
        model.to(device)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        log.warning("%s has no chat template; using a plain 'Role: text' layout", path)
        tokenizer.chat_template = FALLBACK_TEMPLATE
    return tokenizer, model
