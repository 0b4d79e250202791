"""The files of one entry or working area, as nodes and the handles that open them.

A FileSet is built once per entry (or per generation of an area): a small
tree of Node values (what `stat` shows) and openers that return Handles
(what `read`/`write` use). See vml.view.logbook for the whole tree.
"""

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..entries.envtree import env_records, shown_files
from ..entries.reader import ChunkCache, DiskReader
from ..entries.vmdk import descriptor
from ..errors import ReadOnly
from ..repo.manifest import RESERVED_FILE, disk_file_names
from ..repo.repository import Entry, Repository
from ..times import parse_iso
from ..vms.area import Area


@dataclass(frozen=True)
class Node:
    key: tuple
    is_dir: bool
    size: int = 0
    allocated: int = 0
    mtime_ns: int = 0
    mode: int = 0o555
    nlink: int = 1
    immutable: bool = False
    writable: bool = False


class Handle:
    """An open file of the logbook."""

    def read(self, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def read_cached(self, offset: int, size: int) -> bytes | None:
        """The bytes if they are at hand without I/O, else None."""
        return None

    reader: "DiskReader | None" = None  # set for immutable disks and files: what may be prefetched

    def write(self, offset: int, data: bytes) -> None:
        raise ReadOnly("this file is read-only")

    def sync(self) -> None:
        pass

    def release(self) -> None:
        pass


class BytesHandle(Handle):
    def __init__(self, data: bytes):
        self.data = data

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]

    def read_cached(self, offset: int, size: int) -> bytes | None:
        return self.data[offset : offset + size]


class ReaderHandle(Handle):
    def __init__(self, reader: DiskReader):
        self.reader = reader

    def read(self, offset: int, size: int) -> bytes:
        return self.reader.read(offset, size)

    def read_cached(self, offset: int, size: int) -> bytes | None:
        return self.reader.read_cached(offset, size)


