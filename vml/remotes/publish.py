"""Publishing a repository as static files for any HTTP server.

``DIR/objects/ab/cdef...`` holds the manifests and chunk maps exactly as
stored; the chunks go into packs, ``DIR/packs/ab/<pack>`` with its index
``<pack>.idx``, written in the order of the entries' data (parents first,
disks front to back), and ``DIR/packsets/<manifest>`` names the packs of
each entry (the layout of a format-2 repository, docs/format.md). A chunk
already in a published pack is never written again, so publishing a new
entry on a published base uploads only new packs. Every file appears at
once and complete (written beside, then renamed), and never changes.
``DIR/catalog.json`` is the signed catalog (see catalog.py), replaced
atomically after every file it names is on disk, so a client never sees
a catalog naming a file that is not there yet. A publish killed at any
point leaves the previous catalog served, with every object it names
complete; what it had written beside is removed by the next publish, and
an object of the wrong size (renamed into place but never flushed before
the machine crashed) is written again.

Every catalog expires (30 days by default), so that a server or proxy
cannot keep serving a frozen one: `resign` renews the signature and the
expiry of the catalog in DIR without writing any object.
"""

import contextlib
import dataclasses
import fcntl
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import blake3

from .. import keys
from ..errors import BadSignature, CorruptObject, NotFound, UsageError
from ..files import storage_error, syncfs, write_atomic
from ..progress import SILENT, Progress
from ..repo import certificates, paths
from ..repo.chunkmap import HOLE
from ..repo.objects import decode
from ..repo.packfiles import PackFiles
from ..repo.packreader import decode_packset, encode_packset
from ..repo.packs import Index
from ..repo.paths import index_path, pack_path, packset_path
from ..repo.repository import Repository
from ..repo.store import METADATA_LIMIT
from ..times import format_iso
from . import catalog as catalogs
from .catalog import CATALOG_FILE, DEFAULT_EXPIRY_DAYS, Catalog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishSummary:
    entries: list[str]
    revision: int
    new_objects: int
    new_bytes: int
    expires: str


def publish(
    repo: Repository,
    out: Path,
    key_path: Path,
    names=(),
    progress: Progress = SILENT,
    expires_in: float = DEFAULT_EXPIRY_DAYS,
) -> PublishSummary:
    """Publish ``names`` (default: every entry) of ``repo`` into ``out``, valid for ``expires_in`` days.

    With names, the catalog keeps what an earlier publish put there and
    adds or updates these entries (and the entries their data builds on).
    Without, it lists exactly the repository's entries.
    """
    key = keys.load_private_key(key_path)
    out = Path(out).absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / paths.OBJECTS).mkdir(exist_ok=True)
    except OSError as e:
        raise storage_error(e, f"publishing into {out}") from None
    with _locked(out):
        previous = _previous(out, key)
        refs = repo.refs()
        by_digest = {d: n for n, d in refs.items()}
        chosen = {n: repo.entry(n).digest for n in names} if names else dict(refs)
        new_refs = dict(previous.refs) if names and previous else {}
        manifests = set(previous.manifests) if previous else set()
        for digest in chosen.values():
            for d, _ in repo.data_chain(digest):
                manifests.add(d)
                name = by_digest.get(d)
                if name is not None:  # the entries a published entry builds on are listed too
                    new_refs[name] = d
        new_refs.update(chosen)
        try:
            fresh = {d for digest in chosen.values() for d, _ in repo.data_chain(digest)}
            metadata = {d for m in fresh for d in _metadata(repo, m)}
            packs = _PublishedPacks(out, previous)
            fresh |= {m for m in packs.stale(manifests) if repo.store.has(m)}  # their packs are written again
            groups = _chunks_in_order(repo, [*chosen.values(), *sorted(fresh)])
            progress.start(len(metadata) + sum(map(len, groups)))
            count = size = 0
            for obj in sorted(metadata):
                written = _put(out, obj, repo)
                count += written > 0
                size += written
                progress.advance(1)
            for chunks in groups:
                for d in chunks:
                    count += packs.add(d, repo)
                    progress.advance(1)
                packs.writer.flush()  # an entry's packs hold no other entry's chunks
            packsets, indexes = packs.finish(repo, fresh, manifests)
            size += packs.written_bytes()
            syncfs(out)
            now = datetime.now(UTC)
            cat = Catalog(
                repo.name,
                (previous.revision if previous else 0) + 1,
                format_iso(now),
                new_refs,
                frozenset(manifests),
                catalogs.expiry(expires_in, now),
                packsets,
                indexes,
                _certificates(repo, manifests, previous),
            )
            write_atomic(out / CATALOG_FILE, catalogs.sign(cat, key))
        except OSError as e:
            raise storage_error(e, f"publishing into {out}") from None
    return PublishSummary(sorted(chosen), cat.revision, count, size, cat.expires)


