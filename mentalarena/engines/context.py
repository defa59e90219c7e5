"""Fitting a conversation into a context window, predictably, and merging system text for
chat templates that reject system messages."""
from __future__ import annotations

from typing import Callable


def fit_messages(messages: list[dict], count: Callable[[list[dict]], int], budget: int,
                 keep_first: int = 2, block: int = 8) -> tuple[list[dict], int]:
    """Drop the oldest messages after the first `keep_first`, a multiple of `block` at a time, so
    that `count(messages) <= budget`.

    Dropping whole blocks keeps the cut at the same place for the next several calls of a growing
    conversation, so their shared prefix stays cacheable. The last two messages (this call's
    system/user prompt) are never dropped. Returns the messages and how many were dropped; when
    even the minimal conversation is too long, it is returned cut to the minimum.
    """
    if count(messages) <= budget:
        return messages, 0
    head = messages[:keep_first]
    tail_min = min(2, len(messages) - len(head))
    middle = len(messages) - len(head) - tail_min
    if middle <= 0:  # nothing droppable
        return messages, 0
    lo, hi = 1, middle  # smallest number of dropped middle messages that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if count(head + messages[keep_first + mid:]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    drop = min(middle, -(-lo // block) * block)
    return head + messages[keep_first + drop:], drop


def merge_system(messages: list[dict]) -> list[dict]:
    """System text goes into the next user message; adjacent messages of one role are joined.

    For chat templates that reject system messages or non-alternating roles (e.g. Llama-2,
    Mistral). The reference did this for the call's own system prompt only, chosen by a "7b"
    substring in the model name; here it is an explicit flag and covers the whole history.
    """
    merged: list[dict] = []
    pending: list[str] = []
    for m in messages:
        if m["role"] == "system":
            pending.append(m["content"])
            continue
        content = "\n".join(pending + [m["content"]])
        pending = []
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n" + content}
        else:
            merged.append({"role": m["role"], "content": content})
    if pending:
        text = "\n".join(pending)
        if merged and merged[-1]["role"] == "user":
            merged[-1] = {"role": "user", "content": merged[-1]["content"] + "\n" + text}
        else:
            merged.append({"role": "user", "content": text})
    return merged
