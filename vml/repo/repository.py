"""Entries of one repository: lookup, chains, resolution, reading chunks.

An entry's *data chain* runs from the entry to the full entry it is finally
built on: an incremental entry continues with its parent, a differential one
with its base. Resolution applies the chunk maps of that chain from the base
upward into one chunk table per disk, once per open; reads then cost one
table lookup per chunk.
"""

import contextlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from ..errors import Corrupt, CorruptManifest, CorruptObject, NotFound, ObjectMissing, VmlError
from ..names import check_name
from . import chunkmap
from .chunkmap import ChunkTable
from .manifest import DEFAULT_MAX_DISK_SIZE, ENVIRONMENT, Manifest
from .objects import HOLE
from .store import METADATA_LIMIT

log = logging.getLogger(__name__)


class ObjectSource(Protocol):
    """Where a Repository finds objects, by digest: a local Store, a remote's RemoteStore, or the
    objects a bundle brings while it is checked. Nothing here names a file: the storage underneath
    (one file per object today) can change without touching the code that reads entries."""

    def has(self, digest: bytes) -> bool: ...

    def read(self, digest: bytes, limit: int) -> bytes:
        """The content, checked against its digest; at most ``limit`` bytes."""
        ...

    def read_raw(self, digest: bytes) -> bytes:
        """The object as stored (compressed), for copying it elsewhere unchanged."""
        ...

    def object_size(self, digest: bytes) -> int:
        """The stored size."""
        ...

    def refs(self) -> dict[str, bytes]:
        """Entry name -> manifest digest."""
        ...

    def prepare(self, manifest: bytes) -> None:
        """Get ready to read the entry with this manifest (a pack store loads its pack set's indexes)."""
        ...

    def certificates(self, manifest: bytes) -> list[bytes]:
        """The certificates kept beside the entry with this manifest, unchecked (vml.repo.certificates)."""
        ...


@dataclass(frozen=True)
class Entry:
    name: str
    digest: bytes
    manifest: Manifest


@dataclass
class Resolved:
    """Every disk and file of an entry as chunk tables; files keep their mode."""

    disks: dict[str, ChunkTable]
    files: dict[str, tuple[ChunkTable, int]]

    def tables(self) -> list[ChunkTable]:
        return list(self.disks.values()) + [t for t, _ in self.files.values()]


EMPTY = Resolved({}, {})


