"""Publishing a repository as static files for any HTTP server.

``DIR/objects/ab/cdef...`` holds objects exactly as stored; each appears
at once and complete (written beside, then renamed), and never changes.
``DIR/catalog.json`` is the signed catalog (see catalog.py), replaced
atomically after every object it names is on disk, so a client never sees
a catalog naming an object that is not there yet. A publish killed at any
point leaves the previous catalog served, with every object it names
complete; what it had written beside is removed by the next publish, and
an object of the wrong size (renamed into place but never flushed before
the machine crashed) is written again.

Every catalog expires (30 days by default), so that a server or proxy
cannot keep serving a frozen one: `resign` renews the signature and the
expiry of the catalog in DIR without writing any object.
"""

import contextlib
import dataclasses
import fcntl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .. import layout
from ..errors import BadSignature, NotFound, UsageError
from ..files import storage_error, syncfs, write_atomic
from ..progress import SILENT, Progress
from ..repo.objects import decode
from ..repo.repository import Repository
from ..repo.store import METADATA_LIMIT
from ..times import format_iso
from . import catalog as catalogs
from .catalog import CATALOG_FILE, DEFAULT_EXPIRY_DAYS, Catalog


@dataclass(frozen=True)
class PublishSummary:
    entries: list[str]
    revision: int
    new_objects: int
    new_bytes: int
    expires: str


def publish(
    repo: Repository,
    out: Path,
    key_path: Path,
    names=(),
    progress: Progress = SILENT,
    expires_in: float = DEFAULT_EXPIRY_DAYS,
) -> PublishSummary:
    """Publish ``names`` (default: every entry) of ``repo`` into ``out``, valid for ``expires_in`` days.

    With names, the catalog keeps what an earlier publish put there and
    adds or updates these entries (and the entries their data builds on).
    Without, it lists exactly the repository's entries.
    """
    key = catalogs.load_private_key(key_path)
    out = Path(out).absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / layout.OBJECTS).mkdir(exist_ok=True)
    except OSError as e:
        raise storage_error(e, f"publishing into {out}") from None
    with _locked(out):
        previous = _previous(out, key)
        refs = repo.refs()
        by_digest = {d: n for n, d in refs.items()}
        chosen = {n: repo.entry(n).digest for n in names} if names else dict(refs)
        new_refs = dict(previous.refs) if names and previous else {}
        manifests = set(previous.manifests) if previous else set()
        for digest in chosen.values():
            for d, _ in repo.data_chain(digest):
                manifests.add(d)
                name = by_digest.get(d)
                if name is not None:  # the entries a published entry builds on are listed too
                    new_refs[name] = d
        new_refs.update(chosen)
        needed = repo.needed_objects(chosen.values())
        progress.start(len(needed))
        count = size = 0
        try:
            for obj in sorted(needed):
                written = _put(out, obj, repo)
                count += written > 0
                size += written
                progress.advance(1)
            syncfs(out)
            now = datetime.now(UTC)
            cat = Catalog(
                repo.name,
                (previous.revision if previous else 0) + 1,
                format_iso(now),
                new_refs,
                frozenset(manifests),
                catalogs.expiry(expires_in, now),
            )
            write_atomic(out / CATALOG_FILE, catalogs.sign(cat, key))
        except OSError as e:
            raise storage_error(e, f"publishing into {out}") from None
    return PublishSummary(sorted(chosen), cat.revision, count, size, cat.expires)


def resign(out: Path, key_path: Path, expires_in: float = DEFAULT_EXPIRY_DAYS) -> Catalog:
    """Sign the catalog in ``out`` again, valid for ``expires_in`` days from now.

    The refs and manifests stay, and so does the time they were published;
    the revision grows by one so that clients take it over the old one.
    No object is written.
    """
    key = catalogs.load_private_key(key_path)
    out = Path(out).absolute()
    if not (out / CATALOG_FILE).is_file():
        raise NotFound(f"{out / CATALOG_FILE}: no catalog to re-sign (publish first)")
    with _locked(out):
        previous = _previous(out, key)
        if previous is None:  # removed while we waited for the lock
            raise NotFound(f"{out / CATALOG_FILE}: no catalog to re-sign (publish first)")
        cat = dataclasses.replace(previous, revision=previous.revision + 1, expires=catalogs.expiry(expires_in))
        try:
            write_atomic(out / CATALOG_FILE, catalogs.sign(cat, key))
        except OSError as e:
            raise storage_error(e, f"re-signing the catalog in {out}") from None
    return cat


@contextlib.contextmanager
def _locked(out: Path):
    """Hold ``out``'s publish lock, after clearing what a killed publish left beside its files."""
    try:
        lock = open(out / ".publish.lock", "a")  # noqa: SIM115 (held for the whole publish)
    except OSError as e:
        raise storage_error(e, f"publishing into {out}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Objects and the catalog never start with a dot: these are half-written files.
        for p in [*out.glob("objects/*/.*"), *out.glob(f".{CATALOG_FILE}.*")]:
            p.unlink(missing_ok=True)
        yield


def _previous(out: Path, key) -> Catalog | None:
    path = out / CATALOG_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    public = key.public_key()
    try:
        return catalogs.verify(data, public, str(path))
    except BadSignature:
        raise UsageError(
            f"{path} was signed with another key; publish into a new directory, or remove the old catalog"
        ) from None


def _put(out: Path, digest: bytes, repo: Repository) -> int:
    """Write one object unless it is there, whole; return the bytes written."""
    h = digest.hex()
    path = layout.object_path(out, digest)
    with contextlib.suppress(FileNotFoundError):
        # One a killed publish renamed into place but never flushed may be
        # empty or short after a crash of the machine: write it again.
        if path.stat().st_size == repo.object_size(digest):
            return 0
    blob = repo.read_raw(digest)
    decode(blob, digest, METADATA_LIMIT, f"object {h} of repository {repo.name}")  # publish nothing damaged
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, blob, sync=False)  # the publish flushes once, before the catalog
    return len(blob)
