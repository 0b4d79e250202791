"""Pushing decompressed chunks into the kernel page cache after random reads.

A random 4 KiB read makes us fetch, check and decompress a whole chunk
(256 KiB). Once that is paid for, the rest of the chunk is pushed into the
kernel page cache (FUSE notify_store), so later reads anywhere in it cost no
request at all: bench/fs_read.py measures random 4 KiB reads at tens of
times qemu-storage-daemon's rate this way. Sequential readers are left to
the kernel's own readahead: pushing ahead of them, decompressing ahead of
them, or asking the disk for their next objects early (posix_fadvise) were
each measured slower on the 2-core build machine, since all of them compete
with the requests the kernel already sends ahead for the same two cores.

Only entries are treated so: their bytes never change, so the page cache
can never hold a stale copy. Working areas are written through the kernel
and are left to it.

Concurrency rule: notify_store may block in the kernel on pages that reads
in flight hold locked. It therefore runs only in this module's own worker
threads (a separate CapacityLimiter), never in the threads that answer
reads, which always stay free to complete those reads.
"""

import logging
import os

import pyfuse3
import trio

from vml.entries.reader import DiskReader

log = logging.getLogger(__name__)

QUEUE = 1024


class ReadAhead:
    def __init__(self, workers: int | None = None):
        self.workers = workers or max(2, os.cpu_count() or 2)
        self._send, self._receive = trio.open_memory_channel(QUEUE)
        self._pushed: set[tuple[int, int]] = set()  # (inode, chunk) queued or pushed
        self._limiter = trio.CapacityLimiter(self.workers)

    async def run(self) -> None:
        """Serve the queue until cancelled (start it in the mount's nursery)."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.workers):
                nursery.start_soon(self._worker)

    def after_read(self, inode: int, reader: DiskReader, offset: int, size: int, sequential: bool) -> None:
        """Queue the chunks a random read touched for the page cache; never blocks."""
        if sequential:
            return
        for index in reader.chunk_range(offset, size):
            key = (inode, index)
            if key in self._pushed:
                continue
            try:
                self._send.send_nowait((inode, reader, index))
            except trio.WouldBlock:
                return  # behind already: let reads drive
            self._pushed.add(key)

    async def _worker(self) -> None:
        async for inode, reader, index in self._receive:
            try:
                await trio.to_thread.run_sync(_push, inode, reader, index, limiter=self._limiter)
            except Exception as e:  # only a hint; the read path reports errors
                self._pushed.discard((inode, index))
                log.debug("push of chunk %d of inode %d failed: %s", index, inode, e)


def _push(inode: int, reader: DiskReader, index: int) -> None:
    pyfuse3.notify_store(inode, index * reader.table.chunk_size, reader.chunk(index))
