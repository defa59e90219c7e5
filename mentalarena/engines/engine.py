"""Many independent sessions, one model: requests from all sessions in flight are gathered.

Sessions are asyncio tasks that `await client.chat(messages)`. For a batched (local) backend, a
dispatcher waits until every live session is blocked on some model call, then sends everything
pending as one `generate` batch; remote backends get one request per call, many in flight.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from mentalarena.engines.chat import ChatBackend, Reply
from mentalarena.engines.context import fit_messages, merge_system
from mentalarena.errors import ContextOverflow
from mentalarena.engines.halving import run_halving

# Sends of one call in all when a server refuses the prompt as too long: the first, then at most two cut shorter.
OVERFLOW_ATTEMPTS = 3


class Gate:
    """Counts the sessions alive and those waiting on a model; dispatchers watch the two."""

    def __init__(self):
        self.active = 0
        self.waiting = 0
        self.changed = asyncio.Event()

    def notify(self) -> None:
        self.changed.set()

    def all_waiting(self) -> bool:
        return self.waiting >= self.active


@dataclass
class CallStats:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated_calls: int = 0
    dropped_messages: int = 0
    overflow_refits: int = 0  # calls sent again, cut shorter, after the server said they did not fit
    batches: int = 0
    busy_seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        sizes = self.batch_sizes
        return {"calls": self.calls, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "truncated_calls": self.truncated_calls,
                "dropped_messages": self.dropped_messages, "overflow_refits": self.overflow_refits,
                "batches": self.batches,
                "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else 0.0,
                "busy_seconds": round(self.busy_seconds, 2)}


class ModelClient:
    """`await chat(messages, seed)`: fits the context, merges system text if asked, batches, counts."""

    def __init__(self, backend: ChatBackend, gate: Gate, max_new_tokens: int,
                 merge_system_prompt: bool = False, keep_first: int = 2, max_parallel: int = 16):
        self.backend, self.gate = backend, gate
        self.merge = merge_system_prompt
        self.keep_first = keep_first
        self.max_new_tokens = max_new_tokens
        self.on_reply: Callable[[Reply], None] | None = None  # e.g. the progress bar, once per finished call
        self.stats = CallStats()
        # What context overflows taught: the server's window, and how far to trust our token count
        self.window: int | None = None
        self.count_scale = 1.0
        self._pending: list[tuple[list[dict], int | None, asyncio.Future]] = []
        self._dispatcher: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1 if backend.batched else max_parallel)

    @property
    def name(self) -> str:
        return self.backend.name

    def prepare(self, messages: list[dict]) -> tuple[list[dict], int]:
        """The messages actually sent, and how many history messages were dropped to fit."""
        messages = merge_system(messages) if self.merge else list(messages)
        limit = self.limit()
        if not limit:
            return messages, 0
        budget = int((limit - self.max_new_tokens) * self.count_scale)
        return fit_messages(messages, self.backend.count_tokens, budget, self.keep_first)

    def limit(self) -> int | None:
        """The context window: the backend's (given, or reported by its server), or a smaller one a
        server revealed when it refused a prompt."""
        known = [w for w in (getattr(self.backend, "context_limit", None), self.window) if w]
        return min(known) if known else None

    async def chat(self, messages: list[dict], seed: int | None = None) -> Reply:
        """One call. A prompt the server refuses as too long for its window is cut shorter (oldest
        history first, as `prepare` cuts) and sent again."""
        for attempt in range(OVERFLOW_ATTEMPTS):
            sent, dropped = self.prepare(messages)
            self.gate.waiting += 1
            self.gate.notify()
            try:
                if self.backend.batched:
                    reply = await self._queue(sent, seed)
                else:
                    (reply,) = await self._run([sent], [seed])
                break
            except ContextOverflow as overflow:
                if attempt + 1 == OVERFLOW_ATTEMPTS:
                    raise ContextOverflow(f"{overflow}; still too long after {attempt} cut(s) of the conversation "
                                          "(--max_context_tokens sets the window to fit)",
                                          overflow.prompt_tokens, overflow.window) from overflow
                self._learn(overflow, sent)
            finally:
                self.gate.waiting -= 1
        reply.truncated = reply.truncated or dropped > 0
        self.stats.calls += 1
        self.stats.prompt_tokens += reply.prompt_tokens
        self.stats.completion_tokens += reply.completion_tokens
        self.stats.truncated_calls += int(reply.truncated)
        self.stats.dropped_messages += dropped
        if self.on_reply is not None:
            self.on_reply(reply)
        return reply

    def _learn(self, overflow: ContextOverflow, sent: list[dict]) -> None:
        """Take the window the server reported, and trust our token count only as far as the
        server's own count of the refused prompt allows."""
        self.stats.overflow_refits += 1
        limit = self.limit()
        if overflow.window and (limit is None or overflow.window < limit):
            self.window = overflow.window
        if overflow.prompt_tokens:
            ratio = self.backend.count_tokens(sent) / overflow.prompt_tokens
            if ratio < 1:  # we counted fewer tokens than the server did
                self.count_scale = min(self.count_scale, 0.95 * ratio)
        elif not overflow.window:  # the server said nothing measurable: cut a fifth more
            self.count_scale *= 0.8

    async def _run(self, batch: list[list[dict]], seeds: list[int | None], halving: bool = False) -> list:
        """One reply per conversation; with `halving`, a failed batch runs again in halves
        (halving.py), so a request that fails alone gets its error in place of a reply."""
        start = time.perf_counter()
        seeds = None if all(s is None for s in seeds) else seeds
        generate = self._generate_halving if halving else self.backend.generate
        replies = await asyncio.get_running_loop().run_in_executor(self._pool, generate, batch, seeds)
        self.stats.busy_seconds += time.perf_counter() - start
        self.stats.batches += 1
        self.stats.batch_sizes.append(len(batch))
        return replies

    def _generate_halving(self, batch: list[list[dict]], seeds: list[int | None] | None) -> list:
        def run(rows: list[int]) -> list[Reply]:  # each row keeps its own seed, whatever batch it is in
            return self.backend.generate([batch[i] for i in rows], None if seeds is None else [seeds[i] for i in rows])
        return run_halving(run, list(range(len(batch))), self.name)

    async def _queue(self, messages: list[dict], seed: int | None) -> Reply:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((messages, seed, future))
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())
        return await future

    async def _dispatch(self) -> None:
        """Send pending requests once every live session waits on a model (or after a short pause,
        so a session busy elsewhere never stalls the others for long)."""
        while self._pending:
            deadline = time.monotonic() + 0.5
            while not self.gate.all_waiting() and time.monotonic() < deadline:
                self.gate.changed.clear()
                try:
                    await asyncio.wait_for(self.gate.changed.wait(), timeout=0.05)
                except asyncio.TimeoutError:
                    pass
            batch, self._pending = self._pending, []
            try:
                replies = await self._run([m for m, _, _ in batch], [s for _, s, _ in batch], halving=True)
            except Exception as exc:  # not one request's failure (a refused service, ...): every waiting session sees it
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), reply in zip(batch, replies):
                if future.done():
                    continue
                if isinstance(reply, Exception):  # it failed alone, in a batch halved down to it
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    def stats_dict(self) -> dict:
        return {**self.stats.as_dict(), **self.backend.stats()}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.backend.close()
