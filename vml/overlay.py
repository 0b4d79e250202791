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
the guest (see vml.areas).
"""

import contextlib
import errno
import os
import tempfile
import time
from pathlib import Path

from .errors import DiskFull, UsageError


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


class Overlay:
    """One layer of a disk: its written blocks over ``base`` (a DiskReader or another Overlay)."""

    def __init__(self, path: Path, base, block: int):
        self.path, self.base, self.block = path, base, block
        self.size = base.size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        st = os.fstat(self.fd)
        if st.st_size != self.size:
            os.ftruncate(self.fd, self.size)
        self.mtime_ns = st.st_mtime_ns
        self.written = bytearray(-(-self.size // block))  # 1 per written block
        self._scan(0, self.size)

    def __del__(self):
        with contextlib.suppress(AttributeError, OSError):
            os.close(self.fd)

    def _scan(self, start: int, end: int) -> None:
        """Mark the blocks of [start, end) as the file's allocation says."""
        b0, b1 = start // self.block, -(-end // self.block)
        self.written[b0:b1] = bytes(b1 - b0)
        off = b0 * self.block
        stop = min(b1 * self.block, self.size)
        while off < stop:
            try:
                data = os.lseek(self.fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return
                raise
            if data >= stop:
                return
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), stop)
            first, last = data // self.block, -(-hole // self.block)
            self.written[first:last] = b"\1" * (last - first)
            off = hole

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
        return self.written.count(1)

    def allocated(self) -> int:
        """Bytes that are not holes, as st_blocks reports them (an estimate over the layers)."""
        return min(self.size, self.base.allocated() + self.changed_blocks() * self.block)

    def dirty_chunks(self, chunk_size: int) -> set[int]:
        """Chunks with a block written in this layer."""
        per = chunk_size // self.block
        w = self.written
        return {i for i in range(-(-len(w) // per)) if 1 in w[i * per : (i + 1) * per]}

    # -- I/O ---------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        b0, b1 = offset // self.block, -(-end // self.block)
        marks = self.written[b0:b1]
        if 1 not in marks:
            return self.base.read(offset, end - offset)
        if 0 not in marks:
            return os.pread(self.fd, end - offset, offset)
        parts, pos = [], offset
        while pos < end:
            b = pos // self.block
            state = self.written[b]
            stop = b + 1
            while stop < b1 and self.written[stop] == state:
                stop += 1
            run_end = min(stop * self.block, end)
            if state:
                parts.append(os.pread(self.fd, run_end - pos, pos))
            else:
                parts.append(self.base.read(pos, run_end - pos))
            pos = run_end
        return b"".join(parts)

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
        self.written[b0:b1] = b"\1" * (b1 - b0)
        self.mtime_ns = time.time_ns()

    def sync(self) -> None:
        os.fdatasync(self.fd)