class Repository:
    """Entries of one store.

    ``fallbacks`` are remotes whose objects a local entry may build on (an
    entry saved with a remote parent): an object not in the store is looked
    for there, by digest, so it is authentic whichever remote serves it.
    """

    read_only = False

    def __init__(
        self, store: ObjectSource, name: str | None = None, fallbacks=(), max_disk_size: int = DEFAULT_MAX_DISK_SIZE
    ):
        self.store = store
        self.name = name or store.path.name
        self.fallbacks = tuple(fallbacks)
        self.max_disk_size = max_disk_size
        self._last_fallback = None
        self._manifests = lru_cache(maxsize=1024)(self._load_manifest)
        self._maps = lru_cache(maxsize=64)(self._load_map)

    def __repr__(self):
        return f"Repository({self.name!r})"

    # -- entries ---------------------------------------------------------

    def refs(self) -> dict[str, bytes]:
        return self.store.refs()

    def entry(self, name: str) -> Entry:
        check_name(name)
        d = self.refs().get(name)
        if d is None:
            raise NotFound(f"no entry {name!r} in repository {self.name}")
        return Entry(name, d, self.manifest(d, name))

    def entries(self, damaged: dict[str, tuple[bytes, str]] | None = None) -> list[Entry]:
        """All entries, oldest first.

        With ``damaged``, an entry whose manifest cannot be read is put there
        (name -> (manifest digest, why)) instead of failing the whole list.
        """
        out = []
        for n, d in self.refs().items():
            try:
                out.append(Entry(n, d, self.manifest(d, n)))
            except Corrupt as e:
                if damaged is None:
                    raise
                damaged[n] = (d, str(e))
        return sorted(out, key=lambda e: (e.manifest.created, e.name))

    def manifest(self, digest: bytes, name: str | None = None) -> Manifest:
        """The manifest with this digest; ``name`` only labels errors."""
        try:
            return self._manifests(digest)
        except Corrupt as e:
            if name is None:
                raise
            raise type(e)(f"entry {name!r}: {e}") from None

    # -- objects, wherever they are ----------------------------------------

    def is_local(self, digest: bytes) -> bool:
        return self.store.has(digest)

    def read_object(self, digest: bytes, limit: int) -> bytes:
        """Content of an object from the store or, failing that (missing, or every copy damaged), a fallback
        remote: it is checked against its digest wherever it comes from."""
        try:
            return self.store.read(digest, limit)
        except (ObjectMissing, CorruptObject) as e:
            if not self.fallbacks or (isinstance(e, CorruptObject) and not self.store.damage.touches(digest)):
                raise
            failed = e
        try:
            return self._from_fallbacks(lambda remote: remote.read(digest, limit))
        except ObjectMissing:
            if isinstance(failed, CorruptObject):
                raise failed from None  # no remote has it: the damage here is the news
            raise

    def read_raw(self, digest: bytes) -> bytes:
        """The stored (compressed) bytes of an object, from here or a fallback."""
        if self.store.has(digest) or not self.fallbacks:
            return self.store.read_raw(digest)
        return self._from_fallbacks(lambda remote: remote.read_raw(digest))

    def _from_fallbacks(self, read):
        # The remote that served last goes first: an entry's objects come from one place.
        order = sorted(self.fallbacks, key=lambda r: r is not self._last_fallback)
        for remote in order[:-1]:
            with contextlib.suppress(ObjectMissing):
                result = read(remote)
                self._last_fallback = remote
                return result
        result = read(order[-1])
        self._last_fallback = order[-1]
        return result

    def on_remote(self, digest: bytes) -> str | None:
        """The fallback remote whose catalog lists manifest ``digest``, if any (nothing else is fetched)."""
        for remote in self.fallbacks:
            try:
                if remote.lists(digest):
                    return remote.name
            except VmlError as e:
                log.warning("%s", e)
        return None

    def certificates(self, digest: bytes) -> list[bytes]:
        """Certificates of the entry with manifest ``digest``: kept here, or by a remote that lists it."""
        found = list(self.store.certificates(digest))
        for remote in self.fallbacks:
            try:
                if remote.lists(digest):
                    found += remote.certificates(digest)
            except VmlError as e:
                log.warning("%s", e)
        return found

    def object_size(self, digest: bytes) -> int:
        if self.store.has(digest) or not self.fallbacks:
            return self.store.object_size(digest)
        return len(self.read_raw(digest))

    def prefetch(self, digests, limit: int) -> None:
        """Start fetching objects that reads will soon need; objects at hand are skipped."""
        if self._last_fallback is not None:
            self._last_fallback.prefetch([d for d in digests if not self.store.has(d)], limit)

    def _load_manifest(self, digest: bytes) -> Manifest:
        data = self.read_object(digest, METADATA_LIMIT)
        return Manifest.decode(data, f"manifest {digest.hex()}", self.max_disk_size)

    def data_chain(self, digest: bytes, stop=None) -> list[tuple[bytes, Manifest]]:
        """The entry and the entries its data builds on, ending at a full one.

        ``stop(digest)``, if given, ends the walk before the linked entry it accepts.
        """
        chain = [(digest, self.manifest(digest))]
        while (link := chain[-1][1].reference) is not None:
            if stop is not None and stop(link.manifest):
                break
            m = self.manifest(link.manifest, link.name)
            if m.chunk_size != chain[0][1].chunk_size:
                raise CorruptManifest(f"entry {link.name!r}: chunk size differs within a chain")
            if chain[-1][1].kind == "differential" and m.kind != "full":
                raise CorruptManifest(f"entry {chain[-1][1].name!r}: its base is not a full entry")
            chain.append((link.manifest, m))
        return chain

    def base_of(self, digest: bytes) -> tuple[bytes, Manifest]:
        """The full entry at the bottom of an entry's data chain."""
        return self.data_chain(digest)[-1]

    # -- resolution ------------------------------------------------------

    def _load_map(self, map_digest: bytes, count: int, where: str) -> list:
        try:
            data = self.read_object(map_digest, METADATA_LIMIT)
        except Corrupt as e:
            raise type(e)(f"{where}: {e}") from None
        return chunkmap.decode(data, count, where)

    def read_map(self, m: Manifest, stream) -> list:
        count = chunkmap.chunk_count(stream.size, m.chunk_size)
        return self._maps(stream.map, count, f"entry {m.name!r}, {stream.name}")

    def resolve(self, digest: bytes) -> Resolved:
        """Chunk tables of every disk and file of the entry with manifest ``digest``."""
        disks: dict[str, ChunkTable] = {}
        files: dict[str, tuple[ChunkTable, int]] = {}
        self.store.prepare(digest)
        chain = self.data_chain(digest)
        for d, _ in chain:  # the first entry of the chain that is on a remote brings the rest
            if self.fallbacks and not self.store.has(d):
                for remote in self.fallbacks:
                    if remote.lists(d):
                        remote.prepare(d)
                        break
                break
        for _, m in reversed(chain):
            fresh = m.kind == "full"
            disks = {s.name: self._apply(m, s, None if fresh else disks.get(s.name)) for s in m.disks}
            files = {
                s.name: (self._apply(m, s, None if fresh else files.get(s.name, (None,))[0]), s.mode) for s in m.files
            }
        return Resolved(disks, files)

    def _apply(self, m: Manifest, stream, table: ChunkTable | None) -> ChunkTable:
        if table is None:
            table = ChunkTable(stream.size, m.chunk_size)
        else:
            table.resize(stream.size)
        table.apply(self.read_map(m, stream))
        return table

    def read_chunk(self, table: ChunkTable, index: int, where: str) -> bytes:
        """The bytes of one chunk; zeros for a hole."""
        length = table.chunk_length(index)
        d = table.digest(index)
        if d == HOLE:
            return bytes(length)
        try:
            data = self.read_object(d, table.chunk_size)
        except Corrupt as e:
            raise type(e)(f"{where}, chunk {index}: {e}") from None
        if len(data) != length:
            raise CorruptObject(f"{where}, chunk {index}: object {d.hex()} has {len(data)} bytes, expected {length}")
        return data

    def objects_of(self, digest: bytes, m: Manifest) -> set[bytes]:
        """The manifest ``digest``, its chunk maps and every object those maps list."""
        out = {digest, *m.map_digests()}
        for s in m.disks + m.files:
            out.update(d for _, d, _ in self.read_map(m, s))
        out.discard(HOLE)
        return out

    def needed_objects(self, manifests, local_only: bool = False) -> set[bytes]:
        """Every object the entries with these manifest digests need, their chains included.

        With ``local_only``, a chain stops at the first entry that is not in
        this store (one on a remote): what it needs is the remote's to keep.
        """
        needed: set[bytes] = set()
        for digest in manifests:
            for d, m in self.local_chain(digest) if local_only else self.data_chain(digest):
                if d not in needed:
                    needed |= self.objects_of(d, m)
        return needed

    def packs_of(self, manifest: bytes, files=None, local_only: bool = True) -> set[bytes]:
        """The packs holding objects of the entry's data chain (its pack set); of ``files``, else this store's.

        With ``local_only``, only the part of the chain in this store: what a
        remote parent holds is the remote's.
        """
        files = files or self.store.packs
        return {loc.pack for d in self.needed_objects([manifest], local_only) if (loc := files.locate(d))}

    def local_chain(self, digest: bytes) -> list[tuple[bytes, Manifest]]:
        """The start of the data chain that is in this store, up to the first entry on a remote.

        Raises ObjectMissing when a manifest is neither here nor listed by a
        configured remote: a damaged chain is never taken for a remote one.
        """
        if not self.is_local(digest):
            raise ObjectMissing(f"manifest {digest.hex()} is missing from repository {self.name}")
        chain = []
        while True:
            m = self.manifest(digest)
            chain.append((digest, m))
            link = m.reference
            if link is None:
                return chain
            if not self.is_local(link.manifest):
                if self.on_remote(link.manifest):
                    return chain
                raise ObjectMissing(
                    f"entry {link.name!r} (manifest {link.manifest.hex()[:16]}), which {m.name!r} builds on, "
                    "is neither here nor on a configured remote"
                )
            digest = link.manifest

    # -- accounting and display ------------------------------------------

    def stored_bytes(self, digest: bytes) -> int:
        """Bytes of objects an entry adds on top of the chain it builds on.

        Counts its manifest, its chunk maps, and each distinct chunk object
        its own maps reference that its reference chain does not.
        """
        m = self.manifest(digest)
        total = self.object_size(digest) + sum(self.object_size(d) for d in m.map_digests())
        known: set[bytes] = set()
        if m.reference is not None:
            for table in self.resolve(m.reference.manifest).tables():
                known |= table.digest_set()
        own: dict[bytes, int] = {}
        for s in m.disks + m.files:
            for _, d, csize in self.read_map(m, s):
                if d != HOLE and d not in known:
                    own[d] = csize
        return total + sum(own.values())

    def describe(self, entry: Entry) -> dict:
        """What `vml show --json` prints."""
        m = entry.manifest
        chain = [cm.name for _, cm in self.data_chain(entry.digest)]
        return {
            "name": entry.name,
            "repository": self.name,
            "manifest": entry.digest.hex(),
            "parent": m.parent.name if m.parent else None,
            "kind": m.shown_kind,
            "stored_as": m.kind,
            "base": chain[-1],
            "chain": chain,
            "created": m.created,
            "message": m.message,
            "chunk_size": m.chunk_size,
            "disks": [{"name": s.name, "size": s.size} for s in m.disks],
            "files": [{"name": s.name, "size": s.size} for s in m.files],
            "stored_bytes": self.stored_bytes(entry.digest),
            "hardware": m.hardware.to_json() if m.hardware else None,
            **({"environment": m.extra[ENVIRONMENT]} if m.is_environment else {}),
        }

    def children(self, damaged: dict[str, tuple[bytes, str]] | None = None) -> dict[str | None, list[Entry]]:
        """Entries grouped by the name of their parent in this repository.

        An entry whose parent is not here (removed, or never imported, as
        for a differential entry shared without its tree parent) is listed
        under None, as a root. With ``damaged``, entries whose manifest
        cannot be read go there (see entries()); their children stay under
        their name.
        """
        entries = self.entries(damaged)
        by_digest = {e.digest: e.name for e in entries}
        by_digest.update({d: n for n, (d, _) in (damaged or {}).items()})
        out: dict[str | None, list[Entry]] = {}
        for e in entries:
            p = e.manifest.parent
            out.setdefault(by_digest.get(p.manifest) if p else None, []).append(e)
        return out
