"""Working areas: writable copy-on-write views of an entry.

An area lives in ``$VML_HOME/areas/NAME/``::

    area.json             the entry it builds on (repository, name, manifest
                          digest), the generation of its live overlays, and
                          the generations of overlays frozen by a save
    lock                  flock()ed by the one process serving the area
    DISK.GEN.overlay      sparse files as long as the disk (see vml.overlay)

A disk of an area is a stack: the entry's bytes, then the overlays frozen by
a save that has not finished (oldest first), then the live overlay, which
takes the writes. The repository records the area as a lease (see
vml.leases), so that no home's gc frees what it reads.

Saving never holds up the guest for longer than it takes to create empty
files and replace area.json. It runs in three steps:

1. freeze (under the mutex): empty overlays of the next generation are
   created, area.json names them live and the old ones frozen, and writes
   go to them from then on;
2. store (no mutex): the chunks holding written blocks of the frozen
   layers are read and stored as an incremental entry on the area's entry;
3. rebase (under the mutex): the live overlays now rest on the new entry,
   whose bytes are those of the frozen stack; area.json says so, and the
   frozen overlays are removed.

A crash at any point leaves area.json naming a stack whose bytes are the
guest's, and overlay files it does not name are removed when the area is
opened. A save that fails leaves the frozen layers in the stack, and the
next save stores them too.

Concurrency rules, for the mount's worker threads: writes and the freeze
and rebase steps hold the area's mutex; one save runs at a time (and close
waits for it). Reads take no lock: they use the overlay current when they
start, which stays usable (its file descriptor closes only with the
object) and shows the same bytes before and after each step.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .. import control
from ..config import Config
from ..entries.reader import ChunkCache, DiskReader
from ..entries.save import ChunkWriter, Plan, write_entry
from ..errors import AlreadyExists, CorruptManifest, Locked, NotFound, UsageError, VmlError
from ..files import fsync_dir, storage_error, write_atomic
from ..layout import areas_dir
from ..names import check_name
from ..progress import SILENT, Progress
from ..repo import chunkmap, leases
from ..repo.hardware import Hardware
from ..repo.manifest import Stream
from ..repo.objects import parse_hex
from ..repo.repository import Entry, Repository
from ..times import now_iso
from .overlay import Overlay, check_sparse_files

log = logging.getLogger(__name__)

FORMAT = 1
FROZEN_FORMAT = 2  # a record naming frozen overlays
RECORD_FILE = "area.json"
BLOCK = 4096


@dataclass(frozen=True)
class DiskInfo:
    size: int
    allocated: int  # bytes that are not holes, as st_blocks reports them
    mtime_ns: int  # the last write


@dataclass
class AreaRecord:
    name: str
    repository: str
    repository_path: str
    entry: str
    manifest: str  # hex digest of the entry the area builds on
    generation: int
    block_size: int
    created: str
    format: int = FORMAT
    save_to: str = ""  # path of the local repository saves go to, when the entry is a remote's
    frozen: list[int] = field(default_factory=list)  # generations of overlays a save froze, oldest first

    @classmethod
    def load(cls, path: Path) -> "AreaRecord":
        try:
            doc = json.loads(path.read_bytes())
            rec = cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})
            if rec.format not in (FORMAT, FROZEN_FORMAT) or parse_hex(rec.manifest) is None:
                raise ValueError("unsupported format or bad digest")
            gens = [*rec.frozen, rec.generation]
            if not all(type(g) is int and g > 0 for g in gens) or gens != sorted(set(gens)):
                raise ValueError("bad generations")
            check_name(rec.name, "area")
            return rec
        except FileNotFoundError:
            raise NotFound(f"{path.parent}: not a working area (no {RECORD_FILE})") from None
        except (OSError, ValueError, KeyError, TypeError, RecursionError, UsageError) as e:
            raise CorruptManifest(f"{path}: invalid working area record ({e})") from None

    def write(self, path: Path) -> None:
        doc = asdict(self)
        if self.frozen:  # a version that knows no frozen layers refuses the record instead of dropping them
            doc["format"] = FROZEN_FORMAT
        else:
            del doc["frozen"]
            doc["format"] = FORMAT
        write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())


def list_areas(home: Path) -> list[AreaRecord]:
    """Every area under ``home``, by name; damaged ones are skipped."""
    out = []
    d = areas_dir(home)
    if d.is_dir():
        for p in sorted(d.iterdir()):
            if p.name.startswith("."):
                continue
            with contextlib.suppress(VmlError):
                out.append(AreaRecord.load(p / RECORD_FILE))
    return out


def open_area(home: Path, cfg: Config, spec: str, repo_ref: str | None, name: str | None = None) -> AreaRecord:
    """Open a working area on ``spec`` (ENTRY of ``repo_ref``, or REPO:ENTRY), named ``name`` or after the entry.

    An area on a remote's entry saves into the local repository ``repo_ref``
    (or the default one).
    """
    repo, entry = cfg.find_entry(spec, repo_ref)
    save_to = cfg.open(repo_ref) if repo.read_only else None
    return create_area(home, name or entry.name, repo, entry, save_to)


def create_area(home: Path, name: str, repo: Repository, entry: Entry, save_to: Repository | None = None) -> AreaRecord:
    """Create area ``name`` on ``entry``; it is empty until written.

    An area on a remote's entry saves into the local repository ``save_to``.
    """
    check_name(name, "area")
    parent = areas_dir(home)
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / name
    if target.exists():
        raise AlreadyExists(f"working area {name!r} already exists; pick another name with --area")
    block = max(BLOCK, os.statvfs(parent).f_bsize)
    check_sparse_files(parent, block)
    if block > entry.manifest.chunk_size:
        raise UsageError(f"{parent}: file system blocks of {block} bytes are larger than the chunk size")
    if repo.read_only and (save_to is None or save_to.read_only):
        raise UsageError(f"{repo.name} is a remote: name a local repository to save the area into with --repo")
    path = "" if repo.read_only else str(repo.store.path)
    save_path = str(save_to.store.path) if repo.read_only else ""
    rec = AreaRecord(name, repo.name, path, entry.name, entry.digest.hex(), 1, block, now_iso(), save_to=save_path)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.creating."))
    try:
        rec.write(staging / RECORD_FILE)
        (staging / "lock").touch()
        os.chmod(staging, 0o700)
        os.rename(staging, target)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):  # opened at the same moment by another command
            raise AlreadyExists(f"working area {name!r} already exists; pick another name with --area") from None
        raise storage_error(e, f"opening working area {name!r}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(parent)
    # The repository records the area, so that no home's gc frees what it
    # reads; after the area exists, so that no one takes the lease for stale.
    if not repo.read_only:
        try:
            leases.take(repo, leases.here(home, name, entry.name, entry.digest))
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
    return rec


class Area:
    """An open working area; holds its lock until closed."""

    def __init__(self, home: Path, name: str, cache: ChunkCache | None = None):
        check_name(name, "area")
        self.home, self.name = home, name
        self.dir = areas_dir(home) / name
        self.cache = cache or ChunkCache()
        self.mutex = threading.RLock()  # writes, and the freeze and rebase of a save
        self._saving = threading.RLock()  # one save at a time; destroy waits for it
        self.handles = 0  # files of the area open in the mount
        self.version = 0  # changes whenever the disks' stack or the entry does
        if not self.dir.is_dir():
            raise NotFound(f"no working area {name!r} (see `vml consult`)")
        self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self._lock_fd)
            raise Locked(f"working area {name!r} is in use by {holder}") from None
        with contextlib.suppress(OSError):
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"pid {os.getpid()}\n".encode(), 0)
        try:
            self.record = AreaRecord.load(self.dir / RECORD_FILE)
            self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        rec = self.record
        self.repo, self.entry = open_entry(self.home, rec)
        self.target = Config.load(self.home).local(rec.save_to) if rec.save_to else self.repo
        resolved = self.repo.resolve(self.entry.digest)
        self.disks = {}
        for n, table in resolved.disks.items():
            layer = DiskReader(self.repo, table, f"area {self.name}, disk {n}", self.cache)
            for gen in [*rec.frozen, rec.generation]:
                layer = Overlay(self.dir / f"{n}.{gen}.overlay", layer, rec.block_size)
            self.disks[n] = layer
        self.files = self._file_readers(resolved)
        current = {f"{n}.{gen}.overlay" for n in self.disks for gen in [*rec.frozen, rec.generation]}
        for p in self.dir.glob("*.overlay"):
            if p.name not in current:  # left by a save interrupted before or after a step
                p.unlink(missing_ok=True)
        self.version += 1

    def _file_readers(self, resolved) -> dict:
        return {
            n: (DiskReader(self.repo, t, f"area {self.name}, file {n}", self.cache), mode)
            for n, (t, mode) in resolved.files.items()
        }

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- what the area shows ----------------------------------------------

    def disk_info(self) -> dict[str, DiskInfo]:
        """Each disk's size, allocated bytes and time of last write, by name."""
        return {n: DiskInfo(ov.size, ov.allocated(), ov.mtime_ns) for n, ov in self.disks.items()}

    def entry_files(self) -> dict[str, tuple[DiskReader, int]]:
        """The entry's other files (read-only in the area), by name: (reader, mode)."""
        return dict(self.files)

    # -- I/O -------------------------------------------------------------

    def read(self, disk: str, offset: int, size: int) -> bytes:
        return self.disks[disk].read(offset, size)

    def write(self, disk: str, offset: int, data: bytes) -> None:
        with self.mutex:
            self.disks[disk].write(offset, data)

    def sync(self, disk: str | None = None) -> None:
        for name, ov in self.disks.items():
            if disk is None or name == disk:
                ov.sync()

    def unsaved_bytes(self) -> int:
        """Bytes written since the last save (blocks written in two layers count twice)."""
        return sum(layer.changed_blocks() * layer.block for ov in self.disks.values() for layer in ov.layers())

    # -- save ------------------------------------------------------------

    def save_changes(
        self,
        name: str,
        message: str = "",
        progress: Progress = SILENT,
        files: dict[str, Path] | None = None,
        drop: tuple[str, ...] = (),
        hardware: Hardware | None = None,
    ) -> Entry:
        """Store what changed as incremental entry ``name``; the area then builds on it.

        ``files`` adds or replaces files of the entry with local files (a
        running VM's memory state), ``drop`` leaves files of the area's
        entry out, and ``hardware`` replaces the entry's description.
        Writes go on while the changes are stored (see the module's notes).
        """
        files = files or {}
        with self._saving:
            if name in self.target.refs():  # before freezing: a name taken is the common mistake
                raise AlreadyExists(f"entry {name!r} already exists in repository {self.target.name}")
            frozen = self._freeze()
            cs = self.entry.manifest.chunk_size
            dirty = {n: sorted(set().union(*(ly.dirty_chunks(cs) for ly in top.layers()))) for n, top in frozen.items()}
            progress.start(sum(len(v) for v in dirty.values()) * cs)

            def build(writer: ChunkWriter, plan: Plan):
                disks = []
                for s in self.entry.manifest.disks:
                    top = frozen[s.name]
                    chunks = ((i, top.read(i * cs, cs)) for i in dirty[s.name])
                    map_digest = writer.store_chunks(chunks, s.size, plan.ref.disks[s.name])
                    disks.append(Stream(s.name, s.size, map_digest))
                unchanged = writer.put_metadata(chunkmap.encode([]))
                kept = [
                    Stream(f.name, f.size, unchanged, f.mode)
                    for f in self.entry.manifest.files
                    if f.name not in files and f.name not in drop
                ]
                added = []
                for fname, path in sorted(files.items()):
                    st = os.lstat(path)
                    if not stat.S_ISREG(st.st_mode):
                        raise UsageError(f"{path}: not a regular file")
                    ref = plan.ref.files.get(fname)  # chunks left out are read from the parent's file
                    added.append(
                        Stream(fname, st.st_size, writer.store_stream(path, st.st_size, ref and ref[0]), 0o600)
                    )
                return disks, kept + added

            def record_lease(store, digest: bytes) -> None:
                # Under the lock that published the entry: from that moment the
                # area's lease names it, and the old entry until the area moves on.
                leases.put(store, leases.here(self.home, self.name, name, digest, previous=self.entry.digest))

            entry = write_entry(
                self.target,
                name,
                build,
                parent=self.entry,
                kind="incremental",
                message=message,
                what=f"working area {self.name}",
                progress=progress,
                hardware=hardware,
                on_commit=record_lease,
            )
            try:
                self._rebase(entry)
            except OSError as e:
                raise storage_error(
                    e, f"entry {name!r} was saved, but working area {self.name!r} could not move on to it"
                ) from None
            return entry

    def _freeze(self) -> dict[str, Overlay]:
        """Step 1: writes go to fresh overlays from now on; return the frozen tops."""
        with self.mutex:
            rec = self.record
            gen = rec.generation + 1
            tops = dict(self.disks)
            new_rec = replace(rec, generation=gen, frozen=[*rec.frozen, rec.generation])
            try:
                live = {n: Overlay(self.dir / f"{n}.{gen}.overlay", top, rec.block_size) for n, top in tops.items()}
                new_rec.write(self.dir / RECORD_FILE)
            except OSError as e:
                for p in self.dir.glob(f"*.{gen}.overlay"):  # named by no record: nothing in them
                    p.unlink(missing_ok=True)
                raise storage_error(e, f"saving working area {self.name!r}") from None
            self.record, self.disks = new_rec, live
            self.version += 1
            return tops

    def _rebase(self, entry: Entry) -> None:
        """Step 3: the live overlays rest on ``entry``; the frozen ones go."""
        resolved = self.target.resolve(entry.digest)
        with self.mutex:
            rec = self.record
            frozen = [lay.path for ov in self.disks.values() for lay in ov.layers()[1:]]
            new_rec = replace(
                rec,
                repository=self.target.name,
                repository_path=str(self.target.store.path),
                save_to="",
                entry=entry.name,
                manifest=entry.digest.hex(),
                frozen=[],
            )
            new_rec.write(self.dir / RECORD_FILE)
            self.record, self.repo, self.entry = new_rec, self.target, entry
            for n, ov in self.disks.items():
                ov.base = DiskReader(self.repo, resolved.disks[n], f"area {self.name}, disk {n}", self.cache)
            self.files = self._file_readers(resolved)
            self.version += 1
        for p in frozen:
            p.unlink(missing_ok=True)
        # The area reads only the new entry now: the lease lets the old one go.
        # If this fails, the lease keeps both, which keeps more than needed.
        try:
            leases.take(self.target, leases.here(self.home, self.name, entry.name, entry.digest))
        except VmlError as e:
            log.info("working area %s: its lease still keeps the entry before %s (%s)", self.name, entry.name, e)

    def check_saved(self) -> None:
        """Raise UsageError if the area holds changes not saved as an entry."""
        changed = self.unsaved_bytes()
        if changed:
            raise unsaved(self.name, changed)

    def saving(self):
        """The save lock: held, no save runs (the mount takes it before its own locks when closing)."""
        return self._saving

    def opened(self, delta: int) -> None:
        """Count a file of the area opened (+1) or closed (-1) in the mount."""
        with self.mutex:
            self.handles += delta

    def destroy(self, discard: bool = False, refuse_open: bool = False) -> None:
        """Delete the area, still holding its lock.

        Refuses unsaved changes unless ``discard``, and with ``refuse_open``
        files of it still open in the mount. Waits for a save under way.
        """
        with self._saving, self.mutex:  # in this order, as save takes them
            if not discard:
                self.check_saved()
            if refuse_open and self.handles:
                raise Locked(f"working area {self.name!r} has {self.handles} open file(s); close them first")
            trash = self.dir.with_name(f".{self.name}.removing")
            os.rename(self.dir, trash)
            self.close()
        shutil.rmtree(trash, ignore_errors=True)
        if not self.repo.read_only:
            leases.release(self.repo, self.home, self.name, {self.entry.digest})

    def describe(self) -> dict:
        info = self.repo.describe(self.entry)
        info["area"] = self.name
        return info


