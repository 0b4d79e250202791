"""Chunk maps and chunk tables.

A *chunk map* is the stored form: a sorted list of records (chunk index,
object digest, stored size) for one disk or file of one entry. A full entry
lists every chunk that is not all zeros; a delta lists only the chunks that
differ from its reference, with the HOLE digest for chunks that became zero.
The stored size lets a reader know an object's size before fetching it (to
bound downloads and to count bytes) without touching the object.

A *chunk table* is the resolved, in-memory form: a dense array of digests for
every chunk of a disk, built once per open by applying the maps of a chain
from its base upward. 32 bytes + 4 bytes per chunk: a 20 GiB disk at 256 KiB
chunks takes under 3 MiB.
"""

import struct
from array import array
from collections.abc import Iterable, Iterator

from .errors import CorruptManifest
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


class ChunkTable:
    """Digest and stored size of every chunk of one disk or file."""

    __slots__ = ("chunk_size", "count", "csizes", "digests", "size")

    def __init__(self, size: int, chunk_size: int):
        self.size = size
        self.chunk_size = chunk_size
        self.count = chunk_count(size, chunk_size)
        self.digests = bytearray(self.count * DIGEST_SIZE)
        self.csizes = array("I", bytes(4 * self.count))

    def digest(self, index: int) -> bytes:
        if index >= self.count:
            return HOLE
        o = index * DIGEST_SIZE
        return bytes(self.digests[o : o + DIGEST_SIZE])

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def apply(self, records: Iterable[Record]) -> None:
        for index, d, csize in records:
            o = index * DIGEST_SIZE
            self.digests[o : o + DIGEST_SIZE] = d
            self.csizes[index] = csize

    def resize(self, size: int) -> None:
        """Change the size; chunks past the end are dropped, new ones are holes."""
        count = chunk_count(size, self.chunk_size)
        if count < self.count:
            del self.digests[count * DIGEST_SIZE :]
            del self.csizes[count:]
        else:
            self.digests.extend(bytes((count - self.count) * DIGEST_SIZE))
            self.csizes.extend(array("I", bytes(4 * (count - self.count))))
        self.size, self.count = size, count

    def records(self) -> Iterator[Record]:
        """The chunks that hold data, as a full chunk map lists them."""
        mv = memoryview(self.digests)
        for i in range(self.count):
            d = mv[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
            if d != HOLE:
                yield i, bytes(d), self.csizes[i]

    def diff(self, ref: "ChunkTable | None") -> Iterator[Record]:
        """Records that turn ``ref`` (resized to this size) into this table."""
        if ref is None:
            yield from self.records()
            return
        mine, theirs = memoryview(self.digests), memoryview(ref.digests)
        shared = min(self.count, ref.count) * DIGEST_SIZE
        for i in range(self.count):
            o = i * DIGEST_SIZE
            d = mine[o : o + DIGEST_SIZE]
            r = theirs[o : o + DIGEST_SIZE] if o < shared else HOLE
            if d != r:
                yield i, bytes(d), self.csizes[i]

    def digest_set(self) -> set[bytes]:
        mv = memoryview(self.digests)
        out = {bytes(mv[o : o + DIGEST_SIZE]) for o in range(0, len(mv), DIGEST_SIZE)}
        out.discard(HOLE)
        return out

    def copy(self) -> "ChunkTable":
        t = ChunkTable.__new__(ChunkTable)
        t.size, t.chunk_size, t.count = self.size, self.chunk_size, self.count
        t.digests, t.csizes = bytearray(self.digests), array("I", self.csizes)
        return t
