"""Reading an entry's disks at any offset, rebuilt lazily from base plus deltas.

An entry is resolved once, when opened, into chunk tables; a read then
costs a table lookup and, for a chunk not in the cache, one object read and
decompression. Decompressed chunks are kept in a ChunkCache shared by every
open entry and area of a process.

Concurrency rules (readers run in worker threads):

- The cache is guarded by one lock held only for dictionary updates, never
  while reading or decompressing.
- Each missing chunk is loaded once: the first thread to miss it leaves an
  in-flight marker (an Event); others wait on it, then look again. If the
  load fails, the marker is removed and every waiter retries on its own, so
  an error is reported to each reader and never cached.
- Cached data is immutable bytes keyed by digest, so a chunk shared by many
  entries or disks is cached once.
"""

import threading
from collections import OrderedDict

from ..repo.chunkmap import ChunkTable
from ..repo.objects import HOLE
from ..repo.repository import Repository

DEFAULT_CACHE_BYTES = 256 << 20
# Of a process's memory bound ([limits] mount_memory), what is not for decompressed chunks:
# the interpreter and its libraries (about 80 MiB), buffers in flight (whole packs stream
# into the cache's files, not memory) and what malloc has not given back yet.
# bench/fs_read.py measured a peak of 415 MiB at the default 512.
RESERVED_BYTES = 320 << 20


def chunk_cache_bytes(memory: int) -> int:
    """The share of a memory bound the decompressed chunks may take."""
    return max(32 << 20, memory - RESERVED_BYTES)


class ChunkCache:
    """Decompressed chunks by digest, least recently used evicted first."""

    def __init__(self, capacity: int = DEFAULT_CACHE_BYTES):
        self.capacity = capacity
        self.size = 0
        self.hits = self.misses = 0
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        self._loading: dict[bytes, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, digest: bytes, load) -> bytes:
        """The chunk named ``digest``; ``load()`` produces it on a miss."""
        while True:
            with self._lock:
                data = self._hit(digest)
                if data is not None:
                    return data
                event = self._loading.get(digest)
                if event is None:
                    event = self._loading[digest] = threading.Event()
                    self.misses += 1
                    break
            event.wait()
        try:
            data = load()
        except BaseException:
            with self._lock:
                del self._loading[digest]
            event.set()
            raise
        with self._lock:
            del self._loading[digest]
            self._data[digest] = data
            self.size += len(data)
            while self.size > self.capacity and len(self._data) > 1:
                _, old = self._data.popitem(last=False)
                self.size -= len(old)
        event.set()
        return data

    def peek(self, digest: bytes) -> bytes | None:
        """The cached chunk, or None; never loads or waits."""
        with self._lock:
            return self._hit(digest)

    def _hit(self, digest: bytes) -> bytes | None:
        """A cached chunk, counted and marked recently used; the caller holds the lock."""
        data = self._data.get(digest)
        if data is not None:
            self._data.move_to_end(digest)
            self.hits += 1
        return data


FETCH_AHEAD = 128  # chunks kept on their way ahead of a sequential reader (32 MiB at 256 KiB: 4 packs)
SEQUENTIAL_RUN = 32  # chunks read in order before a reader of remote objects counts as sequential


class _NotCached(Exception):
    pass


