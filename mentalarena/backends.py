"""Chat backends: one interface, a batch of conversations in, one reply per conversation out."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: bool = False  # the conversation was cut to fit the context window


class ChatBackend:
    """`generate` takes conversations (lists of {"role", "content"} dicts) and returns one Reply each.

    `batched` backends want many conversations per call (local models); the others are called
    with one conversation at a time from many threads (remote APIs).
    """

    name: str = "backend"
    batched: bool = False

    def generate(self, conversations: list[list[dict]]) -> list[Reply]:
        raise NotImplementedError

    def close(self) -> None:
        pass
