"""A repository's packs on disk: writing them, finding objects in them, pack sets.

Layout (format 2, see docs/format.md)::

    packs/ab/<pack digest>        object frames back to back
    packs/ab/<pack digest>.idx    the pack's index (vml.repo.packs)
    packsets/<manifest digest>    the packs holding the chunks of that entry's data chain

A pack and its index are created complete or not at all (Store.place);
the pack first, then its index, so an index always has its pack. A pack
set is replaced atomically and only after the packs it names are flushed,
so a pack set names only packs that are there. Readers load the indexes of
the packs an entry's pack set names, not of the whole repository; writers
may load them all, to find every object already stored.
"""

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import blake3

from ..errors import CorruptObject, NotFound, ObjectMissing
from ..files import fsync_dir, open_regular, read_regular, write_atomic
from ..layout import fanout, real_directory
from .damage import DamageRecord
from .objects import DIGEST_SIZE, parse_hex
from .packs import MAX_INDEX, PACK_SIZE, Index, Location, PackBuilder

PACKS = "packs"
PACKSETS = "packsets"
PACKSET_MAGIC = b"VMLPSET1"
MAX_PACKSET = len(PACKSET_MAGIC) + (1 << 20) * DIGEST_SIZE + DIGEST_SIZE
OPEN_PACKS = 64  # pack descriptors kept open for reading


def pack_path(root: Path, pack: bytes) -> Path:
    h = pack.hex()
    return root / PACKS / h[:2] / h


def index_path(root: Path, pack: bytes) -> Path:
    h = pack.hex()
    return root / PACKS / h[:2] / f"{h}.idx"


def packset_path(root: Path, manifest: bytes) -> Path:
    return root / PACKSETS / manifest.hex()


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


class _Open:
    """A pack's descriptor, closed once evicted and no read uses it."""

    def __init__(self, fd: int):
        self.fd, self.users, self.evicted = fd, 0, False


