"""Reading the file systems inside a VM's disks, without root, a mount or an appliance.

Disks are read as byte ranges (an entry's disk through the library, an
area's through the mount or in-process), partition tables (MBR, GPT) by
dissect.volume and ext2/3/4 by dissect.extfs, both pure Python. What the
image says is hostile input: every failure of the parsers becomes BadSource
naming the disk, a directory is visited once however many names it has, and
a file is never read past the size of the disk it lies on.
See docs/environments.md for why these libraries.
"""

import io
import shlex
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from dissect.extfs import ExtFS
from dissect.util.stream import RangeStream
from dissect.volume.disk import Disk

from ..errors import BadSource

EXT_MAGIC_OFFSET = 1024 + 56
EXT4_RECOVER = 0x0004  # incompatible feature: the journal needs recovery
EXT4_64BIT = 0x0080  # incompatible feature: block counts have high halves
MAX_TEXT = 1 << 20  # /etc/passwd, /etc/os-release, login files: read at most this much


class ByteRanges(io.RawIOBase):
    """A read-only, seekable file over ``read(offset, size)``."""

    def __init__(self, read, size: int):
        self._read, self.size, self.pos = read, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.size - self.pos))
        data = self._read(self.pos, n) if n else b""
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


@dataclass
class Item:
    """One file, directory or link of a guest file system, as a capture records it."""

    path: str
    type: str  # f d l h p c b s (h: a hard link to an earlier path)
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    inum: int
    size: int = 0
    target: str = ""  # symlink target, or the path a hard link shares its inode with
    rdev: int = 0
    xattrs: dict | None = None
    node: object = None  # the inode, to read a file's bytes


_TYPES = {
    stat.S_IFREG: "f",
    stat.S_IFDIR: "d",
    stat.S_IFLNK: "l",
    stat.S_IFIFO: "p",
    stat.S_IFCHR: "c",
    stat.S_IFBLK: "b",
    stat.S_IFSOCK: "s",
}


def _ns(seconds: int, extra: int) -> int:
    # A signed 32-bit count of seconds; ext4's extra field adds two epoch bits, then nanoseconds << 2.
    signed = seconds - (1 << 32) if seconds >= 1 << 31 else seconds
    return (signed + ((extra & 3) << 32)) * 1_000_000_000 + (extra >> 2)


class GuestFS:
    """One ext2/3/4 file system of a disk (whole, or a partition)."""

    def __init__(self, disk: str, offset: int, size: int, fh, where: str):
        self.disk, self.offset, self.size, self.where = disk, offset, size, where
        self.skipped: list[str] = []  # names with line breaks, left out of a walk
        try:
            self.fs = ExtFS(RangeStream(fh, offset, size))
            self.inode_size = self.fs.sb.s_inode_size if self.fs.sb.s_rev_level else 128
        except Exception as e:  # any failure of the parser is a bad image
            raise BadSource(f"{where}: not a readable ext2/3/4 file system ({e})") from None

    def free_space(self) -> tuple[int, int]:
        """(free bytes, free inodes) as the superblock counts them."""

        def read():
            sb = self.fs.sb
            high = sb.s_free_blocks_count_hi if sb.s_feature_incompat & EXT4_64BIT else 0
            return (sb.s_free_blocks_count_lo | high << 32) * self.fs.block_size, sb.s_free_inodes_count

        return self._guard("the superblock", read)

    def needs_recovery(self) -> bool:
        """Whether the journal holds writes not yet replayed (ext3/4 after an unclean stop)."""
        return bool(self._guard("the superblock", lambda: self.fs.sb.s_feature_incompat) & EXT4_RECOVER)

    def _guard(self, what: str, fn, *args):
        try:
            return fn(*args)
        except BadSource:
            raise
        except Exception as e:
            raise BadSource(f"{self.where}: cannot read {what} ({type(e).__name__}: {e})") from None

    def lookup(self, path: str):
        """The inode at absolute ``path`` (symlinks not followed), or None."""

        def find():
            node = self.fs.root
            for part in (p for p in path.split("/") if p):
                if node.filetype != stat.S_IFDIR:
                    return None
                node = next((c for c in node.iterdir() if c.filename == part), None)
                if node is None:
                    return None
            return node

        return self._guard(path, find)

    def is_dir(self, path: str) -> bool:
        node = self.lookup(path)
        return node is not None and self._guard(path, lambda: node.filetype) == stat.S_IFDIR

    def read_text(self, path: str) -> str | None:
        """The text of a small regular file, or None if there is none."""
        node = self.lookup(path)
        if node is None or self._guard(path, lambda: node.filetype) != stat.S_IFREG:
            return None
        data = self._guard(path, lambda: node.open().read(MAX_TEXT))
        return data.decode(errors="replace")

    def item(self, path: str, node) -> Item:
        def build():
            i = node.inode
            # Inodes of 128 bytes have no extra fields: what follows is the next inode.
            extra = i.i_extra_isize if self.inode_size > 128 else 0
            t = _TYPES.get(stat.S_IFMT(i.i_mode))
            if t is None:
                raise ValueError(f"unknown file type {i.i_mode:o}")
            item = Item(
                path,
                t,
                stat.S_IMODE(i.i_mode),
                i.i_uid | (i.i_uid_high << 16),
                i.i_gid | (i.i_gid_high << 16),
                _ns(i.i_mtime, i.i_mtime_extra if extra >= 12 else 0),
                _ns(i.i_atime, i.i_atime_extra if extra >= 16 else 0),
                _ns(i.i_ctime, i.i_ctime_extra if extra >= 8 else 0),
                node.inum,
                node.size if t == "f" else 0,
                node=node,
            )
            if t == "l":
                item.target = node.link
            elif t in "cb":
                raw = bytes(i.i_block[:8])
                major_minor = int.from_bytes(raw[:4], "little") or int.from_bytes(raw[4:8], "little")
                item.rdev = major_minor
            xattrs = {x.name: x.value for x in node.xattr}
            item.xattrs = xattrs or None
            if item.size > self.size:
                raise ValueError(f"declares {item.size} bytes, more than its whole disk")
            return item

        return self._guard(path, build)

    def walk(self, top: str, takes) -> Iterator[Item]:
        """Every item at and under ``top`` that ``takes(path, is_dir)`` accepts, parents first.

        A directory reached again (a loop in a damaged or hostile image) is
        not entered twice.
        """
        node = self.lookup(top)
        if node is None:
            return
        seen: set[int] = set()
        stack = [(top.rstrip("/") or "/", node)]
        while stack:
            path, node = stack.pop()
            item = self.item(path, node)
            yield item
            if item.type != "d" or node.inum in seen:
                continue
            seen.add(node.inum)
            children = self._guard(path, lambda n=node: [c for c in n.iterdir() if c.filename not in (".", "..")])
            subdirs = []
            for child in sorted(children, key=lambda c: c.filename):
                if "/" in child.filename or "\0" in child.filename or not child.filename:
                    raise BadSource(f"{self.where}: invalid file name {child.filename!r} in {path}")
                if "\n" in child.filename or "\r" in child.filename:
                    self.skipped.append(f"{path.rstrip('/')}/{child.filename}")  # no tool reads such names back
                    continue
                cpath = f"{path.rstrip('/')}/{child.filename}"
                is_dir = self._guard(cpath, lambda c=child: c.filetype) == stat.S_IFDIR
                if takes(cpath, is_dir):
                    subdirs.append((cpath, child))
            stack.extend(reversed(subdirs))

    def read_file(self, item: Item, offset: int, size: int) -> bytes:
        return self.read_inode(item.inum, item.path, offset, size)

    def read_inode(self, inum: int, path: str, offset: int, size: int) -> bytes:
        """Bytes of the file with inode ``inum`` (looked up again: keeping 50,000 parsed inodes costs memory)."""

        def read():
            fh = self.fs.get_inode(inum).open()
            fh.seek(offset)
            return fh.read(size)

        return self._guard(path, read)


