"""The FUSE operations: inode numbers, attributes and errno, nothing more.

Everything about what the logbook contains comes from vml.view.logbook.Logbook;
this class turns its paths and nodes into inodes and its errors into errno.

Rules:
- Nothing but FUSEError leaves a handler: `errno_for` maps library errors in
  one place; anything unexpected is logged with its traceback and becomes
  EIO, and the mount stays up.
- The trio thread only coordinates: every call that can block (reading
  objects, decompressing, writing overlays, fsync) runs in a worker thread
  behind one CapacityLimiter.
- Inode numbers are given per node key and never reused while mounted, so a
  disk's D.img and D-flat.vmdk are one inode, and an inode stays valid after
  its entry disappears (it then answers ENOENT).
- Entries never change: their files are opened with keep_cache and their
  attributes and names are cached by the kernel for long; repository and
  area listings, which change, for a second.
"""

import errno
import logging
import os
import stat
from dataclasses import dataclass

import pyfuse3
import trio

from vml.errors import (
    AlreadyExists,
    Corrupt,
    DiskFull,
    Locked,
    NotFound,
    ReadOnly,
    StorageError,
    UsageError,
    VmlError,
)
from vml.view.fileset import Handle, Node
from vml.view.logbook import Logbook

from .readahead import ReadAhead

log = logging.getLogger(__name__)

LONG_TIMEOUT = 3600.0
SHORT_TIMEOUT = 1.0
BLOCK_SIZE = 4096


# Library errors and the errno they stand for; anything else is EIO.
ERRNO = (
    (NotFound, errno.ENOENT),
    (ReadOnly, errno.EROFS),
    (DiskFull, errno.ENOSPC),
    (Locked, errno.EBUSY),
    (AlreadyExists, errno.EEXIST),
    (UsageError, errno.EINVAL),
)


def errno_for(e: BaseException) -> int:
    """The errno a library error stands for."""
    if isinstance(e, pyfuse3.FUSEError):
        return e.errno
    for cls, code in ERRNO:
        if isinstance(e, cls):
            return code
    if isinstance(e, OSError) and e.errno:
        return e.errno
    return errno.EIO  # Corrupt, StorageError and anything unforeseen


@dataclass
class Opened:
    path: tuple
    handle: Handle
    writable: bool
    inode: int = 0
    next_offset: int = -1  # where a sequential reader reads next
    direct: bool = False  # opened O_DIRECT: the page cache is never read, so nothing is pushed into it


class VmlFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, logbook: Logbook, workers: int = 8, readahead: ReadAhead | None = None):
        super().__init__()
        self.logbook = logbook
        self.readahead = readahead
        self.limiter = trio.CapacityLimiter(workers)
        self._ino_by_key: dict[tuple, int] = {(): pyfuse3.ROOT_INODE}
        self._path_by_ino: dict[int, tuple] = {pyfuse3.ROOT_INODE: ()}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._open: dict[int, Opened] = {}
        self._next_fh = 1
        self.uid, self.gid = os.getuid(), os.getgid()

    # -- helpers ---------------------------------------------------------

    async def _call(self, what: str, fn, *args):
        """Run ``fn`` in a worker thread; turn any error into FUSEError."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        except pyfuse3.FUSEError:
            raise
        except (VmlError, OSError) as e:
            code = errno_for(e)
            if code in (errno.EIO, errno.ENOSPC) or isinstance(e, (Corrupt, StorageError)):
                log.error("%s: %s", what, e)
            else:
                log.debug("%s: %s", what, e)
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("%s: unexpected error", what)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _ino(self, path: tuple, node: Node) -> int:
        ino = self._ino_by_key.get(node.key)
        if ino is None:
            ino = self._ino_by_key[node.key] = self._next_ino
            self._next_ino += 1
        self._path_by_ino.setdefault(ino, path)
        return ino

    def inode_of(self, path: tuple) -> int | None:
        """The inode given to directory ``path``, if the kernel has seen it."""
        for ino, p in self._path_by_ino.items():
            if p == path:
                return ino
        return None

    def _path(self, ino: int) -> tuple:
        try:
            return self._path_by_ino[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attrs(self, ino: int, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = (stat.S_IFDIR if node.is_dir else stat.S_IFREG) | node.mode
        a.st_nlink = 2 if node.is_dir else node.nlink
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_size = node.size
        a.st_blksize = BLOCK_SIZE
        a.st_blocks = -(-node.allocated // 512)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        timeout = LONG_TIMEOUT if node.immutable else SHORT_TIMEOUT
        a.attr_timeout = a.entry_timeout = timeout
        return a

    async def _node(self, path: tuple) -> Node:
        if not path:
            return self.logbook.root()
        return await self._call(f"lookup {'/'.join(path)}", self.logbook.lookup, path)

    # -- metadata ----------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        path = (*self._path(parent_inode), os.fsdecode(name))
        node = await self._node(path)
        return self._attrs(self._ino(path, node), node)

    async def getattr(self, inode, ctx=None):
        path = self._path(inode)
        node = await self._node(path)
        return self._attrs(inode, node)

    async def setattr(self, inode, attr, fields, fh, ctx):
        # Entries and areas keep their modes and times (accepting the request
        # keeps tools such as cp -p working); files being copied in take them.
        path = self._path(inode)
        size = attr.st_size if fields.update_size else None
        mode = attr.st_mode if fields.update_mode else None
        mtime = attr.st_mtime_ns if fields.update_mtime else None
        node = await self._call(f"setattr {'/'.join(path)}", self.logbook.set_attributes, path, size, mode, mtime)
        return self._attrs(inode, node)

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = (*self._path(parent_inode), os.fsdecode(name))
        node = await self._call(f"mkdir {'/'.join(path)}", self.logbook.mkdir, path, mode)
        return self._attrs(self._ino(path, node), node)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = (*self._path(parent_inode), os.fsdecode(name))
        node, handle = await self._call(f"create {'/'.join(path)}", self.logbook.create, path, mode)
        fh = self._new_fh(Opened(path, handle, True))
        return pyfuse3.FileInfo(fh=fh), self._attrs(self._ino(path, node), node)

    async def unlink(self, parent_inode, name, ctx):
        path = (*self._path(parent_inode), os.fsdecode(name))
        node = await self._node(path)
        await self._call(f"unlink {'/'.join(path)}", self.logbook.unlink, path)
        self._forget(path, node)

    async def rmdir(self, parent_inode, name, ctx):
        path = (*self._path(parent_inode), os.fsdecode(name))
        node = await self._node(path)
        await self._call(f"rmdir {'/'.join(path)}", self.logbook.rmdir, path)
        self._forget(path, node)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        new_path = (*self._path(new_parent_inode), os.fsdecode(new_name))
        node = await self._call(f"link {'/'.join(new_path)}", self.logbook.link, self._path(inode), new_path)
        return self._attrs(self._ino(new_path, node), node)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old = (*self._path(parent_inode_old), os.fsdecode(name_old))
        new = (*self._path(parent_inode_new), os.fsdecode(name_new))
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        moved = await self._node(old)
        replaced = await self._call(f"lookup {'/'.join(new)}", self._maybe_node, new)
        await self._call(f"rename {'/'.join(old)}", self.logbook.rename, old, new)
        if replaced is not None:
            self._forget(new, replaced)
        # The kernel keeps the moved inode under its new name: follow it,
        # and everything below it if it is a directory.
        ino = self._ino_by_key.pop(moved.key, None)
        if ino is not None:
            node = await self._node(new)
            self._ino_by_key[node.key] = ino
        for i, p in list(self._path_by_ino.items()):
            if p[: len(old)] == old:
                self._path_by_ino[i] = new + p[len(old) :]

    def _maybe_node(self, path: tuple) -> Node | None:
        try:
            return self.logbook.lookup(path)
        except NotFound:
            return None

    def _forget(self, path: tuple, node: Node) -> None:
        """A name is gone: a new file there must get a new inode."""
        ino = self._ino_by_key.pop(node.key, None)
        if ino is not None and self._path_by_ino.get(ino) == path:
            del self._path_by_ino[ino]

    async def opendir(self, inode, ctx):
        node = await self._node(self._path(inode))
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        path = self._path(fh)
        children = await self._call(f"list {'/'.join(path) or '/'}", self.logbook.listdir, path)
        names = sorted(children)
        for i, name in enumerate(names[start_id:], start=start_id):
            node = children[name]
            child = (*path, name)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(self._ino(child, node), node), i + 1):
                break

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLOCK_SIZE
        s.f_namemax = 255
        return s

    async def access(self, inode, mode, ctx):
        return True

    # -- files -------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        path = self._path(inode)
        write = flags & os.O_ACCMODE != os.O_RDONLY
        node = await self._node(path)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if write and not node.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        handle = await self._call(f"open {'/'.join(path)}", self.logbook.open, path, write)
        fh = self._new_fh(Opened(path, handle, write, inode, direct=bool(flags & os.O_DIRECT)))
        return pyfuse3.FileInfo(fh=fh, keep_cache=node.immutable or node.writable)

    def _new_fh(self, opened: Opened) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = opened
        return fh

    def _opened(self, fh) -> Opened:
        try:
            return self._open[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    async def read(self, fh, off, size):
        o = self._opened(fh)
        sequential = off == o.next_offset
        o.next_offset = off + size
        # Chunks already decompressed are served here, without a thread hop.
        data = o.handle.read_cached(off, size)
        if data is None:
            data = await self._call(
                f"read of {'/'.join(o.path)} at offset {off}, {size} bytes", o.handle.read, off, size
            )
        if self.readahead is not None and o.handle.reader is not None and not o.direct:
            self.readahead.after_read(o.inode, o.handle.reader, off, size, sequential)
        return data

    async def write(self, fh, off, buf):
        o = self._opened(fh)
        if not o.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        await self._call(f"write to {'/'.join(o.path)} at offset {off}", o.handle.write, off, bytes(buf))
        return len(buf)

    async def fsync(self, fh, datasync):
        o = self._opened(fh)
        await self._call(f"fsync of {'/'.join(o.path)}", o.handle.sync)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        o = self._open.pop(fh, None)
        if o is not None:
            await self._call(f"release {'/'.join(o.path)}", o.handle.release)

    async def forget(self, inode_list):
        pass  # inode numbers are never reused while mounted; the table only grows
