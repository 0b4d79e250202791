"""Damaged copies of objects, as reads and verify find them, recorded beside the objects.

A copy of an object is its frame in one pack, or its loose file. One whose
bytes do not decode to their digest is recorded as an empty file
``damaged/<digest>.<pack>`` (``<digest>.loose`` for a loose file), made in
one system call, so that readers, which hold no lock, can record what they
find. What the record changes:

- writers count an object whose every copy is recorded damaged as absent,
  so the next save, import or `vml verify --repair` that has the chunk
  stores it anew, instead of deduplicating onto the damage and reporting
  success for an entry that cannot be read;
- readers prefer a copy not recorded damaged, and when a copy fails they
  record it and try the others;
- gc drops a damaged copy once a good one is stored, then its record.

Older versions of vml ignore the directory: no format change.
"""

import contextlib
import logging
import os
import threading
from pathlib import Path

from .objects import parse_hex
from .paths import real_directory

log = logging.getLogger(__name__)

DIR = "damaged"
LOOSE = "loose"

Copy = tuple[bytes, bytes | None]  # (object digest, pack digest; None: the loose file)


def _name(copy: Copy) -> str:
    digest, pack = copy
    return f"{digest.hex()}.{pack.hex() if pack else LOOSE}"


def _parse(name: str) -> Copy | None:
    digest, _, where = name.partition(".")
    d = parse_hex(digest)
    pack = None if where == LOOSE else parse_hex(where)
    if d is None or (pack is None and where != LOOSE):
        return None
    return d, pack


class DamageRecord:
    """The damaged copies recorded in one repository directory; thread-safe."""

    def __init__(self, root: Path):
        self.dir = root / DIR
        self._lock = threading.Lock()
        self._copies: set[Copy] | None = None

    def _known(self) -> set[Copy]:
        """The record as read once (``reload`` reads it again); the caller holds ``_lock``."""
        if self._copies is None:
            self._copies = self._read()
        return self._copies

    def copies(self) -> set[Copy]:
        """Every damaged copy recorded."""
        with self._lock:
            return set(self._known())

    def reload(self) -> None:
        """Read the record again (a writer that takes the lock sees what readers found since)."""
        with self._lock:
            self._copies = self._read()

    def _read(self) -> set[Copy]:
        if real_directory(self.dir):  # a link is never followed: verify names it
            return set()
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return set()
        return {c for n in names if (c := _parse(n)) is not None}

    def damaged(self, digest: bytes, pack: bytes | None) -> bool:
        with self._lock:
            return (digest, pack) in self._known()

    def touches(self, digest: bytes) -> bool:
        """Whether any copy of ``digest`` is recorded damaged (almost never: checked per chunk saved)."""
        with self._lock:
            known = self._known()
            return bool(known) and any(d == digest for d, _ in known)

    def add(self, digest: bytes, pack: bytes | None) -> None:
        """Record a damaged copy; a repository this process may not write keeps it in memory only."""
        copy = (digest, pack)
        with self._lock:
            known = self._known()
            if copy in known:
                return
            known.add(copy)
        try:
            if real_directory(self.dir):
                raise NotADirectoryError(f"{self.dir} is not a directory")
            self.dir.mkdir(mode=0o755, exist_ok=True)
            os.close(os.open(self.dir / _name(copy), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
        except OSError as e:
            log.warning("cannot record the damaged copy of object %s in %s (%s)", digest.hex(), self.dir, e)

    def forget(self, copies) -> None:
        """Drop the records of these copies (gone, replaced by good bytes, or found right again)."""
        with self._lock:
            known = self._known()
            for copy in copies:
                known.discard(copy)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.dir / _name(copy))


class _NoDamage(DamageRecord):
    """The record of a source nothing is written to (a remote: a damaged copy in its cache is fetched again)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._copies = set()

    def add(self, digest: bytes, pack: bytes | None) -> None:
        pass

    def reload(self) -> None:
        pass

    def forget(self, copies) -> None:
        pass


NO_DAMAGE = _NoDamage()
