"""A deployment's records directory and each job's directory in it: the user's own, written without following links.

RECORDS lies on a file system every node reaches, often one other users
write to as well, and a task writes there unattended. Another user must not
be able to choose where those writes land (a symlink to a victim file, a
directory of their own planted under the next job id), so:

- RECORDS and RECORDS/JOB are created 0700 by whoever comes first, `vml
  deploy` or the task, and refused when they belong to another user or others
  may write in them (as ssh refuses a ~/.ssh others can write);
- each is used through a descriptor opened once and checked, so the checks
  and every write after them concern the same directory, and JOB is opened
  without following a symlink;
- every file goes in through write_atomic_at: a temporary file made
  O_EXCL|O_NOFOLLOW, renamed over whatever lies at the name, never opened
  through it.
"""

import errno
import os
from pathlib import Path
from typing import BinaryIO

from ..errors import UsageError
from ..files import storage_error, write_atomic_at
from ..names import check_name

PRIVATE = 0o700


class Records:
    """An open, checked records directory; files are written into it by name, 0600 unless told."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def write(self, name: str, data: bytes | BinaryIO, mode: int = 0o600) -> None:
        write_atomic_at(self.fd, name, data, mode=mode)

    def job(self, job: str) -> "Records":
        """RECORDS/JOB, created private if missing."""
        path = self.path / check_name(job, "job")
        try:
            os.mkdir(job, PRIVATE, dir_fd=self.fd)
        except FileExistsError:
            pass  # the task's or vml deploy's, whichever came first; or another user's, which the checks refuse
        except OSError as e:
            raise storage_error(e, f"cannot create the records directory {path}") from None
        return _opened(path, job, self.fd, os.O_NOFOLLOW)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "Records":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_records(path: Path) -> Records:
    """RECORDS, a path the user gave (a symlink in it is theirs to make), created private if missing."""
    try:
        path.mkdir(parents=True, mode=PRIVATE)
    except FileExistsError:
        pass
    except OSError as e:
        raise storage_error(e, f"cannot create the records directory {path}") from None
    return _opened(path, path, None, 0)


def _opened(path: Path, name: str | Path, dir_fd: int | None, nofollow: int) -> Records:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | nofollow
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UsageError(f"{path}: a symlink or a file, not a directory; records go only into one") from None
        raise storage_error(e, f"cannot open the records directory {path}") from None
    try:
        _check_private(os.fstat(fd), path)
    except BaseException:
        os.close(fd)
        raise
    return Records(fd, path)


def _check_private(st: os.stat_result, path: Path) -> None:
    me = os.geteuid()
    if st.st_uid != me:
        raise UsageError(
            f"{path}: owned by uid {st.st_uid}, not by this user (uid {me}); records go only into a directory "
            "of one's own"
        )
    if st.st_mode & 0o022:
        raise UsageError(
            f"{path}: writable by group or others (mode {st.st_mode & 0o7777:04o}); records go only into a "
            "directory no one else can write (chmod go-w, or choose another --records)"
        )