def filesystems(disk: str, fh, size: int, where: str) -> list[GuestFS]:
    """The ext file systems of one disk: in its partitions, or the whole disk if it has none."""
    try:
        fh.seek(0)
        parts = [(p.offset, p.size) for p in Disk(fh).partitions if p.size > 0]
    except Exception:  # no partition table: the disk may be one file system
        parts = [(0, size)]
    found = []
    for offset, length in parts:
        if offset >= size:
            continue
        length = min(length, size - offset)
        fh.seek(offset + EXT_MAGIC_OFFSET)
        if fh.read(2) != b"\x53\xef":
            continue
        label = f"{where}, partition at byte {offset}" if offset else where
        found.append(GuestFS(disk, offset, length, fh, label))
    return found


def root_of(found: list[GuestFS], where: str) -> GuestFS:
    """The root file system: the one with /etc/os-release or /etc/passwd."""
    for fs in found:
        if fs.lookup("/etc/os-release") is not None or fs.lookup("/etc/passwd") is not None:
            return fs
    if not found:
        raise BadSource(f"{where}: no ext2/3/4 file system found on its disks")
    raise BadSource(f"{where}: no file system with /etc/os-release or /etc/passwd found")


def fs_holding(found: list[GuestFS], root: GuestFS, path: str) -> tuple[GuestFS, str] | None:
    """(file system, path in it) where ``path`` lies: the root, else one mounted at its top directory."""
    if root.lookup(path) is not None:
        return root, path
    rest = path.strip("/").partition("/")[2]
    for fs in found:  # a separate /home (or /data...) file system: the path without its mount point
        if fs is not root and rest and fs.lookup("/" + rest) is not None:
            return fs, "/" + rest
    return None


def os_release(text: str | None) -> dict[str, str]:
    """The KEY=value pairs of an os-release file."""
    out = {}
    for line in (text or "").splitlines():
        key, eq, value = line.strip().partition("=")
        if eq and key.isidentifier():
            try:
                words = shlex.split(value)
            except ValueError:
                continue
            out[key] = words[0] if words else ""
    return out


def accounts(text: str | None) -> dict[str, tuple[int, int, str]]:
    """/etc/passwd as name -> (uid, gid, home); /etc/group as name -> (gid, 0, "")."""
    out = {}
    for line in (text or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] and fields[2].isdigit():
            gid = int(fields[3]) if len(fields) > 3 and fields[3].isdigit() else 0
            out[fields[0]] = (int(fields[2]), gid, fields[5] if len(fields) > 5 else "")
    return out
