"""The one chat interface every engine implements: a batch of conversations in, one reply per
conversation out. It imports nothing above it (the engines import it; the factory in backends.py
builds them), so no engine ever imports the module that builds it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from mentalarena.errors import ModelCallError
from mentalarena.engines.halving import run_halving


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: bool = False  # the conversation was cut to fit the context window
    endpoint: str | None = None  # the server that answered (remote backends), without credentials


class ChatBackend:
    """`generate` takes conversations (lists of {"role", "content"} dicts) and returns one Reply each.

    `batched` backends want many conversations per call (local models); the others are called
    with one conversation at a time from many threads (remote APIs).
    """

    name: str = "backend"
    batched: bool = False
    context_limit: int | None = None  # tokens; None: never truncate
    # top_p / top_k actually used, and where each came from (flag, generation_config, ...)
    sampling: dict | None = None

    def count_tokens(self, messages: list[dict]) -> int:
        """A rough count (4 characters a token) for backends without a tokenizer at hand."""
        return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)

    def generate(self, conversations: list[list[dict]], seeds: list[int] | None = None) -> list[Reply]:
        """One reply per conversation; `seeds` (one per conversation) fix each sampled reply on its
        own, whatever else shares the batch."""
        raise NotImplementedError

    def check(self) -> list[str]:
        """Before any work: can this backend be used at all? Raises EndpointError if not; returns
        notes for the start-up lines. Local backends have nothing to check."""
        return []

    def stream(self, conversations: list[list[dict]], seeds: list[int] | None = None,
               chat: bool = True) -> Iterator[tuple[int, Reply | Exception]]:
        """(index, reply) pairs in completion order, for many independent requests. A request that
        failed after every retry yields its exception instead of a reply. `seeds` (one per request)
        and `chat=False` (raw text prompts) are honoured by backends that can.

        Here: `generate` on chunks of `max_batch_size`; a chunk that fails is run again in halves
        (halving.py), so only a request that fails alone yields a ModelCallError."""
        def run(rows: list[int]) -> list[Reply]:
            return self.generate([conversations[i] for i in rows], None if seeds is None else [seeds[i] for i in rows])

        step = getattr(self, "max_batch_size", 1)
        for start in range(0, len(conversations), step):
            chunk = list(range(start, min(start + step, len(conversations))))
            try:
                replies = run_halving(run, chunk, self.name)
            except ModelCallError as err:  # not one request's (a refused service, an overflow): the chunk's
                replies = [err] * len(chunk)
            yield from zip(chunk, replies)

    def stats(self) -> dict:
        """Backend-specific counters for the run summary."""
        return {}

    def close(self) -> None:
        pass
