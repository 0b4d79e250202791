"""A remote's cache: a transport in front of its HTTP transport, with quota, LRU eviction, pins, counters.

Files are kept under the names the origin gives them (vml.repo.paths):
whole packs and their indexes under ``packs/ab/``, pack sets under
``packsets/``, loose objects under ``objects/ab/``, each checked before it
is kept (a pack against its name, an index or pack set against the signed
catalog, an object against its digest). A frame fetched alone by a Range
request (a random read) is kept as its object's loose file, so that what
was read once reads offline. Readers check every frame again when they
decode it; a kept copy found damaged is dropped (``forget``) and fetched
again.

One fetch per file, however many readers want it: the first reader to
miss a file fetches it and the others wait for it (``_Job``); whole packs
asked for ahead (a sequential reader's fetch-ahead, preload) are fetched on
``PACK_CONNECTIONS`` threads, streamed into the cache's tmp/ and hashed as
they arrive, and a reader of a chunk in a pack on its way waits for the
pack rather than fetching its frame again.

A file's mtime is its last use: a hit touches it, so eviction removes the
least recently used first. The quota is soft: passing it evicts down to
the low mark (three quarters of the quota), never touching the objects and
packs of pinned entries; indexes and pack sets are small and not evicted.
Several processes (the mount and commands) share a cache; each keeps its
own running total and rescans the directory when it evicts, so they
cannot drift far. Counters (hits, misses, bytes fetched) are added to
``stats.json`` under a lock every few seconds and when the process ends.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

from ..errors import CorruptManifest, CorruptObject, FetchError, ObjectMissing, StorageError, VmlError
from ..files import storage_error, write_atomic
from ..progress import SILENT
from ..repo import paths
from ..repo.transport import LocalTransport, Whole
from .http import HttpTransport

log = logging.getLogger(__name__)

LOW_MARK = 0.75
STATS_EVERY = 2.0  # seconds between flushes of the counters
COUNTERS = ("hits", "misses", "fetched_bytes", "evicted")
PACK_CONNECTIONS = 4  # whole packs fetched at once (bench/packs.py: 4 reach curl's rate)


class _Job:
    """One fetch of one file; its waiters wait on ``done``, then look in the cache (or raise ``error``).

    A job asked for ahead waits on the pool's queue unclaimed; the first thread to claim it runs it: a pool
    thread, or a reader that needs the file now (it runs the fetch itself rather than wait behind the
    queue). Only a claimed job is waited for, and its fetch ends within the remote's timeout."""

    def __init__(self, name: str):
        self.name = name
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.data: bytes | None = None  # for its waiters, when the cache could not keep it
        self.claimed = False
        self.future = None  # on the pool's queue


class _Sink:
    """A whole file arriving into the cache's tmp/, hashed as it comes; named once complete and checked."""

    def __init__(self, tmp: Path, final: Path, name: str, where: str):
        self.final, self.name, self.where = final, name, where
        fd, self.tmp = tempfile.mkstemp(dir=tmp)
        self.file = os.fdopen(fd, "wb")  # buffered: a short write is written on, never lost
        self.hasher = blake3.blake3()
        self.size = 0
        self.error: OSError | None = None

    def write(self, block: bytes) -> None:
        self.hasher.update(block)
        self.size += len(block)
        if self.error is None:
            try:
                self.file.write(block)
            except OSError as e:  # a full cache: the transfer goes on, and finish says why nothing was kept
                self.error = e

    def finish(self, whole: Whole) -> "_Sink":
        self.file.close()
        if self.error is not None:
            self.discard()
            raise storage_error(self.error, f"keeping {self.name} in the cache")
        if self.size > whole.size or self.hasher.digest() != whole.digest:
            self.discard()
            raise CorruptObject(f"{self.where}: {self.name} does not match its name")
        try:
            self.final.parent.mkdir(exist_ok=True)
            os.rename(self.tmp, self.final)
        except OSError as e:
            self.discard()
            raise storage_error(e, f"keeping {self.name} in the cache") from None
        return self

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


STALE = 600.0  # seconds without a write after which a file in tmp/ is a killed fetch's


def _remove_stale(tmp: Path) -> None:
    """Remove what fetches killed mid-way left in tmp/ (a live fetch writes its file every moment)."""
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(tmp):
            with contextlib.suppress(OSError):
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE:
                    os.unlink(entry.path)


