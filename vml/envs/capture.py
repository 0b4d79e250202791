"""`vml env save`: a user's home, histories and login environment from a VM's disk, as an entry.

The disk is read where it is (an entry through the library, an area in
process or through the mount that serves it); nothing is mounted and
nothing in the guest is executed. See envtree for how the files are stored
and docs/environments.md for what is captured.
"""

import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..control import mount_state
from ..entries import envtree
from ..entries.envtree import CHUNK_SIZE, DATA, INDEX, Record
from ..entries.reader import ChunkCache, DiskReader
from ..entries.save import ChunkWriter, Plan, write_entry
from ..errors import BadSource, Locked, NotFound, UsageError
from ..names import check_name
from ..progress import SILENT, Progress
from ..repo.manifest import Stream
from ..repo.repository import Entry, Repository
from ..vms.area import RECORD_FILE, Area, AreaRecord, open_entry
from ..vms.areas import areas_dir
from . import guestfs, homes, loginenv
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
    """(home path, uid or None): USER's home from the guest's /etc/passwd, else /home/USER, or --home.

    A home that no restore would write into (a system directory, a path
    in another form) is refused here, naming it, rather than stored.
    """
    uid = None
    if home is not None:
        path, what = home, f"--home {home!r}"
    else:
        users = guestfs.accounts(root.read_text("/etc/passwd"))
        uid, _, path = users.get(user, (None, 0, ""))
        path = path or f"/home/{user}"
        what = f"{where}: the home of user {user!r}, {path!r},"
    try:
        path = homes.normal(path)
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None
    problem = homes.home_problem(path)
    if problem:
        raise UsageError(f"{what} is {problem}: not captured (a restore would refuse it)")
    return path, uid


def _checked_adds(adds) -> list[str]:
    out = []
    for p in adds:
        try:
            out.append(homes.checked_add(p))
        except ValueError as e:
            raise UsageError(f"--add {p!r}: {e}") from None
    return out


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
    adds = _checked_adds(adds)
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
    walks = [(located, home_path, filt, [f"{home_path}/{h}" for h in loginenv.HISTORY_FILES])]
    for p in adds:
        where = guestfs.fs_holding(found, root, p)
        if where is None:
            raise NotFound(f"{source.where}: --add {p}: no such path")
        walks.append((where, p, Filter((), excludes), []))
    meta = _describe(root, source, home_path, user, includes, excludes, adds, located)
    progress.start(None)  # the size of a home is known only once it is read

    def build(writer: ChunkWriter, plan: Plan):
        writer.progress = SILENT  # counted here, in bytes of files
        capture = _Capture(repo, writer, plan, progress, source.where)
        return capture.store(walks, meta)

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


def _describe(root, source, home_path, user, includes, excludes, adds, located) -> dict:
    """What the manifest says of the capture, before the files are read (``_Capture.store`` adds the counts)."""
    fs, top = located

    def read(path: str):
        if path.startswith("~/"):
            return fs.read_text(top.rstrip("/") + "/" + path[2:])
        return root.read_text(path)

    release = guestfs.os_release(root.read_text("/etc/os-release"))
    cernvm = (root.read_text("/etc/cernvm-release") or "").strip()
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
        "_accounts": (
            {u: n for n, (u, _, _) in guestfs.accounts(root.read_text("/etc/passwd")).items()},
            {g: n for n, (g, _, _) in guestfs.accounts(root.read_text("/etc/group")).items()},
        ),
    }


