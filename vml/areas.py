"""Working areas: writable copy-on-write views of an entry.

An area lives in ``$VML_HOME/areas/NAME/``::

    area.json             the entry it builds on (repository, name, manifest
                          digest) and the overlay generation
    lock                  flock()ed by the one process serving the area
    DISK.GEN.overlay      one sparse file per disk, as long as the disk

The overlay is the whole copy-on-write state: a block of the disk has been
written exactly when that block of the overlay file is allocated
(SEEK_DATA), and then the overlay holds its bytes; elsewhere the entry's
bytes show through. There is no separate dirty map that could disagree with
the data after a crash: a write that does not cover a whole block first
fills the rest of the block from the current content, so every allocated
block is complete. A process killed at any point leaves the page cache, and
so every write, in place; fdatasync() on the overlay makes acknowledged
writes durable against power loss as well (it flushes the blocks and the
allocation that marks them written).

Saving an area reads only the chunks that hold written blocks, stores them
as an incremental entry on the area's entry, then moves the area onto the
new entry with an empty overlay of the next generation: area.json is
replaced first, the old overlay removed after, and files of other
generations are removed when an area is opened.

Concurrency rules, for the mount's worker threads: writes and save hold the
area's mutex (a save sees no write half done, and no write lands between
the save's reading and the switch to the next overlay). Reads take no lock:
they use the Overlay object current when they start, which stays usable
(its file descriptor closes only with the object) and shows the same bytes
before and after a save.
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
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import chunkmap, control, leases
from .config import Config
from .errors import AlreadyExists, CorruptManifest, DiskFull, Locked, NotFound, UsageError, VmlError
from .hardware import Hardware
from .manifest import Stream
from .names import check_name
from .objects import parse_hex
from .progress import SILENT, Progress
from .reader import ChunkCache, DiskReader
from .repository import Entry, Repository, now_iso
from .save import ChunkWriter, Plan, write_entry
from .store import fsync_dir, write_atomic

log = logging.getLogger(__name__)

FORMAT = 1
RECORD_FILE = "area.json"
MEMORY_FILE = "vml-memory.state"  # a running VM's memory, saved with its disks (see vml.boot)
BLOCK = 4096


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

    @classmethod
    def load(cls, path: Path) -> "AreaRecord":
        try:
            doc = json.loads(path.read_bytes())
            rec = cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})
            if rec.format != FORMAT or parse_hex(rec.manifest) is None:
                raise ValueError("unsupported format or bad digest")
            check_name(rec.name, "area")
            return rec
        except FileNotFoundError:
            raise NotFound(f"{path.parent}: not a working area (no {RECORD_FILE})") from None
        except (OSError, ValueError, KeyError, TypeError, RecursionError, UsageError) as e:
            raise CorruptManifest(f"{path}: invalid working area record ({e})") from None

    def save(self, path: Path) -> None:
        write_atomic(path, (json.dumps(asdict(self), indent=1) + "\n").encode())


def areas_dir(home: Path) -> Path:
    return home / "areas"


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


def _check_sparse_files(directory: Path, block: int) -> None:
    """Refuse a file system where allocation does not tell written blocks from holes.

    An overlay's allocated blocks are its written ones; that needs SEEK_DATA
    and SEEK_HOLE, and written zeros kept as data (ZFS with compression, for
    one, turns them back into holes).
    """
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".vml-sparse-probe.")
    try:
        os.ftruncate(fd, 4 * block)
        os.pwrite(fd, bytes(block), block)  # the second block: written zeros
        os.fsync(fd)
        data = os.lseek(fd, 0, os.SEEK_DATA)
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        ok = (data, hole) == (block, 2 * block)
    except OSError:
        ok = False
    finally:
        os.close(fd)
        os.unlink(probe)
    if not ok:
        raise UsageError(
            f"{directory}: this file system does not keep sparse files as working areas need "
            "(SEEK_DATA/SEEK_HOLE, written zeros kept as data); put $VML_HOME on ext4, xfs, btrfs or tmpfs"
        )


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
    _check_sparse_files(parent, block)
    if block > entry.manifest.chunk_size:
        raise UsageError(f"{parent}: file system blocks of {block} bytes are larger than the chunk size")
    if repo.read_only and (save_to is None or save_to.read_only):
        raise UsageError(f"{repo.name} is a remote: name a local repository to save the area into with --repo")
    path = "" if repo.read_only else str(repo.store.path)
    save_path = str(save_to.store.path) if repo.read_only else ""
    rec = AreaRecord(name, repo.name, path, entry.name, entry.digest.hex(), 1, block, now_iso(), save_to=save_path)
    if not repo.read_only:  # the repository records the area, so that no home's gc frees what it reads
        leases.take(repo, leases.here(home, name, entry.name, entry.digest))
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.creating."))
    try:
        rec.save(staging / RECORD_FILE)
        (staging / "lock").touch()
        os.chmod(staging, 0o700)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not repo.read_only:
            leases.release(repo, home, name)
        raise
    fsync_dir(parent)
    return rec


class Overlay:
    """One disk of an area: the written blocks over the entry's bytes."""

    def __init__(self, path: Path, base: DiskReader, block: int):
        self.path, self.base, self.block = path, base, block
        self.size = base.size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        st = os.fstat(self.fd)
        if st.st_size != self.size:
            os.ftruncate(self.fd, self.size)
        self.mtime_ns = st.st_mtime_ns
        self.written = bytearray(-(-self.size // block))  # 1 per written block
        self._scan()

    def __del__(self):
        with contextlib.suppress(AttributeError, OSError):
            os.close(self.fd)

    def _scan(self) -> None:
        off = 0
        while off < self.size:
            try:
                data = os.lseek(self.fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return
                raise
            hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            first, last = data // self.block, -(-hole // self.block)
            self.written[first:last] = b"\1" * (last - first)
            off = hole

    def changed_blocks(self) -> int:
        return self.written.count(1)

    def dirty_chunks(self, chunk_size: int) -> list[int]:
        per = chunk_size // self.block
        w = self.written
        return [i for i in range(-(-len(w) // per)) if 1 in w[i * per : (i + 1) * per]]

    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        b0, b1 = offset // self.block, -(-end // self.block)
        marks = self.written[b0:b1]
        if 1 not in marks:
            return self.base.read(offset, end - offset)
        if 0 not in marks:
            return os.pread(self.fd, end - offset, offset)
        parts, pos = [], offset
        while pos < end:
            b = pos // self.block
            state = self.written[b]
            stop = b + 1
            while stop < b1 and self.written[stop] == state:
                stop += 1
            run_end = min(stop * self.block, end)
            if state:
                parts.append(os.pread(self.fd, run_end - pos, pos))
            else:
                parts.append(self.base.read(pos, run_end - pos))
            pos = run_end
        return b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data``; the caller holds the area's mutex."""
        end = offset + len(data)
        if end > self.size:
            raise DiskFull(f"{self.path.name}: write past the end of the disk ({end} > {self.size})")
        b0, b1 = offset // self.block, -(-end // self.block)
        start, stop = b0 * self.block, min(b1 * self.block, self.size)
        if offset == start and end == stop:
            buf = data
        else:  # complete the partial first and last blocks from the current content
            buf = bytearray(self.read(start, stop - start))
            buf[offset - start : end - start] = data
        view = memoryview(buf)
        pos = start
        while view:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n
        self.written[b0:b1] = b"\1" * (b1 - b0)
        self.mtime_ns = time.time_ns()

    def sync(self) -> None:
        os.fdatasync(self.fd)


class Area:
    """An open working area; holds its lock until closed."""

    def __init__(self, home: Path, name: str, cache: ChunkCache | None = None):
        check_name(name, "area")
        self.home, self.name = home, name
        self.dir = areas_dir(home) / name
        self.cache = cache or ChunkCache()
        self.mutex = threading.RLock()
        self.handles = 0  # files of the area open in the mount
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
        digest = self.entry.digest
        resolved = self.repo.resolve(digest)
        where = f"area {self.name}"
        self.disks = {
            n: Overlay(
                self.dir / f"{n}.{rec.generation}.overlay",
                DiskReader(self.repo, t, f"{where}, disk {n}", self.cache),
                rec.block_size,
            )
            for n, t in resolved.disks.items()
        }
        self.files = {
            n: (DiskReader(self.repo, t, f"{where}, file {n}", self.cache), mode)
            for n, (t, mode) in resolved.files.items()
        }
        current = {f"{n}.{rec.generation}.overlay" for n in self.disks}
        for p in self.dir.glob("*.overlay"):
            if p.name not in current:  # left by a save interrupted after its switch
                p.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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

    def changed_bytes(self) -> int:
        return sum(ov.changed_blocks() * ov.block for ov in self.disks.values())

    # -- save ------------------------------------------------------------

    def save(
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
        """
        files = files or {}
        with self.mutex:
            cs = self.entry.manifest.chunk_size
            dirty = {n: ov.dirty_chunks(cs) for n, ov in self.disks.items()}
            progress.start(sum(len(v) for v in dirty.values()) * cs)

            def build(writer: ChunkWriter, plan: Plan):
                disks = []
                for s in self.entry.manifest.disks:
                    ov = self.disks[s.name]
                    chunks = ((i, ov.read(i * cs, cs)) for i in dirty[s.name])
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
            )
            self._switch(entry)
            return entry

    def _switch(self, entry: Entry) -> None:
        rec = self.record
        old = [ov.path for ov in self.disks.values()]
        # The lease moves to the new entry (one atomic replacement); until
        # then the old one keeps what the area read, and the ref keeps the new.
        try:
            leases.take(self.target, leases.here(self.home, self.name, entry.name, entry.digest), was=self.entry.digest)
        except VmlError as e:
            log.warning("working area %s: cannot record its new entry in %s (%s)", self.name, self.target.name, e)
        new_rec = AreaRecord(
            **{
                **asdict(rec),
                "repository": self.target.name,
                "repository_path": str(self.target.store.path),
                "save_to": "",
                "entry": entry.name,
                "manifest": entry.digest.hex(),
                "generation": rec.generation + 1,
            }
        )
        new_rec.save(self.dir / RECORD_FILE)
        self.record = new_rec
        self._load()
        for p in old:
            p.unlink(missing_ok=True)

    def check_saved(self) -> None:
        """Raise UsageError if the area holds changes not saved as an entry."""
        changed = self.changed_bytes()
        if changed:
            raise unsaved(self.name, changed)

    def destroy(self, discard: bool = False) -> None:
        """Delete the area, still holding its lock; refuses unsaved changes unless ``discard``."""
        with self.mutex:
            if not discard:
                self.check_saved()
            trash = self.dir.with_name(f".{self.name}.removing")
            os.rename(self.dir, trash)
            self.close()
        shutil.rmtree(trash, ignore_errors=True)
        if not self.repo.read_only:
            leases.release(self.repo, self.home, self.name)

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


def changed_bytes(home: Path, rec: AreaRecord) -> int:
    """Bytes written to an area since its last save (read without its lock)."""
    total = 0
    for p in (areas_dir(home) / rec.name).glob(f"*.{rec.generation}.overlay"):
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
            area.save(entry, message, progress, files, drop, hardware)
    except Locked:
        if control.mount_state(home) is None:
            raise
        files = files or {}
        if set(files) - {MEMORY_FILE} or any(p != areas_dir(home) / name / MEMORY_FILE for p in files.values()):
            raise UsageError(f"the mount saves only {MEMORY_FILE} of the area's directory with its disks") from None
        control.request(
            home,
            "save",
            area=name,
            entry=entry,
            message=message,
            memory=bool(files),
            drop=list(drop),
            hardware=hardware.to_json() if hardware else None,
        )
    return AreaRecord.load(areas_dir(home) / name / RECORD_FILE)


def close_area(home: Path, name: str, discard: bool = False) -> None:
    """Remove area ``name``, here or through the mount that serves it."""
    try:
        remove_area(home, name, discard)
    except Locked:
        if control.mount_state(home) is None:
            raise
        control.request(home, "close", area=name, discard=discard)
