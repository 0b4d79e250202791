"""Chunk maps and chunk tables.

A *chunk map* is the stored form: a sorted list of records (chunk index,
object digest, stored size) for one disk or file of one entry. A full entry
lists every chunk that is not all zeros; a delta lists only the chunks that
differ from its reference, with the HOLE digest for chunks that became zero.
The stored size lets a reader know an object's size before fetching it (to
bound downloads and to count bytes) without touching the object.

A *chunk table* is the resolved, in-memory form: the digest of every chunk of
a disk that holds data, built once per open by applying the maps of a chain
from its base upward. It costs 44 bytes per chunk with data and nothing per
hole (a 20 GiB disk full of data at 256 KiB chunks takes under 4 MiB), so
what a manifest merely declares (a size of terabytes) costs no memory.
"""

import struct
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator

from ..errors import CorruptManifest
from .objects import DIGEST_SIZE, HOLE

MAGIC = b"VMLMAP1\n"
RECORD = struct.Struct("<Q32sI")

Record = tuple[int, bytes, int]


def encode(records: Iterable[Record]) -> bytes:
    """Encode records, which must come in increasing chunk order."""
    out = bytearray(MAGIC)
    last = -1
    for index, d, csize in records:
        if index <= last:
            raise ValueError("chunk map records out of order")
        last = index
        out += RECORD.pack(index, d, csize)
    return bytes(out)


def decode(data: bytes, chunk_count: int, where: str) -> list[Record]:
    """Decode and validate a chunk map for a stream of ``chunk_count`` chunks."""
    if not data.startswith(MAGIC) or (len(data) - len(MAGIC)) % RECORD.size:
        raise CorruptManifest(f"{where}: not a chunk map")
    records = list(RECORD.iter_unpack(memoryview(data)[len(MAGIC) :]))
    last = -1
    for index, _, _ in records:
        if index <= last or index >= chunk_count:
            raise CorruptManifest(f"{where}: chunk index {index} out of order or out of range")
        last = index
    return records


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def chunk_length(size: int, chunk_size: int, index: int) -> int:
    """The length of chunk ``index`` of a stream of ``size`` bytes (the last may be short)."""
    return min(chunk_size, size - index * chunk_size)


class ChunkTable:
    """Digest and stored size of every chunk of one disk or file that holds data.

    Only chunks with data take memory (8 + 32 + 4 bytes each, in three sorted
    arrays); a hole costs nothing, so a disk declared as terabytes of holes
    is as cheap as an empty one. A lookup is a binary search.
    """

    __slots__ = ("_csizes", "_digests", "_index", "chunk_size", "count", "size")

    def __init__(self, size: int, chunk_size: int):
        self.size = size
        self.chunk_size = chunk_size
        self.count = chunk_count(size, chunk_size)
        self._index = array("Q")
        self._digests = bytearray()
        self._csizes = array("I")

    def __len__(self) -> int:
        """The number of chunks that hold data."""
        return len(self._index)

    def _find(self, index: int) -> int:
        """Position of chunk ``index`` in the arrays, or -1 if it is a hole."""
        j = bisect_left(self._index, index)
        return j if j < len(self._index) and self._index[j] == index else -1

    def digest(self, index: int) -> bytes:
        j = self._find(index)
        if j < 0:
            return HOLE
        return bytes(self._digests[j * DIGEST_SIZE : (j + 1) * DIGEST_SIZE])

    def indexes_in(self, start: int, stop: int) -> array:
        """The indexes of chunks with data from ``start`` up to, not including, ``stop``."""
        return self._index[bisect_left(self._index, start) : bisect_left(self._index, stop)]

    def chunk_length(self, index: int) -> int:
        return chunk_length(self.size, self.chunk_size, index)

    def allocated(self) -> int:
        """Bytes of the stream in chunks that hold data (what st_blocks reports)."""
        n = len(self._index)
        if n and self._index[-1] == self.count - 1:
            return (n - 1) * self.chunk_size + self.chunk_length(self.count - 1)
        return n * self.chunk_size

    def apply(self, records: Iterable[Record]) -> None:
        """Apply a chunk map's records, in increasing index order (a hole record removes a chunk)."""
        old_index, old_digests, old_csizes = self._index, self._digests, self._csizes
        index, digests, csizes = array("Q"), bytearray(), array("I")
        pos = 0
        for i, d, csize in records:
            j = bisect_left(old_index, i, pos)
            if j > pos:  # the unchanged run before this record, copied whole
                index += old_index[pos:j]
                digests += old_digests[pos * DIGEST_SIZE : j * DIGEST_SIZE]
                csizes += old_csizes[pos:j]
            if j < len(old_index) and old_index[j] == i:
                j += 1  # replaced or removed
            if d != HOLE:
                index.append(i)
                digests += d
                csizes.append(csize)
            pos = j
        index += old_index[pos:]
        digests += old_digests[pos * DIGEST_SIZE :]
        csizes += old_csizes[pos:]
        self._index, self._digests, self._csizes = index, digests, csizes

    def resize(self, size: int) -> None:
        """Change the size; chunks past the end are dropped, new ones are holes."""
        count = chunk_count(size, self.chunk_size)
        if count < self.count:
            j = bisect_left(self._index, count)
            del self._index[j:]
            del self._digests[j * DIGEST_SIZE :]
            del self._csizes[j:]
        self.size, self.count = size, count

    def records(self) -> Iterator[Record]:
        """The chunks that hold data, as a full chunk map lists them."""
        mv = memoryview(self._digests)
        for j, i in enumerate(self._index):
            yield i, bytes(mv[j * DIGEST_SIZE : (j + 1) * DIGEST_SIZE]), self._csizes[j]

    def diff(self, ref: "ChunkTable | None") -> Iterator[Record]:
        """Records that turn ``ref`` (resized to this size) into this table."""
        if ref is None:
            yield from self.records()
            return
        mine = self.records()
        theirs = (r for r in ref.records() if r[0] < self.count)
        a, b = next(mine, None), next(theirs, None)
        while a is not None or b is not None:
            if b is None or (a is not None and a[0] < b[0]):
                yield a
                a = next(mine, None)
            elif a is None or b[0] < a[0]:
                yield b[0], HOLE, 0
                b = next(theirs, None)
            else:
                if a[1] != b[1]:
                    yield a
                a, b = next(mine, None), next(theirs, None)

    def digest_set(self) -> set[bytes]:
        mv = memoryview(self._digests)
        return {bytes(mv[o : o + DIGEST_SIZE]) for o in range(0, len(mv), DIGEST_SIZE)}

    def copy(self) -> "ChunkTable":
        t = ChunkTable(self.size, self.chunk_size)
        t._index, t._digests, t._csizes = array("Q", self._index), bytearray(self._digests), array("I", self._csizes)
        return t
