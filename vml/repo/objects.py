"""Object encoding: BLAKE3 digests and zstd frames.

An object is one zstd frame whose header declares its decompressed size; it
is named by the BLAKE3 digest of the decompressed bytes. Decoding checks the
declared size against a limit *before* decompressing (python-zstandard
ignores ``max_output_size`` when the header carries a size, so a forged
header could otherwise make it allocate anything), then checks that the
frame is complete, that nothing trails it, and that the digest matches.

Compressor and decompressor contexts are not thread-safe; each thread keeps
its own. Both libraries release the GIL while they work, so worker threads
hash and compress in parallel.
"""

import threading
from collections.abc import Callable

import blake3
import zstandard

from ..errors import CorruptObject, ObjectTooLarge

DIGEST_SIZE = 32
HOLE = bytes(DIGEST_SIZE)  # stands for an all-zero chunk; never a real digest
COMPRESSION_LEVEL = 3
# An object's frame is never larger than a compressed 16 MiB chunk or a 64 MiB chunk map
# can become (zstd's bound is +0.4%); anything above is forged. The one bound of a frame.
MAX_OBJECT = (64 << 20) + (1 << 20)

_local = threading.local()


def digest(data) -> bytes:
    return blake3.blake3(data).digest()


def compress(data) -> bytes:
    comp = getattr(_local, "compressor", None)
    if comp is None:
        comp = _local.compressor = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL, write_content_size=True)
    return comp.compress(data)


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


def decode(blob: bytes, expected: bytes, limit: int, where: str | Callable[[], str]) -> bytes:
    """Decompress ``blob`` and check it against digest ``expected``.

    ``limit`` bounds the decompressed size; ``where`` names the object in
    error messages (a path or a hex digest), or is called for that name
    only when there is an error.
    """
    try:
        return _decode(blob, expected, limit)
    except CorruptObject as e:
        raise type(e)(f"{where() if callable(where) else where}: {e}") from None


def _decode(blob: bytes, expected: bytes, limit: int) -> bytes:
    try:
        size = zstandard.get_frame_parameters(blob).content_size
    except zstandard.ZstdError as e:
        raise CorruptObject(f"not a zstd frame ({e})") from None
    if size == zstandard.CONTENTSIZE_UNKNOWN or size == zstandard.CONTENTSIZE_ERROR:
        raise CorruptObject("zstd frame does not declare its size")
    if size > limit:
        raise ObjectTooLarge(f"decompresses to {size} bytes, more than the limit of {limit}")
    obj = _decompressor().decompressobj()
    try:
        data = obj.decompress(blob)
    except zstandard.ZstdError as e:
        raise CorruptObject(f"damaged zstd data ({e})") from None
    if not obj.eof or obj.unused_data or len(data) != size:
        raise CorruptObject("truncated or padded zstd frame")
    if digest(data) != expected:
        raise CorruptObject("content does not match its name")
    return data


def frame_limit(limit: int) -> int:
    """Most bytes a frame of ``limit`` bytes of content can take."""
    return min(MAX_OBJECT, limit + (limit >> 7) + (64 << 10))


def parse_hex(name: str) -> bytes | None:
    """The digest a hex object name stands for, or None if it is not one."""
    if len(name) != 2 * DIGEST_SIZE:
        return None
    try:
        return bytes.fromhex(name)
    except ValueError:
        return None