class CachedTransport:
    """The cache of one remote: a transport that keeps what its origin sends."""

    def __init__(self, path: Path, quota: int, origin: HttpTransport):
        self.path, self.quota, self.origin = path, quota, origin
        self.where = origin.where
        self.parallel = origin.parallel
        self.tmp = path / "tmp"
        for d in (path / paths.OBJECTS, path / paths.PACKS, path / paths.PACKSETS, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        paths.move_old_indexes(path)  # an earlier vml kept them in indexes/
        _remove_stale(self.tmp)
        self.local = LocalTransport(path)
        origin.keep = self._keep
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._size: int | None = None  # running total, from a scan
        self._evicting = False
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._flushed = time.monotonic()
        self.pinned_objects = lambda: set()  # set by the owner: objects and packs pinned entries need
        atexit.register(self.flush_stats)

    def shown(self, name: str) -> str:
        return f"{self.where} cache, {name}"

    def has(self, name: str) -> bool:
        return os.path.exists(self.path / name)

    def kept(self, name: str, limit: int) -> bytes | None:
        """The kept file ``name``, if it is here (nothing is fetched)."""
        return self._kept(name, limit, None)

    # -- loading ---------------------------------------------------------

    def load(self, name, limit, span=None, whole: Whole | None = None, check=None, alias=None) -> bytes:
        """A kept file (or range of it), else fetched through the origin, checked and kept.

        ``alias``: the name a range fetched alone is kept under (a frame: its object's loose file); a range
        without one is not kept."""
        data = self._kept(name, limit, span)
        if data is None and alias is not None:
            data = self._kept(alias, limit, None)
        if data is not None:
            return data
        self.count("misses")
        if span is not None and whole is not None and (self._under_way(name) or self.origin.fetcher.ranges is False):
            # On its way whole (asked for ahead), or the server sends only whole files: one fetch of the
            # file serves every reader of it. If that failed, the frame alone is fetched below.
            with contextlib.suppress(VmlError, OSError):
                self._once(name, lambda: self._whole(name, whole))
            if (data := self._kept(name, limit, span, count=False)) is not None:
                return data
        key = alias if span is not None else name

        def fetch() -> bytes:
            body = self.origin.load(name, limit, span, whole, check)
            self.count("fetched_bytes", len(body))
            if key is not None:
                self._keep(key, body)
            return body

        if key is None:
            return fetch()
        data = self._once(key, fetch)
        if data is None:  # another thread fetched and kept it
            data = self._kept(key, limit, None, count=False)
        return data if data is not None else fetch()  # evicted at once: fetched again, for this reader only

    def _kept(self, name: str, limit: int, span, count: bool = True) -> bytes | None:
        try:
            data = self.local.load(name, limit, span)
        except ObjectMissing:
            return None
        except CorruptObject as e:  # cut short, or not a regular file: fetch it again
            log.warning("%s; fetching it again", e)
            self.forget(name)
            return None
        if count:
            with contextlib.suppress(OSError):
                os.utime(self.path / name)
            self.count("hits")
        return data

    def _under_way(self, name: str) -> bool:
        with self._lock:
            return name in self._jobs

    def _claim(self, name: str) -> tuple[_Job, bool]:
        """The job for ``name`` (made if there is none), and whether the caller is to run it: a new job, or one
        queued on the pool and not started yet. False: another thread runs it; wait for it."""
        with self._lock:
            job = self._jobs.get(name)
            if job is None:
                job = self._jobs[name] = _Job(name)
            if job.claimed:
                return job, False
            job.claimed = True
            return job, True

    def _finish(self, job: _Job, error: BaseException | None = None) -> None:
        job.error = error
        with self._lock:
            if self._jobs.get(job.name) is job:
                del self._jobs[job.name]
        job.done.set()

    def _once(self, name: str, fetch) -> bytes | None:
        """``fetch()`` run once for ``name`` however many threads ask at the same time; what it returned to
        the thread that ran it and to those that waited (None: the file is kept by then)."""
        job, mine = self._claim(name)
        if not mine:
            job.done.wait()
            if job.error is not None:
                raise job.error
            return job.data
        try:
            job.data = fetch()
        except BaseException as e:
            self._finish(job, e)
            raise
        self._finish(job)
        return job.data

    def _whole(self, name: str, whole: Whole) -> bytes | None:
        """Fetch a whole file into the cache; None when it is kept (streamed there), else its bytes."""
        if self.has(name):
            return None  # a reader that asked before an earlier fetch of it ended
        if whole.digest is None:
            body = self.origin.whole_file(name, whole)
            self.count("fetched_bytes", len(body))
            self._keep(name, body)
            return body
        sink = self.origin.into(name, whole, lambda: _Sink(self.tmp, self.path / name, name, self.where))
        self.count("fetched_bytes", sink.size)
        self._grew(sink.size)
        return None

    # -- fetching ahead --------------------------------------------------

    def _pack_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:  # threads start at the first use
                self._pool = ThreadPoolExecutor(PACK_CONNECTIONS, thread_name_prefix="vml-packs")
            return self._pool

    def _start(self, name: str, whole: Whole) -> _Job | None:
        """A job fetching ``name`` whole on the pool (a new one, or the one under way); None if kept."""
        with self._lock:
            job = self._jobs.get(name)
        if job is not None:
            return job
        if self.has(name):
            return None
        pool = self._pack_pool()
        with self._lock:
            job = self._jobs.get(name)
            if job is not None:
                return job
            job = self._jobs[name] = _Job(name)
        try:
            job.future = pool.submit(self._run, whole, job)
        except RuntimeError as e:  # the interpreter is ending: nothing more runs on the pool
            self._finish(job, FetchError(f"{self.where}: {name} not fetched ({e})"))
        return job

    def _run(self, whole: Whole, job: _Job) -> None:
        with self._lock:
            if job.claimed:  # a reader needed it first and fetched it itself
                return
            job.claimed = True
        try:
            self._whole(job.name, whole)
        except BaseException as e:  # a reader that needs it fetches its frame and says why if that fails too
            log.debug("%s: fetching %s ahead failed: %s", self.where, job.name, e)
            self._finish(job, e)
            return
        self._finish(job)

    def _cancel(self, jobs: list[_Job]) -> None:
        """Take jobs that no thread has started off the pool's queue (a preload that failed or was stopped)."""
        for job in jobs:
            if job.future is not None and job.future.cancel():
                self._finish(job, FetchError(f"{self.where}: {job.name} not fetched (cancelled)"))

    def prefetch(self, wanted) -> None:
        """Start fetching these whole files in the background (those not kept or on their way)."""
        for name, whole in wanted:
            self._start(name, whole)

    def fetch(self, wanted, progress=SILENT) -> None:
        """Fetch these whole files now, on a few connections; ``progress`` advances as each arrives.

        Only the pool's threads fetch and only this thread waits, so a file
        already on its way (asked for ahead) is waited for, never fetched
        twice, and no pool thread ever waits for work queued behind it.
        """
        jobs = []
        try:
            for name, whole in wanted:
                job = self._start(name, whole)
                if job is None:
                    progress.advance(1)
                else:
                    jobs.append(job)
            while jobs:
                arrived = [job for job in jobs if job.done.is_set()]
                if not arrived:
                    jobs[0].done.wait(0.05)
                for job in arrived:
                    jobs.remove(job)
                    if job.error is not None:
                        raise job.error
                    progress.advance(1)
        except BaseException:  # an error, or Ctrl-C: what has not started is not fetched on the way out
            self._cancel(jobs)
            raise

    # -- keeping ---------------------------------------------------------

    def forget(self, name: str) -> None:
        """Drop a kept file found damaged: the next load fetches it again."""
        self.local.forget(name)
        (self.path / name).unlink(missing_ok=True)

    def _keep(self, name: str, blob: bytes) -> None:
        p = self.path / name
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
            log.warning("cache %s: cannot keep %s (%s)", self.path, name, storage_error(e, "writing"))
            return
        self._grew(len(blob))

    def _grew(self, n: int) -> None:
        with self._lock:
            if self._size is not None:
                self._size += n
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
        packs = ((d, p) for d, p, _ in paths.packs_in(self.path) if not paths.is_index(p))
        for d, p in [*((d, p) for d, p, _ in paths.objects_in(self.path)), *packs]:
            if d is not None:
                with contextlib.suppress(FileNotFoundError):
                    st = p.stat()
                    out.append((st.st_mtime, st.st_size, d, p))
        return out

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
                    self.local.forget(str(p.relative_to(self.path)))  # its space is freed once closed
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
        packs = sum(1 for *_, p in found if p.parent.parent.name == paths.PACKS)
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
