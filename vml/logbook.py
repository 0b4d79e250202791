"""The logbook as directories and files: what the mount shows, without FUSE.

    /<repository>/<entry>/D.img          a disk, rebuilt on read from its chain
    /<repository>/<entry>/D-flat.vmdk    the same file (same node) under VMware's name
    /<repository>/<entry>/D.vmdk         a monolithicFlat descriptor naming D-flat.vmdk
    /<repository>/<entry>/<files>        the entry's configuration files
    /<repository>/<entry>/entry.json     what `vml show --json` prints
    /areas/<area>/...                    the same for a working area; D.img is writable

Paths are tuples of names. Every node has a key that is stable for as long
as what it shows does not change (entries are keyed by manifest digest), so
the mount can give it a stable inode; two names with one key are one file.
Entries never change, so their nodes are marked immutable and may be cached
by the kernel for as long as it likes.

Repository listings follow refs.json (re-read when it changes); an entry is
resolved once when first used and kept in a small LRU. Areas are opened,
and so locked by this process, when first used, and stay open until closed.
"""

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

from .areas import Area, list_areas, remove_area
from .config import Config
from .errors import NotFound, ReadOnly
from .manifest import RESERVED_FILE, disk_file_names
from .reader import ChunkCache, DiskReader
from .repository import Entry, Repository, parse_iso
from .store import Store
from .vmdk import descriptor

AREAS = "areas"
ENTRY_CACHE = 64


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

    def write(self, offset: int, data: bytes) -> None:
        raise ReadOnly("this file is read-only")

    def sync(self) -> None:
        pass


class BytesHandle(Handle):
    def __init__(self, data: bytes):
        self.data = data

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]


class ReaderHandle(Handle):
    def __init__(self, reader: DiskReader):
        self.reader = reader

    def read(self, offset: int, size: int) -> bytes:
        return self.reader.read(offset, size)


