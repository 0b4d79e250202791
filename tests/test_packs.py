"""Pack files and their indexes (vml/repo/packs.py), without a repository."""

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vml.errors import CorruptObject
from vml.repo import objects, packs


def build(chunks: list[bytes]) -> tuple[bytes, bytes, bytes]:
    """(pack bytes, pack digest, index bytes) of ``chunks``."""
    b = packs.PackBuilder()
    data = bytearray()
    for c in chunks:
        frame = objects.compress(c)
        if b.add(objects.digest(c), frame) is not None:
            data += frame
    pack, index = b.seal()
    return bytes(data), pack, index


def read(pack_bytes: bytes, index: packs.Index, content: bytes) -> bytes:
    d = objects.digest(content)
    loc = index.find(d)
    assert loc is not None
    frame = pack_bytes[loc.offset : loc.offset + loc.length]
    return objects.decode(frame, d, 1 << 20, f"pack {loc.pack.hex()} at {loc.offset}")


@given(st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=40))
@settings(max_examples=60, deadline=None)
def test_every_object_added_is_found_and_reads_back(chunks):
    pack_bytes, pack, index_bytes = build(chunks)
    index = packs.Index(index_bytes, "test.idx", pack)
    assert index.pack == pack == packs.pack_digest(pack_bytes)
    assert index.pack_size == len(pack_bytes)
    assert index.count == len(set(chunks))  # each object once
    for c in chunks:
        assert read(pack_bytes, index, c) == c
    assert index.find(objects.digest(b"not in the pack")) is None
    # Pack order is the order of adding: objects lie back to back from offset 0.
    ends = 0
    for _, loc in index.in_pack_order():
        assert loc.offset == ends
        ends += loc.length
    assert ends == len(pack_bytes)


def test_a_flipped_bit_in_a_pack_fails_that_object_only():
    chunks = [os.urandom(5000) for _ in range(20)]
    pack_bytes, pack, index_bytes = build(chunks)
    index = packs.Index(index_bytes, "test.idx", pack)
    victim = chunks[7]
    loc = index.find(objects.digest(victim))
    damaged = bytearray(pack_bytes)
    damaged[loc.offset + loc.length // 2] ^= 0x10
    with pytest.raises(CorruptObject, match=f"pack {pack.hex()} at {loc.offset}"):
        read(bytes(damaged), index, victim)
    for c in chunks:
        if c is not victim:
            assert read(bytes(damaged), index, c) == c
    assert packs.pack_digest(bytes(damaged)) != pack  # a whole-pack check sees it too


def test_damaged_or_forged_indexes_are_refused():
    chunks = [os.urandom(100) for _ in range(5)]
    _, pack, good = build(chunks)
    head = len(packs.MAGIC)

    def resealed(body: bytes) -> bytes:  # a forgery with a valid checksum
        return body + packs.pack_digest(body)

    cases = {
        "not a pack index": [b"", b"VMLIDX2\n" + good[head:], good[:20]],
        "checksum": [good[:-1] + bytes([good[-1] ^ 1]), good[:50] + bytes([good[50] ^ 1]) + good[51:]],
        "length does not match": [resealed(good[:-32] + b"x" * 44), resealed(good[: -32 - 44])],
    }
    # Records out of order, an object past the pack's end, a zero length.
    records = [struct.unpack_from("<32sQI", good, head + 44 + i * 44) for i in range(5)]

    def forged(recs, size=None):
        body = packs.MAGIC + struct.pack("<32sQI", pack, size or 10**6, len(recs))
        body += b"".join(struct.pack("<32sQI", *r) for r in recs)
        return resealed(body)

    cases["not sorted"] = [forged([records[1], records[0], *records[2:]]), forged([records[0], records[0]])]
    d = records[0][0]
    cases["outside its pack"] = [
        forged([(d, 10**6 - 1, 2)]),
        forged([(d, 0, 0)]),
        forged([(d, 0, packs.MAX_OBJECT + 1)], size=packs.MAX_PACK),
        forged([(d, 2**64 - 1, 1)]),
    ]
    # A pack larger than any VML writes: its offsets could pass the end check and overflow a read.
    cases["declares a pack of"] = [forged([(d, 2**63 + 5, 1)], size=2**64 - 1), forged([], size=packs.MAX_PACK + 1)]
    for why, datas in cases.items():
        for data in datas:
            with pytest.raises(CorruptObject, match=why):
                packs.Index(data, "x.idx")
    with pytest.raises(CorruptObject, match="not of"):
        packs.Index(good, "x.idx", objects.digest(b"another pack"))
    # A forged count is refused before any record is read.
    huge = packs.MAGIC + struct.pack("<32sQI", pack, 0, 2**32 - 1)
    with pytest.raises(CorruptObject, match="length does not match"):
        packs.Index(resealed(huge), "x.idx")


def test_a_pack_refuses_empty_or_oversized_frames():
    b = packs.PackBuilder()
    with pytest.raises(ValueError):
        b.add(objects.digest(b"a"), b"")
    with pytest.raises(ValueError):
        b.add(objects.digest(b"a"), bytes(packs.MAX_OBJECT + 1))
    assert len(b) == 0 and b.size == 0
