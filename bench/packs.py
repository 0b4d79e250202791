"""What unit to store and fetch chunks in: one file per chunk, or packs of a few MiB.

The input for repository format 2. A 1 GiB ext4 image made with mkfs.ext4 -d
from real system files is cut into 256 KiB chunks, each compressed (zstd 3)
as VML stores it; the same frames are then laid out

- as loose objects, one file per chunk (`objects/ab/cdef...`, format 1);
- in packs of 1, 4, 8 and 16 MiB, in disk order, with their indexes.

Local: a cold read of every chunk in disk order (page cache dropped), each
frame read, decompressed and its BLAKE3 checked, on 2 threads as the mount
reads ahead, against `cat` of the same bytes as one file (the anchor).

HTTP, from nginx on loopback and through the tests' latency proxy at 20 ms
round trip: every chunk fetched as its own object, and every pack fetched
whole, with requests (a Session, as vml/remotes/fetch.py does) and with
pycurl (one reused handle), on 4 connections, against curl of the one
file. It also prints the client CPU per request.

    .venv/bin/python bench/packs.py [--workdir DIR] [--repeat N]
"""

import argparse
import os
import resource
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import pycurl
import requests

from vml.repo import objects, packs, paths

from common import drop_caches, mkfs_ext4, need, print_table, real_tree, run
from servers import FaultProxy, Nginx

CHUNK = 256 << 10
PACK_SIZES = (1, 4, 8, 16)  # MiB
CONNECTIONS = 4


def frames_of(image: Path) -> list[tuple[bytes, bytes]]:
    """(digest, frame) of every chunk with data, in disk order, each digest once."""
    out, seen = [], set()
    with open(image, "rb") as f:
        while chunk := f.read(CHUNK):
            if chunk.count(0) == len(chunk):
                continue
            d = objects.digest(chunk)
            if d not in seen:
                seen.add(d)
                out.append((d, objects.compress(chunk)))
    return out


def lay_out(root: Path, frames) -> dict:
    """Write the frames loose and in packs of each size; return what a reader needs."""
    shutil.rmtree(root, ignore_errors=True)
    # (digest, file, offset, length); offset None: the whole file is the object
    layouts = {"loose": [(d, paths.object_path(root / "loose", d), None, len(f)) for d, f in frames]}
    for _, path, _, _ in layouts["loose"]:
        path.parent.mkdir(parents=True, exist_ok=True)
    for (_, f), (_, path, _, _) in zip(frames, layouts["loose"], strict=True):
        path.write_bytes(f)
    with open(root / "all.bin", "wb") as out:
        for _, f in frames:
            out.write(f)
    for mib in PACK_SIZES:
        layouts[f"packs of {mib} MiB"] = write_packs(root / f"packs{mib}", frames, mib << 20)
    os.sync()
    return layouts


def write_packs(directory: Path, frames, target: int) -> list:
    """Frames in disk order into packs of about ``target`` bytes; where each one lies."""
    directory.mkdir(parents=True)
    where = []
    groups, group, size = [], [], 0
    for d, f in frames:
        group.append((d, f))
        size += len(f)
        if size >= target:
            groups.append(group)
            group, size = [], 0
    groups += [group] if group else []
    for group in groups:
        builder = packs.PackBuilder()
        for d, f in group:
            builder.add(d, f)
        pack, index = builder.seal()
        (directory / pack.hex()).write_bytes(b"".join(f for _, f in group))
        (directory / (pack.hex() + ".idx")).write_bytes(index)
        where += [(d, directory / pack.hex(), offset, length) for d, offset, length in builder.records]
    return where


def cold_local(where, threads: int = 2) -> float:
    """Seconds to read and check every chunk, in disk order, page cache dropped."""
    drop_caches()
    fds: dict[Path, int] = {}
    lock = threading.Lock()

    def one(item):
        d, path, offset, length = item
        if offset is None:  # one file per chunk: open, read, close
            with open(path, "rb") as f:
                frame = f.read()
        else:
            with lock:
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY)
            frame = os.pread(fd, length, offset)
        objects.decode(frame, d, CHUNK, str(path))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(one, where, chunksize=8):
            pass
    seconds = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return seconds