class AreaDiskHandle(Handle):
    def __init__(self, area: Area, disk: str):
        self.area, self.disk = area, disk

    def read(self, offset: int, size: int) -> bytes:
        return self.area.read(self.disk, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.area.write(self.disk, offset, data)

    def sync(self) -> None:
        self.area.sync(self.disk)


class FileSet:
    """The files of one entry or area: a small tree of nodes and their openers."""

    def __init__(self, key: tuple, mtime_ns: int, describe, generation: int = 0):
        self.key, self.mtime_ns, self._describe = key, mtime_ns, describe
        self.generation = generation  # of an area: the files are rebuilt after each save
        self.dirs: dict[tuple, dict[str, Node]] = {(): {}}
        self.openers: dict[tuple, object] = {}
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
    resolved = repo.resolve(entry.digest)
    for name, table in resolved.disks.items():
        reader = DiskReader(repo, table, f"entry {entry.name!r}, disk {name}", cache)
        _add_disk(fs, name, reader.size, reader.allocated(), lambda r=reader: ReaderHandle(r), True, False)
    for name, (table, mode) in resolved.files.items():
        reader = DiskReader(repo, table, f"entry {entry.name!r}, file {name}", cache)
        node = Node(
            (*fs.key, "file", name), False, reader.size, reader.allocated(), fs.mtime_ns, mode & 0o555, immutable=True
        )
        fs.add(tuple(name.split("/")), node, lambda r=reader: ReaderHandle(r))
    fs.add_json(immutable=True)
    return fs


def _add_disk(fs: FileSet, name: str, size: int, allocated: int, opener, immutable: bool, writable: bool) -> None:
    img, vmdk, flat = disk_file_names(name)
    mode = 0o644 if writable else 0o444
    disk = Node((*fs.key, "disk", name), False, size, allocated, fs.mtime_ns, mode, 2, immutable, writable)
    fs.add((img,), disk, opener)
    fs.add((flat,), disk, opener)
    desc = descriptor(name, size)
    fs.add(
        (vmdk,),
        Node((*fs.key, "vmdk", name), False, len(desc), len(desc), fs.mtime_ns, 0o444, immutable=True),
        lambda d=desc: BytesHandle(d),
    )


class Logbook:
    """Every configured repository and every working area of a VML home."""

    def __init__(self, home: Path, cache: ChunkCache | None = None):
        self.home = home
        self.cache = cache or ChunkCache()
        self._lock = threading.Lock()  # guards the dictionaries below, never held during I/O
        self._config: tuple[tuple, Config] | None = None
        self._repos: dict[Path, Repository] = {}
        self._refs: dict[Path, tuple[tuple, dict]] = {}
        self._entries: OrderedDict[tuple, FileSet] = OrderedDict()
        self._areas: dict[str, tuple[Area, FileSet]] = {}

    # -- sources ---------------------------------------------------------

    def config(self) -> Config:
        path = self.home / "config.toml"
        stamp = _stamp(path)
        with self._lock:
            if self._config and self._config[0] == stamp:
                return self._config[1]
        cfg = Config.load(self.home)
        with self._lock:
            self._config = (stamp, cfg)
        return cfg

    def repository(self, name: str) -> Repository:
        cfg = self.config()
        if name not in cfg.repositories or name == AREAS:
            raise NotFound(f"no repository {name!r}")
        path = cfg.repositories[name]
        with self._lock:
            repo = self._repos.get(path)
        if repo is None:
            repo = Repository(Store(path), name)
            with self._lock:
                self._repos[path] = repo
        return repo

    def refs(self, repo: Repository) -> dict[str, bytes]:
        path = repo.store.path
        stamp = _stamp(repo.store.refs_path)
        with self._lock:
            cached = self._refs.get(path)
            if cached and cached[0] == stamp:
                return cached[1]
        refs = repo.refs()
        with self._lock:
            self._refs[path] = (stamp, refs)
        return refs

    def entry(self, repo: Repository, name: str) -> FileSet:
        digest = self.refs(repo).get(name)
        if digest is None:
            raise NotFound(f"no entry {name!r} in repository {repo.name}")
        key = (repo.store.path, name, digest)
        with self._lock:
            fs = self._entries.get(key)
            if fs is not None:
                self._entries.move_to_end(key)
                return fs
        fs = entry_files(repo, Entry(name, digest, repo.manifest(digest, name)), self.cache)
        with self._lock:
            self._entries[key] = fs
            while len(self._entries) > ENTRY_CACHE:
                self._entries.popitem(last=False)
        return fs

    def area(self, name: str) -> tuple[Area, FileSet]:
        with self._lock:
            opened = self._areas.get(name)
        if opened is not None and opened[0].record.generation == opened[1].generation:
            return opened
        area = opened[0] if opened else Area(self.home, name, self.cache)
        fs = self._area_files(area)
        with self._lock:
            self._areas[name] = (area, fs)
        return area, fs

    def _area_files(self, area: Area) -> FileSet:
        mtime = int(parse_iso(area.record.created).timestamp() * 1e9)
        # Keys leave out the generation: a saved area's disk stays the same file.
        fs = FileSet(("area", area.name), mtime, area.describe, area.record.generation)
        for name, ov in area.disks.items():
            allocated = ov.base.allocated() + ov.changed_blocks() * ov.block
            _add_disk(fs, name, ov.size, min(allocated, ov.size), lambda n=name: AreaDiskHandle(area, n), False, True)
        for name, (reader, mode) in area.files.items():
            node = Node((*fs.key, "file", name), False, reader.size, reader.allocated(), mtime, mode & 0o555)
            fs.add(tuple(name.split("/")), node, lambda r=reader: ReaderHandle(r))
        fs.add_json(immutable=False)
        return fs

    # -- the tree ----------------------------------------------------------

    def listdir(self, path: tuple) -> dict[str, Node]:
        """The children of directory ``path``."""
        if not path:
            out = {AREAS: Node(("areas",), True, mode=0o755)}
            for name, p in self.config().repositories.items():
                if name != AREAS:
                    out[name] = Node(("repo", str(p)), True, mode=0o755)
            return out
        if path[0] == AREAS:
            if len(path) == 1:
                return {
                    r.name: Node(
                        ("areadir", r.name, r.created),
                        True,
                        mode=0o755,
                        mtime_ns=int(parse_iso(r.created).timestamp() * 1e9),
                    )
                    for r in list_areas(self.home)
                }
            area, fs = self.area(path[1])
            nodes = self._in_files(fs, path[2:])
            if path[2:] == ():  # disks show the time of their last write
                nodes = {
                    n: replace(node, mtime_ns=area.disks[node.key[3]].mtime_ns) if node.key[2] == "disk" else node
                    for n, node in nodes.items()
                }
            return nodes
        repo = self.repository(path[0])
        if len(path) == 1:
            out = {}
            for name, digest in self.refs(repo).items():
                m = repo.manifest(digest, name)
                out[name] = Node(
                    ("entrydir", str(repo.store.path), name, digest),
                    True,
                    immutable=True,
                    mtime_ns=int(parse_iso(m.created).timestamp() * 1e9),
                )
            return out
        return self._in_files(self.entry(repo, path[1]), path[2:])

    @staticmethod
    def _in_files(fs: FileSet, sub: tuple) -> dict[str, Node]:
        if sub not in fs.dirs:
            raise NotFound("no such directory")
        return fs.dirs[sub]

    def lookup(self, path: tuple) -> Node:
        node = self.listdir(path[:-1]).get(path[-1])
        if node is None:
            raise NotFound(f"no {'/'.join(path)}")
        return node

    def open(self, path: tuple, write: bool = False) -> Handle:
        node = self.lookup(path)
        if node.is_dir:
            raise NotFound(f"{'/'.join(path)} is a directory")
        if write and not node.writable:
            raise ReadOnly(f"{'/'.join(path)} is read-only")
        if path[0] == AREAS:
            _, fs = self.area(path[1])
        else:
            fs = self.entry(self.repository(path[0]), path[1])
        return fs.openers[path[2:]]()

    # -- areas -------------------------------------------------------------

    def save_area(self, name: str, entry: str, message: str = "") -> Entry:
        area, _ = self.area(name)
        saved = area.save(entry, message)
        with self._lock:
            self._refs.pop(area.repo.store.path, None)
        return saved

    def close_area(self, name: str, discard: bool = False) -> None:
        with self._lock:
            opened = self._areas.pop(name, None)
        if opened is not None:
            opened[0].close()
        remove_area(self.home, name, discard)

    def open_areas(self) -> list[str]:
        with self._lock:
            return list(self._areas)

    def close(self) -> None:
        with self._lock:
            areas, self._areas = list(self._areas.values()), {}
        for area, _ in areas:
            area.close()


def _stamp(path: Path) -> tuple:
    try:
        st = os.stat(path)
        return st.st_ino, st.st_mtime_ns, st.st_size
    except FileNotFoundError:
        return ()
