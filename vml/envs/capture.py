"""`vml env save`: a user's home, histories and login environment from a VM's disk, as an entry.

The disk is read where it is (an entry through the library, an area in
process or through the mount that serves it); nothing is mounted and
nothing in the guest is executed. See envtree for how the files are stored
and docs/environments.md for what is captured.
"""

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..control import mount_state
from ..entries.reader import ChunkCache, DiskReader
from ..entries.save import ChunkWriter, Plan, write_entry
from ..errors import BadSource, Locked, NotFound, UsageError
from ..names import check_name
from ..progress import SILENT, Progress
from ..repo.manifest import Stream
from ..repo.repository import Entry, Repository
from ..vms.area import RECORD_FILE, Area, AreaRecord, open_entry
from ..vms.areas import areas_dir
from . import envtree, guestfs, loginenv
from .envtree import CHUNK_SIZE, DATA, INDEX, Record
from .patterns import Filter


@dataclass
class GuestSource:
    """The disks of an entry or area, open for reading, and what to record about where they came from."""

    where: str
    disks: dict[str, tuple[object, int]]
    origin: dict
    closers: list = field(default_factory=list)

    def close(self) -> None:
        for c in self.closers:
            c()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def filesystems(self) -> list[guestfs.GuestFS]:
        found = []
        for name, (fh, size) in self.disks.items():
            found += guestfs.filesystems(name, fh, size, f"{self.where}, disk {name}")
        return found


def _ranges(read, size: int):
    return io.BufferedReader(guestfs.ByteRanges(read, size), buffer_size=64 << 10)


def entry_source(repo: Repository, entry: Entry) -> GuestSource:
    if envtree.is_environment(entry.manifest):
        raise UsageError(f"entry {entry.name!r} is an environment backup, not a VM's disks")
    resolved = repo.resolve(entry.digest)
    cache = ChunkCache(64 << 20)
    disks = {}
    for name, table in resolved.disks.items():
        reader = DiskReader(repo, table, f"entry {entry.name!r}, disk {name}", cache)
        disks[name] = (_ranges(reader.read, reader.size), reader.size)
    origin = {"entry": entry.name, "repository": repo.name, "manifest": entry.digest.hex()}
    return GuestSource(f"entry {entry.name!r}", disks, origin)


def area_disk_paths(home: Path, area: str) -> dict[str, Path]:
    """The area's disks on the running mount, by name; UsageError if the logbook is not mounted."""
    state = mount_state(home)
    if state is None:
        raise UsageError(f"working area {area!r} is written through the mount: run `vml mount` first")
    rec = AreaRecord.load(_area_dir(home, area) / RECORD_FILE)
    _, entry = open_entry(home, rec)
    base = Path(state["mountpoint"]) / "areas" / area
    return {d.name: base / f"{d.name}.img" for d in entry.manifest.disks}


def _area_dir(home: Path, area: str) -> Path:
    check_name(area, "area")
    d = areas_dir(home) / area
    if not (d / RECORD_FILE).is_file():
        raise NotFound(f"no working area {area!r}")
    return d


def area_source(home: Path, area: str) -> GuestSource:
    """An area's disks: in process, or through the mount when the mount serves the area."""
    rec = AreaRecord.load(_area_dir(home, area) / RECORD_FILE)
    origin = {"area": area, "entry": rec.entry, "repository": rec.repository}
    try:
        a = Area(home, area)
    except Locked:
        if mount_state(home) is None:
            raise
        src = GuestSource(f"area {area!r}", {}, origin)
        for name, path in area_disk_paths(home, area).items():
            fh = open(path, "rb")  # noqa: SIM115 - closed with the source
            src.closers.append(fh.close)
            src.disks[name] = (fh, path.stat().st_size)
        return src
    src = GuestSource(f"area {area!r}", {}, origin, [a.close])
    for name, info in a.disk_info().items():
        src.disks[name] = (_ranges(lambda off, n, d=name: a.read(d, off, n), info.size), info.size)
    return src


def find_home(root: guestfs.GuestFS, where: str, user: str | None, home: str | None) -> tuple[str, int | None]:
    """(home path, uid or None): USER's home from the guest's /etc/passwd, else /home/USER, or --home."""
    if home is not None:
        if not home.startswith("/"):
            raise UsageError(f"--home {home!r}: give the absolute path in the guest")
        return home.rstrip("/") or "/", None
    users = guestfs.accounts(root.read_text("/etc/passwd"))
    if user in users:
        uid, _, path = users[user]
        return path or f"/home/{user}", uid
    return f"/home/{user}", None


