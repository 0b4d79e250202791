"""Digest and compression speed on this machine, per chunk, on real data.

The measurement behind two format decisions: the digest (BLAKE3 against the
anchor hashlib SHA-256) and the zstd level. Data: 256 MiB of real system
files cut into chunks of the repository's candidate sizes.

    .venv/bin/python bench/primitives.py
"""

import hashlib
import os
import time

import blake3
import zstandard

from common import print_table

SIZE = 256 << 20


def corpus() -> bytes:
    buf = bytearray()
    for root, dirs, files in os.walk("/usr/lib"):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            try:
                with open(p, "rb") as fh:
                    buf += fh.read()
            except OSError:
                continue
            if len(buf) >= SIZE:
                return bytes(buf[:SIZE])
    return bytes(buf)


def speed(fn, chunks) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for c in chunks:
            fn(c)
        best = min(best, time.perf_counter() - t0)
    return sum(map(len, chunks)) / best / 1e6


def main() -> None:
    data = corpus()
    rows = []
    for cs in (64 << 10, 256 << 10, 1 << 20):
        chunks = [data[i : i + cs] for i in range(0, len(data), cs)]
        row = [f"{cs >> 10}K"]
        row.append(f"{speed(lambda c: hashlib.sha256(c).digest(), chunks):.0f}")
        row.append(f"{speed(lambda c: blake3.blake3(c).digest(), chunks):.0f}")
        for level in (1, 3):
            z = zstandard.ZstdCompressor(level=level)
            comp = [z.compress(c) for c in chunks]
            row.append(f"{speed(z.compress, chunks):.0f} (x{len(data) / sum(map(len, comp)):.2f})")
        d = zstandard.ZstdDecompressor()
        comp = [zstandard.ZstdCompressor(level=3).compress(c) for c in chunks]
        row.append(f"{speed(d.decompress, comp) * sum(map(len, chunks)) / sum(map(len, comp)):.0f}")
        rows.append(row)
    print_table(
        "MB/s per core on 256 MiB of /usr/lib (best of 3); compression ratio in brackets",
        ["chunk", "sha256", "blake3", "zstd -1", "zstd -3", "unzstd (output MB/s)"],
        rows,
    )


if __name__ == "__main__":
    main()
