"""The one home for writing outputs: every file a run creates, appends to or rewrites goes through here.

- Modes: a new file is readable by its owner only (0o600), since samples and records hold patients'
  and clients' words; `MENTALARENA_FILE_MODE=group` makes new files 0o640. The umask may narrow
  either. A file that exists keeps its mode, and a rewritten file the mode it had.
- Symbolic links: nothing is written through one planted at an output, lock or temporary path (a
  shared lab folder): files are opened with O_NOFOLLOW, temporary files get unique names (mkstemp),
  and a link where an output goes is one StorageError line.
- Rewrites are atomic: a temporary file beside the target, fsynced, renamed over it, the folder fsynced.
- A full disk, a quota or a file size limit is one StorageError line naming the file: an append cut
  short is cut back to where it began (no torn row), a failed rewrite leaves the old file whole and
  removes its temporary file, so a re-run resumes from what was written before.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

from mentalarena.errors import InputError, StorageError

MODE_SETTING = "MENTALARENA_FILE_MODE"
MODES = {"owner": 0o600, "group": 0o640}
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def new_file_mode() -> int:
    """The permission bits of a file this project creates (the umask may take more away)."""
    value = os.environ.get(MODE_SETTING, "").strip().lower() or "owner"
    if value not in MODES:
        raise InputError(f"{MODE_SETTING}={value!r}: must be owner (new files readable by you only, the default) "
                         "or group (also readable by your group)")
    return MODES[value]


def open_nofollow(path: str | Path, flags: int) -> int:
    """`os.open` that refuses a symbolic link at `path` (one line) and creates files with the project's mode."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, new_file_mode())
    except OSError as exc:
        raise_storage_error(path, exc)
        raise


def raise_storage_error(path: str | Path, exc: OSError) -> None:
    """The one line for a full disk or a planted link while writing `path`; other errors are the caller's."""
    if exc.errno in FULL_DISK:
        raise StorageError(f"{path}: no space left on the device (or quota/size limit); what was written before "
                           "is intact: free space and re-run to resume") from exc
    if exc.errno == errno.ELOOP and os.path.islink(path):
        raise _link_error(path) from exc


def append(path: str | Path, data: bytes) -> None:
    """Add `data` at the end in one write, then fsync. A write the disk cannot take is cut back to
    the size the file had, so a full disk leaves no torn row."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        start = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            with suppress(OSError):  # failing that, the torn line is cut on the next read (repair_torn_tail)
                os.ftruncate(fd, start)
            raise_storage_error(path, exc)
            raise
    finally:
        os.close(fd)


def truncate(path: str | Path, size: int) -> None:
    """Cut a file back to `size` bytes (never through a link), durably."""
    fd = open_nofollow(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", **options):
    """A new file object whose content replaces `path` whole when the block ends without error;
    on an error the old file stays as it was and the temporary file is removed."""
    path = Path(path)
    keep = _mode_to_keep(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, done = None, False
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, keep if keep is not None else new_file_mode() & ~_umask())
        with os.fdopen(fd, mode, **options) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a rename replaces a link planted since the check, never writes through it
        done = True
    except OSError as exc:
        raise_storage_error(path, exc)
        raise
    finally:
        if tmp and not done:
            with suppress(OSError):
                os.unlink(tmp)
    _sync_folder(path.parent)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Rewrite a derived file whole (text as UTF-8): a reader sees the old file or the new one, never half."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json_atomic(path: str | Path, data) -> None:
    """Rewrite a JSON file (a summary, results, a state or a job record) whole."""
    write_atomic(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def _mode_to_keep(path: Path) -> int | None:
    """The mode of the file a rewrite replaces (None: there is none); a link there is refused."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        raise _link_error(path)
    return stat.S_IMODE(info.st_mode)


def _link_error(path) -> StorageError:
    return StorageError(f"{path} is a symbolic link; refusing to write through it (someone may have planted it "
                        "to redirect the output): remove the link or choose another output")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _umask() -> int:
    """The umask, read where Linux tells it; elsewhere set for a moment to the strict 0o077, since
    threads creating files meanwhile would get it."""
    with suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o077)
    os.umask(old)
    return old


def _sync_folder(folder: Path) -> None:
    """Make the rename durable; a file system that cannot fsync a folder is no error here."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
