"""A remote's chunks read out of its published packs (catalog format 3).

A repository published as packs (docs/format.md) serves ``packs/ab/<pack>``
with its index ``packs/ab/<pack>.idx``, and for every entry
``packsets/<manifest>``, the packs its data lies in. The signed catalog
gives the BLAKE3 of every pack set and every index, and a pack is named by
the BLAKE3 of its bytes: everything is checked against the signature before
it is used, and each chunk is still checked against its digest when read.

A reader of an entry first loads its pack set and those packs' indexes
(kept in the cache directory, so an entry once opened opens offline). Then:

- a sequential reader's fetch-ahead and preload fetch **whole packs**, on a
  few connections, each checked in one pass and kept whole in the cache
  (one file per pack; each chunk is still checked when it is read). Whole
  packs are what Squid and CDNs cache, and one request brings tens of
  chunks;
- any other read fetches only its chunk's frame, by a Range request: at
  most one frame, the chunk size plus zstd's bound (``RANDOM_READ_BOUND``).
  A server that ignores Range (a plain static server answers 200 and the
  whole file) sends the whole pack instead: it is checked against its name
  and kept whole like a pack fetched ahead, and from then on every read of
  a pack not cached fetches it whole, once however many readers want it.
"""

import logging
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

from ..errors import CorruptManifest, CorruptObject
from ..files import write_atomic
from ..progress import SILENT, Progress
from ..repo.packfiles import MAX_PACKSET, decode_packset
from ..repo.packs import MAX_INDEX, MAX_OBJECT, Index, Location
from .cache import ObjectCache
from .catalog import Catalog
from .fetch import Fetcher

log = logging.getLogger(__name__)

PACK_CONNECTIONS = 4  # whole packs fetched at once (bench/packs.py: 4 reach curl's rate)
INDEX_CONNECTIONS = 16  # indexes fetched at once: small, so it is round trips that count
RANDOM_READ_BOUND = MAX_OBJECT  # bytes a read outside a sequential run may fetch: one frame


def pack_url(pack: bytes) -> str:
    h = pack.hex()
    return f"packs/{h[:2]}/{h}"


class _Job:
    def __init__(self):
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.data: bytes | None = None  # the pack, for its waiters when the cache could not keep it


