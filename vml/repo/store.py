"""The repository on disk: objects, refs, the writer lock.

Layout of a repository directory::

    vml-repository.json   format version, chunk size, digest and compression
    refs.json             entry name -> manifest digest (the only mutable file)
    objects/ab/cdef...    immutable zstd objects named by BLAKE3 of their content
    tmp/                  files being written; cleared by the next writer
    lock                  flock()ed by the one writer
    leases/<id>.json      working areas that build on entries here (see vml.repo.leases);
                          absent until the first area is opened

Crash safety rests on three rules. An object appears under its name only
once complete (written to tmp/, then hard-linked into place, which also
makes "already there" an atomic answer). Objects are flushed with syncfs()
before any ref that needs them is written. Refs change only by replacing
refs.json atomically (temp file, fsync, rename, fsync of the directory), so
a set of ref changes lands all at once or not at all. A writer killed at any
point therefore leaves at worst unreferenced objects and files in tmp/,
which `vml gc` and the next writer remove.

Readers take no lock: objects never change, and refs.json is read whole.
"""

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import (
    AlreadyExists,
    CorruptManifest,
    CorruptObject,
    Locked,
    NotFound,
    ObjectMissing,
    ObjectTooLarge,
    StorageError,
    UsageError,
)
from ..files import create_complete, fsync_dir, read_regular, syncfs, write_atomic
from ..names import check_name
from . import certificates, damage, objects, paths
from .damage import DamageRecord
from .packfiles import PackFiles
from .packs import MAX_OBJECT, Location

FORMAT = 2  # what `vml init` creates
FORMATS = (1, 2)  # what this version reads
# Additions within a format that older readers would misread name themselves in
# vml-repository.json's "features"; a reader refuses a repository with one it does
# not know (as git's extensions). This version adds none.
FEATURES: tuple[str, ...] = ()
META_FILE = "vml-repository.json"
META_LIMIT = 64 << 10
REFS_FILE = "refs.json"
LEASES_DIR = "leases"
DEFAULT_CHUNK_SIZE = 256 << 10
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 16 << 20
# Manifests and chunk maps are bounded so that a forged one cannot exhaust
# memory; 64 MiB of chunk map covers a 1.5 PiB disk at the default chunk size.
METADATA_LIMIT = 64 << 20

log = logging.getLogger(__name__)


def _decodes(blob: bytes, digest: bytes) -> bool:
    with contextlib.suppress(CorruptObject):
        return bool(objects.decode(blob, digest, METADATA_LIMIT, "")) or True
    return False


def check_chunk_size(size: int) -> int:
    if size < MIN_CHUNK_SIZE or size > MAX_CHUNK_SIZE or size & (size - 1):
        raise UsageError(
            f"invalid chunk size {size}: use a power of two from "
            f"{MIN_CHUNK_SIZE >> 10} KiB to {MAX_CHUNK_SIZE >> 20} MiB"
        )
    return size