def fetch_requests(urls: list[str]) -> tuple[float, float, int]:
    """(seconds, client CPU seconds, bytes) to GET every URL on CONNECTIONS sessions."""
    local = threading.local()

    def one(url):
        s = getattr(local, "s", None)
        if s is None:
            s = local.s = requests.Session()
        r = s.get(url, timeout=30)
        r.raise_for_status()
        return len(r.content)

    return _timed(one, urls)


def fetch_pycurl(urls: list[str]) -> tuple[float, float, int]:
    local = threading.local()

    def one(url):
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = pycurl.Curl()
        buf = bytearray()
        c.setopt(pycurl.URL, url)
        c.setopt(pycurl.WRITEFUNCTION, buf.extend)
        c.perform()
        if c.getinfo(pycurl.RESPONSE_CODE) != 200:
            raise RuntimeError(f"{url}: {c.getinfo(pycurl.RESPONSE_CODE)}")
        return len(buf)

    return _timed(one, urls)


def _timed(one, urls) -> tuple[float, float, int]:
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        total = sum(pool.map(one, urls))
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return t1 - t0, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/vml-bench-packs"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    need("mkfs.ext4", "nginx", "curl")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    image = work / "disk.img"
    if not image.exists():
        mkfs_ext4(image, "1G", real_tree(work / "tree", 600))
    frames = frames_of(image)
    stored = sum(len(f) for _, f in frames)
    layouts = lay_out(work / "layouts", frames)
    print(f"{len(frames)} chunks with data, {stored / 1e6:.0f} MB stored")

    rows = []
    anchor = statistics.median(_cat(work / "layouts" / "all.bin") for _ in range(args.repeat))
    rows.append(["cat of the same bytes as one file (anchor)", "1", f"{stored / anchor / 1e6:.0f}", "1.00x"])
    for name, where in layouts.items():
        files = len({p for _, p, _, _ in where}) * (1 if name == "loose" else 2)
        s = statistics.median(cold_local(where) for _ in range(args.repeat))
        rows.append([name, files, f"{stored / s / 1e6:.0f}", f"{anchor / s:.2f}x"])
    print_table(
        "Cold local read of every chunk, disk order, 2 threads, decompressed and checked",
        ["layout", "files", "MB/s stored", "vs anchor"],
        rows,
    )

    origin = Nginx(work / "layouts")
    try:
        for label, delay in (("loopback", 0.0), ("20 ms RTT", 0.010)):
            proxy = FaultProxy(origin.port, delay=delay) if delay else None
            base = proxy.url if proxy else origin.url
            try:
                rows = []
                curl = statistics.median(
                    run(["curl", "-sf", "-o", "/dev/null", f"{base}/all.bin"]).seconds for _ in range(args.repeat)
                )
                rows.append(["curl, one file (anchor)", 1, f"{stored / curl / 1e6:.0f}", "", "1.00x"])
                for name, where in layouts.items():
                    files = dict.fromkeys(p for _, p, _, _ in where)  # in disk order, each once
                    urls = [f"{base}/{p.relative_to(work / 'layouts')}" for p in files]
                    for client, fn in (("requests", fetch_requests), ("pycurl", fetch_pycurl)):
                        results = [fn(urls) for _ in range(args.repeat)]
                        s = statistics.median(r[0] for r in results)
                        cpu = statistics.median(r[1] for r in results) / len(urls)
                        assert all(r[2] == stored for r in results), "short fetch"
                        rows.append(
                            [
                                f"{name}, {client}",
                                len(urls),
                                f"{stored / s / 1e6:.0f}",
                                f"{cpu * 1e3:.2f}",
                                f"{curl / s:.2f}x",
                            ]
                        )
            finally:
                if proxy:
                    proxy.stop()
            print_table(
                f"Fetching every chunk over HTTP, {label}, {CONNECTIONS} connections",
                ["unit, client", "requests", "MB/s", "client CPU ms/request", "vs curl"],
                rows,
            )
    finally:
        origin.stop()


def _cat(path: Path) -> float:
    drop_caches()
    return run(["cat", path]).seconds


if __name__ == "__main__":
    main()