class RemotePacks:
    """Where a remote's chunks lie in its packs, and fetching them from there."""

    def __init__(self, cache_dir: Path, fetcher: Fetcher, cache: ObjectCache, where: str):
        self.dir, self.fetcher, self.cache, self.where = cache_dir, fetcher, cache, where
        self._lock = threading.Lock()
        self._where: dict[bytes, Location] = {}
        self._indexes: dict[bytes, Index] = {}
        self._prepared: set[bytes] = set()
        self._jobs: dict[bytes, _Job] = {}
        # Threads start on first use, so making both pools here costs nothing until then.
        self._pool = ThreadPoolExecutor(PACK_CONNECTIONS, thread_name_prefix="vml-packs")
        self._index_pool = ThreadPoolExecutor(INDEX_CONNECTIONS, thread_name_prefix="vml-indexes")

    # -- indexes ---------------------------------------------------------

    def prepare(self, catalog: Catalog, manifest: bytes) -> None:
        """Load the indexes of the packs an entry's data lies in (fetched once, then from the cache)."""
        want = catalog.packsets.get(manifest)
        if want is None or manifest in self._prepared:
            return  # not published as packs: its objects are loose
        h = manifest.hex()
        data = self._small_file(f"packsets/{h}", self.dir / "packsets" / h, want, MAX_PACKSET, f"pack set of {h}")
        packs = decode_packset(data, f"{self.where}: packsets/{h}")
        missing = [p for p in packs if p not in self._indexes]
        for pack in missing:
            if pack not in catalog.indexes:
                raise CorruptManifest(f"{self.where}: pack set of {h} names pack {pack.hex()}, unknown to the catalog")
        for index in self._index_pool.map(lambda p: self._load_index(p, catalog.indexes[p]), missing):
            with self._lock:
                self._indexes[index.pack] = index
                for d, loc in index:
                    self._where.setdefault(d, loc)
        self._prepared.add(manifest)

    def _load_index(self, pack: bytes, digest: bytes) -> Index:
        h = pack.hex()
        where = f"{self.where}: {pack_url(pack)}.idx"
        data = self._small_file(f"{pack_url(pack)}.idx", self.dir / "indexes" / f"{h}.idx", digest, MAX_INDEX, where)
        return Index(data, where, pack)

    def _small_file(self, url: str, kept: Path, digest: bytes, limit: int, what: str) -> bytes:
        """A file whose BLAKE3 the catalog gives: from the cache directory, else fetched and kept there."""
        try:
            data = kept.read_bytes()
            if blake3.blake3(data).digest() == digest:
                return data
            log.warning("%s: %s does not match the catalog; fetching it again", self.where, kept)
        except FileNotFoundError:
            pass

        def check(body: bytes) -> bytes:
            if blake3.blake3(body).digest() != digest:
                raise CorruptObject(f"{self.where}: {url} does not match the catalog ({what})")
            return body

        data = self.fetcher.get(url, limit, check)
        kept.parent.mkdir(exist_ok=True)
        write_atomic(kept, data, sync=False)
        return data

    def locate(self, digest: bytes, catalog: Catalog | None = None) -> Location | None:
        """Where a loaded index puts ``digest``; with ``catalog``, a miss loads every entry's indexes first.

        Readers of an entry have loaded its indexes (``prepare``); a lookup
        of an object outside any prepared entry costs every index once.
        """
        loc = self._where.get(digest)
        if loc is None and catalog is not None and not catalog.packsets.keys() <= self._prepared:
            for manifest in sorted(catalog.packsets):
                self.prepare(catalog, manifest)
            loc = self._where.get(digest)
        return loc

    # -- fetching --------------------------------------------------------

    def wait(self, pack: bytes) -> bool:
        """Wait for a whole-pack fetch of ``pack`` if one is under way; whether there was one."""
        with self._lock:
            job = self._jobs.get(pack)
        if job is not None:
            job.done.wait()
        return job is not None

    def fetch_frame(self, loc: Location, check) -> tuple[object, bool]:
        """(one object's frame passed through ``check``, whether its whole pack came and is cached).

        The frame comes by a Range request, or out of its whole pack where the server ignores ranges.
        """
        if self.fetcher.ranges is False:
            frame = self.cache.read_frame(loc.pack, loc.offset, loc.length, count=False)
            if frame is None:
                frame = self._pack_bytes(loc.pack)[loc.offset : loc.offset + loc.length]
            return check(frame), self.cache.has_pack(loc.pack)
        whole = False

        def frame_or_pack(body: bytes):
            nonlocal whole
            if len(body) == loc.length:
                return check(body)
            self._check_pack(loc.pack, body)  # the whole pack, from a server that ignored the range
            self._keep_pack(loc.pack, body)
            whole = True
            return check(body[loc.offset : loc.offset + loc.length])

        size = self._indexes[loc.pack].pack_size
        span = (loc.offset, loc.length)
        result = self.fetcher.get(pack_url(loc.pack), loc.length, frame_or_pack, span=span, whole=size)
        return result, whole and self.cache.has_pack(loc.pack)

    def _check_pack(self, pack: bytes, body: bytes) -> None:
        if len(body) != self._indexes[pack].pack_size or blake3.blake3(body).digest() != pack:
            raise CorruptObject(f"{self.where}: {pack_url(pack)} does not match its name")

    def _keep_pack(self, pack: bytes, data: bytes) -> None:
        self.cache.put_pack(pack, data)
        self.cache.count("fetched_bytes", len(data))

    def _pack_bytes(self, pack: bytes) -> bytes:
        """A whole pack, fetched once however many readers want it (from the cache if it is there by now)."""
        job, leader = self._job(pack)
        if leader:
            self._run(pack, job)
        else:
            job.done.wait()
            if job.error is not None:
                raise job.error
        data = job.data
        if data is None:  # cached by an earlier fetch
            data = self.cache.read_frame(pack, 0, self._indexes[pack].pack_size, count=False)
        if data is None:  # evicted at once: fetch it again, for this reader only
            data = self._fetch_whole(pack)
        return data

    def _fetch_whole(self, pack: bytes) -> bytes:
        def checked(body: bytes) -> bytes:
            self._check_pack(pack, body)
            return body

        return self.fetcher.get(pack_url(pack), self._indexes[pack].pack_size, checked)

    def _job(self, pack: bytes) -> tuple[_Job, bool]:
        """The fetch of ``pack`` under way, or a new one; and whether it is new (the caller runs it)."""
        with self._lock:
            job = self._jobs.get(pack)
            if job is not None:
                return job, False
            job = self._jobs[pack] = _Job()
            return job, True

    def fetch_pack(self, pack: bytes) -> int:
        """Fetch a whole pack into the cache (once, however many ask); bytes fetched."""
        job, leader = self._job(pack)
        if leader:
            return self._run(pack, job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return 0

    def _run(self, pack: bytes, job: _Job) -> int:
        try:
            if self.cache.has_pack(pack):  # a reader that asked before an earlier fetch of it ended
                return 0
            data = job.data = self._fetch_whole(pack)
            self._keep_pack(pack, data)
            return len(data)
        except BaseException as e:
            job.error = e
            raise
        finally:
            with self._lock:
                del self._jobs[pack]
            job.done.set()

    def by_pack(self, digests) -> tuple[dict[bytes, list[bytes]], list[bytes]]:
        """({pack: its digests among these}, digests in no known pack)."""
        packed, loose = defaultdict(list), []
        for d in digests:
            loc = self._where.get(d)
            if loc is None:
                loose.append(d)
            else:
                packed[loc.pack].append(d)
        return packed, loose

    def prefetch(self, digests) -> list[bytes]:
        """Start fetching the packs of these objects in the background; return the ones in no pack."""
        packed, loose = self.by_pack(digests)
        for pack in packed:
            job, leader = self._job(pack)  # on its way from now on: readers of its chunks wait for it
            if leader:
                self._pool.submit(self._quiet_run, pack, job)
        return loose

    def _quiet_run(self, pack: bytes, job: _Job) -> None:
        try:
            self._run(pack, job)
        except Exception as e:  # a read that needs it will fetch its frame and say why if that fails
            log.debug("%s: fetching pack %s ahead failed: %s", self.where, pack.hex(), e)

    def fetch_packs(self, packed: dict[bytes, list[bytes]], progress: Progress = SILENT) -> None:
        """Fetch these packs whole (``packed``: pack -> the wanted objects in it), on a few connections.

        Only the pool's threads fetch and only this thread waits, so a pack
        already on its way (asked for ahead) is waited for, never fetched twice,
        and no pool thread ever waits for work queued behind it.
        """
        jobs = []
        for pack in packed:
            job, leader = self._job(pack)
            if leader:
                self._pool.submit(self._quiet_run, pack, job)
            jobs.append((pack, job))
        # Report each pack as it arrives, in whatever order they do, so a progress bar moves
        # with the small packs rather than waiting behind the first and largest.
        while jobs:
            arrived = [item for item in jobs if item[1].done.is_set()]
            if not arrived:
                jobs[0][1].done.wait(0.05)
            for item in arrived:
                pack, job = item
                jobs.remove(item)
                if job.error is not None:
                    raise job.error
                progress.advance(len(packed[pack]))
