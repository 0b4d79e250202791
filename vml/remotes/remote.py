"""Remotes: published repositories read over HTTP, through a local cache.

A remote is a read-only repository whose refs come from its signed catalog
and whose objects are fetched on first use, checked against their digest,
and kept in the remote's cache (``$VML_HOME/cache/NAME``). Each object is
fetched once per process however many readers want it at the same time.
Its chunks are found and read by the one pack reader (vml.repo.packreader)
through the remote's cache, a transport that wraps the HTTP transport
(vml.remotes.cache, vml.remotes.http). Sequential readers and preload
fetch whole packs on parallel connections.
"""

import contextlib
import fcntl
import functools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import keys, layout
from ..errors import (
    BadSignature,
    Corrupt,
    ExpiredCatalog,
    FetchError,
    ObjectMissing,
    ReadOnly,
    UsageError,
)
from ..files import write_atomic
from ..names import check_name
from ..progress import SILENT, Progress
from ..repo import paths
from ..repo.manifest import DEFAULT_MAX_DISK_SIZE
from ..repo.objects import decode, frame_limit
from ..repo.packreader import PackReader, SignedListing
from ..repo.packs import MAX_INDEX
from ..repo.repository import Repository
from ..repo.store import METADATA_LIMIT
from ..repo.transport import Whole
from . import catalog as catalogs
from .cache import CachedTransport
from .catalog import CATALOG_FILE, CATALOG_LIMIT, Catalog
from .fetch import Fetcher, Settings
from .http import HttpTransport

log = logging.getLogger(__name__)

DEFAULT_QUOTA = 10 << 30
CATALOG_TTL = 60.0
IDENTITY_FILE = "identity.json"  # in the cache: the repository the remote stands for


@dataclass(frozen=True)
class RemoteConfig:
    name: str
    url: str
    key: str  # "ed25519:<base64>", as `vml keygen` writes KEYFILE.pub
    cache_quota: int = DEFAULT_QUOTA
    catalog_ttl: float = CATALOG_TTL
    settings: Settings = field(default_factory=Settings)
    repository: str = ""  # the published repository's name, learnt when the remote is added (see identity())