class PackFiles:
    """The packs of one repository directory; thread-safe for readers."""

    def __init__(self, root: Path, place: Callable[[Path, bytes], bool], damage: DamageRecord | None = None):
        """``place(path, data)`` creates an immutable file complete (the Store's, which checks the lock);
        ``damage`` is the repository's record of damaged copies (vml.repo.damage)."""
        self.root = root
        self._place = place
        self.damage = damage or DamageRecord(root)
        self._lock = threading.Lock()
        # Where each object lies; an object stored twice (a copy written again after damage, or by a
        # gc copying it out of a pack it then removes) has its other places in _more, and the copy in
        # _where is one not recorded damaged whenever there is one.
        self._where: dict[bytes, Location] = {}
        self._more: dict[bytes, list[Location]] = {}
        self._indexed: set[bytes] = set()  # packs whose index is loaded
        self._all = False
        self._generation = 0  # how many times packs were forgotten (see load_all)
        self._open: OrderedDict[bytes, _Open] = OrderedDict()

    # -- finding ---------------------------------------------------------

    def load(self, packs: Iterable[bytes]) -> None:
        """Load the indexes of ``packs`` (once each)."""
        for pack in packs:
            if pack not in self._indexed:
                self._register(self._read_index(pack))

    def _read_index(self, pack: bytes) -> Index:
        path = index_path(self.root, pack)
        try:
            data = read_regular(path, MAX_INDEX, "pack index", follow=False, error=CorruptObject)
        except NotFound:
            raise ObjectMissing(f"pack index {path} is missing") from None
        return Index(data, str(path), pack)

    def _register(self, index: Index) -> None:
        with self._lock:
            where = self._where
            for d, loc in index:
                if d not in where:
                    where[d] = loc
                else:
                    self._another_place(d, loc)
            self._indexed.add(index.pack)

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
            for pack in self.packs():
                if pack not in self._indexed:
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

    def _unlocate(self, gone: set[bytes]) -> None:
        """Drop the loaded locations in packs ``gone`` (the caller holds the lock)."""
        self._indexed -= gone
        self._where = {d: loc for d, loc in self._where.items() if loc.pack not in gone}
        more, self._more = self._more, {}
        for d, places in more.items():
            for loc in places:
                if loc.pack not in gone:
                    self._another_place(d, loc)

    def revalidate(self) -> None:
        """What a writer calls once it holds the lock: forget packs a gc removed since their indexes were
        loaded (its pack sets must name only packs that are there), and let the next miss look for packs
        written since."""
        self.forget_pack(*(pack for pack in list(self._indexed) if not index_path(self.root, pack).exists()))

    def inventory(self) -> tuple[list[tuple[bytes, Location]], list[str]]:
        """Every object's place in a pack with a readable index (an object stored twice is listed twice), and
        one line per index or stray file that is not right.

        A pack without its index is what a writer killed between the two
        leaves: no index, so no pack set, can name it; it is skipped here
        and removed by gc.
        """
        found, problems = [], []
        for p, problem in fanout(self.root / PACKS):
            name = p.name.removesuffix(".idx")
            pack = None if problem else parse_hex(name)
            if problem:
                problems.append(f"{p}: {problem}")
            elif pack is None or not name.startswith(p.parent.name):
                problems.append(f"{p}: stray file among the packs")
            elif p.suffix != ".idx" and not index_path(self.root, pack).exists():
                continue  # a killed writer's or gc's leftover: nothing can name it; gc removes it
            elif p.suffix == ".idx":
                try:
                    index = self._read_index(pack)
                except (CorruptObject, ObjectMissing) as e:
                    problems.append(str(e))
                    continue
                if not pack_path(self.root, pack).exists():
                    problems.append(f"{p}: index without its pack")
                    continue
                self._register(index)
                found += list(index)
        return found, problems

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

    def has_index(self, pack: bytes) -> bool:
        return index_path(self.root, pack).exists()

    def pack_name(self, pack: bytes) -> str:
        return str(pack_path(self.root, pack))

    def packs(self) -> Iterator[bytes]:
        """Every pack that has its index, in name order."""
        for p, problem in fanout(self.root / PACKS):
            d = parse_hex(p.name.removesuffix(".idx")) if not problem and p.suffix == ".idx" else None
            if d is not None and p.name.startswith(p.parent.name):
                yield d

    # -- reading ---------------------------------------------------------

    def read(self, loc: Location) -> bytes:
        """The frame at ``loc``; a pack shorter than its index says is CorruptObject."""
        handle = self._acquire(loc.pack)
        try:
            frame = os.pread(handle.fd, loc.length, loc.offset)
        except OSError as e:
            raise CorruptObject(f"pack {pack_path(self.root, loc.pack)}: cannot read it ({e.strerror})") from None
        finally:
            self._release(handle)
        if len(frame) != loc.length:
            raise CorruptObject(f"pack {pack_path(self.root, loc.pack)} is shorter than its index says")
        return frame

    def _acquire(self, pack: bytes) -> _Open:
        with self._lock:
            handle = self._open.get(pack)
            if handle is not None:
                self._open.move_to_end(pack)
                handle.users += 1
                return handle
        path = pack_path(self.root, pack)
        try:
            with open_regular(path, "pack", follow=False, error=CorruptObject) as f:
                fd = os.dup(f.fileno())  # kept open past this block, closed by _release
        except NotFound:
            raise ObjectMissing(f"pack {path} is missing") from None
        with self._lock:
            handle = self._open.get(pack)
            if handle is not None:  # another thread opened it meanwhile
                os.close(fd)
            else:
                handle = self._open[pack] = _Open(fd)
                while len(self._open) > OPEN_PACKS:
                    _, old = self._open.popitem(last=False)
                    old.evicted = True
                    if not old.users:
                        os.close(old.fd)
            handle.users += 1
            return handle

    def _release(self, handle: _Open) -> None:
        with self._lock:
            handle.users -= 1
            if handle.evicted and not handle.users:
                os.close(handle.fd)

    def __del__(self):
        # Descriptors are plain integers: without this, a dropped PackFiles (a
        # repository opened again after a config change) would keep them open.
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        with self._lock:
            for handle in self._open.values():
                handle.evicted = True
                if not handle.users:
                    os.close(handle.fd)
            self._open.clear()

    # -- pack sets -------------------------------------------------------

    def packset(self, manifest: bytes) -> list[bytes] | None:
        """The packs an entry's data lies in, or None if it has no pack set."""
        path = packset_path(self.root, manifest)
        try:
            data = read_regular(path, MAX_PACKSET, "pack set", follow=False, error=CorruptObject)
        except NotFound:
            return None
        return decode_packset(data, str(path))

    def write_packset(self, manifest: bytes, packs: Iterable[bytes]) -> None:
        """Replace an entry's pack set; the caller holds the lock and has flushed the packs."""
        path = packset_path(self.root, manifest)
        path.parent.mkdir(mode=0o755, exist_ok=True)
        write_atomic(path, encode_packset(packs), sync=False)

    def packset_manifests(self) -> list[bytes]:
        """The manifests that have a pack set (a link in place of packsets/ is not followed: it names none)."""
        top = self.root / PACKSETS
        if real_directory(top):
            return []
        try:
            names = os.listdir(top)
        except FileNotFoundError:
            return []
        return [d for n in sorted(names) if (d := parse_hex(n)) is not None]

    def remove_leftovers(self) -> int:
        """Remove packs without an index and indexes without a pack (a killed writer's or gc's); bytes freed."""
        freed = 0
        files = [p for p, problem in fanout(self.root / PACKS) if not problem]
        names = {(p.parent.name, p.name) for p in files}
        for path in files:
            other = path.name.removesuffix(".idx") if path.suffix == ".idx" else f"{path.name}.idx"
            if parse_hex(path.name.removesuffix(".idx")) is not None and (path.parent.name, other) not in names:
                with contextlib.suppress(FileNotFoundError):
                    freed += path.stat().st_size
                    path.unlink()
        return freed

    def remove_packset(self, manifest: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            packset_path(self.root, manifest).unlink()

    # -- writing ---------------------------------------------------------

    def writer(self, target: int = PACK_SIZE) -> "PackWriter":
        return PackWriter(self, target)

    def add_pack(self, builder: PackBuilder, data: bytes | bytearray) -> bytes:
        """Store one sealed pack and its index; return the pack's digest."""
        pack, index = builder.seal()
        path = pack_path(self.root, pack)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._place(path, data)
        self._place(index_path(self.root, pack), index)
        with self._lock:  # the new place wins: a repack copies objects out of packs it then removes
            for d, offset, length in builder.records:
                self._another_place(d, Location(pack, offset, length), wins=True)
            self._indexed.add(pack)
        return pack

    def remove_pack(self, pack: bytes) -> None:
        """Remove a pack and its index (index first, so no index is left without its pack)."""
        with self._lock:
            self._unlocate({pack})
            handle = self._open.pop(pack, None)
            if handle is not None:
                handle.evicted = True
                if not handle.users:
                    os.close(handle.fd)
        for path in (index_path(self.root, pack), pack_path(self.root, pack)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(pack_path(self.root, pack).parent)


class PackWriter:
    """Appends the objects of one save to packs of about ``target`` bytes, in the order given."""

    def __init__(self, files: PackFiles, target: int):
        self.files = files
        self.target = target
        self.created: list[bytes] = []  # packs this writer stored, for a roll back
        self._builder = PackBuilder()
        self._data = bytearray()

    def add(self, digest: bytes, frame: bytes) -> bool:
        """Append an object; False if a pack (stored or being built) holds a copy not recorded damaged."""
        if digest in self._builder or self.files.good(digest) is not None:
            return False
        self._builder.add(digest, frame)
        self._data += frame
        if self._builder.size >= self.target:
            self.flush()
        return True

    def flush(self) -> None:
        """Store the pack being built, if it holds anything."""
        if len(self._builder):
            self.created.append(self.files.add_pack(self._builder, self._data))  # written as it is: no copy
            self._builder, self._data = PackBuilder(), bytearray()

    def rollback(self) -> None:
        self._builder, self._data = PackBuilder(), bytearray()
        for pack in self.created:
            self.files.remove_pack(pack)
        self.created.clear()
