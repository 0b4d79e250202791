"""The one reader of packs: where an object lies, and its frame, through any transport.

A repository (vml.repo.packfiles, over its directory), a published
directory read over HTTP and a remote's cache (vml.remotes, over the cache
that wraps HTTP) all find and read objects here:

- an entry's pack set (``packsets/<manifest>``) names the packs its data
  lies in; a reader loads their indexes (vml.repo.packs) and finds each
  chunk by a dictionary lookup; at a miss it loads every index there is;
- a frame is read as a byte range of its pack, through the transport
  (``Transport.load(name, limit, span)``), and checked by the caller when
  decoded (vml.repo.objects);
- a listing says which packs there are and how an index or pack set is
  checked: by its own checksum in a directory (``DirectoryListing``), by
  the BLAKE3 the signed catalog gives for a remote (``SignedListing``).

An object stored twice (a copy written again after damage, or by a gc
copying it out of a pack it then removes) has its other places too, and
the preferred place is one not recorded damaged whenever there is one.
Thread-safe: one lock guards the dictionaries, held only to update them.
"""

import contextlib
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

from ..errors import CorruptObject, ObjectMissing
from . import paths
from .damage import NO_DAMAGE, DamageRecord
from .objects import DIGEST_SIZE
from .packs import MAX_INDEX, MAX_PACK, Index, Location
from .transport import Transport, Whole

PACKSET_MAGIC = b"VMLPSET1"
MAX_PACKSET = len(PACKSET_MAGIC) + (1 << 20) * DIGEST_SIZE + DIGEST_SIZE
INDEX_LOADS = 16  # indexes loaded at once through a transport that fetches (small: round trips count)


def encode_packset(packs: Iterable[bytes]) -> bytes:
    body = PACKSET_MAGIC + b"".join(sorted(set(packs)))
    return body + blake3.blake3(body).digest()


def decode_packset(data: bytes, where: str) -> list[bytes]:
    n = len(data) - len(PACKSET_MAGIC) - DIGEST_SIZE
    if len(data) > MAX_PACKSET or n < 0 or n % DIGEST_SIZE or not data.startswith(PACKSET_MAGIC):
        raise CorruptObject(f"{where}: not a pack set")
    if blake3.blake3(data[:-DIGEST_SIZE]).digest() != data[-DIGEST_SIZE:]:
        raise CorruptObject(f"{where}: pack set is damaged (checksum)")
    body = data[len(PACKSET_MAGIC) : -DIGEST_SIZE]
    return [body[i : i + DIGEST_SIZE] for i in range(0, n, DIGEST_SIZE)]


class DirectoryListing:
    """The packs of a directory: those with an index; indexes and pack sets check themselves."""

    def __init__(self, root: Path):
        self.root = root

    def packs(self) -> Iterable[bytes]:
        """Every pack that has its index, in name order."""
        for d, path, _problem in paths.packs_in(self.root):
            if d is not None and path.suffix == ".idx":
                yield d

    def digest(self, name: str) -> bytes | None:
        return None

    def has_packset(self, manifest: bytes) -> bool:
        return True  # whether it is there, loading it tells


class SignedListing:
    """The packs a signed catalog lists (vml.remotes.catalog), and the BLAKE3 of each index and pack set."""

    def __init__(self, catalog: Callable):
        self.catalog = catalog

    def packs(self) -> Iterable[bytes]:
        return sorted(self.catalog().indexes)

    def digest(self, name: str) -> bytes | None:
        cat = self.catalog()
        kind, _, rest = name.partition("/")
        if kind == paths.PACKSETS:
            want = cat.packsets.get(bytes.fromhex(rest))
        else:
            want = cat.indexes.get(bytes.fromhex(rest.rpartition("/")[2].removesuffix(".idx")))
        if want is None:
            raise CorruptObject(f"{name} is not in the catalog")
        return want

    def has_packset(self, manifest: bytes) -> bool:
        return manifest in self.catalog().packsets


