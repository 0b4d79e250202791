"""Saving entries: chunk, hash, compress and store disks and files.

The calling thread reads chunks in order (skipping holes with SEEK_DATA, so
a sparse 20 GiB image costs nothing for its empty parts); worker threads
check for zeros, hash, compare with the reference entry and compress what is
new. At most ``4 * workers`` chunks are in flight, which bounds memory.

A save holds the repository lock throughout. Nothing is visible until the
final refs update; if the save fails, the objects it created are removed
again, and if it is killed they stay unreferenced until `vml gc`.
"""

import contextlib
import errno
import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import AlreadyExists, BadSource, UsageError
from ..files import storage_error
from ..names import check_name
from ..progress import SILENT, Progress
from ..repo import chunkmap, objects
from ..repo.chunkmap import ChunkTable, Record
from ..repo.hardware import Hardware, describe_directory
from ..repo.manifest import ENVIRONMENT, KINDS, Link, Manifest, Stream, check_size
from ..repo.objects import HOLE
from ..repo.repository import EMPTY, Entry, Repository, Resolved
from ..repo.store import Store
from ..times import now_iso
from .sources import discover, raw_view


class _Done:
    """A finished stand-in for a Future, so holes keep their place in line."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value

    def done(self):
        return True


class ChunkWriter:
    """Stores streams of one save as chunks; can undo the objects it created."""

    def __init__(self, store: Store, chunk_size: int, progress: Progress = SILENT, workers: int | None = None):
        self.store = store
        self.chunk_size = chunk_size
        self.progress = progress
        self.workers = workers or os.cpu_count() or 2
        self.max_inflight = 4 * self.workers
        self.created: list[bytes] = []
        # Chunks go into packs, in stream order (the collector adds them), where the repository packs them.
        self.packer = store.pack_writer()
        self._zero = bytes(chunk_size)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="vml-save")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def rollback(self) -> None:
        for d in self.created:
            self.store.remove_object(d)
        self.created.clear()
        if self.packer is not None:
            self.packer.rollback()

    def seal(self, repo: Repository, digest: bytes) -> None:
        """Store the last pack, and the pack set of the entry with manifest ``digest`` (format 2)."""
        if self.packer is None:
            return
        self.packer.flush()
        self.store.packs.write_packset(digest, repo.packs_of(digest))

    @contextlib.contextmanager
    def undone_on_failure(self, what: str, landed=lambda: False):
        """Run the block; if it fails, remove the objects it created, unless ``landed()`` says its result is in.

        The workers are stopped first, so none stores an object after the
        roll back. An OSError becomes one line naming ``what``.
        """
        try:
            yield self
        except BaseException as e:
            self.close()
            if not landed():
                self.rollback()
            if isinstance(e, OSError):
                raise storage_error(e, what) from None
            raise
        finally:
            self.close()

    def put_metadata(self, data: bytes) -> bytes:
        d, _, created = self.store.put(data)
        if created:
            self.created.append(d)
        return d

    def store_stream(self, path: Path, size: int, ref: ChunkTable | None) -> bytes:
        """Store the first ``size`` bytes of ``path``; return its chunk map's digest.

        With a reference table, only chunks that differ from it are stored
        and listed (a delta map); without, every chunk that is not zero.
        """
        fd = os.open(path, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            return self.store_chunks(self._read_chunks(fd, path, size, ref), size, ref)
        finally:
            os.close(fd)

    def store_chunks(self, chunks, size: int, ref: ChunkTable | None) -> bytes:
        """Store chunks of a stream of ``size`` bytes; return its chunk map's digest.

        ``chunks`` yields (index, bytes), each index once, or
        (index, None) for a chunk known to be zeros. A chunk not yielded is
        taken to be the reference's, as for the clean chunks of a working
        area.
        """
        records: list[Record] = []
        pending: deque = deque()

        def collect(fut) -> None:
            index, d, csize, frame = fut.result()
            if frame is not None:
                self.packer.add(d, frame)
            if d != (ref.digest(index) if ref else HOLE):
                records.append((index, d, csize))
            self.progress.advance(min(self.chunk_size, size - index * self.chunk_size))

        try:
            for index, data in chunks:
                if data is None:
                    pending.append(_Done((index, HOLE, 0, None)))
                else:
                    ref_digest = ref.digest(index) if ref else HOLE
                    pending.append(self._pool.submit(self._process, index, data, ref_digest))
                while pending and (len(pending) > self.max_inflight or pending[0].done()):
                    collect(pending.popleft())
            while pending:
                collect(pending.popleft())
        except BaseException:
            # Let running workers finish before the caller rolls back, or
            # they could create objects after the rollback.
            futures = [f for f in pending if isinstance(f, Future)]
            for f in futures:
                f.cancel()
            wait(futures)
            raise
        return self.put_metadata(chunkmap.encode(sorted(records)))  # chunks may come in any order

    def _process(self, index: int, data: bytes, ref_digest: bytes) -> tuple[int, bytes, int, bytes | None]:
        """(index, digest, stored size, frame for the collector to pack or None)."""
        zero = self._zero if len(data) == self.chunk_size else bytes(len(data))
        if data == zero:
            return index, HOLE, 0, None
        d = objects.digest(data)
        if d == ref_digest and not (self.store.damage.touches(d) and not self.store.has_good(d)):
            return index, d, 0, None  # unchanged: not stored, not listed (unless its only copies are damaged)
        if self.packer is not None:
            if self.store.has_good(d):
                return index, d, self.store.object_size(d), None
            frame = objects.compress(data)
            return index, d, len(frame), frame
        d, csize, created = self.store.put(data, d)
        if created:
            self.created.append(d)
        return index, d, csize, None

    def _read_chunks(self, fd: int, path: Path, size: int, ref: ChunkTable | None):
        """Yield (index, bytes) for each chunk with data, and (index, None) for a hole where ``ref`` has data.

        Runs of holes are skipped with SEEK_DATA without visiting their
        chunks, so a sparse image declaring terabytes costs only its data.
        """
        cs = self.chunk_size
        count = chunkmap.chunk_count(size, cs)
        index = 0
        seekable = True
        while index < count:
            off = index * cs
            data_start, data_end = off, size
            if seekable:
                try:
                    data_start = os.lseek(fd, off, os.SEEK_DATA)
                    data_end = os.lseek(fd, data_start, os.SEEK_HOLE)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # no data after off
                        data_start = size
                    else:  # SEEK_DATA unsupported here: read everything
                        seekable, data_start, data_end = False, off, size
            first = min(data_start // cs, count)
            if first > index:  # chunks index..first-1 are holes
                listed = ref.indexes_in(index, first) if ref else ()
                for i in listed:
                    yield i, None  # the reference has data here: counted when collected
                skipped = min(first * cs, size) - off - sum(chunkmap.chunk_length(size, cs, i) for i in listed)
                self.progress.advance(skipped)
                index = first
                continue
            stop = min(chunkmap.chunk_count(data_end, cs), count)
            for i in range(index, stop):
                n = min(cs, size - i * cs)
                data = os.pread(fd, n, i * cs)
                if len(data) != n:
                    raise BadSource(f"{path}: file shrank while it was being saved")
                yield i, data
            index = stop


def _manifest(source, max_size: int, **fields) -> Manifest:
    try:
        m = Manifest(**fields)
        m.check_sizes(max_size)
        return m
    except ValueError as e:
        raise BadSource(f"{source}: cannot be saved as an entry: {e}") from None


@dataclass(frozen=True)
class Plan:
    """What a new entry builds on, for the code that stores its streams."""

    kind: str
    parent: Entry | None
    chunk_size: int
    ref: Resolved  # the reference's content: only chunks differing from it are stored


def write_entry(
    repo: Repository,
    name: str,
    build,
    *,
    parent: str | Entry | None = None,
    kind: str | None = None,
    message: str = "",
    what: str = "",
    progress: Progress = SILENT,
    workers: int | None = None,
    hardware: Hardware | None = None,
    on_commit=None,
    chunk_size: int | None = None,
    extra: dict | None = None,
) -> Entry:
    """Create entry ``name``: ``build(writer, plan)`` stores its streams.

    ``chunk_size`` applies to an entry without a parent (one with a parent
    keeps the parent's); ``extra`` adds keys to the manifest (an
    environment entry's description).

    ``hardware`` describes the VM; without it the entry keeps its parent's.
    ``on_commit(store, digest)``, if given, runs under the lock right after
    the entry's ref lands (a working area records its lease there).

    ``build`` returns (disks, files) as Stream tuples. This holds the
    repository lock throughout, commits with one refs update, and removes
    every object it created if anything fails before that. ``what`` names
    the source in error messages.
    """
    check_name(name)
    if kind is not None and kind not in KINDS:
        raise UsageError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    store = repo.store
    with store.lock(f"vml save {name}"):
        if name in repo.refs():
            raise AlreadyExists(f"entry {name!r} already exists in repository {repo.name}")
        parent_entry = repo.entry(parent) if isinstance(parent, str) else parent
        if parent_entry is not None and parent_entry.manifest.is_environment != bool(extra and extra.get(ENVIRONMENT)):
            raise UsageError(
                f"entry {parent_entry.name!r} cannot be the parent: an environment backup and a VM's disks "
                "do not build on each other"
            )
        kind = kind or ("incremental" if parent_entry else "full")
        if kind != "full" and parent_entry is None:
            raise UsageError(f"a {kind} entry needs --parent")
        base = reference = None
        if kind == "incremental":
            reference = parent_entry.digest
        elif kind == "differential":
            base_digest, base_manifest = repo.base_of(parent_entry.digest)
            base = Link(base_manifest.name, base_digest)
            reference = base_digest
        chunk_size = parent_entry.manifest.chunk_size if parent_entry else chunk_size or store.chunk_size
        plan = Plan(kind, parent_entry, chunk_size, repo.resolve(reference) if reference else EMPTY)
        writer = ChunkWriter(store, chunk_size, progress, workers)
        # The refs update may land before a late error: then the objects stay.
        with writer.undone_on_failure(f"saving entry {name!r} into {store.path}", lambda: name in repo.refs()):
            disks, files = build(writer, plan)
            manifest = _manifest(
                what,
                repo.max_disk_size,
                name=name,
                kind=kind,
                created=now_iso(),
                message=message,
                chunk_size=chunk_size,
                parent=Link(parent_entry.name, parent_entry.digest) if parent_entry else None,
                base=base,
                disks=tuple(disks),
                files=tuple(files),
                hardware=hardware or (parent_entry.manifest.hardware if parent_entry else None),
                extra=dict(extra or {}),
            )
            digest = writer.put_metadata(manifest.encode())
            writer.seal(repo, digest)
            store.sync()
            store.update_refs({name: digest})
            if on_commit is not None:
                on_commit(store, digest)
    return repo.entry(name)


def save_source(
    repo: Repository,
    name: str,
    source: Path | str,
    *,
    parent: str | Entry | None = None,
    kind: str | None = None,
    message: str = "",
    fmt: str | None = None,
    progress: Progress = SILENT,
    workers: int | None = None,
    allow_outside: bool = False,
) -> Entry:
    """Save a disk image or VM directory as entry ``name``.

    ``kind`` defaults to incremental when a parent is given, else full.
    ``allow_outside`` accepts backing files, data files and extents outside
    the image's directory (never URLs or devices).
    """
    check_name(name)
    disks, files = discover(source, fmt, allow_outside=allow_outside)
    hardware = None
    if Path(source).is_dir():
        hardware = describe_directory(Path(source), {d.path.name: d.name for d in disks}, {f.name for f in files})
    file_sizes = [f.path.stat().st_size for f in files]
    try:  # refused before reading anything
        for d in disks:
            check_size(d.name, d.size, repo.max_disk_size)
        for f, size in zip(files, file_sizes, strict=True):
            check_size(f.name, size, repo.max_disk_size)
    except ValueError as e:
        raise BadSource(f"{source}: {e}") from None
    progress.start(sum(d.size for d in disks) + sum(file_sizes))

    def build(writer: ChunkWriter, plan: Plan):
        nonlocal disks
        parent_disks = plan.parent.manifest.disks if plan.parent else ()
        if len(parent_disks) == 1 and not Path(source).is_dir():
            # A single image saved on a parent is the next state of the
            # parent's disk, whatever the image file is called.
            disks = [replace(disks[0], name=parent_disks[0].name)]
        staging = repo.store.staging_dir("save.")
        try:
            disk_streams = []
            for d in disks:
                with raw_view(d, staging) as raw:
                    map_digest = writer.store_stream(raw, d.size, plan.ref.disks.get(d.name))
                disk_streams.append(Stream(d.name, d.size, map_digest))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        file_streams = []
        for f, size in zip(files, file_sizes, strict=True):
            ref_file = plan.ref.files.get(f.name)
            map_digest = writer.store_stream(f.path, size, ref_file[0] if ref_file else None)
            file_streams.append(Stream(f.name, size, map_digest, f.mode))
        return disk_streams, file_streams

    return write_entry(
        repo,
        name,
        build,
        parent=parent,
        kind=kind,
        message=message,
        what=str(source),
        progress=progress,
        workers=workers,
        hardware=hardware,
    )