def unsaved(name: str, changed: int) -> UsageError:
    return UsageError(
        f"working area {name!r} has {changed} bytes of unsaved changes: save them with "
        f"`vml save NEW --area {name}`, or close with --discard"
    )


def open_entry(home: Path, rec: AreaRecord) -> tuple[Repository, Entry]:
    """The repository and entry area ``rec`` builds on."""
    cfg = Config.load(home)
    repo = cfg.local(rec.repository_path, rec.repository) if rec.repository_path else cfg.open(rec.repository)
    digest = bytes.fromhex(rec.manifest)
    return repo, Entry(rec.entry, digest, repo.manifest(digest, rec.entry))


def remove_area(home: Path, name: str, discard: bool = False) -> None:
    """Delete an area; refuses while it holds unsaved changes, unless ``discard``."""
    with Area(home, name) as area:
        area.destroy(discard)


def roots(home: Path, repo: Repository) -> tuple[bytes, ...]:
    """The manifests that working areas on ``repo`` build on (gc must keep them)."""
    here = repo.store.path.resolve()
    return tuple(bytes.fromhex(r.manifest) for r in list_areas(home) if Path(r.repository_path).resolve() == here)


def overlay_bytes(home: Path, rec: AreaRecord) -> int:
    """Bytes the area's overlays hold on disk: what was written since its last save, read without its lock."""
    total = 0
    gens = {str(g) for g in [*rec.frozen, rec.generation]}
    for p in (areas_dir(home) / rec.name).glob("*.overlay"):
        if p.name.rsplit(".", 2)[1] not in gens:  # DISK.GEN.overlay
            continue
        with contextlib.suppress(OSError):
            total += p.stat().st_blocks * 512
    return total


def save_area(
    home: Path,
    name: str,
    entry: str,
    message: str = "",
    progress: Progress = SILENT,
    files: dict[str, Path] | None = None,
    drop: tuple[str, ...] = (),
    hardware: Hardware | None = None,
) -> AreaRecord:
    """Save area ``name`` as entry ``entry``, here or through the mount that serves it.

    Returns the area's record afterwards (it then builds on ``entry``).
    See Area.save for ``files``, ``drop`` and ``hardware``.
    """
    try:
        with Area(home, name) as area:
            area.save_changes(entry, message, progress, files, drop, hardware)
    except Locked:
        if control.mount_state(home) is None:
            raise
        control.ask_save(home, name, entry, message, files, drop, hardware)
    return AreaRecord.load(areas_dir(home) / name / RECORD_FILE)


def close_area(home: Path, name: str, discard: bool = False) -> None:
    """Remove area ``name``, here or through the mount that serves it."""
    try:
        remove_area(home, name, discard)
    except Locked:
        if control.mount_state(home) is None:
            raise
        control.ask_close(home, name, discard)
