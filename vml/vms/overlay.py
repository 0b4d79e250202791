"""Copy-on-write overlays: the written blocks of a working area's disk over what lies below.

An overlay is a sparse file as long as the disk: a block has been written
exactly when that block of the file is allocated (SEEK_DATA), and then the
file holds its bytes; elsewhere the layer below shows through. There is no
separate dirty map that could disagree with the data after a crash: a write
that does not cover a whole block first fills the rest of the block from the
current content, so every allocated block is complete. A process killed at
any point leaves the page cache, and so every write, in place; fdatasync()
makes acknowledged writes durable against power loss as well.

Overlays stack. The layer below the newest is either the entry's disk (a
DiskReader) or an older overlay that a save froze: saving switches writes
to a fresh overlay at once, then stores the frozen one without holding up
the guest (see vml.vms.area).
"""

import contextlib
import errno
import os
import tempfile
import time
from pathlib import Path

from ..errors import DiskFull, UsageError
from ..files import open_regular


def check_sparse_files(directory: Path, block: int) -> None:
    """Refuse a file system where allocation does not tell written blocks from holes.

    That needs SEEK_DATA and SEEK_HOLE, and written zeros kept as data (ZFS
    with compression, for one, turns them back into holes).
    """
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".vml-sparse-probe.")
    try:
        os.ftruncate(fd, 4 * block)
        os.pwrite(fd, bytes(block), block)  # the second block: written zeros
        os.fsync(fd)
        data = os.lseek(fd, 0, os.SEEK_DATA)
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        ok = (data, hole) == (block, 2 * block)
    except OSError:
        ok = False
    finally:
        os.close(fd)
        os.unlink(probe)
    if not ok:
        raise UsageError(
            f"{directory}: this file system does not keep sparse files as working areas need "
            "(SEEK_DATA/SEEK_HOLE, written zeros kept as data); put $VML_HOME on ext4, xfs, btrfs or tmpfs"
        )


