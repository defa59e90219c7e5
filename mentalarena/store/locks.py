"""One writer per output: a run holds an exclusive lock on `<output>.lock` while it writes.

The lock is the kernel's (`flock`), so it dies with its process: a run killed by `kill -9` leaves
at most an unlocked file behind, and the next run takes it at once. The file also says who holds
it (pid, host, start time, script), for the message a second run gets. A run that finishes
removes its lock file. On a file system without `flock` (some Lustre and NFS mounts) a run says
so in one warning line and goes on unlocked.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from mentalarena.errors import BusyError
from mentalarena.store.files import open_nofollow

log = logging.getLogger("mentalarena.store.locks")
# flock's answers where the file system has no locks at all (not: another process holds it)
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
_warned: set[Path] = set()  # folders already warned about: one line per file system, not per output


class OutputLock:
    """Held from `acquire()` to `release()` (or the end of a `with` block)."""

    def __init__(self, target: str | Path):
        self.target = Path(target)
        self.path = self.target.with_name(self.target.name + ".lock")
        self._fd: int | None = None
        self._made: list[Path] = []  # folders made for the lock, deepest first

    def acquire(self) -> "OutputLock":
        self._made = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)  # a planted link is refused, never truncated
            except FileNotFoundError:  # its folder was removed by a run that just ended (see release)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise BusyError(f"{self.target}: another run is writing it ({holder}); wait for it to end, "
                                "or choose another output") from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in NO_LOCKS:
                    raise
                self._warn_unlocked()
                return self  # unlocked: release() has nothing to undo, and leaves the file to whoever else runs
            # The previous holder may have removed the file between our open and our lock: then we
            # hold a lock on a file nobody else can see. Start again on the current one.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime(
            "%Y-%m-%d %H:%M:%S"), "script": os.path.basename(sys.argv[0])}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still locked, so no other run holds a lock on a removed file
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        for folder in self._made:  # made for the lock alone (a run stopped by bad input): nothing is left behind
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote there
                break

    def _warn_unlocked(self) -> None:
        if self.path.parent not in _warned:
            _warned.add(self.path.parent)
            log.warning("%s: this file system does not support locks (flock): two runs writing %s at once would "
                        "corrupt it; make sure only one runs", self.path, self.target)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def hold_all(stack: ExitStack, targets) -> None:
    """Lock every output in `targets` for the life of `stack`, or none of them (a busy one raises,
    and the stack releases those already taken)."""
    for target in dict.fromkeys(Path(t) for t in targets):
        stack.enter_context(OutputLock(target))


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "its process id is not recorded yet"
    script = f", {info['script']}" if info.get("script") else ""
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}{script}"
