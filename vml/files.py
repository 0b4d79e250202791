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
import secrets
import shutil
import stat
from pathlib import Path
from typing import BinaryIO

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


def read_regular(path: Path, limit: int, what: str = "file") -> bytes:
    """The content of regular file ``path``, at most ``limit`` bytes (more is refused)."""
    with open_regular(path, what) as f:
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
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_atomic_at(dir_fd, path.name, data, sync, mode)
    finally:
        os.close(dir_fd)


def write_atomic_at(dir_fd: int, name: str, data: bytes | BinaryIO, sync: bool = True, mode: int = 0o644) -> None:
    """write_atomic into the directory open as ``dir_fd``; ``data`` may also be a binary file, copied in pieces.

    A directory checked once stays the one written into, even if its path is renamed meanwhile. The
    temporary file is made O_EXCL|O_NOFOLLOW and renamed over whatever lies at ``name``, a symlink
    included, which is replaced, never followed.
    """
    fd, tmp = _temporary(dir_fd, name)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                shutil.copyfileobj(data, f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    if sync:
        os.fsync(dir_fd)


def _temporary(dir_fd: int, name: str) -> tuple[int, str]:
    """A new file ``.NAME.RANDOM`` of mode 0600 in ``dir_fd``, as mkstemp makes one in a path."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = f".{name}.{secrets.token_hex(4)}"
        try:
            return os.open(tmp, flags, 0o600, dir_fd=dir_fd), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", f".{name}.*")


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
