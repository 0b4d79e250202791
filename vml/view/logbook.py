"""The logbook as directories and files: what the mount shows, without FUSE.

    /<repository>/<entry>/D.img          a disk, rebuilt on read from its chain
    /<repository>/<entry>/D-flat.vmdk    the same file (same node) under VMware's name
    /<repository>/<entry>/D.vmdk         a monolithicFlat descriptor naming D-flat.vmdk
    /<repository>/<entry>/<files>        the entry's configuration files
    /<repository>/<entry>/entry.json     what `vml show --json` prints, but the certificates
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

import contextlib
import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

from ..config import Config
from ..entries import copies
from ..entries.reader import ChunkCache
from ..errors import AlreadyExists, Corrupt, NotFound, ReadOnly
from ..layout import areas_dir, cache_dir, config_path
from ..names import check_name
from ..remotes.catalog import CATALOG_FILE
from ..repo.repository import Entry, Repository
from ..repo.store import REFS_FILE
from ..times import parse_iso
from ..vms.area import Area
from ..vms.areas import list_areas, remove_area
from .fileset import AreaDiskHandle, FileHandle, FileSet, Handle, Node, ReaderHandle, add_disk, entry_files, staged_node

log = logging.getLogger(__name__)

AREAS = "areas"
ENTRY_CACHE = 64


class Logbook:
    """Every configured repository and every working area of a VML home."""

    def __init__(self, home: Path, cache: ChunkCache | None = None):
        self.home = home
        self.cache = cache or ChunkCache()
        self._lock = threading.Lock()  # guards the dictionaries below, never held during I/O
        self._config: tuple[tuple, Config] | None = None
        self._repos: dict[tuple, Repository] = {}
        self._refs: dict[Path, tuple[tuple, dict]] = {}
        self._entries: OrderedDict[tuple, FileSet] = OrderedDict()
        self._areas: dict[str, tuple[Area, FileSet]] = {}
        self._area_open_lock = threading.Lock()  # serializes opening and closing areas
        self._incoming: dict[tuple, list] = {}  # (repo, name) -> [open handles, time of last change]

    # -- sources ---------------------------------------------------------

    def config(self) -> Config:
        path = config_path(self.home)
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
        if name == AREAS or (name not in cfg.repositories and name not in cfg.remotes):
            raise NotFound(f"no repository {name!r}")
        key = (name, cfg.repositories.get(name), cfg.remotes.get(name))
        with self._lock:
            repo = self._repos.get(key)
        if repo is None:
            repo = cfg.open(name)
            with self._lock:
                self._repos[key] = repo
        return repo

    def refs(self, repo: Repository) -> dict[str, bytes]:
        if repo.read_only:
            return repo.refs()  # a remote keeps its catalog for its own time to live
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
        if opened is not None and opened[0].version == opened[1].generation:
            return opened
        with self._area_open_lock:  # one opener at a time: the second would find the area locked
            with self._lock:
                opened = self._areas.get(name)
            if opened is not None and opened[0].version == opened[1].generation:
                return opened
            area = opened[0] if opened else Area(self.home, name, self.cache)
            fs = self._area_files(area)
            with self._lock:
                self._areas[name] = (area, fs)
            return area, fs

    def _area_files(self, area: Area) -> FileSet:
        mtime = int(parse_iso(area.record.created).timestamp() * 1e9)
        # Keys leave out the generation: a saved area's disk stays the same file.
        fs = FileSet(("area", area.name), mtime, area.describe, area.version)
        for name, info in area.disk_info().items():
            add_disk(fs, name, info.size, info.allocated, lambda n=name: AreaDiskHandle(area, n), False, True)
        for name, (reader, mode) in area.entry_files().items():
            node = Node((*fs.key, "file", name), False, reader.size, reader.allocated(), mtime, mode & 0o555)
            fs.add(tuple(name.split("/")), node, lambda r=reader: ReaderHandle(r))
        fs.add_json(immutable=False)
        return fs

    # -- the tree ----------------------------------------------------------

    def listdir(self, path: tuple) -> dict[str, Node]:
        """The children of directory ``path``."""
        if not path:
            areas_mtime = _mtime(areas_dir(self.home)) or _mtime(config_path(self.home))
            out = {AREAS: Node(("areas",), True, mode=0o755, mtime_ns=areas_mtime)}
            cfg = self.config()
            for name, p in cfg.repositories.items():
                if name != AREAS:  # a repository changes when its refs do
                    out[name] = Node(("repo", str(p)), True, mode=0o755, mtime_ns=_mtime(p / REFS_FILE))
            for name, rc in cfg.remotes.items():
                catalog = cache_dir(self.home, name) / CATALOG_FILE
                out[name] = Node(("remote", name, rc.url), True, mode=0o555, mtime_ns=_mtime(catalog) or 0)
            return out
        if path[0] == AREAS:
            if len(path) == 1:
                return {
                    r.name: Node(
                        ("areadir", r.name, r.created),
                        True,
                        mode=0o700,  # an area is its owner's, even on a mount others may read
                        mtime_ns=int(parse_iso(r.created).timestamp() * 1e9),
                    )
                    for r in list_areas(self.home)
                }
            area, fs = self.area(path[1])
            nodes = {n: replace(node, mode=node.mode & 0o700) for n, node in self._in_files(fs, path[2:]).items()}
            if path[2:] == ():  # disks show the time of their last write
                info = area.disk_info()
                nodes = {
                    n: replace(node, mtime_ns=info[fs.disks[n]].mtime_ns) if n in fs.disks else node
                    for n, node in nodes.items()
                }
            return nodes
        repo = self.repository(path[0])
        if len(path) == 1:
            out = {}
            refs = self.refs(repo)
            for name, digest in refs.items():
                try:
                    m = repo.manifest(digest, name)
                except Corrupt as e:  # one damaged entry must not hide the others
                    log.error("%s", e)
                    continue
                out[name] = Node(
                    ("entrydir", str(repo.store.path), name, digest),
                    True,
                    immutable=True,
                    mtime_ns=int(parse_iso(m.created).timestamp() * 1e9),
                )
            staged = copies.incoming_dir(self.home) / path[0]
            if staged.is_dir():
                for p in staged.iterdir():
                    if p.name not in refs and not p.name.startswith("."):
                        out[p.name] = staged_node(p)
            return out
        staged = self._staged(path)
        if staged is not None:
            if not staged.is_dir():
                raise NotFound(f"no directory {'/'.join(path)}")
            return {p.name: staged_node(p) for p in staged.iterdir()}
        return self._in_files(self.entry(repo, path[1]), path[2:])

    @staticmethod
    def _in_files(fs: FileSet, sub: tuple) -> dict[str, Node]:
        if sub not in fs.dirs:
            raise NotFound("no such directory")
        return fs.dirs[sub]

    def root(self) -> Node:
        return Node((), True, mode=0o755, mtime_ns=_mtime(config_path(self.home)))

    def lookup(self, path: tuple) -> Node:
        node = self.listdir(path[:-1]).get(path[-1])
        if node is None:
            raise NotFound(f"no {'/'.join(path)}")
        return node

    def open(self, path: tuple, write: bool = False) -> Handle:
        staged = self._staged(path)
        if staged is not None and len(path) > 2:
            return FileHandle(staged, write, self._activity(path))
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

    # -- copies into a repository ------------------------------------------

    def _staged(self, path: tuple) -> Path | None:
        """Where ``path`` is staged, if it lies in an incoming copy."""
        if len(path) < 2 or path[0] == AREAS or path[0] not in self.config().repositories:
            return None
        top = copies.staging_path(self.home, path[0], path[1])
        if not top.is_dir():
            return None
        for part in path[2:]:
            if part in ("", ".", "..") or "/" in part:
                raise NotFound(f"bad name {part!r}")
        return top.joinpath(*path[2:])

    def _activity(self, path: tuple):
        """A callback that records activity (and open handles) in an incoming copy."""
        key = path[:2]

        def note(delta: int = 0) -> None:
            with self._lock:
                state = self._incoming.setdefault(key, [0, 0.0])
                state[0] += delta
                state[1] = time.monotonic()

        note()
        return note

    def _writable(self, path: tuple) -> Path:
        """The staged path for a change at ``path``; ReadOnly outside incoming copies."""
        staged = self._staged(path) if len(path) > 2 else None
        if staged is None:
            raise ReadOnly(
                f"{'/'.join(path)}: entries never change; copy an entry into a repository "
                "directory, or open it in a working area"
            )
        self._activity(path)
        return staged

    def mkdir(self, path: tuple, mode: int) -> Node:
        if len(path) == 2 and path[0] != AREAS:
            repo = self.repository(path[0])
            if repo.read_only:
                raise ReadOnly(f"{path[0]} is a remote: copy into a local repository's directory")
            check_name(path[1])
            if path[1] in self.refs(repo):
                raise AlreadyExists(f"entry {path[1]!r} already exists in repository {repo.name}")
            staged = copies.staging_path(self.home, path[0], path[1])
            staged.mkdir(parents=True, exist_ok=False)
            self._activity(path)
            return staged_node(staged)
        staged = self._writable(path)
        staged.mkdir(mode & 0o777)
        return staged_node(staged)

    def create(self, path: tuple, mode: int) -> tuple[Node, Handle]:
        staged = self._writable(path)
        os.close(os.open(staged, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, mode & 0o777))
        return staged_node(staged), FileHandle(staged, True, self._activity(path))

    def unlink(self, path: tuple) -> None:
        os.unlink(self._writable(path))

    def rmdir(self, path: tuple) -> None:
        staged = self._staged(path)
        if len(path) == 2 and staged is not None:
            staged.rmdir()  # OSError ENOTEMPTY unless empty
            with self._lock:
                self._incoming.pop(path, None)
            return
        os.rmdir(self._writable(path))

    def link(self, path: tuple, new_path: tuple) -> Node:
        if path[:2] != new_path[:2]:
            raise OSError(errno.EXDEV, "links only within one copied entry")
        dst = self._writable(new_path)
        os.link(self._writable(path), dst)
        return staged_node(dst)

    def rename(self, path: tuple, new_path: tuple) -> None:
        if path[:2] != new_path[:2]:
            raise OSError(errno.EXDEV, "renames only within one copied entry")
        os.rename(self._writable(path), self._writable(new_path))

    def set_attributes(self, path: tuple, size: int | None, mode: int | None, mtime_ns: int | None) -> Node:
        """Truncate, chmod or touch a staged file; entries and areas keep theirs."""
        staged = self._staged(path) if len(path) > 2 else None
        if staged is None:
            node = self.lookup(path)
            if size is not None and size != node.size:
                raise ReadOnly(f"{'/'.join(path)}: disks keep their size")
            return node
        self._activity(path)
        if size is not None:
            os.truncate(staged, size)
        if mode is not None:
            os.chmod(staged, mode & 0o7777)
        if mtime_ns is not None:
            os.utime(staged, ns=(mtime_ns, mtime_ns))
        return staged_node(staged)

    def ready_copies(self, quiet: float) -> list[tuple[str, str]]:
        """Incoming copies with nothing open and no change for ``quiet`` seconds."""
        now = time.monotonic()
        out = []
        for repo, name, _ in copies.pending(self.home):
            with self._lock:
                opened, last = self._incoming.setdefault((repo, name), [0, now])
            if opened == 0 and now - last >= quiet:
                out.append((repo, name))
        return out

    def finalize_copy(self, repo_name: str, name: str) -> Entry:
        """Turn an incoming copy into an entry, if it is exactly one (see vml.entries.copies).

        The staged directory is first moved aside, under the lock and with
        nothing in it open, so that anything written into the copy from then
        on fails where the writer sees it, rather than being dropped. If the
        copy is not taken, it is put back and left alone until it changes.
        """
        target = self.repository(repo_name)
        sources = [self.repository(n) for n in self.config().repositories if n not in (repo_name, AREAS)]
        staged = copies.staging_path(self.home, repo_name, name)
        aside = copies.aside_path(staged)
        with self._lock:
            opened, _ = self._incoming.get((repo_name, name), (0, 0.0))
            if opened:
                raise copies.NotTaken(f"{staged}: files in it are open")
            os.rename(staged, aside)
            self._incoming.pop((repo_name, name), None)
        try:
            entry = copies.finalize(target, name, aside, sources)
        except BaseException:
            with self._lock:
                if not staged.exists():
                    os.rename(aside, staged)
                self._incoming[(repo_name, name)] = [0, float("inf")]  # not again until it changes
            raise
        with self._lock:
            self._refs.pop(target.store.path, None)
        return entry

    # -- areas -------------------------------------------------------------

    def save_served_area(self, name: str, entry: str, message: str = "", **options) -> Entry:
        """Save area ``name``; ``options`` as for Area.save."""
        area, _ = self.area(name)
        saved = area.save_changes(entry, message, **options)
        with self._lock:
            self._refs.pop(area.repo.store.path, None)
        return saved

    def close_area(self, name: str, discard: bool = False) -> None:
        """Delete area ``name``, which this process may be serving.

        Refuses (keeping the area served) while it has unsaved changes,
        unless ``discard``, or while any of its files is open.
        """
        with self._lock:
            opened = self._areas.get(name)
        # A save under way finishes first, before the open lock is taken, so
        # that lookups (which may need that lock) are not held up behind it.
        with opened[0].saving() if opened else contextlib.nullcontext(), self._area_open_lock:
            with self._lock:
                opened = self._areas.get(name)
            if opened is None:
                remove_area(self.home, name, discard)
                return
            opened[0].destroy(discard, refuse_open=True)
            with self._lock:
                self._areas.pop(name, None)

    def open_areas(self) -> list[str]:
        with self._lock:
            return list(self._areas)

    def close(self) -> None:
        with self._lock:
            areas, self._areas = list(self._areas.values()), {}
        for area, _ in areas:
            area.close()


def _mtime(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def _stamp(path: Path) -> tuple:
    try:
        st = os.stat(path)
        return st.st_ino, st.st_mtime_ns, st.st_size
    except FileNotFoundError:
        return ()
