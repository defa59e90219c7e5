"""A progress bar that moves with every model call (not only with finished sessions or answers),
with calls/s, generated tokens/s and an ETA, so a working run never looks like a hung one."""
from __future__ import annotations

import sys
import time


class Progress:
    """`reply(r)` once per finished call; `retotal(n)` when the expected number of calls changes."""

    def __init__(self, total_calls: int, desc: str, enabled: bool = True):
        self.calls = self.tokens = self.failed = 0
        self.started = time.monotonic()
        self.extra: dict[str, object] = {}
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=max(1, total_calls), unit="call", desc=desc, dynamic_ncols=True, file=sys.stderr,
                            smoothing=0.1)

    def reply(self, reply) -> None:
        self.calls += 1
        self.tokens += reply.completion_tokens
        if self.bar is not None:
            if self.bar.n >= self.bar.total:  # an estimate ran short: keep a total (and an ETA) on show
                self.bar.total = self.bar.n + 1
            self.bar.update(1)
            self._postfix()

    def failure(self) -> None:
        """A call that failed for good still counts as done, for the ETA."""
        self.failed += 1
        if self.bar is not None:
            self.bar.update(1)
            self._postfix()

    def retotal(self, total_calls: int) -> None:
        if self.bar is not None:
            self.bar.total = max(total_calls, self.bar.n, 1)
            self.bar.refresh()

    def note(self, **values) -> None:
        self.extra.update(values)
        if self.bar is not None:
            self._postfix()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _postfix(self) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        shown = {**self.extra, "tok/s": f"{self.tokens / elapsed:.1f}"}
        if self.failed:
            shown["failed"] = self.failed
        self.bar.set_postfix(shown, refresh=False)


class SessionProgress(Progress):
    """Self-play: the total is sessions x calls per session, a number known only roughly in advance
    (decoder rounds and tries vary), so it starts from the settings and follows the sessions done."""

    def __init__(self, sessions: int, calls_per_session: float, enabled: bool = True):
        super().__init__(round(sessions * calls_per_session), "self-play", enabled)
        self.sessions, self.per_session = sessions, calls_per_session
        self.done_sessions = self.ok_sessions = self.ok_calls = self.failed_sessions = 0

    def session(self, calls: int | None) -> None:
        """A session ended: `calls` it made, or None when it failed (then its calls are unknown)."""
        self.done_sessions += 1
        if calls is None:
            self.failed_sessions += 1
        else:
            self.ok_sessions += 1
            self.ok_calls += calls
        average = self.ok_calls / self.ok_sessions if self.ok_sessions else self.per_session
        # what the finished sessions took, plus the average for every other one (those still
        # running, whose calls so far are counted in the bar already, and those not started)
        self.retotal(round(self.ok_calls + (self.sessions - self.ok_sessions) * average))
        self.note(sessions=f"{self.done_sessions}/{self.sessions}", failed_sessions=self.failed_sessions)
