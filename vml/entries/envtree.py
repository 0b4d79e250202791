"""How an environment entry stores a captured file tree: two streams that delta well.

An environment entry is stored like any entry, with two disks, so bundles,
publish, copies, verify and gc serve it unchanged:

- ``env-data``: file contents in *slots* of one chunk each. A file takes
  consecutive slots (its bytes, the last slot padded with zeros); an empty
  file takes none. A new backup with ``--parent`` keeps every surviving
  file in the slots it had, so unchanged files are unchanged chunks and the
  delta lists only what changed (a removed file's slots become holes).
- ``env-index``: one record per path (JSON, one per line, sorted by path),
  in pages of one chunk each. A page ends after a path whose hash says so
  (about every 64 paths), so pages depend on the paths they hold and a
  change to a few files changes a few pages.

The manifest's "environment" key holds what `vml env show` prints. What a
record says is checked when read, as any stored input is.
"""

import json
import posixpath
import re
import zlib
from dataclasses import dataclass

from ..errors import BadSource, CorruptManifest, UsageError
from ..repo.manifest import ENVIRONMENT, Manifest
from ..repo.repository import Entry, Repository
from .reader import ChunkCache, DiskReader

INDEX, DATA = "env-index", "env-data"
KEY = ENVIRONMENT
CHUNK_SIZE = 64 << 10  # small: a small file costs one slot, a page one chunk
PAGE_EVERY = 64
TYPES = set("fdlhpcbs")
MAX_XATTRS = 4 << 10  # bytes of extended attributes kept per file (up to 6x that as JSON)
MAX_PATH = 4096  # bytes of a path or link target in a record: PATH_MAX, and what ext4 keeps of a link
# ext4 keeps seconds as a signed 32-bit number plus two epoch bits in an inode's extra fields.
MIN_TIME_NS, MAX_TIME_NS = -(1 << 31) * 10**9, ((3 << 32) + (1 << 31)) * 10**9
_XATTR = re.compile(r"(user|trusted|security|system)\.[A-Za-z0-9_.@:+-]{1,200}")


def is_environment(m: Manifest) -> bool:
    return m.is_environment


@dataclass
class Record:
    path: str
    type: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int = 0
    ctime_ns: int = 0
    inum: int = 0
    size: int = 0
    slot: int = 0
    target: str = ""
    rdev: int = 0
    xattrs: dict | None = None  # name -> value as latin-1 text (bytes kept exactly)

    def slots(self, chunk_size: int) -> int:
        return -(-self.size // chunk_size) if self.type == "f" else 0

    def to_json(self) -> str:
        doc = {"p": self.path, "t": self.type, "m": self.mode, "u": self.uid, "g": self.gid, "mt": self.mtime_ns}
        for key, value, default in (
            ("at", self.atime_ns, 0),
            ("ct", self.ctime_ns, 0),
            ("i", self.inum, 0),
            ("s", self.size, 0),
            ("o", self.slot, 0),
            ("l", self.target, ""),
            ("r", self.rdev, 0),
            ("x", self.xattrs, None),
        ):
            if value != default:
                doc[key] = value
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, doc: dict) -> "Record":
        r = cls(
            doc["p"],
            doc["t"],
            doc["m"],
            doc["u"],
            doc["g"],
            doc["mt"],
            doc.get("at", 0),
            doc.get("ct", 0),
            doc.get("i", 0),
            doc.get("s", 0),
            doc.get("o", 0),
            doc.get("l", ""),
            doc.get("r", 0),
            doc.get("x"),
        )
        r.check()
        return r

    def check(self) -> None:
        """ValueError naming the path unless this is a record a restore can act on.

        Capture checks each record as reading does, so that a backup stored
        is a backup that can be read back.
        """
        check_path(self.path)
        counts = (self.mode, self.uid, self.gid, self.inum, self.size, self.slot, self.rdev)
        if self.type not in TYPES or not all(_count(v) for v in counts):
            raise ValueError(f"bad record for {self.path!r}")
        if self.mode > 0o7777 or self.uid >= 1 << 32 or self.gid >= 1 << 32 or self.rdev >= 1 << 32:
            raise ValueError(f"bad record for {self.path!r}")
        if not all(_count(t, MIN_TIME_NS) and t < MAX_TIME_NS for t in (self.mtime_ns, self.atime_ns, self.ctime_ns)):
            raise ValueError(f"a time of {self.path!r} lies outside what ext4 holds (1901 to 2446)")
        if not isinstance(self.target, str) or len(self.target) > MAX_PATH:
            raise ValueError(f"the link target of {self.path!r} is longer than {MAX_PATH} bytes")
        if self.xattrs is not None and not (
            isinstance(self.xattrs, dict)
            and all(
                isinstance(k, str) and _XATTR.fullmatch(k) and isinstance(v, str) and all(ord(c) < 256 for c in v)
                for k, v in self.xattrs.items()
            )
        ):
            raise ValueError(f"bad extended attributes for {self.path!r}")
        if self.type == "h":
            check_path(self.target)