class Blocks:
    """Which blocks of a layer are written: one byte a block, kept only for pages that hold some.

    A page covers PAGE blocks (256 MiB of disk at 4 KiB); a disk declared as
    terabytes costs nothing until it is written. Pages are changed in place
    by writes (under the area's mutex) and replaced whole by a rescan, so a
    reader without the mutex never sees a page half rebuilt.
    """

    PAGE = 1 << 16

    def __init__(self):
        self.pages: dict[int, bytearray] = {}

    def count(self) -> int:
        return sum(page.count(1) for page in list(self.pages.values()))

    def between(self, b0: int, b1: int) -> list[tuple[int, int, bool]]:
        """[b0, b1) cut into (start, end, marked) pieces, in order, neighbours of one state joined."""
        out: list[tuple[int, int, bool]] = []

        def piece(s: int, e: int, marked: bool) -> None:
            if out and out[-1][2] == marked and out[-1][1] == s:
                out[-1] = (out[-1][0], e, marked)
            else:
                out.append((s, e, marked))

        for p in range(b0 // self.PAGE, (b1 - 1) // self.PAGE + 1):
            base = p * self.PAGE
            lo, hi = max(b0, base) - base, min(b1, base + self.PAGE) - base
            page = self.pages.get(p)
            if page is None:
                piece(base + lo, base + hi, False)
                continue
            i = lo
            while i < hi:
                marked = page[i] == 1
                j = page.find(b"\0" if marked else b"\1", i, hi)
                j = hi if j < 0 else j
                piece(base + i, base + j, marked)
                i = j
        return out

    def add(self, b0: int, b1: int) -> None:
        for p in range(b0 // self.PAGE, (b1 - 1) // self.PAGE + 1):
            base = p * self.PAGE
            lo, hi = max(b0, base) - base, min(b1, base + self.PAGE) - base
            page = self.pages.get(p)
            if page is None:
                page = bytearray(self.PAGE)
                page[lo:hi] = b"\1" * (hi - lo)
                self.pages[p] = page
            else:
                page[lo:hi] = b"\1" * (hi - lo)

    def replace(self, b0: int, b1: int, marked: list[tuple[int, int]]) -> None:
        """Make [b0, b1) marked exactly where ``marked`` (runs within it) says."""
        for p in range(b0 // self.PAGE, (b1 - 1) // self.PAGE + 1):
            base = p * self.PAGE
            lo, hi = max(b0, base) - base, min(b1, base + self.PAGE) - base
            old = self.pages.get(p)
            page = bytearray(old) if old is not None else bytearray(self.PAGE)
            page[lo:hi] = bytes(hi - lo)
            for s, e in marked:
                s, e = max(s - base, lo), min(e - base, hi)
                if s < e:
                    page[s:e] = b"\1" * (e - s)
            if 1 in page:
                self.pages[p] = page  # one assignment: readers see the old page or the new one
            else:
                self.pages.pop(p, None)


class Overlay:
    """One layer of a disk: its written blocks over ``base`` (a DiskReader or another Overlay).

    Not ``writable``, the file is only looked at (by a process that does
    not hold the area): it must exist (NotFound) and be a regular file.
    """

    def __init__(self, path: Path, base, block: int, writable: bool = True):
        self.path, self.base, self.block = path, base, block
        self.size = base.size
        if writable:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        else:
            with open_regular(path, "working area overlay") as f:
                self.fd = os.dup(f.fileno())
        st = os.fstat(self.fd)
        if st.st_size != self.size and writable:
            os.ftruncate(self.fd, self.size)
        self.mtime_ns = st.st_mtime_ns
        self.written = Blocks()
        self._scan(0, self.size)

    def __del__(self):
        with contextlib.suppress(AttributeError, OSError):
            os.close(self.fd)

    def _scan(self, start: int, end: int) -> None:
        """Mark the blocks of [start, end) as the file's allocation says (one replacement)."""
        b0, b1 = start // self.block, -(-end // self.block)
        off, stop = b0 * self.block, min(b1 * self.block, self.size)
        found = []
        while off < stop:
            try:
                data = os.lseek(self.fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            if data >= stop:
                break
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), stop)
            found.append((data // self.block, -(-hole // self.block)))
            off = hole
        self.written.replace(b0, b1, found)

    # -- what this layer holds -------------------------------------------

    def layers(self) -> list["Overlay"]:
        """This overlay and the overlays below it, newest first."""
        out: list[Overlay] = []
        layer = self
        while isinstance(layer, Overlay):
            out.append(layer)
            layer = layer.base
        return out

    def changed_blocks(self) -> int:
        return self.written.count()

    def allocated(self) -> int:
        """Bytes that are not holes, as st_blocks reports them (an estimate over the layers)."""
        return min(self.size, self.base.allocated() + self.changed_blocks() * self.block)

    def dirty_chunks(self, chunk_size: int) -> set[int]:
        """Chunks with a block written in this layer."""
        per = chunk_size // self.block
        out: set[int] = set()
        for s, e, marked in self.written.between(0, -(-self.size // self.block)) if self.size else ():
            if marked:
                out.update(range(s // per, (e - 1) // per + 1))
        return out

    # -- I/O ---------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        parts = []
        for s, e, marked in self.written.between(offset // self.block, -(-end // self.block)):
            lo, hi = max(offset, s * self.block), min(end, e * self.block)
            parts.append(os.pread(self.fd, hi - lo, lo) if marked else self.base.read(lo, hi - lo))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data``; the caller holds the area's mutex.

        If the file system refuses (ENOSPC), the marks are read again from
        the file's allocation, so that what this process serves stays what
        a restart would find; the caller reports the error to the writer.
        """
        end = offset + len(data)
        if end > self.size:
            raise DiskFull(f"{self.path.name}: write past the end of the disk ({end} > {self.size})")
        b0, b1 = offset // self.block, -(-end // self.block)
        start, stop = b0 * self.block, min(b1 * self.block, self.size)
        if offset == start and end == stop:
            buf = data
        else:  # complete the partial first and last blocks from the current content
            buf = bytearray(self.read(start, stop - start))
            buf[offset - start : end - start] = data
        view = memoryview(buf)
        pos = start
        try:
            while view:
                n = os.pwrite(self.fd, view, pos)
                view, pos = view[n:], pos + n
        except OSError:
            self._scan(start, stop)
            raise
        self.written.add(b0, b1)
        self.mtime_ns = time.time_ns()

    def sync(self) -> None:
        """Flush this layer and the frozen ones below it: a write acknowledged before a freeze lies there."""
        for layer in self.layers():
            os.fdatasync(layer.fd)