class PackReader:
    """Finds objects in the packs of one transport and reads their frames."""

    def __init__(self, transport: Transport, listing, damage: DamageRecord = NO_DAMAGE):
        self.transport, self.listing, self.damage = transport, listing, damage
        self._lock = threading.Lock()
        self._where: dict[bytes, Location] = {}
        self._more: dict[bytes, list[Location]] = {}
        self._sizes: dict[bytes, int] = {}  # pack -> its size, for packs whose index is loaded
        self._prepared: set[bytes] = set()  # manifests whose packs' indexes are loaded
        self._all = False
        self._generation = 0  # how many times packs were forgotten (see load_all)
        self._pool: ThreadPoolExecutor | None = None

    # -- small files checked by the listing ------------------------------

    def _small(self, name: str, limit: int) -> bytes:
        """An index or pack set, checked against the listing's digest where it gives one."""
        want = self.listing.digest(name)
        whole = Whole(limit, digest=want) if want else None
        data = self.transport.load(name, limit, whole=whole)
        if want and blake3.blake3(data).digest() != want:
            self.transport.forget(name)  # a damaged kept copy: once more from the origin
            data = self.transport.load(name, limit, whole=whole)
            if blake3.blake3(data).digest() != want:
                raise CorruptObject(f"{self.transport.shown(name)} does not match the catalog")
        return data

    def packset(self, manifest: bytes) -> list[bytes] | None:
        """The packs an entry's data lies in, or None if it has no pack set."""
        if not self.listing.has_packset(manifest):
            return None
        name = paths.packset_name(manifest)
        try:
            data = self._small(name, MAX_PACKSET)
        except ObjectMissing:
            return None
        return decode_packset(data, self.transport.shown(name))

    def _read_index(self, pack: bytes) -> Index:
        name = paths.index_name(pack)
        return Index(self._small(name, MAX_INDEX), self.transport.shown(name), pack)

    # -- finding ---------------------------------------------------------

    def prepare(self, manifest: bytes) -> None:
        """Load the indexes of the packs an entry's data lies in; a damaged pack set is CorruptObject."""
        if manifest in self._prepared:
            return
        try:
            self.load(self.packset(manifest) or ())
        except ObjectMissing:  # a gc replaced the pack set and removed a pack it named: read it again
            self.load(self.packset(manifest) or ())
        self._prepared.add(manifest)

    def load(self, packs: Iterable[bytes]) -> None:
        """Load the indexes of ``packs`` (once each; in parallel where the transport fetches)."""
        missing = [p for p in dict.fromkeys(packs) if p not in self._sizes]
        if len(missing) > 1 and getattr(self.transport, "parallel", 1) > 1:
            for index in self._loads().map(self._read_index, missing):
                self._register(index)
        else:
            for pack in missing:
                self._register(self._read_index(pack))

    def _loads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:  # threads start at the first use
                self._pool = ThreadPoolExecutor(INDEX_LOADS, thread_name_prefix="vml-indexes")
            return self._pool

    def _register(self, index: Index) -> None:
        with self._lock:
            where = self._where
            for d, loc in index:
                if d not in where:
                    where[d] = loc
                else:
                    self._another_place(d, loc)
            self._sizes[index.pack] = index.pack_size

    def _another_place(self, d: bytes, loc: Location, wins: bool = False) -> None:
        """Note ``loc`` as a place of ``d`` besides the one known; it becomes the preferred one if ``wins``
        or if the known one is recorded damaged and it is not (the caller holds the lock)."""
        current = self._where.get(d)
        if current is None:
            self._where[d] = loc
            return
        if current == loc:
            return
        if wins or (self.damage.damaged(d, current.pack) and not self.damage.damaged(d, loc.pack)):
            self._where[d], loc = loc, current
        more = self._more.setdefault(d, [])
        if loc not in more:
            more.append(loc)

    def load_all(self, again: bool = False) -> None:
        """Load every pack's index: what a writer does to find any stored object (``again``: look for
        packs written since the last time too).

        A reader holds no lock: an index listed a moment ago may be gone (a
        gc removed its pack, after moving what was live elsewhere); skip it.
        """
        if again or not self._all:
            generation = self._generation
            for pack in self.listing.packs():
                if pack not in self._sizes:
                    with contextlib.suppress(ObjectMissing):
                        self._register(self._read_index(pack))
            with self._lock:
                # A pack forgotten meanwhile (another thread found it gone) may have lost locations
                # this loop had already registered: "all loaded" is not true then, and the next
                # miss loads again.
                if generation == self._generation:
                    self._all = True

    def forget_pack(self, *packs: bytes) -> None:
        """Forget where packs that are gone put their objects; the next miss looks at every index there is."""
        with self._lock:
            self._unlocate(set(packs))
            self._all = False
            self._generation += 1
            self._prepared.clear()
        for pack in packs:
            self.transport.forget(paths.pack_name(pack))

    def _unlocate(self, gone: set[bytes]) -> None:
        """Drop the loaded locations in packs ``gone`` (the caller holds the lock)."""
        for pack in gone:
            self._sizes.pop(pack, None)
        self._where = {d: loc for d, loc in self._where.items() if loc.pack not in gone}
        more, self._more = self._more, {}
        for d, places in more.items():
            for loc in places:
                if loc.pack not in gone:
                    self._another_place(d, loc)

    def locate(self, digest: bytes) -> Location | None:
        """Where a loaded index puts ``digest``; at the first miss, every index is loaded."""
        loc = self._where.get(digest)
        if loc is None and not self._all:
            self.load_all()
            loc = self._where.get(digest)
        return loc

    def located(self, digest: bytes) -> Location | None:
        """Where an already loaded index puts ``digest`` (loads nothing)."""
        return self._where.get(digest)

    def places(self, digest: bytes) -> list[Location]:
        """Every place of ``digest`` in a loaded index, the preferred one first."""
        with self._lock:
            first = self._where.get(digest)
            return [first, *self._more.get(digest, ())] if first else []

    def good(self, digest: bytes) -> Location | None:
        """A place of ``digest`` not recorded damaged: what a writer counts as having the object (at the
        first miss, every index is loaded)."""
        if self.locate(digest) is None:
            return None
        return next((loc for loc in self.places(digest) if not self.damage.damaged(digest, loc.pack)), None)

    def mark_damaged(self, digest: bytes, pack: bytes) -> None:
        """Record the copy of ``digest`` in ``pack`` as damaged; readers go to another copy from now on."""
        self.damage.add(digest, pack)
        with self._lock:
            current = self._where.get(digest)
            if current is None or current.pack != pack:
                return
            more = self._more.get(digest, [])
            good = next((loc for loc in more if not self.damage.damaged(digest, loc.pack)), None)
            if good is not None:
                more.remove(good)
                more.append(current)
                self._where[digest] = good

    def by_pack(self, digests: Iterable[bytes]) -> tuple[dict[bytes, list[bytes]], list[bytes]]:
        """({pack: its digests among these}, digests in no loaded index)."""
        packed, loose = defaultdict(list), []
        for d in digests:
            loc = self._where.get(d)
            if loc is None:
                loose.append(d)
            else:
                packed[loc.pack].append(d)
        return packed, loose

    # -- reading ---------------------------------------------------------

    def whole(self, pack: bytes) -> Whole:
        """What the pack is: its size (from its loaded index) and its name, the BLAKE3 of its bytes."""
        return Whole(self._sizes.get(pack, MAX_PACK), digest=pack)

    def read(self, loc: Location) -> bytes:
        """The frame at ``loc``; a pack shorter than its index says is CorruptObject."""
        span = (loc.offset, loc.length)
        return self.transport.load(paths.pack_name(loc.pack), loc.length, span=span, whole=self.whole(loc.pack))

    def pack_name(self, pack: bytes) -> str:
        return self.transport.shown(paths.pack_name(pack))

    def prefetch(self, packs: Iterable[bytes]) -> None:
        """Start getting these whole packs ahead of their readers (a transport that fetches)."""
        self.transport.prefetch([(paths.pack_name(p), self.whole(p)) for p in packs])

    def fetch(self, packs: Iterable[bytes], progress) -> None:
        """Get these whole packs now (a transport that fetches); ``progress`` advances per pack."""
        self.transport.fetch([(paths.pack_name(p), self.whole(p)) for p in packs], progress)