def resign(out: Path, key_path: Path, expires_in: float = DEFAULT_EXPIRY_DAYS) -> Catalog:
    """Sign the catalog in ``out`` again, valid for ``expires_in`` days from now.

    The refs and manifests stay, and so does the time they were published;
    the revision grows by one so that clients take it over the old one.
    No object is written.
    """
    key = keys.load_private_key(key_path)
    out = Path(out).absolute()
    if not (out / CATALOG_FILE).is_file():
        raise NotFound(f"{out / CATALOG_FILE}: no catalog to re-sign (publish first)")
    with _locked(out):
        previous = _previous(out, key)
        if previous is None:  # removed while we waited for the lock
            raise NotFound(f"{out / CATALOG_FILE}: no catalog to re-sign (publish first)")
        cat = dataclasses.replace(previous, revision=previous.revision + 1, expires=catalogs.expiry(expires_in))
        try:
            write_atomic(out / CATALOG_FILE, catalogs.sign(cat, key))
        except OSError as e:
            raise storage_error(e, f"re-signing the catalog in {out}") from None
    return cat


@contextlib.contextmanager
def _locked(out: Path):
    """Hold ``out``'s publish lock, after clearing what a killed publish left beside its files."""
    try:
        lock = open(out / ".publish.lock", "a")  # noqa: SIM115 (held for the whole publish)
    except OSError as e:
        raise storage_error(e, f"publishing into {out}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Published files never start with a dot: these are half-written ones.
        for pattern in (*paths.LEFTOVERS, f".{CATALOG_FILE}.*"):
            for p in out.glob(pattern):
                p.unlink(missing_ok=True)
        yield


def _previous(out: Path, key) -> Catalog | None:
    path = out / CATALOG_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    public = key.public_key()
    try:
        return catalogs.verify(data, public, str(path))
    except BadSignature:
        raise UsageError(
            f"{path} was signed with another key; publish into a new directory, or remove the old catalog"
        ) from None


def _certificates(repo: Repository, manifests, previous: Catalog | None) -> dict[bytes, tuple[dict, ...]]:
    """The certificates of every published manifest: those kept in ``repo``, then those published before.

    Only certificates that verify are published; one that does not is left
    out with a warning, so a damaged file cannot make every reader refuse it.
    The repository's come first: it keeps no more than a catalog may carry,
    and a new one by a trusted key has taken the place of another there
    (certificates.keep), so the earlier catalog's must not push it out.
    """
    out = {}
    for m in sorted(manifests):
        found = {}
        for data in repo.store.certificates(m) if repo.store.has(m) else ():
            try:
                certificates.check(data, m, f"certificate of manifest {m.hex()[:16]} in {repo.name}")
                found[data] = None
            except BadSignature as e:
                log.warning("%s; not published", e)
        for c in previous.certificates.get(m, ()) if previous else ():
            found.setdefault(certificates.encode(c), None)
        if found:
            out[m] = tuple(certificates.as_object(data) for data in found)[: certificates.PER_MANIFEST]
    return out


def _put(out: Path, digest: bytes, repo: Repository) -> int:
    """Write one object unless it is there, whole; return the bytes written."""
    h = digest.hex()
    path = paths.object_path(out, digest)
    with contextlib.suppress(FileNotFoundError):
        # One a killed publish renamed into place but never flushed may be
        # empty or short after a crash of the machine: write it again.
        if path.stat().st_size == repo.object_size(digest):
            return 0
    blob = repo.read_raw(digest)
    decode(blob, digest, METADATA_LIMIT, f"object {h} of repository {repo.name}")  # publish nothing damaged
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, blob, sync=False)  # the publish flushes once, before the catalog
    return len(blob)


def _metadata(repo: Repository, manifest: bytes) -> list[bytes]:
    """The objects published loose for one entry: its manifest and chunk maps."""
    return [manifest, *repo.manifest(manifest).map_digests()]


