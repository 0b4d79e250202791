"""Leases: the working areas of every home, recorded in the repository they build on.

A working area reads its entry's objects for as long as it is open, and its
entry may be removed meanwhile, by this home or by another user's home that
shares the repository. So opening an area records a lease in the
repository, ``leases/<id>.json``, naming the host, the user, the home, the
area and the manifest it builds on; `vml gc` keeps everything a lease's
manifest needs, and `vml rm` refuses to remove an entry an area builds on.

Leases are written, replaced and removed only under the repository's writer
lock, and gc reads them under that same lock, so an area opened while gc
runs is either seen by it or opened after it (and then checks that its entry
is still there). A lease is one small JSON file replaced atomically; its id
is a digest of (host, home, area), so each area has at most one lease per
repository. Leases belong to the repository directory: they are never
published, exported or copied, since they say who reads it here.

A lease can outlive its area (a home deleted by hand, a crashed host):
`vml leases` lists them, says which are stale where it can tell (areas of
this host), and `vml leases drop` removes them.
"""

import errno
import getpass
import json
import logging
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import Corrupt, CorruptManifest, NotFound, StorageError, UsageError
from ..files import fsync_dir, read_regular, storage_error, write_atomic
from ..layout import areas_dir
from ..names import check_name
from ..times import now_iso
from . import objects
from .repository import Repository

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass(frozen=True)
class Lease:
    host: str
    user: str
    home: str
    area: str
    entry: str
    manifest: str  # hex digest of the entry the area builds on
    since: str
    format: int = FORMAT
    previous: str = ""  # the entry before a save, until the area has moved on (hex digest, or "")

    @property
    def id(self) -> str:
        return lease_id(self.host, self.home, self.area)

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.manifest)

    @property
    def digests(self) -> set[bytes]:
        """Every manifest the area may read: its entry's, and while a save finishes, the one before."""
        return {self.digest} | ({bytes.fromhex(self.previous)} if self.previous else set())

    def where(self) -> str:
        """The area and its home, as messages name them."""
        return f"working area {self.area!r} of {self.home} (user {self.user} on {self.host})"

    def encode(self) -> bytes:
        return (json.dumps(asdict(self), indent=1) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> "Lease":
        try:
            doc = json.loads(data)
            lease = cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})
            if lease.format != FORMAT or objects.parse_hex(lease.manifest) is None:
                raise ValueError("unsupported format or bad digest")
            if lease.previous and objects.parse_hex(lease.previous) is None:
                raise ValueError("bad digest")
            if not all(isinstance(getattr(lease, k), str) for k in ("host", "user", "home", "area", "entry", "since")):
                raise TypeError("fields must be strings")
            check_name(lease.area, "area")
            return lease
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, UsageError) as e:
            raise CorruptManifest(f"{where}: invalid lease ({e})") from None


def lease_id(host: str, home: str, area: str) -> str:
    return objects.digest(f"{host}\0{home}\0{area}".encode()).hex()[:32]


def home_key(home: Path) -> str:
    """The home as leases name it: one spelling however it was reached (links, .., relative)."""
    return os.path.realpath(home)


def here(home: Path, area: str, entry: str, manifest: bytes, previous: bytes | None = None) -> Lease:
    """The lease of ``area`` of ``home`` on this host, on ``manifest`` (and ``previous`` while a save finishes)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return Lease(
        socket.gethostname(),
        user,
        home_key(home),
        area,
        entry,
        manifest.hex(),
        now_iso(),
        previous=previous.hex() if previous else "",
    )


LEASE_LIMIT = 64 << 10


def files(store) -> dict[str, bytes | str]:
    """File name -> content of every lease file of ``store``, or why it cannot be read.

    Read without the lock. A lease file that is not a regular file (a FIFO,
    a directory, a link) is reported, never opened for reading.
    """
    out: dict[str, bytes | str] = {}
    try:
        names = sorted(os.listdir(store.leases_dir))
    except FileNotFoundError:
        return out
    for name in names:
        if name.startswith("."):
            continue  # a lease being written
        path = store.leases_dir / name
        try:
            out[name] = read_regular(path, LEASE_LIMIT, "lease", follow=False, error=CorruptManifest)
        except NotFound:
            continue  # dropped meanwhile
        except CorruptManifest as e:
            out[name] = str(e).removeprefix(f"{path}: ")
    return out


def _write(store, name: str, data: bytes) -> None:
    store.require_lock()
    store.leases_dir.mkdir(mode=0o755, exist_ok=True)
    write_atomic(store.leases_dir / name, data)


def _remove(store, name: str) -> None:
    """Remove whatever is at a lease's name, a damaged one too (a directory; a link, never what it names)."""
    store.require_lock()
    path = store.leases_dir / name
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    fsync_dir(store.leases_dir)