class AreaDiskHandle(Handle):
    def __init__(self, area: Area, disk: str):
        self.area, self.disk = area, disk
        area.opened(+1)
        self._open = True

    def release(self) -> None:
        if self._open:
            self._open = False
            self.area.opened(-1)

    def read(self, offset: int, size: int) -> bytes:
        return self.area.read(self.disk, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.area.write(self.disk, offset, data)

    def sync(self) -> None:
        self.area.sync(self.disk)


class FileHandle(Handle):
    """A staged file of an incoming copy: a plain file on local disk."""

    def __init__(self, path: Path, write: bool, activity):
        # Counted open before it is: a copy with an open file is never finalized.
        self.activity = activity
        activity(+1)
        try:
            self.fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
        except BaseException:
            self.fd = -1
            activity(-1)
            raise

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def sync(self) -> None:
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.activity(-1)


class FileSet:
    """The files of one entry or area: a small tree of nodes and their openers."""

    def __init__(self, key: tuple, mtime_ns: int, describe, generation: int = 0):
        self.key, self.mtime_ns, self._describe = key, mtime_ns, describe
        self.generation = generation  # of an area: the files are rebuilt after each save
        self.dirs: dict[tuple, dict[str, Node]] = {(): {}}
        self.openers: dict[tuple, object] = {}
        self.disks: dict[str, str] = {}  # file name at the top -> the disk it shows (D.img and D-flat.vmdk)
        self._json: bytes | None = None

    def add(self, path: tuple, node: Node, opener) -> None:
        for i in range(1, len(path)):
            sub = path[:i]
            if sub not in self.dirs:
                self.dirs[sub] = {}
                self.dirs[sub[:-1]][sub[-1]] = Node(
                    (*self.key, "dir", sub), True, mtime_ns=self.mtime_ns, immutable=node.immutable
                )
        self.dirs[path[:-1]][path[-1]] = node
        self.openers[path] = opener

    def add_json(self, immutable: bool) -> None:
        data = self.json()
        self.add(
            (RESERVED_FILE,),
            Node((*self.key, "json"), False, len(data), len(data), self.mtime_ns, 0o444, immutable=immutable),
            lambda: BytesHandle(self.json()),
        )

    def json(self) -> bytes:
        if self._json is None:
            self._json = (json.dumps(self._describe(), indent=2) + "\n").encode()
        return self._json


def entry_files(repo: Repository, entry: Entry, cache: ChunkCache) -> FileSet:
    """The files of an entry, resolved once."""
    m = entry.manifest
    mtime = parse_iso(m.created).timestamp() * 1e9
    fs = FileSet(("entry", str(repo.store.path), entry.name, entry.digest), int(mtime), lambda: repo.describe(entry))
    if m.is_environment:
        _environment_files(fs, repo, entry, cache)
        fs.add_json(immutable=True)
        return fs
    resolved = repo.resolve(entry.digest)
    for name, table in resolved.disks.items():
        reader = DiskReader(repo, table, f"entry {entry.name!r}, disk {name}", cache)
        add_disk(fs, name, reader.size, reader.allocated(), lambda r=reader: ReaderHandle(r), True, False)
    for name, (table, mode) in resolved.files.items():
        reader = DiskReader(repo, table, f"entry {entry.name!r}, file {name}", cache)
        node = Node(
            (*fs.key, "file", name), False, reader.size, reader.allocated(), fs.mtime_ns, mode & 0o555, immutable=True
        )
        fs.add(tuple(name.split("/")), node, lambda r=reader: ReaderHandle(r))
    fs.add_json(immutable=True)
    return fs


class SliceHandle(Handle):
    """One captured file of an environment entry: a range of its data stream.

    It has no ``reader``: the mount's read-ahead pushes a reader's chunks at
    the reader's offsets, which are not this file's.
    """

    def __init__(self, data: DiskReader, start: int, size: int):
        self.data, self.start, self.size = data, start, size

    def read(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        return self.data.read(self.start + offset, size) if size else b""


def _environment_files(fs: FileSet, repo: Repository, entry: Entry, cache: ChunkCache) -> None:
    """The captured tree, read-only, under the entry's directory (``home/alice/...``).

    Directories and regular files are shown with their modes and times (hard
    links as copies); symlinks and special files are not, as the mount shows
    no such nodes. Owners are the mount's, as for every entry.
    """
    records, data = env_records(repo, entry)
    cs = entry.manifest.chunk_size
    for path, r in shown_files(records):
        key = (*fs.key, "env", r.path)
        if r.type == "d":
            if path not in fs.dirs:
                fs.dirs[path] = {}
                fs.add(path, Node(key, True, mtime_ns=r.mtime_ns, mode=r.mode & 0o555, immutable=True), None)
            continue
        node = Node(key, False, r.size, r.size, r.mtime_ns, r.mode & 0o555, immutable=True)
        fs.add(path, node, lambda r=r: SliceHandle(data, r.slot * cs, r.size))


def add_disk(fs: FileSet, name: str, size: int, allocated: int, opener, immutable: bool, writable: bool) -> None:
    img, vmdk, flat = disk_file_names(name)
    mode = 0o644 if writable else 0o444
    disk = Node((*fs.key, "disk", name), False, size, allocated, fs.mtime_ns, mode, 2, immutable, writable)
    fs.add((img,), disk, opener)
    fs.add((flat,), disk, opener)
    fs.disks[img] = fs.disks[flat] = name
    desc = descriptor(name, size)
    fs.add(
        (vmdk,),
        Node((*fs.key, "vmdk", name), False, len(desc), len(desc), fs.mtime_ns, 0o444, immutable=True),
        lambda d=desc: BytesHandle(d),
    )


def staged_node(p: Path) -> Node:
    st = os.lstat(p)
    is_dir = stat.S_ISDIR(st.st_mode)
    key = ("incoming", str(p))  # by path: inode numbers of removed files are reused
    return Node(
        key,
        is_dir,
        st.st_size,
        st.st_blocks * 512,
        st.st_mtime_ns,
        stat.S_IMODE(st.st_mode),
        st.st_nlink,
        writable=True,
    )