class _Capture:
    """One capture under the repository lock: files read once, in walk order, each while its inode is at hand.

    A file keeps the slots it had in the parent backup when it still fits
    (and is not read at all when its size, times and inode are the same: it
    is unchanged, as restic decides); any other file gets new slots at the
    end. Slots the parent used that nothing uses now become holes.
    """

    def __init__(self, repo: Repository, writer: ChunkWriter, plan: Plan, progress: Progress, where: str):
        self.writer, self.progress, self.where = writer, progress, where
        self.cs = writer.chunk_size
        self.ref_index, self.ref_data = plan.ref.disks.get(INDEX), plan.ref.disks.get(DATA)
        self.before: dict[str, Record] = {}
        if self.ref_index is not None:
            reader = DiskReader(repo, self.ref_index, "the parent's index", ChunkCache(16 << 20))
            self.before = {r.path: r for r in envtree.read_records(reader, self.cs, "the parent environment")}
        self.next_slot = -(-self.ref_data.size // self.cs) if self.ref_data is not None else 0
        self.records: dict[str, Record] = {}
        self.inode_of: dict[str, tuple] = {}  # path -> (file system, inode) of regular files
        self.owned: set[int] = set()
        self.holder: dict[tuple, str] = {}  # inode -> the path whose record got its data

    def store(self, walks, meta: dict):
        data_map = self.writer.store_chunks(self._data(walks), 0, self.ref_data)
        records = self._finish()
        pages = envtree.pages(records, self.cs)
        freed = [] if self.ref_index is None else self.ref_index.indexes_in(len(pages), self.ref_index.count)
        padded = ((i, page.ljust(self.cs, b"\0")) for i, page in enumerate(pages))
        chunks = itertools.chain(padded, ((i, None) for i in freed))
        index_map = self.writer.store_chunks(chunks, len(pages) * self.cs, self.ref_index)
        users, groups = meta.pop("_accounts")
        files = [r for r in records if r.type == "f"]
        odd = sorted({p for (fs, _), *_ in walks for p in fs.skipped})
        meta.update(
            left_out=odd[:20],  # names with line breaks, which nothing could restore (first 20)
            histories=[p for p in (f"{meta['home']}/{h}" for h in loginenv.HISTORY_FILES) if p in self.records],
            files=len(records),
            bytes=sum(r.size for r in files),
            owners={
                "users": {str(u): users[u] for u in sorted({r.uid for r in records}) if u in users},
                "groups": {str(g): groups[g] for g in sorted({r.gid for r in records}) if g in groups},
            },
        )
        data_size = self.next_slot * self.cs
        return [Stream(INDEX, len(pages) * self.cs, index_map), Stream(DATA, data_size, data_map)], []

    def _data(self, walks) -> Iterator[tuple[int, bytes | None]]:
        """(slot, padded bytes) of every file read; at the end (slot, None) for each slot freed."""
        for (fs, top), shown_root, filt, always in walks:
            prefix = shown_root[: len(shown_root) - len(top)] if top != shown_root else ""

            def takes(path: str, is_dir: bool, prefix=prefix, filt=filt, always=always) -> bool:
                shown = prefix + path
                return filt.takes(shown, is_dir) or (shown in always and not filt.excluded(shown))

            for it in fs.walk(top, takes):
                path = prefix + it.path if it.path != "/" else shown_root
                if path in self.records:
                    continue
                r = Record(path, it.type, it.mode, it.uid, it.gid, it.mtime_ns, it.atime_ns, it.ctime_ns, it.inum)
                r.xattrs = envtree.xattrs_text(it.xattrs)
                r.target, r.rdev = it.target, it.rdev
                try:
                    r.check()
                except ValueError as e:  # stored, it would make the whole backup unreadable
                    raise BadSource(f"{self.where}: {e}: not captured (leave it out with --exclude)") from None
                self.records[path] = r
                if it.type != "f":
                    continue
                key = (id(fs), it.inum)
                self.inode_of[path] = key
                if key in self.holder:
                    continue  # a hard link: its data is stored once (see _finish)
                self.holder[key] = path
                r.size = it.size
                yield from self._file(r, fs, it)
        if self.ref_data is not None:
            for i in self.ref_data.indexes_in(0, self.ref_data.count):
                if i not in self.owned:
                    yield i, None

    def _file(self, r: Record, fs, it) -> Iterator[tuple[int, bytes]]:
        n, cs = r.slots(self.cs), self.cs
        old = self.before.get(r.path)
        if n and old is not None and old.type == "f" and old.slots(cs) >= n and old.slot not in self.owned:
            r.slot = old.slot
            same = (old.size, old.mtime_ns, old.ctime_ns, old.inum) == (r.size, r.mtime_ns, r.ctime_ns, r.inum)
        else:
            r.slot, self.next_slot, same = self.next_slot, self.next_slot + n, False
        self.owned.update(range(r.slot, r.slot + n))
        self.progress.advance(r.size)
        if same:
            return  # not yielded: the parent's chunks stay
        stream = fs._guard(r.path, it.node.open)
        for i in range(n):
            want = min(cs, r.size - i * cs)
            data = fs._guard(r.path, stream.read, want)
            if len(data) != want:
                raise BadSource(f"{self.where}: {r.path} is shorter than its size says")
            yield r.slot + i, data.ljust(cs, b"\0")

    def _finish(self) -> list[Record]:
        """Records sorted by path; of paths sharing an inode, the first holds the data, the others link to it."""
        records = sorted(self.records.values(), key=lambda r: r.path)
        first: dict[tuple, Record] = {}
        for r in records:
            key = self.inode_of.get(r.path)
            if key is None:
                continue
            if key not in first:
                first[key] = r
                holder = self.records[self.holder[key]]
                if holder is not r:  # the walk met a later path first: the first path takes the data over
                    r.size, r.slot, r.type = holder.size, holder.slot, "f"
            else:
                r.type, r.target, r.size, r.slot = "h", first[key].path, 0, 0
        return records
