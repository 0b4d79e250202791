"""Files: written atomically and flushed, and files a user names read safely.

Every small file VML replaces (refs, records, leases, config) goes through
write_atomic: readers see the old or the new content, never a mix.

Opening a FIFO for reading waits for a writer, and a device can be read
for ever; a command given one where it expects a file must refuse at once.
Files a user names are opened with O_NONBLOCK, checked with fstat, and
only then read.
"""

import contextlib
import ctypes
import errno
import os
import stat
import tempfile
from pathlib import Path

from .errors import NotFound, StorageError, UsageError

_libc = ctypes.CDLL(None, use_errno=True)


def open_regular(path: Path, what: str = "file"):
    """``path`` opened for binary reading, if it is a regular file; else NotFound or UsageError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such {what}") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read the {what} ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{path}: not a regular file (a {what} was expected)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, limit: int, what: str = "file", private: bool = False) -> bytes:
    """The content of regular file ``path``, at most ``limit`` bytes (more is refused).

    A ``private`` file (a secret) is refused, as ssh refuses a private key,
    when its mode lets anyone but its owner in: another user may have read it.
    """
    with open_regular(path, what) as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if private and mode & 0o077:
            raise UsageError(
                f"{path}: permissions {mode:04o} are too open "
                f"(a private {what} must be readable by its owner only: chmod 600 {path})"
            )
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise UsageError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if len(data) > limit:
        raise UsageError(f"{path}: larger than a {what} can be ({limit} bytes)")
    return data


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, sync: bool = True, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that readers see old or new, never a mix.

    Without ``sync``, the caller flushes later (many files, one syncfs). ``mode`` is the new file's
    (0o600 for a file holding a secret): the temporary file has it before any byte is written, so
    no other user can open it in between.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        if mode != 0o600:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(path.parent)


def syncfs(path: Path) -> None:
    """Flush everything written to the file system holding ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise StorageError(f"{path}: syncfs failed ({os.strerror(err)})")
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def storage_error(e: OSError, doing: str) -> StorageError:
    """Turn an OSError into a one-line StorageError saying what was being done."""
    reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    where = f" ({e.filename})" if e.filename else ""
    return StorageError(f"{doing}: {reason}{where}")
