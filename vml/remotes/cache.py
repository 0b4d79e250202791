"""The local object cache of one remote: quota, LRU eviction, pins, counters.

Objects are kept as fetched (compressed, already checked against their
digest) under ``objects/ab/cdef...``, and whole packs fetched from a remote
that publishes packs (checked against their name) under ``packs/ab/<pack>``:
one file per pack, read a frame at a time, so a preload writes a few files
rather than one per chunk. A file's mtime is its last use: a hit touches
it, so eviction removes the least recently used first. The quota is
soft: passing it evicts down to the low mark (three quarters of the quota),
never touching the objects and packs of pinned entries. Several processes (the mount
and commands) share a cache; each keeps its own running total and rescans
the directory when it evicts, so they cannot drift far.

Counters (hits, misses, bytes fetched) are added to ``stats.json`` under a
lock every few seconds and when the process ends.
"""

import atexit
import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from .. import layout
from ..errors import CorruptManifest, StorageError, VmlError
from ..files import storage_error, write_atomic
from ..repo.objects import parse_hex
from ..repo.packfiles import PACKS, pack_path

log = logging.getLogger(__name__)

LOW_MARK = 0.75
STATS_EVERY = 2.0  # seconds between flushes of the counters
COUNTERS = ("hits", "misses", "fetched_bytes", "evicted")