def _count(v, least: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def check_path(p) -> str:
    """An absolute, normal guest path without line breaks or NULs, of at most MAX_PATH bytes (ValueError otherwise)."""
    if not isinstance(p, str) or not p.startswith("/") or any(c in p for c in "\0\n\r"):
        raise ValueError(f"bad path {p!r}")
    if p != "/" and (posixpath.normpath(p) != p or p.startswith("//")):
        raise ValueError(f"path {p!r} is not normal")
    if len(p.encode(errors="surrogateescape")) > MAX_PATH:  # a lone surrogate: UnicodeEncodeError, a ValueError
        raise ValueError(f"path {p[:120]!r}... is longer than {MAX_PATH} bytes")
    return p


def pages(records: list[Record], chunk_size: int) -> list[bytes]:
    """The index pages of records sorted by path (each to be padded to one chunk when stored)."""
    out: list[bytes] = []
    page = bytearray()
    for r in records:
        line = r.to_json().encode() + b"\n"
        if len(line) > chunk_size:
            raise BadSource(f"the record of {r.path} is larger than an index page")
        if len(page) + len(line) > chunk_size:
            out.append(bytes(page))
            page = bytearray()
        page += line
        if zlib.crc32(r.path.encode(errors="surrogateescape")) % PAGE_EVERY == 0:
            out.append(bytes(page))
            page = bytearray()
    if page:
        out.append(bytes(page))
    return out


def parse_page(data: bytes, where: str) -> list[Record]:
    text = data.split(b"\0", 1)[0]
    try:
        return [Record.from_json(json.loads(line)) for line in text.splitlines() if line]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptManifest(f"{where}: invalid index page ({e})") from None


def read_records(index_reader, chunk_size: int, where: str) -> list[Record]:
    """Every record of an environment entry, checked: sorted, unique, slots inside the data stream."""
    records: list[Record] = []
    for offset in range(0, index_reader.size, chunk_size):
        records += parse_page(index_reader.read(offset, chunk_size), f"{where}, index page {offset // chunk_size}")
    paths = [r.path for r in records]
    if paths != sorted(paths) or len(set(paths)) != len(paths):
        raise CorruptManifest(f"{where}: index is not sorted or lists a path twice")
    return records


def check_slots(records: list[Record], data_size: int, chunk_size: int, where: str) -> None:
    for r in records:
        if r.type == "f" and (r.slot + r.slots(chunk_size)) * chunk_size > data_size:
            raise CorruptManifest(f"{where}: {r.path} lies outside the entry's data")


def xattrs_text(xattrs: dict[str, bytes] | None) -> dict | None:
    """Extended attributes as kept in a record: valid names only, at most MAX_XATTRS bytes in all."""
    kept = {k: v for k, v in (xattrs or {}).items() if isinstance(k, str) and _XATTR.fullmatch(k)}
    if not kept or sum(len(k) + len(v) for k, v in kept.items()) > MAX_XATTRS:
        return None
    return {k: v.decode("latin-1") for k, v in kept.items()}


def env_records(repo: Repository, entry: Entry, cache_bytes: int = 32 << 20) -> tuple[list[Record], DiskReader]:
    """The records of an environment entry, checked, and a reader of its file data.

    ``cache_bytes`` bounds the chunks kept decompressed: a reader that
    goes through the data once (a restore) needs few.
    """
    m = entry.manifest
    if not is_environment(m):
        raise UsageError(f"entry {entry.name!r} is not an environment backup (see `vml env save`)")
    resolved = repo.resolve(entry.digest)
    cache = ChunkCache(cache_bytes)
    where = f"entry {entry.name!r}"
    if INDEX not in resolved.disks or DATA not in resolved.disks:
        raise BadSource(f"{where}: environment entry without its index or data")
    index = DiskReader(repo, resolved.disks[INDEX], f"{where}, index", cache)
    data = DiskReader(repo, resolved.disks[DATA], f"{where}, files", cache)
    records = read_records(index, m.chunk_size, where)
    check_slots(records, data.size, m.chunk_size, where)
    return records, data


def shown_files(records: list[Record]) -> list[tuple[tuple[str, ...], Record]]:
    """What an environment entry's directory shows (in the mount, and what a copy of it must hold).

    Directories and regular files, by their path without the leading "/";
    a hard link shows as a file with the data of the path it links to.
    Symlinks, devices and anything that would collide with entry.json are
    not shown.
    """
    by_path = {r.path: r for r in records}
    out = []
    for r in records:
        shown = by_path.get(r.target) if r.type == "h" else r
        if shown is None or shown.type not in "fd" or r.path == "/":
            continue
        path = tuple(r.path.strip("/").split("/"))
        if path[0] == "entry.json":
            continue
        out.append((path, shown if shown is r else _as_file(r, shown)))
    return out


def _as_file(link: Record, data: Record) -> Record:
    return Record(link.path, "f", data.mode, data.uid, data.gid, data.mtime_ns, size=data.size, slot=data.slot)
