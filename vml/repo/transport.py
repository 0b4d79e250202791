"""Transports: how a pack reader gets the bytes of a named file.

A transport loads the whole of a file named as in vml.repo.paths
(``packs/ab/<pack>``, ``objects/ab/cdef...``), or one byte range of it, as
restic's backends do (``Load(h, length, offset)``). This module has the
local one, a directory; vml.remotes has HTTP through the proxies
(``HttpTransport``) and the cache in front of it (``CachedTransport``),
which is a transport wrapping a transport. Whatever the transport, the
reader above checks what it gets (indexes against their checksum or the
signed catalog, every frame against its object digest), so a transport
only moves bytes and says where they came from.

Errors: ObjectMissing when the file is not there, CorruptObject when it
cannot be read whole or is shorter than the range asked for.
"""

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import CorruptObject, NotFound, ObjectMissing
from ..files import open_regular, read_regular
from .paths import kind

OPEN_FILES = 64  # descriptors a local transport keeps open for ranged reads


@dataclass(frozen=True)
class Whole:
    """What a whole file must be to be kept: its size (at most, with ``digest`` None) and its BLAKE3 (a pack's
    name), or else ``check(body)``, which raises CorruptObject for a wrong body (a loose object)."""

    size: int
    digest: bytes | None = None
    check: Callable[[bytes], object] | None = None


class Transport(Protocol):
    where: str  # the source, as messages name it

    def load(self, name: str, limit: int, span: tuple[int, int] | None = None, whole: Whole | None = None) -> bytes:
        """The file ``name`` (at most ``limit`` bytes), or only ``span`` (offset, length) of it. ``whole`` says
        what the whole file is, for a transport that keeps or fetches whole files."""

    def shown(self, name: str) -> str:
        """How a message names the file ``name`` of this transport."""

    def forget(self, name: str) -> None:
        """A copy of ``name`` that a transport keeps was found damaged: load it from its origin next time."""

    def prefetch(self, wanted: Iterable[tuple[str, Whole]]) -> None:
        """Start getting these whole files ahead of their readers, where that saves time (a cache)."""

    def fetch(self, wanted: Iterable[tuple[str, Whole]], progress) -> None:
        """Get these whole files now, where they are not at hand (a cache); ``progress`` advances per file."""


class _Open:
    """A file's descriptor, closed once evicted and no read uses it."""

    def __init__(self, fd: int):
        self.fd, self.users, self.evicted = fd, 0, False


class LocalTransport:
    """Files of a local directory: a repository, a published directory or a remote's cache. Thread-safe."""

    def __init__(self, root: Path):
        self.root = root
        self.where = str(root)
        self._lock = threading.Lock()
        self._open: OrderedDict[str, _Open] = OrderedDict()

    def shown(self, name: str) -> str:
        return str(self.root / name)

    def load(self, name: str, limit: int, span: tuple[int, int] | None = None, whole: Whole | None = None) -> bytes:
        if span is None:
            try:
                return read_regular(self.root / name, limit, kind(name), follow=False, error=CorruptObject)
            except NotFound:
                raise ObjectMissing(f"{kind(name)} {self.root / name} is missing") from None
        handle = self._acquire(name)
        try:
            data = os.pread(handle.fd, span[1], span[0])
        except OSError as e:
            raise CorruptObject(f"{kind(name)} {self.root / name}: cannot read it ({e.strerror})") from None
        finally:
            self._release(handle)
        if len(data) != span[1]:
            raise CorruptObject(f"{kind(name)} {self.root / name} is shorter than its index says")
        return data

    def has(self, name: str) -> bool:
        return os.path.exists(self.root / name)

    def _acquire(self, name: str) -> _Open:
        with self._lock:
            handle = self._open.get(name)
            if handle is not None:
                self._open.move_to_end(name)
                handle.users += 1
                return handle
        path = self.root / name
        try:
            with open_regular(path, kind(name), follow=False, error=CorruptObject) as f:
                fd = os.dup(f.fileno())  # kept open past this block, closed by _release
        except NotFound:
            raise ObjectMissing(f"{kind(name)} {path} is missing") from None
        with self._lock:
            handle = self._open.get(name)
            if handle is not None:  # another thread opened it meanwhile
                os.close(fd)
            else:
                handle = self._open[name] = _Open(fd)
                while len(self._open) > OPEN_FILES:
                    _, old = self._open.popitem(last=False)
                    self._evict(old)
            handle.users += 1
            return handle

    def _release(self, handle: _Open) -> None:
        with self._lock:
            handle.users -= 1
            if handle.evicted and not handle.users:
                os.close(handle.fd)

    @staticmethod
    def _evict(handle: _Open) -> None:
        handle.evicted = True
        if not handle.users:
            os.close(handle.fd)

    def forget(self, name: str) -> None:
        """Close the file's descriptor (it was removed or replaced): the next read opens it anew."""
        with self._lock:
            handle = self._open.pop(name, None)
            if handle is not None:
                self._evict(handle)

    def prefetch(self, wanted: Iterable[tuple[str, Whole]]) -> None:
        pass  # a local file is at hand

    def fetch(self, wanted: Iterable[tuple[str, Whole]], progress) -> None:
        for _ in wanted:
            progress.advance(1)

    def close(self) -> None:
        with self._lock:
            for handle in self._open.values():
                self._evict(handle)
            self._open.clear()

    def __del__(self):
        # Descriptors are plain integers: without this, a dropped transport (a repository
        # opened again after a config change) would keep them open.
        with contextlib.suppress(Exception):
            self.close()
