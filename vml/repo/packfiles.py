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
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import CorruptObject, ObjectMissing
from ..files import fsync_dir, write_atomic
from . import paths
from .damage import DamageRecord
from .packreader import DirectoryListing, PackReader, encode_packset
from .packs import PACK_SIZE, Location, PackBuilder
from .transport import LocalTransport


class PackFiles(PackReader):
    """The packs of one repository directory: the pack reader over the directory, and writing; thread-safe
    for readers."""

    def __init__(self, root: Path, place: Callable[[Path, bytes], bool], damage: DamageRecord | None = None):
        """``place(path, data)`` creates an immutable file complete (the Store's, which checks the lock);
        ``damage`` is the repository's record of damaged copies (vml.repo.damage)."""
        super().__init__(LocalTransport(root), DirectoryListing(root), damage or DamageRecord(root))
        self.root = root
        self._place = place

    def revalidate(self) -> None:
        """What a writer calls once it holds the lock: forget packs a gc removed since their indexes were
        loaded (its pack sets must name only packs that are there), and let the next miss look for packs
        written since."""
        self.forget_pack(*(pack for pack in list(self._sizes) if not self.has_index(pack)))

    def inventory(self) -> tuple[list[tuple[bytes, Location]], list[str]]:
        """Every object's place in a pack with a readable index (an object stored twice is listed twice), and
        one line per index or stray file that is not right.

        A pack without its index is what a writer killed between the two
        leaves: no index, so no pack set, can name it; it is skipped here
        and removed by gc.
        """
        found, problems = [], []
        for pack, p, problem in paths.packs_in(self.root):
            if pack is None:
                problems.append(f"{p}: {problem}")
            elif p.suffix != ".idx" and not self.has_index(pack):
                continue  # a killed writer's or gc's leftover: nothing can name it; gc removes it
            elif p.suffix == ".idx":
                try:
                    index = self._read_index(pack)
                except (CorruptObject, ObjectMissing) as e:
                    problems.append(str(e))
                    continue
                if not paths.pack_path(self.root, pack).exists():
                    problems.append(f"{p}: index without its pack")
                    continue
                self._register(index)
                found += list(index)
        return found, problems

    def has_index(self, pack: bytes) -> bool:
        return paths.index_path(self.root, pack).exists()

    def packs(self):
        """Every pack that has its index, in name order."""
        return self.listing.packs()

    def close(self) -> None:
        self.transport.close()

    # -- pack sets -------------------------------------------------------

    def write_packset(self, manifest: bytes, packs: Iterable[bytes]) -> None:
        """Replace an entry's pack set; the caller holds the lock and has flushed the packs."""
        path = paths.packset_path(self.root, manifest)
        path.parent.mkdir(mode=0o755, exist_ok=True)
        write_atomic(path, encode_packset(packs), sync=False)

    def packset_manifests(self) -> list[bytes]:
        """The manifests that have a pack set (a link in place of packsets/ is not followed: it names none)."""
        return paths.packsets_in(self.root)

    def remove_leftovers(self) -> int:
        """Remove packs without an index and indexes without a pack (a killed writer's or gc's); bytes freed."""
        freed = 0
        files = [p for d, p, _ in paths.packs_in(self.root) if d is not None]
        names = {(p.parent.name, p.name) for p in files}
        for path in files:
            other = path.name.removesuffix(".idx") if path.suffix == ".idx" else f"{path.name}.idx"
            if (path.parent.name, other) not in names:
                with contextlib.suppress(FileNotFoundError):
                    freed += path.stat().st_size
                    path.unlink()
        return freed

    def remove_packset(self, manifest: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            paths.packset_path(self.root, manifest).unlink()

    # -- writing ---------------------------------------------------------

    def writer(self, target: int = PACK_SIZE) -> "PackWriter":
        return PackWriter(self, target)

    def add_pack(self, builder: PackBuilder, data: bytes | bytearray) -> bytes:
        """Store one sealed pack and its index; return the pack's digest."""
        pack, index = builder.seal()
        path = paths.pack_path(self.root, pack)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._place(path, data)
        self._place(paths.index_path(self.root, pack), index)
        with self._lock:  # the new place wins: a repack copies objects out of packs it then removes
            for d, offset, length in builder.records:
                self._another_place(d, Location(pack, offset, length), wins=True)
            self._sizes[pack] = builder.size
        return pack

    def remove_pack(self, pack: bytes) -> None:
        """Remove a pack and its index (index first, so no index is left without its pack)."""
        with self._lock:
            self._unlocate({pack})
        self.transport.forget(paths.pack_name(pack))
        for path in (paths.index_path(self.root, pack), paths.pack_path(self.root, pack)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(paths.pack_path(self.root, pack).parent)


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