class ObjectCache:
    def __init__(self, path: Path, quota: int):
        self.path = path
        self.quota = quota
        self.tmp = path / "tmp"
        for d in (path / layout.OBJECTS, path / PACKS, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._size: int | None = None  # running total, from a scan
        self._evicting = False
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._flushed = time.monotonic()
        self.pinned_objects = lambda: set()  # set by the owner: objects and packs pinned entries need
        atexit.register(self.flush_stats)

    def _path(self, digest: bytes) -> Path:
        return layout.object_path(self.path, digest)

    def discard(self, digest: bytes) -> None:
        """Forget a cached object (found damaged)."""
        self._path(digest).unlink(missing_ok=True)

    # -- objects ---------------------------------------------------------

    def get(self, digest: bytes) -> bytes | None:
        """The stored bytes of a cached object, or None; a hit makes it most recently used."""
        p = self._path(digest)
        try:
            with open(p, "rb") as f:
                blob = f.read()
                os.utime(f.fileno())
        except FileNotFoundError:
            self.count("misses")
            return None
        except OSError as e:
            log.warning("cache %s: cannot read %s (%s); fetching it again", self.path, p, e.strerror)
            self.count("misses")
            return None
        self.count("hits")
        return blob

    def peek(self, digest: bytes) -> bytes | None:
        """The stored bytes if cached, without counting a hit or a miss."""
        try:
            return self._path(digest).read_bytes()
        except OSError:
            return None

    def has(self, digest: bytes) -> bool:
        return self._path(digest).exists()

    def size_of(self, digest: bytes) -> int | None:
        try:
            return self._path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def put(self, digest: bytes, blob: bytes) -> None:
        """Keep a checked object; past the quota, evict down to the low mark."""
        self._keep(self._path(digest), blob, f"object {digest.hex()}")

    # -- whole packs -----------------------------------------------------

    def has_pack(self, pack: bytes) -> bool:
        return pack_path(self.path, pack).exists()

    def put_pack(self, pack: bytes, data: bytes) -> None:
        """Keep a whole pack, checked against its name."""
        self._keep(pack_path(self.path, pack), data, f"pack {pack.hex()}")

    def read_frame(self, pack: bytes, offset: int, length: int, count: bool = True) -> bytes | None:
        """The ``length`` bytes at ``offset`` of a cached pack (a hit makes it most recently used), or None."""
        try:
            with open(pack_path(self.path, pack), "rb", buffering=0) as f:
                frame = os.pread(f.fileno(), length, offset)
                if count:
                    os.utime(f.fileno())
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cache %s: cannot read pack %s (%s); fetching it again", self.path, pack.hex(), e.strerror)
            return None
        if len(frame) != length:  # a pack cut short: what it holds is not what it was checked as
            self.discard_pack(pack)
            return None
        if count:
            self.count("hits")
        return frame

    def discard_pack(self, pack: bytes) -> None:
        """Forget a cached pack (found damaged)."""
        pack_path(self.path, pack).unlink(missing_ok=True)

    def _keep(self, p: Path, blob: bytes, what: str) -> None:
        try:
            p.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.rename(tmp, p)
        except OSError as e:
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)
            # A full or broken cache must not fail a read that was served.
            log.warning("cache %s: cannot keep %s (%s)", self.path, what, storage_error(e, "writing"))
            return
        with self._lock:
            if self._size is not None:
                self._size += len(blob)
            over = self._size is None or self._size > self.quota
        if over:
            try:
                self.evict()
            except (VmlError, OSError) as e:  # the read was served; the cache can shrink later
                log.warning("cache %s: cannot evict (%s)", self.path, e)

    # -- quota -----------------------------------------------------------

    def scan(self) -> list[tuple[float, int, bytes, Path]]:
        """(last use, size, digest, path) of every cached object and pack."""
        out = []
        for d, p in [*((d, p) for d, p, _ in layout.objects_in(self.path)), *self._packs_in()]:
            if d is not None:
                with contextlib.suppress(FileNotFoundError):
                    st = p.stat()
                    out.append((st.st_mtime, st.st_size, d, p))
        return out

    def _packs_in(self):
        for p, problem in layout.fanout(self.path / PACKS):
            d = None if problem else parse_hex(p.name)
            yield (d if d is not None and p.name.startswith(p.parent.name) else None), p

    def evict(self, target: int | None = None) -> int:
        """Remove least recently used, unpinned objects until at most ``target`` bytes remain."""
        with self._lock:
            if self._evicting:
                return 0
            self._evicting = True
        try:
            found = self.scan()
            total = sum(s for _, s, _, _ in found)
            limit = int(self.quota * LOW_MARK) if target is None else target
            removed = 0
            if total > (self.quota if target is None else target):
                pinned = self.pinned_objects()
                for _, size, d, p in sorted(found):
                    if total <= limit:
                        break
                    if d in pinned:
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                        total -= size
                        removed += 1
                if target is None and total > limit:  # clear keeps pinned objects by design: no warning
                    log.warning("cache %s: pinned entries alone hold more than the low mark of the quota", self.path)
                self.count("evicted", removed)
            with self._lock:
                self._size = total
            return removed
        finally:
            with self._lock:
                self._evicting = False

    def usage(self) -> tuple[int, int, int]:
        """(objects, packs, bytes) in the cache now."""
        found = self.scan()
        packs = sum(1 for *_, p in found if p.parent.parent.name == PACKS)
        return len(found) - packs, packs, sum(s for _, s, _, _ in found)

    def clear(self) -> int:
        """Remove every object that no pinned entry needs; return how many."""
        before = len(self.scan())
        self.evict(target=0)
        return before - len(self.scan())

    # -- pins ------------------------------------------------------------

    def pins(self) -> dict[str, bytes]:
        """Pinned entries: name -> manifest digest (their objects and packs are never evicted)."""
        try:
            doc = json.loads((self.path / "pins.json").read_bytes())
            return {n: bytes.fromhex(h) for n, h in doc.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as e:
            raise CorruptManifest(f"{self.path / 'pins.json'}: unreadable ({e})") from None

    def set_pins(self, pins: dict[str, bytes]) -> None:
        write_atomic(
            self.path / "pins.json", (json.dumps({n: d.hex() for n, d in sorted(pins.items())}) + "\n").encode()
        )

    # -- counters --------------------------------------------------------

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self._counts[what] += n
            due = time.monotonic() - self._flushed > STATS_EVERY
        if due:
            self.flush_stats()

    def flush_stats(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, dict.fromkeys(COUNTERS, 0)
            self._flushed = time.monotonic()
        if not any(counts.values()):
            return
        try:
            with self._stats_lock():
                stats = self.stats()
                for k, v in counts.items():
                    stats[k] = stats.get(k, 0) + v
                write_atomic(self.path / "stats.json", (json.dumps(stats) + "\n").encode())
        except (OSError, StorageError, CorruptManifest) as e:
            log.warning("cache %s: cannot update counters (%s)", self.path, e)

    def stats(self) -> dict:
        try:
            doc = json.loads((self.path / "stats.json").read_bytes())
        except FileNotFoundError:
            return dict.fromkeys(COUNTERS, 0)
        except (OSError, ValueError) as e:
            raise CorruptManifest(f"{self.path / 'stats.json'}: unreadable ({e})") from None
        return {k: int(doc.get(k, 0)) for k in COUNTERS}

    @contextlib.contextmanager
    def _stats_lock(self):
        with open(self.path / "stats.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