def read_all(repo: Repository) -> tuple[list[Lease], list[str]]:
    """Every lease of ``repo``, and one line per lease file that cannot be read."""
    if repo.read_only:
        raise UsageError(f"{repo.name} is a remote: leases are kept by local repositories")
    leases, damaged = [], []
    for name, data in files(repo.store).items():
        where = str(repo.store.leases_dir / name)
        if isinstance(data, str):
            damaged.append(f"{where}: invalid lease: {data}")
            continue
        try:
            lease = Lease.decode(data, where)
        except Corrupt as e:
            damaged.append(str(e))
            continue
        if f"{lease.id}.json" != name:
            damaged.append(f"{where}: invalid lease (its name does not match its area)")
            continue
        leases.append(lease)
    return leases, damaged


def roots(repo: Repository) -> list[Lease]:
    """The leases gc must keep; the caller holds the lock. A damaged lease stops gc."""
    leases, damaged = read_all(repo)
    if damaged:
        raise CorruptManifest(
            f"{damaged[0]}; it may protect an area's data, so nothing is collected: "
            "fix it, or remove it with `vml leases drop`"
        )
    return leases


def holders(repo: Repository, digests: set[bytes]) -> list[Lease]:
    """The leases on any of these manifests; the caller holds the lock."""
    leases, _ = read_all(repo)
    return [lease for lease in leases if lease.digests & digests]


def take(repo: Repository, lease: Lease) -> bool:
    """Record ``lease`` in ``repo``, replacing the area's previous one.

    Its entry must still be in the repository under the lock: named by a ref,
    or held by a lease.
    Returns False, with a warning, if this user cannot write the repository:
    the area works, but another user's gc may remove what it needs.
    """
    store = repo.store
    try:
        with store.lock(f"vml lease {lease.area}"):
            live = set(repo.refs().values()).union(*(other.digests for other in read_all(repo)[0]))
            if lease.digest not in live:
                raise NotFound(
                    f"entry {lease.entry!r} was removed from repository {repo.name} while the area was being opened"
                )
            _write(store, f"{lease.id}.json", lease.encode())
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return _unprotected(repo, lease, e.strerror)
        raise storage_error(e, f"recording a lease for area {lease.area!r} in {store.path}") from None
    return True


def _unprotected(repo: Repository, lease: Lease, why: str) -> bool:
    log.warning(
        "cannot record working area %s in repository %s (%s): while it is open, `vml gc` run by someone who "
        "can write the repository may remove what the area needs",
        lease.area,
        repo.name,
        why,
    )
    return False


def put(store, lease: Lease) -> None:
    """Write ``lease`` as it is; the caller holds the lock (a save does, right after its refs land)."""
    _write(store, f"{lease.id}.json", lease.encode())


def release(repo: Repository, home: Path, area: str, manifests: set[bytes]) -> None:
    """Remove the lease of ``area`` of ``home`` on this host, if it is on one of ``manifests``; never fails the caller.

    A lease on another manifest belongs to an area of the same name opened
    since (or being opened): it stays.
    """
    name = f"{lease_id(socket.gethostname(), home_key(home), area)}.json"
    try:
        if name not in files(repo.store):
            return
        with repo.store.lock(f"vml close {area}"):
            data = files(repo.store).get(name)
            if isinstance(data, bytes) and Lease.decode(data, name).digests & manifests:
                _remove(repo.store, name)
    except (OSError, StorageError, Corrupt) as e:
        log.warning("cannot remove the lease of working area %s from %s (%s): see `vml leases`", area, repo.name, e)


def is_stale(lease: Lease) -> bool | None:
    """Whether the area behind a lease is gone: True or False on this host, None for another host."""
    if lease.host != socket.gethostname():
        return None
    # Gone means no record: an area that moved on to another entry (its lease
    # not yet moved with it) still reads through this one. A home this user
    # may not look into (another user's, 0700) is not ours to judge.
    try:
        os.stat(areas_dir(Path(lease.home)) / lease.area / "area.json")
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return None
    return False


def drop(repo: Repository, ids: list[str], stale: bool = False) -> list[str]:
    """Remove the leases whose id starts with one of ``ids`` (damaged lease files too), and with ``stale``
    every stale one; return what was dropped, as messages name it."""
    if not ids and not stale:
        raise UsageError("say which leases to drop: their ids (see `vml leases`), or --stale")
    with repo.store.lock("vml leases drop"):
        leases = {f"{lease.id}.json": lease for lease in read_all(repo)[0]}
        names = sorted(files(repo.store))
        chosen: dict[str, str] = {}
        for prefix in ids:
            found = [name for name in names if name.startswith(prefix.lower())]
            if len(found) != 1:
                what = "no lease" if not found else f"{len(found)} leases"
                raise NotFound(f"{what} in repository {repo.name} with an id starting {prefix!r} (see `vml leases`)")
            lease = leases.get(found[0])
            chosen[found[0]] = f"{lease.where()} on entry {lease.entry}" if lease else f"damaged lease {found[0]}"
        if stale:
            for name, lease in leases.items():
                if is_stale(lease):
                    chosen[name] = f"{lease.where()} on entry {lease.entry}"
        for name in chosen:
            _remove(repo.store, name)
    return list(chosen.values())
