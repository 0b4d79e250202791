"""Pack files: many objects in one file, and the index that finds them.

A pack is the concatenation of object frames, each exactly the bytes a
loose object would hold, in the order they were written (a save writes a
disk's chunks in disk order). It is named by the BLAKE3 digest of its
bytes, so it never changes once named, any HTTP cache may keep it whole,
and a whole pack can be checked in one pass over its compressed bytes.

Its index lists, sorted by object digest, where each object lies::

    b"VMLIDX1\\n"                       magic
    pack digest (32) pack size (u64) count (u32)
    count x (object digest (32), offset (u64), length (u32))
    BLAKE3 of everything above (32)

All integers little-endian. A reader checks the index whole before using
it (its own digest, sorted unique digests, every object inside the pack),
and still checks each object as it reads it (objects.decode), so a
damaged pack fails only the objects whose bytes are damaged, never their
neighbours, and never returns wrong bytes.
"""

import bisect
import struct
from dataclasses import dataclass

import blake3

from ..errors import CorruptObject
from .objects import DIGEST_SIZE, MAX_OBJECT

MAGIC = b"VMLIDX1\n"
_HEAD = struct.Struct("<32sQI")
_RECORD = struct.Struct("<32sQI")
RECORD_SIZE = _RECORD.size  # 44
PACK_SIZE = 8 << 20  # a pack is sealed once it holds this much (docs/format.md) ...
MAX_PACK = PACK_SIZE + MAX_OBJECT  # ... so none is larger: an index saying more is forged
# Bounds a forged index before it is read whole: a million objects is a
# pack of at least 4 GiB of 4 KiB chunks, far above any pack VML writes.
MAX_COUNT = 1 << 20
MAX_INDEX = len(MAGIC) + _HEAD.size + MAX_COUNT * RECORD_SIZE + DIGEST_SIZE


@dataclass(frozen=True)
class Location:
    """Where an object lies: in which pack, at which offset, how long."""

    pack: bytes
    offset: int
    length: int


def encode_index(pack: bytes, pack_size: int, records: list[tuple[bytes, int, int]]) -> bytes:
    """The index of a pack of ``pack_size`` bytes holding ``records`` (digest, offset, length)."""
    records = sorted(records)
    body = bytearray(MAGIC)
    body += _HEAD.pack(pack, pack_size, len(records))
    for d, offset, length in records:
        body += _RECORD.pack(d, offset, length)
    body += blake3.blake3(body).digest()
    return bytes(body)


class Index:
    """A checked pack index: finds an object's place by binary search."""

    def __init__(self, data: bytes, where: str, pack: bytes | None = None):
        """Parse and check ``data`` (``where`` names it in errors) as the index of ``pack``, when given."""
        fixed = len(MAGIC) + _HEAD.size + DIGEST_SIZE
        if len(data) < fixed or len(data) > MAX_INDEX or not data.startswith(MAGIC):
            raise CorruptObject(f"{where}: not a pack index")
        if blake3.blake3(data[:-DIGEST_SIZE]).digest() != data[-DIGEST_SIZE:]:
            raise CorruptObject(f"{where}: pack index is damaged (checksum)")
        self.pack, self.pack_size, count = _HEAD.unpack_from(data, len(MAGIC))
        if pack is not None and self.pack != pack:
            raise CorruptObject(f"{where}: index of pack {self.pack.hex()}, not of {pack.hex()}")
        if self.pack_size > MAX_PACK:
            raise CorruptObject(f"{where}: pack index declares a pack of {self.pack_size} bytes (at most {MAX_PACK})")
        if count > MAX_COUNT or len(data) != fixed + count * RECORD_SIZE:
            raise CorruptObject(f"{where}: pack index length does not match its {count} records")
        start = len(MAGIC) + _HEAD.size
        self._records = memoryview(data)[start : start + count * RECORD_SIZE]
        self.count = count
        previous = b""
        for i in range(count):
            d, offset, length = _RECORD.unpack_from(self._records, i * RECORD_SIZE)
            if d <= previous:
                raise CorruptObject(f"{where}: pack index is not sorted by digest")
            if length == 0 or length > MAX_OBJECT or offset + length > self.pack_size:
                raise CorruptObject(f"{where}: object {d.hex()} lies outside its pack")
            previous = d
        self.where = where

    def _digest(self, i: int) -> bytes:
        return bytes(self._records[i * RECORD_SIZE : i * RECORD_SIZE + DIGEST_SIZE])

    def find(self, digest: bytes) -> Location | None:
        i = bisect.bisect_left(range(self.count), digest, key=self._digest)
        if i == self.count or self._digest(i) != digest:
            return None
        _, offset, length = _RECORD.unpack_from(self._records, i * RECORD_SIZE)
        return Location(self.pack, offset, length)

    def __iter__(self):
        """(digest, Location) of every object, in digest order."""
        for i in range(self.count):
            d, offset, length = _RECORD.unpack_from(self._records, i * RECORD_SIZE)
            yield d, Location(self.pack, offset, length)

    def in_pack_order(self) -> list[tuple[bytes, Location]]:
        """Every object in the order it lies in the pack."""
        return sorted(self, key=lambda r: r[1].offset)


class PackBuilder:
    """Collects object frames into one pack's bytes, in the order given, each object once."""

    def __init__(self):
        self._hasher = blake3.blake3()
        self.size = 0
        self.records: list[tuple[bytes, int, int]] = []
        self._seen: set[bytes] = set()

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._seen

    def __len__(self) -> int:
        return len(self.records)

    def add(self, digest: bytes, frame: bytes) -> int | None:
        """Append ``frame`` as object ``digest``; its offset, or None if the pack holds it already."""
        if digest in self._seen:
            return None
        if not frame or len(frame) > MAX_OBJECT:
            raise ValueError(f"object frame of {len(frame)} bytes")
        offset = self.size
        self._hasher.update(frame)
        self.size += len(frame)
        self.records.append((digest, offset, len(frame)))
        self._seen.add(digest)
        return offset

    def seal(self) -> tuple[bytes, bytes]:
        """(pack digest, index bytes) for what was added."""
        pack = self._hasher.digest()
        return pack, encode_index(pack, self.size, self.records)


def pack_digest(data) -> bytes:
    return blake3.blake3(data).digest()
