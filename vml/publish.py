"""Publishing a repository as static files for any HTTP server.

``DIR/objects/ab/cdef...`` holds objects exactly as stored; each appears
at once and complete (written beside, then renamed), and never changes.
``DIR/catalog.json`` is the signed catalog (see catalog.py), replaced
atomically after every object it names is on disk, so a client never sees
a catalog naming an object that is not there yet.
"""

import fcntl
from dataclasses import dataclass
from pathlib import Path

from . import catalog as catalogs
from .catalog import CATALOG_FILE, Catalog
from .errors import BadSignature, UsageError
from .objects import decode
from .progress import SILENT, Progress
from .repository import Repository, now_iso
from .store import METADATA_LIMIT, storage_error, syncfs, write_atomic


@dataclass(frozen=True)
class PublishSummary:
    entries: list[str]
    revision: int
    new_objects: int
    new_bytes: int


def publish(repo: Repository, out: Path, key_path: Path, names=(), progress: Progress = SILENT) -> PublishSummary:
    """Publish ``names`` (default: every entry) of ``repo`` into ``out``.

    With names, the catalog keeps what an earlier publish put there and
    adds or updates these entries (and the entries their data builds on).
    Without, it lists exactly the repository's entries.
    """
    key = catalogs.load_private_key(key_path)
    out = Path(out).absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "objects").mkdir(exist_ok=True)
        lock = open(out / ".publish.lock", "a")  # noqa: SIM115 (held for the whole publish)
    except OSError as e:
        raise storage_error(e, f"publishing into {out}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = _previous(out, key)
        for p in (out / "objects").glob("*/.*"):  # left by a publish that was killed (objects never start with .)
            p.unlink(missing_ok=True)
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
            cat = Catalog(
                repo.name,
                (previous.revision if previous else 0) + 1,
                now_iso(),
                new_refs,
                frozenset(manifests),
            )
            write_atomic(out / CATALOG_FILE, catalogs.sign(cat, key))
        except OSError as e:
            raise storage_error(e, f"publishing into {out}") from None
    return PublishSummary(sorted(chosen), cat.revision, count, size)


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
    """Write one object unless it is there; return the bytes written."""
    h = digest.hex()
    path = out / "objects" / h[:2] / h[2:]
    if path.exists():
        return 0
    blob = repo.read_raw(digest)
    decode(blob, digest, METADATA_LIMIT, f"object {h} of repository {repo.name}")  # publish nothing damaged
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, blob, sync=False)  # the publish flushes once, before the catalog
    return len(blob)
