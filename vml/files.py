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
import tempfile
from pathlib import Path
from typing import BinaryIO

from .errors import NotFound, StorageError, UsageError, VmlError

_libc = ctypes.CDLL(None, use_errno=True)


def open_regular(path: Path, what: str = "file", *, follow: bool = True, error: type[VmlError] = UsageError):
    """``path`` opened for binary reading, if it is a regular file; else NotFound or ``error``.

    Without ``follow``, a symbolic link at ``path`` is refused too (a repository's own files are never
    links: one there would lead a reader out of the repository).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such {what}") from None
    except OSError as e:
        why = "a symbolic link, not followed" if e.errno == errno.ELOOP and not follow else e.strerror
        raise error(f"{path}: cannot read the {what} ({why})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{path}: not a regular file (a {what} was expected)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(
    path: Path,
    limit: int,
    what: str = "file",
    *,
    follow: bool = True,
    error: type[VmlError] = UsageError,
    private: bool = False,
    check=None,
) -> bytes:
    """The content of regular file ``path``, at most ``limit`` bytes (more is refused with ``error``).

    A ``private`` file (a secret) is refused, as ssh refuses a private key,
    when its mode lets anyone but its owner in: another user may have read it.
    ``check(stat)`` may refuse the file by what fstat says of the very file read.
    """
    with open_regular(path, what, follow=follow, error=error) as f:
        st = os.fstat(f.fileno())
        if check is not None:
            check(st)
        mode = stat.S_IMODE(st.st_mode)
        if private and mode & 0o077:
            raise UsageError(
                f"{path}: permissions {mode:04o} are too open "
                f"(a private {what} must be readable by its owner only: chmod 600 {path})"
            )
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{path}: cannot read the {what} ({e.strerror})") from None
    if len(data) > limit:
        raise error(f"{path}: larger than a {what} can be ({limit} bytes)")
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


def create_complete(final: Path, data: bytes | bytearray, tmp_dir: Path) -> bool:
    """Create the immutable file ``final`` holding ``data``, complete or not at all; False if it exists.

    The file is written unnamed (O_TMPFILE) in its directory and linked into place complete, which
    needs no temporary name and no unlink (and linking fails if the name is taken: "already there"
    is an atomic answer); file systems without O_TMPFILE get a named temporary file in ``tmp_dir``.
    """
    global _tmpfile_ok
    if _tmpfile_ok:
        try:
            fd = os.open(final.parent, os.O_TMPFILE | os.O_WRONLY, 0o644)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            _tmpfile_ok = False
        else:
            try:
                write_all(fd, data)
                # linkat(AT_SYMLINK_FOLLOW) on the /proc link; CPython uses it only when given a directory fd.
                os.link(str(fd), final, src_dir_fd=_proc_fds(), follow_symlinks=True)
                return True
            except FileExistsError:
                return False
            finally:
                os.close(fd)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="obj.")
    try:
        write_all(fd, data)
        os.close(fd)
        fd = -1
        try:
            os.link(tmp, final)
            return True
        except FileExistsError:
            return False
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


_tmpfile_ok = True  # until a file system refuses O_TMPFILE
_proc_fd_dir = (-1, -1)  # (pid, fd of /proc/PID/fd)


def _proc_fds() -> int:
    """A directory fd of this process's /proc fd table; renewed after fork."""
    global _proc_fd_dir
    pid = os.getpid()
    if _proc_fd_dir[0] != pid:
        _proc_fd_dir = (pid, os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    return _proc_fd_dir[1]


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