class RemoteStore:
    """The read side of a Store, served from a remote's cache and its HTTP server."""

    def __init__(self, home: Path, rc: RemoteConfig):
        self.rc = rc
        self.name = rc.name
        self.path = layout.cache_dir(home, rc.name)
        self.key = keys.parse_public_key(rc.key, f"remote {rc.name}")
        self.fetcher = Fetcher(rc.url, rc.settings, f"remote {rc.name}")
        self.cache = CachedTransport(self.path, rc.cache_quota, HttpTransport(self.fetcher, self._where()))
        self.cache.pinned_objects = self.pinned_objects
        self.reader = PackReader(self.cache, SignedListing(self.catalog))
        self.refs_path = self.path / CATALOG_FILE
        self._catalog: tuple[float, Catalog] | None = None
        self._catalog_lock = threading.Lock()
        self._retry = catalogs.RetryAfter(self.path / catalogs.RETRY_FILE, f"{rc.url} via {rc.settings.proxy}")

    def __repr__(self):
        return f"RemoteStore({self.name!r}, {self.rc.url!r})"

    # -- catalog ---------------------------------------------------------
    #
    # The verified catalog and the remote's identity (the name of the
    # repository it stands for) are kept in the cache directory, which the
    # mount and every command of the user share. Each file is replaced
    # atomically, and only under catalog.lock. The identity is config's
    # `repository` (learnt by `vml remote add`), or else identity.json,
    # recorded from the first catalog that came from the network (a remote
    # added with --no-check, or by an older vml). From then on a catalog of
    # another repository is refused and never kept, and revisions are
    # compared only between catalogs of that one repository.

    def catalog(self, refresh: bool = False) -> Catalog:
        """The verified catalog, fetched again when older than the TTL.

        Offline, or when the network offers only an expired catalog, the
        last verified catalog is used, even expired, and the log says so.
        """
        with self._catalog_lock:
            now = time.monotonic()
            if not refresh and self._catalog and now - self._catalog[0] < self.rc.catalog_ttl:
                return self._catalog[1]
            identity = self.identity()
            seen = self._cached_catalog(identity)
            if (
                not refresh
                and self._catalog is None
                and seen is not None
                and self._age() < self.rc.catalog_ttl
                and not seen.expired()
            ):
                self._catalog = (now, seen)  # fetched by another process moments ago
                return seen
            wait = 0.0 if refresh or seen is None else self._retry.waiting()
            if wait > 0:  # a refresh failed a moment ago: as offline, until the back-off ends
                self._warn_cached(seen, "a refresh failed recently", wait)
                self._catalog = (now, seen)
                return seen
            check = functools.partial(self._check, identity, seen)
            try:
                age = 0 if refresh else self.rc.settings.catalog_max_age
                data, cat = self.fetcher.get(CATALOG_FILE, CATALOG_LIMIT, check, max_age=age)
            except (FetchError, ObjectMissing, ExpiredCatalog) as e:
                # Offline, the cached catalog serves even expired (offline use is
                # promised). A network that answers with an expired catalog may
                # be a frozen server: the cached one serves only until it expires too.
                if isinstance(e, ExpiredCatalog) and (seen is None or seen.expired()):
                    raise
                if seen is None:
                    raise FetchError(f"{self._where()}: no catalog: {e}") from None
                self._warn_cached(seen, e, self._retry.failed(self.rc.catalog_ttl))
                cat = seen
            else:
                cat = cat if data is None else self._keep_catalog(data, cat)
                self._retry.succeeded()
            self._catalog = (time.monotonic(), cat)
            return cat

    def _where(self) -> str:
        return f"remote {self.name} ({self.rc.url})"

    def _check(self, identity: str | None, seen: Catalog | None, data: bytes) -> tuple[bytes | None, Catalog]:
        """A catalog fetched from the network, if it may replace ``seen`` ((None, seen): keep seen); else Corrupt."""
        cat = catalogs.verify(data, self.key, f"{self._where()}: {CATALOG_FILE}")
        if identity and cat.repository != identity:
            raise self._other_repository(cat.repository, identity)
        if seen and seen.repository == cat.repository and cat.revision < seen.revision:
            if not seen.expired():  # a proxy's copy from before the last publish: keep the newer one
                return None, seen
            raise BadSignature(
                f"{self._where()}: catalog revision {cat.revision} is older than revision {seen.revision} "
                "seen before; refused as a replay"
            )
        if cat.expired():
            raise ExpiredCatalog(
                f"{self._where()}: the catalog expired on {cat.expires}; the publisher must run `vml publish --resign`"
            )
        return data, cat

    def _other_repository(self, got: str, identity: str) -> BadSignature:
        return BadSignature(
            f"{self._where()}: the catalog is of repository {got!r}, not {identity!r}; refused "
            f"(if the remote now serves another repository, `vml remote rm {self.name}` and add it again)"
        )

    def _warn_cached(self, seen: Catalog, why: Exception | str, retry_in: float) -> None:
        stale = f" (it expired on {seen.expires})" if seen.expired() else ""
        reason = str(why).removeprefix(f"{self._where()}: ")
        log.warning(
            "%s: using the cached catalog, revision %d%s, for %.0f s: %s",
            self._where(),
            seen.revision,
            stale,
            retry_in,
            reason,
        )

    def _keep_catalog(self, data: bytes, cat: Catalog) -> Catalog:
        """Keep a fetched catalog, and the identity at first contact; return the newest kept.

        Another process may have recorded the identity, or kept a newer
        catalog, since this one was checked.
        """
        with open(self.path / "catalog.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            identity = self.identity()
            if identity is None:
                write_atomic(self.path / IDENTITY_FILE, (json.dumps({"repository": cat.repository}) + "\n").encode())
                log.info("%s: stands for repository %s from now on", self._where(), cat.repository)
            elif identity != cat.repository:
                raise self._other_repository(cat.repository, identity)
            kept = self._cached_catalog(cat.repository)
            if kept is not None and kept.revision > cat.revision:
                return kept
            write_atomic(self.refs_path, data)  # its mtime says when it was last confirmed
            return cat

    def identity(self) -> str | None:
        """The name of the repository this remote stands for, if known yet."""
        if self.rc.repository:
            return self.rc.repository
        path = self.path / IDENTITY_FILE
        try:
            return check_name(json.loads(path.read_bytes())["repository"], "repository")
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, RecursionError, UsageError) as e:
            log.warning("%s: unreadable (%s); learning the repository again", path, e)
        # A catalog verified at an earlier contact (by a vml that recorded no
        # identity) says it as well as a first contact would.
        cached = self._cached_catalog(None)
        if cached is None:
            return None
        with open(self.path / "catalog.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            write_atomic(path, (json.dumps({"repository": cached.repository}) + "\n").encode())
        return cached.repository

    def _age(self) -> float:
        try:
            return time.time() - self.refs_path.stat().st_mtime
        except FileNotFoundError:
            return float("inf")

    def _cached_catalog(self, repository: str | None) -> Catalog | None:
        """The cached catalog, unless missing, damaged, or of another repository than ``repository``."""
        try:
            data = self.refs_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            cat = catalogs.verify(data, self.key, str(self.refs_path))
        except Corrupt as e:  # the key changed, or the file was damaged: start over
            log.warning("%s; ignoring it", e)
            return None
        return cat if repository is None or cat.repository == repository else None

    def refs(self) -> dict[str, bytes]:
        return dict(self.catalog().refs)

    def serves_ranges(self) -> bool | None:
        """Whether the server answers Range requests (one request for a pack index; None: no answer, or no
        packs). Without ranges, a read of a chunk not cached fetches its whole pack."""
        indexes = self.catalog().indexes
        # Not the catalog: a Range request of it through a proxy would replace the proxy's copy.
        return self.fetcher.serves_ranges(paths.index_name(min(indexes)), MAX_INDEX) if indexes else None

    def certificates(self, manifest: bytes) -> list[bytes]:
        return self.catalog().certificate_files(manifest)

    def lists(self, digest: bytes) -> bool:
        """Whether the remote's catalog lists manifest ``digest`` (no object is fetched)."""
        return digest in self.catalog().manifests

    # -- objects ---------------------------------------------------------

    def has(self, digest: bytes) -> bool:
        """Whether the object is in the cache (its whole pack, or its own file)."""
        loc = self.reader.located(digest)
        return (loc is not None and self.cache.has(paths.pack_name(loc.pack))) or self.cache.has(
            paths.object_name(digest)
        )

    def prepare(self, manifest: bytes) -> None:
        """Learn where the chunks of this entry lie, if the remote publishes packs."""
        self.reader.prepare(manifest)

    def object_size(self, digest: bytes) -> int:
        """Its stored size: from a loaded index, the kept file, else the object itself (fetched if need be)."""
        if (loc := self.reader.located(digest)) is not None:
            return loc.length
        with contextlib.suppress(OSError):
            return (self.path / paths.object_name(digest)).stat().st_size
        return len(self.read_raw(digest))

    def read(self, digest: bytes, limit: int) -> bytes:
        """Content of an object: from the cache, else fetched, checked and cached."""
        return self._read(digest, limit)[1]

    def read_raw(self, digest: bytes) -> bytes:
        return self._read(digest, METADATA_LIMIT)[0]

    def _read(self, digest: bytes, limit: int) -> tuple[bytes, bytes]:
        """(stored bytes, content) of an object: its frame in a pack, else its loose file; a kept copy that
        fails its digest is dropped and fetched once more."""
        where = f"{self._where()}, object {digest.hex()}"

        def check(blob: bytes) -> bytes:
            decode(blob, digest, limit, where)
            return blob

        loc = self.reader.located(digest)
        if loc is None:
            # Kept loose (a manifest, a map, a frame read alone): read offline without any index. Else it is
            # in a pack of another entry, or loose at the origin (manifests are, as the catalog lists them).
            kept = self.cache.kept(paths.object_name(digest), frame_limit(limit))
            if kept is not None:
                try:
                    return kept, decode(kept, digest, limit, where)
                except Corrupt as e:
                    log.warning("%s (the copy in the cache); fetching it again", e)
                    self.cache.forget(paths.object_name(digest))
            if digest not in self.catalog().manifests:
                loc = self.reader.locate(digest)  # loads the indexes of every pack the catalog lists, once
        name = paths.pack_name(loc.pack) if loc else paths.object_name(digest)
        for attempt in range(2):
            try:
                if loc is None:
                    blob = self.cache.load(name, frame_limit(limit), check=check)
                else:
                    span, whole = (loc.offset, loc.length), self.reader.whole(loc.pack)
                    blob = self.cache.load(name, loc.length, span, whole, check, alias=paths.object_name(digest))
                return blob, decode(blob, digest, limit, where)
            except ObjectMissing:
                raise ObjectMissing(f"object {digest.hex()} is missing from {self._where()}") from None
            except Corrupt as e:
                kept = [n for n in (name, paths.object_name(digest)) if self.cache.has(n)]
                if attempt or not kept:  # what the network sent was refused: the fetcher tried every proxy
                    raise
                log.warning("%s (the copy in the cache); fetching it again", e)
                for n in kept:
                    self.cache.forget(n)
        raise AssertionError("unreachable")

    # -- fetching ahead --------------------------------------------------

    def prefetch(self, digests, limit: int) -> None:
        """Start fetching these objects in the background: their whole packs, or their own files."""
        packed, loose = self.reader.by_pack(d for d in digests if not self.has(d))
        self.reader.prefetch(packed)
        self.cache.prefetch(self._loose(loose, limit))

    def _loose(self, digests, limit: int) -> list[tuple[str, Whole]]:
        def checker(d: bytes):
            return lambda blob: decode(blob, d, limit, f"{self._where()}, object {d.hex()}")

        return [(paths.object_name(d), Whole(frame_limit(limit), check=checker(d))) for d in digests]

    def fetch_all(self, digests, limit: int, progress: Progress = SILENT) -> int:
        """Make sure every object is cached, whole packs on a few connections; return bytes fetched.
        ``progress`` counts the files to fetch: packs and loose objects."""
        packed, loose = self.reader.by_pack(digests)  # one look in the cache per pack, not per chunk
        packed = {p: ds for p, ds in packed.items() if not self.cache.has(paths.pack_name(p))}
        loose = [d for d in loose if not self.cache.has(paths.object_name(d))]
        progress.start(len(packed) + len(loose))
        before = self.fetcher.bytes
        try:
            self.cache.fetch(self._loose(loose, limit), progress)
            self.reader.fetch(packed, progress)
        except ObjectMissing as e:
            raise ObjectMissing(f"{e}") from None
        return self.fetcher.bytes - before

    # -- pins ------------------------------------------------------------

    def pins(self) -> dict[str, bytes]:
        return self.cache.pins()

    def pinned_objects(self) -> set[bytes]:
        pins = self.pins()
        if not pins:
            return set()
        for manifest in pins.values():
            self.prepare(manifest)  # where their chunks lie: the packs to keep
        objects = RemoteRepository(self).needed_objects(pins.values())
        return objects | {loc.pack for d in objects if (loc := self.reader.located(d)) is not None}

    # -- what a writer would need ----------------------------------------

    @contextlib.contextmanager
    def lock(self, command: str, timeout: float = 60.0):
        raise ReadOnly(f"remote {self.name} is read-only: save into a local repository (--repo)")
        yield  # pragma: no cover


class RemoteRepository(Repository):
    """A remote seen as a read-only repository."""

    read_only = True

    def __init__(self, store: RemoteStore, max_disk_size: int = DEFAULT_MAX_DISK_SIZE):
        super().__init__(store, store.name, max_disk_size=max_disk_size)

    def __repr__(self):
        return f"RemoteRepository({self.name!r}, {self.store.rc.url!r})"

    def is_local(self, digest: bytes) -> bool:
        return False  # nothing of a remote is a local repository's to keep

    def prefetch(self, digests, limit: int) -> None:
        self.store.prefetch(digests, limit)

    def entry_objects(self, digest: bytes) -> list[bytes]:
        """Every object an entry needs, metadata first (so it is fetched first).

        The manifests of all the remote's entries come too (they are small),
        so that `vml log` works offline.
        """
        self.store.prepare(digest)
        chain = self.data_chain(digest)
        out = list(dict.fromkeys([d for d, _ in chain] + sorted(self.store.catalog().refs.values())))
        out += [md for _, m in chain for md in m.map_digests()]
        rest = self.needed_objects([digest]) - set(out)
        return out + sorted(rest)


_remotes: dict[tuple, RemoteStore] = {}
_remotes_lock = threading.Lock()


def open_remote(home: Path, rc: RemoteConfig) -> RemoteStore:
    """The one RemoteStore of this process for ``rc`` (so in-flight fetches and pools are shared)."""
    key = (str(home), rc)
    with _remotes_lock:
        store = _remotes.get(key)
        if store is None:
            store = _remotes[key] = RemoteStore(home, rc)
        return store


def flush_counters() -> None:
    """Write the cache counters of every remote this process has used."""
    with _remotes_lock:
        stores = list(_remotes.values())
    for store in stores:
        store.cache.flush_stats()
