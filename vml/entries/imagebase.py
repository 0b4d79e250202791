"""What every image parser shares: bounded reads of one open image, and what a parser reports."""

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadSource

SECTOR = 512
HEAD = 64 << 10  # bytes read from the start of an image; qcow2 extensions past this are refused
MAX_DESCRIPTOR = 64 << 10
MAX_NAME = 1023  # qemu's own limit for a qcow2 backing file name
MAX_EXTENTS = 2048


@dataclass(frozen=True)
class Reference:
    """A file an image names, as the image spells it."""

    role: str  # "backing file", "data file" or "extent"
    name: str
    format: str | None = None  # a backing file's declared format, or an extent's type (FLAT, SPARSE, ...)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    size: int  # virtual size in bytes, as the header declares it
    references: tuple[Reference, ...] = ()


class Image:
    """An open image: its size, its first bytes, and bounded reads at any offset."""

    def __init__(self, path: Path):
        self.path = path
        try:
            # O_NONBLOCK: a FIFO must not hang the save; it is refused below.
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            raise BadSource(f"{path}: {e.strerror}") from None
        try:
            st = os.fstat(self.fd)
            if stat.S_ISREG(st.st_mode):
                self.size = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                self.size = os.lseek(self.fd, 0, os.SEEK_END)
            else:
                raise BadSource(f"{path}: not a regular file or block device")
            self.head = self.read(0, HEAD)
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset``; fewer at the end of the file."""
        if offset < 0 or offset >= self.size:
            return b""
        n = min(n, self.size - offset)
        chunks = []
        try:
            while n > 0:
                data = os.pread(self.fd, n, offset)
                if not data:
                    break
                chunks.append(data)
                offset += len(data)
                n -= len(data)
        except OSError as e:
            raise BadSource(f"{self.path}: {e.strerror}") from None
        return b"".join(chunks)

    def bad(self, why: str) -> BadSource:
        return BadSource(f"{self.path}: {why}")


@contextlib.contextmanager
def opened(path: Path):
    img = Image(path)
    try:
        yield img
    finally:
        os.close(img.fd)


def c_string(data: bytes) -> bytes:
    """What C code sees of ``data``: everything up to the first NUL."""
    end = data.find(b"\0")
    return data if end < 0 else data[:end]


def file_name(img: Image, raw: bytes, what: str) -> str:
    raw = c_string(raw)
    if len(raw) > MAX_NAME:
        raise img.bad(f"{what} name longer than {MAX_NAME} bytes")
    return os.fsdecode(raw)
