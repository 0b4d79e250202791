"""Entries copied into a repository directory of the mount.

`cp -r /vml/rep1/entry2 /vml/rep2/` makes directory entry2 in rep2 and
writes its files. The mount stages them as plain files in
``$VML_HOME/incoming/<repository>/<name>/`` and, once nothing in the
directory has been open for a quiet moment, tries to finalize it here.

A copy is adopted only when it is exactly an entry: its ``entry.json``
names a manifest that one of the configured repositories holds, and the
staged files are exactly that entry's files (each disk's D.img, D.vmdk and
D-flat.vmdk, and its configuration files), with the same bytes, chunk for
chunk. rep2 then gets the same entry (same manifest digest), storing only
the objects it lacked, those of the entry's chain included, so that it can
verify, export and build on it. Anything else (a copy cut short, files
changed or added, a plain VM directory) is not turned into an entry behind
the user's back: it stays staged, shown in the mount and by `vml consult`,
until the user removes it or saves it with `vml save --from`.
"""

import json
import logging
import shutil
from pathlib import Path

from ..errors import Corrupt, VmlError
from ..files import storage_error
from ..layout import incoming_dir
from ..names import check_name
from ..repo.manifest import RESERVED_FILE, disk_file_names
from ..repo.objects import HOLE, decode, digest
from ..repo.repack import pack_loose
from ..repo.repository import Entry, Repository
from ..repo.store import METADATA_LIMIT
from . import envtree
from .vmdk import descriptor

log = logging.getLogger(__name__)


class NotTaken(VmlError):
    """A staged copy that is not exactly an entry; it stays staged."""


def staging_path(home: Path, repository: str, name: str) -> Path:
    check_name(repository, "repository")
    check_name(name)
    return incoming_dir(home) / repository / name


def finalize(target: Repository, name: str, staging: Path, sources: list[Repository]) -> Entry:
    """Adopt the staged copy at ``staging`` as entry ``name`` of ``target``, then remove it.

    Raises NotTaken, leaving ``staging`` alone, when the copy is not exactly an entry.
    """
    claimed = _claimed_manifest(staging)
    if claimed is None:
        raise NotTaken(f"{staging}: no {RESERVED_FILE} naming an entry (a plain directory is saved with vml save)")
    source = next((r for r in [target, *sources] if r.store.has(claimed)), None)
    if source is None:
        raise NotTaken(f"{staging}: no configured repository has the entry {RESERVED_FILE} names")
    problem = _mismatch(source, claimed, staging)
    if problem:
        raise NotTaken(f"{staging}: not a complete, unchanged copy of the entry ({problem})")
    try:
        entry = _adopt(target, name, source, claimed)
    except Corrupt as e:
        raise NotTaken(f"{staging}: cannot copy the entry's objects from {source.name} ({e})") from None
    shutil.rmtree(staging, ignore_errors=True)
    return entry


def _claimed_manifest(staging: Path) -> bytes | None:
    try:
        doc = json.loads((staging / RESERVED_FILE).read_bytes())
        return bytes.fromhex(doc["manifest"]) if len(doc["manifest"]) == 64 else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def _mismatch(repo: Repository, manifest: bytes, staging: Path) -> str | None:
    """Why the staged files are not exactly the entry ``manifest``, or None if they are."""
    try:
        resolved = repo.resolve(manifest)
    except Corrupt as e:
        return str(e)
    expected: dict[str, object] = {}
    if repo.manifest(manifest).is_environment:
        return _environment_mismatch(repo, manifest, staging)
    for name, table in resolved.disks.items():
        img, vmdk, flat = disk_file_names(name)
        expected[img] = expected[flat] = table
        expected[vmdk] = descriptor(name, table.size)
    expected.update({n: t for n, (t, _) in resolved.files.items()})
    staged = {p.relative_to(staging).as_posix() for p in staging.rglob("*") if not p.is_dir()}
    staged.discard(RESERVED_FILE)
    if staged != set(expected):
        missing, extra = sorted(set(expected) - staged), sorted(staged - set(expected))
        return f"missing {missing}, extra {extra}" if missing else f"extra {extra}"
    for rel, want in expected.items():
        path = staging / rel
        if isinstance(want, bytes):
            if path.read_bytes() != want:
                return f"{rel} differs"
        elif not _same_content(path, want):
            return f"{rel} differs"
    return None


def _environment_mismatch(repo: Repository, manifest: bytes, staging: Path) -> str | None:
    """Why the staged tree is not exactly what the environment entry's directory shows, or None."""
    records, data = envtree.env_records(repo, Entry("copy", manifest, repo.manifest(manifest)))
    cs = repo.manifest(manifest).chunk_size
    expected = {"/".join(p): r for p, r in envtree.shown_files(records) if r.type == "f"}
    staged = {p.relative_to(staging).as_posix() for p in staging.rglob("*") if not p.is_dir()}
    staged.discard(RESERVED_FILE)
    if staged != set(expected):
        missing, extra = sorted(set(expected) - staged)[:3], sorted(staged - set(expected))[:3]
        return f"missing {missing}, extra {extra}" if missing else f"extra {extra}"
    for rel, r in expected.items():
        try:
            if (staging / rel).read_bytes() != data.read(r.slot * cs, r.size):
                return f"{rel} differs"
        except OSError as e:
            return f"{rel}: {e.strerror}"
    return None


def _same_content(path: Path, table) -> bool:
    try:
        if path.stat().st_size != table.size:
            return False
        with open(path, "rb") as f:
            for i in range(table.count):
                data = f.read(table.chunk_length(i))
                want = table.digest(i)
                if (data.count(0) != len(data)) if want == HOLE else (digest(data) != want):
                    return False
    except OSError:
        return False
    return True


def _adopt(target: Repository, name: str, source: Repository, manifest: bytes) -> Entry:
    """Add entry ``manifest`` to ``target`` as ``name``, copying what it lacks from ``source``."""
    with target.store.lock(f"vml copy {name}"):
        if name in target.refs():
            raise NotTaken(f"entry {name!r} already exists in repository {target.name}")
        try:
            for obj in source.needed_objects([manifest], local_only=True):
                if target.store.has_good(obj):
                    continue
                blob = source.store.read_raw(obj)
                decode(blob, obj, METADATA_LIMIT, f"object {obj.hex()} of {source.name}")
                target.store.put_raw(obj, blob)
            pack_loose(target, [manifest])
            target.store.sync()
            target.store.update_refs({name: manifest})
        except OSError as e:
            raise storage_error(e, f"copying entry {name!r} into {target.store.path}") from None
    return target.entry(name)


def aside_path(staged: Path) -> Path:
    """Where a staged copy is moved while it is being finalized."""
    return staged.with_name(f".{staged.name}.finalizing")


def pending(home: Path) -> list[tuple[str, str, Path]]:
    """Every staged copy: (repository, name, staging directory)."""
    out = []
    root = incoming_dir(home)
    if root.is_dir():
        for repo_dir in sorted(root.iterdir()):
            for d in sorted(repo_dir.iterdir()) if repo_dir.is_dir() else ():
                if not d.name.startswith("."):
                    out.append((repo_dir.name, d.name, d))
    return out


def recover(home: Path) -> None:
    """Put back copies a mount that died was finalizing (call before serving)."""
    root = incoming_dir(home)
    for d in root.glob("*/.*.finalizing") if root.is_dir() else ():
        back = d.with_name(d.name[1 : -len(".finalizing")])
        if not back.exists():
            d.rename(back)
