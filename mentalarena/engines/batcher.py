"""Continuous batching for many independent prompts (evaluation sets).

Static batches decode until their longest answer ends: one 256-token answer keeps a batch of
five-token answers waiting, and the tail runs at batch-1 speed. Here every request owns a *slot*
of a preallocated key/value cache and writes at its own column; when an answer ends, its slot is
handed to the next prompt at once, so the decode batch stays full until the queue runs dry.

Layout: active requests always occupy slots 0..n-1 (a finished row is replaced by the last one),
so each decode step runs on views of the cache, never on copies. Prompts are prefilled one at a
time without padding, straight into their slot. Identical prompts (the repeats of an evaluation)
are prefilled once and their cache is copied into each repeat's slot.

Memory that runs out (halving.py says which failures those are) fails as little as can be told
apart: a prefill runs one prompt alone, so that request fails and its slot goes to the next; a
decode step runs every active row at once, so the requests not answered yet start again from
scratch with half as many slots, down to one, where the request decoding alone is the one failed.
"""
from __future__ import annotations

import inspect
import logging
from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator

import torch
from transformers.cache_utils import Cache, DynamicCache

from mentalarena.engines.chat import Reply
from mentalarena.errors import ModelCallError
from mentalarena.engines.halving import alone_error, describe, out_of_memory, release_memory
from mentalarena.engines.sampling import row_generators

log = logging.getLogger("mentalarena.engines.batcher")


