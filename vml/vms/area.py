"""An open working area: its disks as stacks of overlays, its record, and the three steps of a save.

See vml.vms.areas for the layout of an area's directory and the rules
that keep its writes safe; this module is the object the mount serves
and the command line saves through.
"""

import contextlib
import fcntl
import json
import logging
import os
import shutil
import stat
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..config import Config
from ..entries.reader import ChunkCache, DiskReader
from ..entries.save import ChunkWriter, Plan, write_entry
from ..errors import AlreadyExists, CorruptManifest, Locked, NotFound, UsageError, VmlError
from ..files import storage_error, write_atomic
from ..layout import areas_dir
from ..names import check_name
from ..progress import SILENT, Progress
from ..repo import chunkmap, leases
from ..repo.hardware import Hardware
from ..repo.manifest import Stream
from ..repo.objects import parse_hex
from ..repo.repository import Entry, Repository
from .overlay import Overlay

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
            below = DiskReader(self.repo, table, f"area {self.name}, disk {n}", self.cache)
            self.disks[n] = stack(self.dir, n, rec, below)
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


def stack(directory: Path, disk: str, rec: AreaRecord, below: DiskReader, writable: bool = True):
    """Disk ``disk``'s overlays in ``directory``, as ``rec`` names them, over the entry's disk ``below``.

    Not ``writable`` (looked at by a process that does not hold the area),
    a layer with no file is left out: the mount makes the file when it
    first serves the area, and until then nothing was written there.
    """
    layer = below
    for gen in [*rec.frozen, rec.generation]:
        try:
            layer = Overlay(directory / f"{disk}.{gen}.overlay", layer, rec.block_size, writable)
        except NotFound:
            if writable:
                raise
    return layer


def changed_disks(home: Path, rec: AreaRecord, repo: Repository, entry: Entry) -> list[str]:
    """The disks of area ``rec`` whose bytes differ from those of ``entry``, looked at without the area's lock.

    Written is not changed: a chunk written back as it was is the same.
    Only chunks with a block written in an overlay are compared, so this
    costs time in proportion to what was written, never to the disk's size.
    """
    d = areas_dir(home) / rec.name
    cache = ChunkCache()
    out = []
    for n, table in repo.resolve(entry.digest).disks.items():
        below = DiskReader(repo, table, f"area {rec.name}, disk {n}", cache)
        top = stack(d, n, rec, below, writable=False)
        layers = top.layers() if isinstance(top, Overlay) else []
        cs = table.chunk_size
        written = sorted(set().union(*(layer.dirty_chunks(cs) for layer in layers)))
        if any(top.read(i * cs, cs) != below.read(i * cs, cs) for i in written):
            out.append(n)
    return out


def open_entry(home: Path, rec: AreaRecord) -> tuple[Repository, Entry]:
    """The repository and entry area ``rec`` builds on."""
    cfg = Config.load(home)
    repo = cfg.local(rec.repository_path, rec.repository) if rec.repository_path else cfg.open(rec.repository)
    digest = bytes.fromhex(rec.manifest)
    return repo, Entry(rec.entry, digest, repo.manifest(digest, rec.entry))