class Store:
    """Objects, refs and the lock of one repository directory."""

    def __init__(self, path: Path | str):
        self.path = Path(path).absolute()
        meta_path = self.path / META_FILE
        try:
            meta = json.loads(
                read_regular(meta_path, META_LIMIT, "repository settings", follow=False, error=CorruptManifest)
            )
        except NotFound:
            raise NotFound(f"{self.path}: not a VML repository (no {META_FILE})") from None
        except (ValueError, RecursionError) as e:
            raise CorruptManifest(f"{meta_path}: cannot read repository settings ({e})") from None
        if not isinstance(meta, dict):
            raise CorruptManifest(f"{meta_path}: not a JSON object")
        if meta.get("format") not in FORMATS:
            raise CorruptManifest(f"{meta_path}: unsupported repository format {meta.get('format')!r}")
        self.format = meta["format"]
        features = meta.get("features", [])
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise CorruptManifest(f"{meta_path}: features must be a list of names")
        unknown = sorted(set(features) - set(FEATURES))
        if unknown:  # a later vml wrote data this one would misread: refuse it whole
            raise CorruptManifest(
                f"{meta_path}: this repository uses {', '.join(unknown)}, which this vml does not know; upgrade vml"
            )
        if meta.get("digest") != "blake3" or meta.get("compression") != "zstd":
            raise CorruptManifest(f"{meta_path}: unsupported digest or compression")
        try:
            self.chunk_size = check_chunk_size(meta.get("chunk_size"))
        except (UsageError, TypeError):
            raise CorruptManifest(f"{meta_path}: invalid chunk_size") from None
        self.tmp_dir = self.path / "tmp"
        self.refs_path = self.path / REFS_FILE
        self.leases_dir = self.path / LEASES_DIR
        self._locked = False
        self.lock_wait = 60.0  # [limits] lock_wait of the config that opened it
        self.damage = DamageRecord(self.path)
        self.packs = PackFiles(self.path, self.place, self.damage)

    @classmethod
    def create(cls, path: Path | str, chunk_size: int = DEFAULT_CHUNK_SIZE, format: int = FORMAT) -> "Store":
        path = Path(path).absolute()
        check_chunk_size(chunk_size)
        if (path / META_FILE).exists():
            raise AlreadyExists(f"{path}: already a VML repository")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise AlreadyExists(f"{path}: exists and is not an empty directory")
        parent = path.parent
        if not parent.is_dir():
            raise NotFound(f"{parent}: no such directory")
        # Build the repository beside its final name and rename it into
        # place, so that a half-created repository is never found.
        staging = None
        try:
            staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.creating."))
            for i in range(256):
                (staging / paths.OBJECTS / f"{i:02x}").mkdir(parents=True)
            (staging / "tmp").mkdir()
            (staging / "lock").touch()
            meta = {"format": format, "chunk_size": chunk_size, "digest": "blake3", "compression": "zstd"}
            (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            (staging / REFS_FILE).write_text(json.dumps({"entries": {}}) + "\n")
            os.chmod(staging, 0o755)
            if path.exists():
                path.rmdir()
            os.rename(staging, path)
        except OSError as e:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise StorageError(f"{path}: cannot create repository ({e.strerror})") from None
        fsync_dir(parent)
        return cls(path)

    def set_format(self, version: int) -> None:
        """Declare the repository's format (vml upgrade, once the new layout is complete and flushed)."""
        self.require_lock()
        meta_path = self.path / META_FILE
        meta = json.loads(meta_path.read_bytes())
        meta["format"] = version
        write_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
        self.format = version

    @property
    def packs_chunks(self) -> bool:  # format 2; format 1 keeps every object loose
        return self.format >= 2

    def pack_writer(self):  # a PackWriter for new chunks, or None where they stay loose
        return self.packs.writer() if self.packs_chunks else None

    def inventory(self) -> tuple[list[tuple[bytes, Location]], list[str]]:  # see PackFiles.inventory
        return self.packs.inventory() if self.packs_chunks else ([], [])

    # -- objects ---------------------------------------------------------

    def _path(self, digest: bytes) -> Path:
        return paths.object_path(self.path, digest)

    def has(self, digest: bytes) -> bool:
        """Whether a copy of the object is here, damaged or not (writers ask ``has_good``)."""
        return os.path.exists(self._path(digest)) or (self.format == 2 and self.packs.locate(digest) is not None)

    def has_good(self, digest: bytes) -> bool:
        """Whether a copy not recorded damaged is here (vml.repo.damage): what a writer deduplicates onto."""
        if os.path.exists(self._path(digest)) and not self.damage.damaged(digest, None):
            return True
        return self.format == 2 and self.packs.good(digest) is not None

    def object_size(self, digest: bytes) -> int:
        """Stored (compressed) size of an object."""
        with contextlib.suppress(FileNotFoundError):
            return os.stat(self._path(digest)).st_size
        return self._packed(digest).length

    def read_raw(self, digest: bytes) -> bytes:
        """The stored, still compressed bytes of an object: its frame in a pack, else a loose file.

        A pack whose index is loaded is looked at first: that is where an
        entry's chunks are, and it costs no system call to find out. A copy
        recorded damaged is read only when there is no other.
        """
        return self._copy(digest)[0]

    def _copy(self, digest: bytes) -> tuple[bytes, Location | None]:
        """(the stored bytes of one copy of ``digest``, where: its place in a pack, None for the loose file)."""
        loc = self.packs.located(digest) if self.format == 2 else None
        if loc is None or self.damage.damaged(digest, loc.pack):
            try:
                return self._read_at(digest, None), None
            except NotFound:
                loc = loc or self._packed(digest)
        try:
            return self._read_at(digest, loc), loc
        except ObjectMissing as e:  # its pack is gone
            if self.packs.has_index(loc.pack):
                # gc removes an index before its pack: a pack missing beside its index is damage, and
                # forgetting it would only make other readers' lookups of its objects race with this one.
                self._damaged(digest, loc)
                raise ObjectMissing(f"object {digest.hex()} is missing: {e}") from None
            # Readers hold no lock: a gc may have copied the object into a new pack and removed this
            # one since its index was loaded. Look once more, among the packs there now.
            self.packs.forget_pack(loc.pack)
            again = self.packs.locate(digest)
            if again is not None:
                with contextlib.suppress(ObjectMissing):
                    return self._read_at(digest, again), again
            raise ObjectMissing(f"object {digest.hex()} is missing: {e}") from None

    def _read_at(self, digest: bytes, where: Location | None) -> bytes:
        """The stored bytes of one copy; a copy that cannot be read (cut short, not a regular file) is damaged."""
        try:
            if where is None:
                return read_regular(self._path(digest), MAX_OBJECT, "object", follow=False, error=CorruptObject)
            return self.packs.read(where)
        except CorruptObject:
            self._damaged(digest, where)
            raise

    def _damaged(self, digest: bytes, where: Location | None) -> None:
        if where is None:
            self.damage.add(digest, None)
        else:
            self.packs.mark_damaged(digest, where.pack)

    def prepare(self, manifest: bytes) -> None:
        """Load the indexes of the packs the entry's data lies in (format 2); a damaged pack set is CorruptObject."""
        if self.format == 2:
            self.packs.prepare(manifest)

    def _packed(self, digest: bytes):
        loc = self.packs.locate(digest) if self.format == 2 else None
        if loc is None:
            raise ObjectMissing(f"object {digest.hex()} is missing from {self.path}")
        return loc

    def read(self, digest: bytes, limit: int) -> bytes:
        """Decompressed, digest-checked content of an object.

        A copy that fails (its bytes, or reading them) is recorded damaged
        (vml.repo.damage) and the other copies, those stored since included,
        are tried; only when all fail is it an error.
        """
        try:
            blob, where = self._copy(digest)
            return self._checked(digest, blob, where, limit)
        except (CorruptObject, ObjectMissing) as first:
            if not self.damage.touches(digest):
                raise  # no copy at all, or more than the caller may take: nothing is damaged
            for other in self._other_copies(digest):
                with contextlib.suppress(CorruptObject, ObjectMissing):
                    return self.read_copy(digest, other, limit)
            raise first

    def read_copy(self, digest: bytes, where: Location | None, limit: int = METADATA_LIMIT) -> bytes:
        """The content of one copy of ``digest`` (``where``: its place in a pack, None for the loose file),
        recorded damaged if it fails, and no longer if it is right (repaired by hand)."""
        content = self._checked(digest, self._read_at(digest, where), where, limit)
        copy = (digest, where.pack if where else None)
        if self.damage.damaged(*copy):
            self.damage.forget([copy])
        return content

    def _checked(self, digest: bytes, blob: bytes, where: Location | None, limit: int) -> bytes:
        try:
            return objects.decode(blob, digest, limit, lambda: self.copy_name(digest, where))
        except ObjectTooLarge:
            # More than the caller may take is its bound, unless no object may be that large or the copy
            # does not decode under the largest bound either (a damaged size in the frame's header).
            if limit >= METADATA_LIMIT or not _decodes(blob, digest):
                self._damaged(digest, where)
            raise
        except CorruptObject:
            self._damaged(digest, where)
            raise

    def copy_name(self, digest: bytes, where: Location | None) -> str:
        """One copy of an object as messages name it: its file, or its pack and offset."""
        loose = where is None
        return str(self._path(digest)) if loose else f"pack {self.packs.pack_name(where.pack)} at offset {where.offset}"

    def _other_copies(self, digest: bytes) -> list[Location | None]:
        """The copies of ``digest`` not recorded damaged, in every pack there is now (a good copy may have
        been stored since the indexes were loaded: by a save, or `vml verify --repair`)."""
        if self.format == 2:
            self.packs.load_all(again=True)
        out: list[Location | None] = [
            loc for loc in self.packs.places(digest) if not self.damage.damaged(digest, loc.pack)
        ]
        if os.path.exists(self._path(digest)) and not self.damage.damaged(digest, None):
            out.insert(0, None)
        return out

    def put(self, data, digest: bytes | None = None) -> tuple[bytes, int, bool]:
        """Store ``data``; return (digest, stored size, whether it was new).

        ``digest``, when given, must be the digest of ``data``.
        """
        d = digest or objects.digest(data)
        with contextlib.suppress(FileNotFoundError):
            if not self.damage.damaged(d, None):  # a damaged loose file is replaced
                return d, os.stat(self._path(d)).st_size, False
        blob = objects.compress(data)
        return d, len(blob), self.put_raw(d, blob)

    def put_raw(self, digest: bytes, blob: bytes) -> bool:
        """Store an already compressed object; return False if it was there.

        The caller vouches that ``blob`` decodes to content named ``digest``.
        A loose file recorded damaged is replaced (and False returned: a roll
        back must not remove what others named before).
        """
        if self.damage.damaged(digest, None) and os.path.lexists(self._path(digest)):
            self._replace_loose(digest, lambda tmp: create_complete(tmp, blob, self.tmp_dir))
            return False
        return self.place(self._path(digest), blob)

    def _replace_loose(self, digest: bytes, make) -> None:
        """Replace a damaged loose file by the complete file ``make(tmp)`` creates at ``tmp``."""
        self.require_lock()
        tmp = self.tmp_dir / f"replace.{digest.hex()}"
        tmp.unlink(missing_ok=True)
        make(tmp)
        os.rename(tmp, self._path(digest))
        self.damage.forget([(digest, None)])

    def place(self, final: Path, data: bytes | bytearray) -> bool:
        """Create the immutable file ``final`` holding ``data``, complete or not at all; False if it exists."""
        self.require_lock()
        if problem := paths.real_directory(final.parent):  # a link in place of objects/ab or packs/ab
            raise CorruptManifest(f"{final.parent}: {problem}; refusing to write through it (run vml verify)")
        return create_complete(final, data, self.tmp_dir)

    def link_in(self, digest: bytes, tmp: str | Path) -> bool:
        """Give the complete file ``tmp`` its object name; False if taken (a damaged loose file is replaced)."""
        self.require_lock()
        try:
            os.link(tmp, self._path(digest))
            return True
        except FileExistsError:
            if self.damage.damaged(digest, None):
                self._replace_loose(digest, lambda new: os.link(tmp, new))
            return False

    def remove_object(self, digest: bytes) -> None:
        self.require_lock()
        self._path(digest).unlink(missing_ok=True)

    def iter_objects(self) -> Iterator[tuple[bytes | None, Path, str | None]]:
        """Every file under objects/: (digest, path, None), or (None, path, what is wrong) for what is no
        object; links are reported, never followed."""
        yield from paths.objects_in(self.path)

    def sync(self) -> None:
        """Flush every object written so far to stable storage (syncfs)."""
        syncfs(self.path / paths.OBJECTS)

    def certificates(self, manifest: bytes) -> list[bytes]:
        """The certificate files kept beside the entry with this manifest (vml.repo.certificates), unchecked."""
        return certificates.stored(self.path, manifest)

    # -- refs ------------------------------------------------------------

    def refs(self) -> dict[str, bytes]:
        """Entry name -> manifest digest, as of one atomic read."""
        try:
            raw = read_regular(self.refs_path, METADATA_LIMIT, "refs file", follow=False, error=CorruptManifest)
        except NotFound:
            raise CorruptManifest(f"{self.refs_path}: missing") from None
        try:
            doc = json.loads(raw)
            out = {}
            for name, hexd in doc["entries"].items():
                d = objects.parse_hex(hexd)
                if d is None:
                    raise ValueError(f"bad digest for {name!r}")
                out[check_name(name)] = d
            return out
        except (ValueError, KeyError, TypeError, AttributeError, UsageError) as e:
            raise CorruptManifest(f"{self.refs_path}: does not parse ({e})") from None

    def update_refs(self, set_refs: dict[str, bytes] | None = None, delete: tuple[str, ...] = ()) -> None:
        """Apply ref changes in one atomic replacement of refs.json.

        The caller must hold the lock and must have synced every object the
        new refs need.
        """
        self.require_lock()
        refs = self.refs()
        for name in delete:
            refs.pop(name, None)
        refs.update(set_refs or {})
        doc = {"entries": {k: v.hex() for k, v in sorted(refs.items())}}
        try:
            write_atomic(self.refs_path, (json.dumps(doc, indent=1) + "\n").encode())
        except OSError as e:
            raise StorageError(f"{self.refs_path}: cannot write refs ({e.strerror})") from None

    # -- locking ---------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, command: str, timeout: float | None = None):
        """Hold the writer lock; waits up to ``timeout`` seconds for it (default: ``lock_wait``)."""
        timeout = self.lock_wait if timeout is None else timeout
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + timeout
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    if time.monotonic() >= deadline:
                        raise Locked(f"repository {self.path} is busy: {holder} holds its lock") from None
                    if not waited:
                        log.warning(
                            "waiting up to %.0f s for repository %s: %s holds its lock", timeout, self.path, holder
                        )
                        waited = True
                    time.sleep(0.1)
            with contextlib.suppress(OSError):  # only a hint for others; a full disk may refuse it
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} ({command})\n".encode(), 0)
            self._require_real_directories()
            self.damage.reload()  # what readers found since, so that this writer stores it anew
            self._locked = True
            self._clean_tmp()
            self.packs.revalidate()  # others may have written or removed packs before we got the lock
            try:
                yield self
            finally:
                self._locked = False
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the flock

    def layout_problems(self) -> list[str]:
        """One line for each directory of the repository that is not a directory (a link is never followed)."""
        names = (paths.OBJECTS, paths.PACKS, paths.PACKSETS, "tmp", LEASES_DIR, certificates.DIR, damage.DIR)
        return [f"{self.path / n}: {problem}" for n in names if (problem := paths.real_directory(self.path / n))]

    def _require_real_directories(self) -> None:
        # A writer removes and replaces files in these: through a link it would do so in another directory
        # (another repository's packs, /etc), so it writes nothing until they are what they should be.
        problems = self.layout_problems()
        if problems:
            raise CorruptManifest(f"{problems[0]}; refusing to write through it (run vml verify)")

    def require_lock(self) -> None:
        """Refuse a write by a caller that does not hold the lock (a bug, not a user's error)."""
        if not self._locked:
            raise RuntimeError("repository write without holding the lock")

    def _clean_tmp(self) -> None:
        # Whatever is in tmp/ belongs to a writer that died: only lock
        # holders write there, and we hold the lock now. So does a
        # temporary refs file left by a writer killed while replacing it.
        for p in [*self.path.glob(f".{REFS_FILE}.*"), *self.leases_dir.glob(".*.json.*")]:
            p.unlink(missing_ok=True)
        for p in self.tmp_dir.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def staging_dir(self, prefix: str) -> Path:
        self.require_lock()
        return Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix=prefix))