class SlotCache(Cache):
    """`slots` rows of `width` columns per layer; before each decode step the batcher sets the
    rows taking part and the column each of them writes to."""

    def __init__(self, config, slots: int, width: int, dtype: torch.dtype, device):
        super().__init__(layers=[])
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots, kv_heads, width, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.rows = 0  # decode: rows 0..rows-1 take part
        self.columns: torch.Tensor | None = None  # decode: the column each row writes to
        self.seen = 0  # decode: columns 0..seen-1 are attended to

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = torch.arange(self.rows, device=keys.device)
        keys[rows, :, self.columns] = key_states[:, :, 0]
        values[rows, :, self.columns] = value_states[:, :, 0]
        return keys[:self.rows, :, :self.seen], values[:self.rows, :, :self.seen]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def move(self, src: int, dst: int, length: int) -> None:
        for keys, values in zip(self.keys, self.values):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]

    def snapshot(self, slot: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[slot, :, :length].clone(), v[slot, :, :length].clone()) for k, v in zip(self.keys, self.values)]

    def restore(self, slot: int, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for keys, values, (k, v) in zip(self.keys, self.values, saved):
            keys[slot, :, :k.shape[1]], values[slot, :, :v.shape[1]] = k, v


@dataclass
class _Row:
    request: int
    length: int  # tokens in the slot (prompt + generated so far, excluding the pending token)
    budget: int  # new tokens this request may still produce
    generated: list[int] = field(default_factory=list)


class ContinuousBatcher:
    """Runs one list of token-id prompts through a causal LM, yielding replies as they finish."""

    def __init__(self, model, eos_ids: set[int], decode: Callable[[list[int]], str],
                 sample: Callable[[torch.Tensor, list[torch.Generator]], torch.Tensor], slots: int,
                 max_new_tokens: int, context_limit: int | None):
        self.model, self.eos_ids = model, eos_ids
        self.decode_text, self.sample = decode, sample
        self.slots, self.max_new_tokens, self.context_limit = slots, max_new_tokens, context_limit
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.prefilled_tokens = 0

    def run(self, prompts: list[list[int]], seeds: list[int]) -> Iterator[tuple[int, Reply | ModelCallError]]:
        """(request, reply) as answers finish; a request that ran out of memory alone yields its
        ModelCallError instead (see the module's docstring). Each attempt samples from fresh
        generators of the requests' `seeds`, so a request retried samples as it would have alone."""
        todo = dict.fromkeys(range(len(prompts)))  # requests not answered yet, in order
        slots = self.slots
        while todo:
            active: list[int] = []  # the requests decoding when a step failed
            try:
                for request, reply in self._attempt(prompts, seeds, list(todo), slots, active):
                    del todo[request]
                    yield request, reply
                return
            except Exception as exc:  # noqa: BLE001 - anything but memory is raised again
                if not out_of_memory(exc):
                    raise
                failure, alone = describe(exc), alone_error(exc)
            release_memory()
            active = [r for r in active if r in todo]  # not one answered just before the failure
            used = len(active) or min(slots, len(todo))
            if used > 1:
                slots = used // 2
                log.warning("%d requests decoding together ran out of memory (%s); the %d unanswered start "
                            "again, %d at a time", used, failure, len(todo), slots)
                continue
            # alone: the request decoding, or (the cache itself did not fit) the prompt that sets its width
            culprit = active[0] if active else max(todo, key=lambda r: len(prompts[r]))
            del todo[culprit]
            yield culprit, alone

    def _attempt(self, prompts, seeds, requests: list[int], slots: int, active: list[int]):
        """`requests` from scratch, `slots` at a time; `active` is kept naming the rows decoding."""
        generators = dict(zip(requests, row_generators([seeds[r] for r in requests], self.device)))
        limit = self.context_limit or 1 << 30
        width = min(max(len(prompts[r]) for r in requests) + self.max_new_tokens, limit)
        cache = SlotCache(self.model.config.get_text_config(), min(slots, len(requests)), width,
                          self.dtype, self.device)
        pending = iter(requests)
        copies = Counter(tuple(prompts[r]) for r in requests)
        saved: dict[tuple, tuple] = {}  # prompt -> (cache snapshot, logits) while repeats remain
        rows: list[_Row] = []
        logits = torch.empty(0)
        while True:
            new_logits = []
            while len(rows) < cache.keys[0].shape[0]:
                request = next(pending, None)
                if request is None:
                    break
                prompt = prompts[request]
                budget = min(self.max_new_tokens, width - len(prompt))  # width is within the limit
                if budget <= 0:  # the prompt alone fills the context: nothing can be generated
                    yield request, Reply("", prompt_tokens=len(prompt), truncated=True)
                    continue
                try:
                    new_logits.append(self._admit(cache, len(rows), prompt, copies, saved))
                except Exception as exc:  # noqa: BLE001 - anything but memory is raised again
                    if not out_of_memory(exc):
                        raise
                    failed = alone_error(exc)  # the prompt ran alone: the request fails, its slot stays free
                else:
                    rows.append(_Row(request, len(prompt), budget))
                    continue
                release_memory()
                yield request, failed
            active[:] = [r.request for r in rows]
            if new_logits:
                logits = torch.cat([logits, *new_logits]) if len(logits) else torch.cat(new_logits)
            if not rows:
                return
            tokens = self.sample(logits, [generators[r.request] for r in rows])
            finished = []
            for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
                if token in self.eos_ids:
                    finished.append(i)
                    continue
                row.generated.append(token)
                if len(row.generated) >= row.budget:
                    finished.append(i)
            for i in reversed(finished):  # highest first, so the rows moved down are still active ones
                row = rows[i]
                yield row.request, Reply(self.decode_text(row.generated), prompt_tokens=len(prompts[row.request]),
                                         completion_tokens=len(row.generated))
                last = len(rows) - 1
                if i != last:
                    cache.move(last, i, rows[last].length)
                    rows[i] = rows[last]
                    tokens[i] = tokens[last]
                rows.pop()
            active[:] = [r.request for r in rows]
            tokens = tokens[:len(rows)]
            if not rows:
                logits = torch.empty(0)
                continue
            logits = self._step(cache, rows, tokens)

    def _admit(self, cache: SlotCache, slot: int, prompt: list[int], copies: Counter, saved: dict) -> torch.Tensor:
        key = tuple(prompt)
        copies[key] -= 1
        if key in saved:
            snapshot, logits = saved[key]
            cache.restore(slot, snapshot)
            if copies[key] == 0:
                del saved[key]
            return logits
        logits = self._prefill(cache, slot, prompt)
        if copies[key] > 0:
            saved[key] = (cache.snapshot(slot, len(prompt)), logits)
        return logits

    def _prefill(self, cache: SlotCache, slot: int, prompt: list[int]) -> torch.Tensor:
        """One prompt, unpadded, through a throwaway cache (so attention takes the fused causal
        kernel rather than an explicit mask), then copied into its slot."""
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        extra = {"logits_to_keep": 1} if self.keep_last else {}
        out = self.model(input_ids=ids, cache=DynamicCache(config=self.model.config), use_cache=True, **extra)
        cache.restore(slot, [(layer.keys[0], layer.values[0]) for layer in out.cache.layers])
        self.prefilled_tokens += len(prompt)
        return out.logits[:, -1, :].float()

    def _step(self, cache: SlotCache, rows: list[_Row], tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row's newest token at its own column; return the next logits."""
        lengths = torch.tensor([r.length for r in rows], device=self.device)
        cache.rows, cache.columns = len(rows), lengths
        cache.seen = int(lengths.max()) + 1
        columns = torch.arange(cache.seen, device=self.device)
        mask = torch.zeros(len(rows), 1, 1, cache.seen, dtype=self.dtype, device=self.device)
        mask.masked_fill_(columns[None, None, None, :] > lengths[:, None, None, None], torch.finfo(self.dtype).min)
        out = self.model(input_ids=tokens[:, None].to(self.device), attention_mask=mask, cache=cache,
                         position_ids=lengths[:, None], use_cache=True)
        for r in rows:
            r.length += 1
        return out.logits[:, -1, :].float()