def save_environment(
    repo: Repository,
    name: str,
    source: GuestSource,
    *,
    user: str | None = None,
    home: str | None = None,
    includes=(),
    excludes=(),
    adds=(),
    parent: str | None = None,
    message: str = "",
    progress: Progress = SILENT,
) -> Entry:
    """Capture a home (and ``adds``) from ``source`` into environment entry ``name``."""
    check_name(name)
    if user is None and home is None:
        raise UsageError("name the user (--user USER) or the home directory (--home PATH)")
    filt = Filter(includes, excludes)
    for p in adds:
        if not p.startswith("/"):
            raise UsageError(f"--add {p!r}: give an absolute path in the guest")
    parent_entry = repo.entry(parent) if parent else None
    if parent_entry is not None and not envtree.is_environment(parent_entry.manifest):
        raise UsageError(f"--parent {parent}: entry {parent!r} is not an environment backup")
    found = source.filesystems()
    root = guestfs.root_of(found, source.where)
    home_path, uid = find_home(root, source.where, user, home)
    located = guestfs.fs_holding(found, root, home_path)
    if located is None or not located[0].is_dir(located[1]):
        why = f" (user {user!r} is not in its /etc/passwd)" if user and uid is None and home is None else ""
        raise NotFound(f"{source.where}: no home directory {home_path}{why}")
    items = _walk(located, home_path, filt, always=[f"{home_path}/{h}" for h in loginenv.HISTORY_FILES])
    for p in adds:
        where = guestfs.fs_holding(found, root, p)
        if where is None:
            raise NotFound(f"{source.where}: --add {p}: no such path")
        items += _walk(where, p, Filter((), excludes), always=[])
    records, readers = _records(items)
    meta = _describe(root, source, home_path, user, records, includes, excludes, adds, located)
    progress.start(sum(r.size for r in records if r.type == "f"))

    def build(writer: ChunkWriter, plan: Plan):
        return _store(repo, writer, plan, records, readers, source.where)

    return write_entry(
        repo,
        name,
        build,
        parent=parent_entry,
        message=message,
        what=source.where,
        progress=progress,
        chunk_size=CHUNK_SIZE,
        extra={envtree.KEY: meta},
    )


def _walk(located, shown_root: str, filt: Filter, always: list[str]) -> list[tuple]:
    """(guest path, item, fs) for everything taken under one top directory; ``always`` kept unless excluded."""
    fs, top = located
    prefix = shown_root[: len(shown_root) - len(top)] if top != shown_root else ""

    def takes(path: str, is_dir: bool) -> bool:
        shown = prefix + path
        return filt.takes(shown, is_dir) or (shown in always and not filt.excluded(shown))

    return [(prefix + it.path if it.path != "/" else shown_root, it, fs) for it in fs.walk(top, takes)]


def _records(items) -> tuple[list[Record], dict[str, tuple]]:
    """Records sorted by path, hard links recorded once; readers: path -> (fs, item) for file data."""
    records: list[Record] = []
    readers: dict[str, tuple] = {}
    first_of_inode: dict[tuple, str] = {}
    seen: set[str] = set()
    for path, it, fs in sorted(items, key=lambda x: x[0]):
        if path in seen:
            continue
        seen.add(path)
        r = Record(path, it.type, it.mode, it.uid, it.gid, it.mtime_ns, it.atime_ns, it.ctime_ns, it.inum)
        r.xattrs = envtree.xattrs_text(it.xattrs)
        key = (id(fs), it.inum)
        if it.type not in "d" and key in first_of_inode:
            r.type, r.target = "h", first_of_inode[key]
        elif it.type == "f":
            r.size = it.size
            first_of_inode[key] = path
            readers[path] = (fs, it)
        elif it.type == "l":
            r.target = it.target
        elif it.type in "cb":
            r.rdev = it.rdev
        records.append(r)
    return records, readers


