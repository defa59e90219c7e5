"""One failing row fails that row: a batch that fails is run again in halves, down to single rows.

A local model answers many requests in one batch; one very long prompt can run the device out of
memory for all of them. Which failures a smaller batch may avoid is decided here, once, for every
engine: memory that ran out, and a backend's own failure of one request (a ModelCallError). A
refused service or a context overflow concerns the run (or is handled by cutting the prompt), and
any other exception is a bug that every half would hit again: those are never split.
"""
from __future__ import annotations

import gc
import logging
import sys
from typing import Callable

from mentalarena.errors import ContextOverflow, ModelCallError, ServiceRefused

log = logging.getLogger("mentalarena.engines.halving")

# How allocators other than CUDA's caching one say it (they raise a plain RuntimeError): CUDA kernels
# ("CUDA error: out of memory"), MPS ("MPS backend out of memory"), the CPU allocator ("can't
# allocate memory" on Linux, "not enough memory" elsewhere), cuBLAS's workspace (ALLOC_FAILED).
MEMORY_WORDS = ("out of memory", "can't allocate memory", "not enough memory", "alloc_failed")


def out_of_memory(exc: BaseException) -> bool:
    """The device or the host ran out of memory: MemoryError, torch.OutOfMemoryError, or a
    RuntimeError whose message says so. torch is looked up, never imported: no torch, no torch error."""
    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(word in str(exc).lower() for word in MEMORY_WORDS)


def splittable(exc: BaseException) -> bool:
    """Whether a failed batch is worth running again in halves (see the module's docstring)."""
    if isinstance(exc, (ServiceRefused, ContextOverflow)):
        return False
    return isinstance(exc, ModelCallError) or out_of_memory(exc)


def describe(exc: BaseException) -> str:
    """Type and first line: what a log line or an error may say (never a prompt: messages of
    allocators and backends name sizes and servers, not the text)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def alone_error(exc: BaseException) -> ModelCallError:
    """The error of a request that failed with no other request beside it. A backend's own
    ModelCallError is kept; anything else becomes one naming it. No traceback is kept: its frames
    would hold on to the tensors of the failed attempt."""
    if isinstance(exc, ModelCallError):
        return exc.with_traceback(None)
    return ModelCallError(f"{describe(exc)} (on this request alone)")


def release_memory() -> None:
    """Before the next attempt: Python's garbage, and the blocks torch's CUDA allocator keeps cached."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run_halving(run: Callable[[list[int]], list], rows: list[int], what: str) -> list:
    """`run(rows)` returns one result per row. Where it raises a `splittable` failure, each half of
    `rows` runs again (recursively): a row that fails alone gets its `alone_error` as its result,
    the others their own results, in `rows`' order. Other failures propagate."""
    try:
        return run(rows)
    except Exception as exc:  # noqa: BLE001 - sorted out just below
        if not splittable(exc):
            raise
        failure = alone_error(exc) if len(rows) == 1 else describe(exc)
    release_memory()
    if len(rows) == 1:
        return [failure]
    log.warning("%s: a batch of %d requests failed (%s); running each half again", what, len(rows), failure)
    half = len(rows) // 2
    return run_halving(run, rows[:half], what) + run_halving(run, rows[half:], what)