class DiskReader:
    """Random-access reads of one resolved disk or file of an entry."""

    def __init__(self, repo: Repository, table: ChunkTable, where: str, cache: ChunkCache):
        self.repo, self.table, self.where, self.cache = repo, table, where, cache
        self.fetches = repo.read_only or bool(repo.fallbacks)  # objects may come over the network
        self._last = -SEQUENTIAL_RUN - 1  # the chunk read last (none yet: far from any) ...
        self._run = 0  # ... and how many chunks in order ended there
        self._ahead_to = 0  # chunks before this one have been asked for
        self._ahead_lock = threading.Lock()  # guards the three above: read threads share a reader

    @property
    def size(self) -> int:
        return self.table.size

    def chunk(self, index: int) -> bytes:
        d = self.table.digest(index)
        if d == HOLE:
            return bytes(self.table.chunk_length(index))
        if self.fetches:
            self._fetch_ahead(index)
        return self.cache.get(d, lambda: self.repo.read_chunk(self.table, index, self.where))

    def _fetch_ahead(self, index: int) -> None:
        """Keep up to FETCH_AHEAD chunks on their way for a sequential reader of remote objects.

        Sequential means reading from the first chunk on (where booting,
        copying and checksumming start), or SEQUENTIAL_RUN chunks read in
        order anywhere else (a chunk a little further on continues a run:
        holes and chunks served from memory never reach here). A shorter run
        (a 4 MiB read at a random place, with the kernel's read-ahead after
        it) fetches only the frames it reads, never the whole packs around
        them. Reading the same
        chunk again (a read split in two by FUSE, or the page-cache push
        after a random read) says nothing either way. The chunk being read
        is asked for too, so that it comes with its pack when packs are
        fetched whole.
        """
        with self._ahead_lock:
            if index == self._last:
                return
            step = index - self._last
            if 0 < step <= SEQUENTIAL_RUN:  # on from the last read (holes and chunks served from memory never come)
                self._run += 1
            elif step < 0 and -step <= SEQUENTIAL_RUN:  # reads of one run answered out of order (FUSE's threads)
                return
            else:  # a new run: what was asked for ahead of the old one says nothing of this one
                self._run, self._ahead_to = SEQUENTIAL_RUN if index == 0 else 1, index
            self._last = index
            if self._run < SEQUENTIAL_RUN or self._ahead_to - index > FETCH_AHEAD // 2:
                return
            # From where the last request ended, if the reader has not left it far behind: chunks skipped
            # over by this read may still be read by another thread of the same run.
            start = self._ahead_to if index - self._ahead_to <= FETCH_AHEAD else index
            end = min(self.table.count, index + 1 + FETCH_AHEAD)
            self._ahead_to = end
        wanted = [d for i in range(start, end) if (d := self.table.digest(i)) != HOLE and self.cache.peek(d) is None]
        if wanted:
            self.repo.prefetch(wanted, self.table.chunk_size)

    def cached_chunk(self, index: int) -> bytes | None:
        """The chunk if it can be had without I/O (a hole, or cached), else None."""
        d = self.table.digest(index)
        if d == HOLE:
            return bytes(self.table.chunk_length(index))
        return self.cache.peek(d)

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; short only at the end of the disk."""
        return self._read(offset, size, self.chunk)

    def read_cached(self, offset: int, size: int) -> bytes | None:
        """Like read, but None instead of loading anything: for callers that must not block."""
        try:
            return self._read(offset, size, self._cached_or_raise)
        except _NotCached:
            return None

    def _cached_or_raise(self, index: int) -> bytes:
        data = self.cached_chunk(index)
        if data is None:
            raise _NotCached
        return data

    def _read(self, offset: int, size: int, chunk) -> bytes:
        end = min(offset + size, self.table.size)
        if offset >= end:
            return b""
        cs = self.table.chunk_size
        first, last = offset // cs, (end - 1) // cs
        if first == last:
            start = offset - first * cs
            return chunk(first)[start : start + end - offset]
        parts = []
        for index in range(first, last + 1):
            data = chunk(index)
            lo = offset - index * cs if index == first else 0
            hi = end - index * cs if index == last else len(data)
            parts.append(data[lo:hi])
        return b"".join(parts)

    def chunk_range(self, offset: int, size: int) -> range:
        """The chunk indexes a read of ``size`` bytes at ``offset`` touches."""
        end = min(offset + size, self.table.size)
        cs = self.table.chunk_size
        return range(offset // cs, (end - 1) // cs + 1) if offset < end else range(0)

    def allocated(self) -> int:
        """Bytes of the disk that are not holes (what st_blocks reports)."""
        return self.table.allocated()