def _describe(root, source, home_path, user, records, includes, excludes, adds, located) -> dict:
    fs, top = located
    prefix = home_path[: len(home_path) - len(top)] if top != home_path else ""

    def read(path: str):
        if path.startswith("~/"):
            return fs.read_text(top.rstrip("/") + "/" + path[2:])
        return root.read_text(path)

    users = {u: n for n, (u, _, _) in guestfs.accounts(root.read_text("/etc/passwd")).items()}
    groups = {g: n for n, (g, _, _) in guestfs.accounts(root.read_text("/etc/group")).items()}
    release = guestfs.os_release(root.read_text("/etc/os-release"))
    cernvm = (root.read_text("/etc/cernvm-release") or "").strip()
    files = [r for r in records if r.type == "f"]
    histories = [f"{home_path}/{h}" for h in loginenv.HISTORY_FILES if any(r.path == f"{home_path}/{h}" for r in files)]
    del prefix
    return {
        "format": 1,
        "user": user,
        "home": home_path,
        "os": {
            "id": release.get("ID", ""),
            "version_id": release.get("VERSION_ID", ""),
            "pretty_name": release.get("PRETTY_NAME", release.get("NAME", "")),
            "cernvm_release": cernvm[:200],
        },
        "from": source.origin,
        "patterns": {"include": list(includes), "exclude": list(excludes), "add": list(adds)},
        "environment": loginenv.collect(read),
        "source": "login files (parsed, not executed)",
        "histories": histories,
        "files": len(records),
        "bytes": sum(r.size for r in files),
        "owners": {
            "users": {str(u): users[u] for u in sorted({r.uid for r in records}) if u in users},
            "groups": {str(g): groups[g] for g in sorted({r.gid for r in records}) if g in groups},
        },
    }


def _store(repo: Repository, writer: ChunkWriter, plan: Plan, records: list[Record], readers, where: str):
    cs = writer.chunk_size
    ref_index, ref_data = plan.ref.disks.get(INDEX), plan.ref.disks.get(DATA)
    before: dict[str, Record] = {}
    if ref_index is not None:
        cache = ChunkCache(16 << 20)
        index_reader = DiskReader(repo, ref_index, "the parent's index", cache)
        before = {r.path: r for r in envtree.read_records(index_reader, cs, "the parent environment")}
    next_slot = -(-ref_data.size // cs) if ref_data is not None else 0
    unchanged: set[str] = set()
    for r in records:
        n = r.slots(cs)
        old = before.get(r.path)
        if n and old is not None and old.type == "f" and old.slots(cs) >= n:
            r.slot = old.slot
            if (old.size, old.mtime_ns, old.ctime_ns, old.inum) == (r.size, r.mtime_ns, r.ctime_ns, r.inum):
                unchanged.add(r.path)
        elif n:
            r.slot, next_slot = next_slot, next_slot + n
    data_size = next_slot * cs
    index_pages = envtree.pages(records, cs)
    index_map = writer.store_chunks(
        _with_freed(enumerate(index_pages), ref_index, len(index_pages)), len(index_pages) * cs, ref_index
    )
    data_map = writer.store_chunks(
        _data_chunks(records, readers, unchanged, ref_data, cs, next_slot, where), data_size, ref_data
    )
    return [Stream(INDEX, len(index_pages) * cs, index_map), Stream(DATA, data_size, data_map)], []


def _with_freed(chunks, ref, count: int) -> Iterator[tuple[int, bytes | None]]:
    yield from chunks
    if ref is not None:
        for i in ref.indexes_in(count, ref.count):
            yield i, None


def _data_chunks(records, readers, unchanged, ref, cs: int, slots: int, where: str):
    """(slot, padded bytes) in slot order; (slot, None) for a slot the parent used that is free now."""
    owned: dict[int, tuple[Record, int]] = {}
    for r in records:
        for i in range(r.slots(cs)):
            owned[r.slot + i] = (r, i)
    freed = [] if ref is None else [i for i in ref.indexes_in(0, ref.count) if i not in owned]
    order = sorted([(s, x) for s, x in owned.items() if x[0].path not in unchanged] + [(i, None) for i in freed])
    for slot, owner in order:
        if owner is None:
            yield slot, None
            continue
        r, i = owner
        fs, item = readers[r.path]
        want = min(cs, r.size - i * cs)
        data = fs.read_file(item, i * cs, want)
        if len(data) != want:
            raise BadSource(f"{where}: {r.path} is shorter than its size says")
        yield slot, data.ljust(cs, b"\0")
