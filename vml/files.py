"""Reading files a user names: regular files only, bounded, and never blocking on a FIFO.

Opening a FIFO for reading waits for a writer, and a device can be read
for ever; a command given one where it expects a file must refuse at once.
Files are opened with O_NONBLOCK, checked with fstat, and only then read.
"""

import os
import stat
from pathlib import Path

from .errors import NotFound, UsageError


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