def _chunks_in_order(repo: Repository, manifests) -> list[list[bytes]]:
    """The chunks these entries need, each once, by entry: parents first, each disk and file front to back."""
    groups: list[list[bytes]] = []
    seen: set[bytes] = set()
    done: set[bytes] = set()
    for digest in manifests:
        for d, m in reversed(repo.data_chain(digest)):
            if d in done:
                continue
            done.add(d)
            group = []
            for s in m.disks + m.files:
                for _, c, _ in repo.read_map(m, s):
                    if c != HOLE and c not in seen:
                        seen.add(c)
                        group.append(c)
            groups.append(group)
    return groups


class _PublishedPacks:
    """The packs of a published directory: new chunks go into new packs, pack sets list each entry's."""

    def __init__(self, out: Path, previous: Catalog | None):
        self.out = out
        self.previous = previous
        self.files = PackFiles(out, _place)
        self.repaired: set[bytes] = set()
        self._drop_damaged()
        self.writer = self.files.writer()

    def _drop_damaged(self) -> None:
        """Remove packs a crash cut short (renamed into place, never flushed), so their chunks are packed again.

        Checked by size against their index: reading every published pack
        again at each publish would cost what the publish itself costs.
        """
        for pack in list(self.files.packs()):
            try:
                index = Index(index_path(self.out, pack).read_bytes(), str(index_path(self.out, pack)), pack)
                if pack_path(self.out, pack).stat().st_size == index.pack_size:
                    continue
            except (CorruptObject, FileNotFoundError):
                pass
            self.files.remove_pack(pack)
            self.repaired.add(pack)
        self.files.remove_leftovers()

    def stale(self, manifests) -> set[bytes]:
        """Those of ``manifests`` whose published pack set names a pack that had to be removed."""
        if not self.repaired or self.previous is None:
            return set()
        return {m for m in manifests if self.repaired.intersection(self._published_packset(m) or ())}

    def _published_packset(self, manifest: bytes) -> list[bytes] | None:
        """The packs the previous catalog lists for ``manifest``, if it lists a pack set that is there."""
        path = packset_path(self.out, manifest)
        if self.previous is None or manifest not in self.previous.packsets or not path.is_file():
            return None
        return decode_packset(path.read_bytes(), str(path))

    def add(self, digest: bytes, repo: Repository) -> bool:
        """Pack one chunk unless a published pack holds it; whether it was packed."""
        if self.files.locate(digest) is not None:
            return False
        blob = repo.read_raw(digest)
        decode(blob, digest, METADATA_LIMIT, f"object {digest.hex()} of repository {repo.name}")  # nothing damaged
        return self.writer.add(digest, blob)

    def written_bytes(self) -> int:
        return sum(
            pack_path(self.out, p).stat().st_size + index_path(self.out, p).stat().st_size for p in self.writer.created
        )

    def finish(self, repo: Repository, fresh: set[bytes], manifests) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
        """Seal the last pack, write the pack sets, and return (pack sets, indexes) for the catalog.

        ``fresh``: the entries published now, whose chunks were just packed;
        the others of ``manifests`` keep the pack set they were published
        with (one published loose by an older vml has none: clients read it
        loose), unless it names a pack that had to be written again.
        """
        self.writer.flush()
        old_sets = self.previous.packsets if self.previous else {}
        indexes = {p: d for p, d in (self.previous.indexes if self.previous else {}).items() if p not in self.repaired}
        packsets = {}
        for manifest in sorted(manifests):
            kept = self._published_packset(manifest)
            if kept is not None and not self.repaired.intersection(kept):
                packsets[manifest] = old_sets[manifest]
                continue
            if manifest not in fresh:
                continue
            path = packset_path(self.out, manifest)
            packs = repo.packs_of(manifest, self.files, local_only=False)
            data = encode_packset(packs)
            path.parent.mkdir(exist_ok=True)
            _place(path, data)
            packsets[manifest] = blake3.blake3(data).digest()
            for pack in packs - indexes.keys():
                indexes[pack] = blake3.blake3(index_path(self.out, pack).read_bytes()).digest()
        return packsets, indexes


def _place(path: Path, data: bytes) -> bool:
    """Write a published file complete under its name (flushed once, before the catalog)."""
    write_atomic(path, data, sync=False)
    return True
