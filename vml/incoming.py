"""Entries copied into a repository directory of the mount.

`cp -r /vml/rep1/entry2 /vml/rep2/` makes directory entry2 in rep2 and
writes its files. The mount stages them as plain files in
``$VML_HOME/incoming/<repository>/<name>/`` and, once nothing in the
directory has been open for a quiet moment, finalizes it here:

- If the copy has an ``entry.json`` naming a manifest that one of the
  configured repositories holds, and every copied disk and file matches
  that entry chunk for chunk, the entry is added to the target under the
  same manifest digest: the same entry, not a look-alike. Only the objects
  the target lacks are copied, read from the repository that has them and
  checked against their digests; that includes the objects of the entry's
  chain, so the target can verify, export and build on it.
- Otherwise (a plain VM directory, or bytes that differ from what
  entry.json claims) the directory is saved as a new full entry, exactly as
  `vml save NAME --from DIR` would, so nothing copied is lost.

Either way the staging directory is removed once the entry is in place.
"""

import json
import logging
import os
import shutil
from pathlib import Path

from .errors import Corrupt, VmlError
from .manifest import RESERVED_FILE, disk_file_names
from .names import check_name
from .objects import HOLE, decode, digest
from .repository import Entry, Repository
from .save import save
from .store import METADATA_LIMIT, storage_error

log = logging.getLogger(__name__)


def incoming_dir(home: Path) -> Path:
    return home / "incoming"


def staging_path(home: Path, repository: str, name: str) -> Path:
    check_name(repository, "repository")
    check_name(name)
    return incoming_dir(home) / repository / name


def finalize(target: Repository, name: str, staging: Path, sources: list[Repository]) -> Entry:
    """Turn a staged copy into entry ``name`` of ``target``; remove the staging directory."""
    claimed = _claimed_manifest(staging)
    entry = None
    if claimed is not None:
        source = next((r for r in [target, *sources] if r.store.has(claimed)), None)
        if source is not None and _matches(source, claimed, staging):
            try:
                entry = _adopt(target, name, source, claimed)
            except Corrupt as e:
                log.warning(
                    "%s: cannot copy entry %s from %s (%s); saving the files as a new entry",
                    staging,
                    claimed.hex()[:16],
                    source.name,
                    e,
                )
        elif source is not None:
            log.warning(
                "%s: the copied files differ from the entry entry.json names; saving them as a new entry", staging
            )
    if entry is None:
        entry = save(target, name, staging, message=f"copied into {target.name}")
    shutil.rmtree(staging, ignore_errors=True)
    return entry


def _claimed_manifest(staging: Path) -> bytes | None:
    try:
        doc = json.loads((staging / RESERVED_FILE).read_bytes())
        return bytes.fromhex(doc["manifest"]) if len(doc["manifest"]) == 64 else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def _matches(repo: Repository, manifest: bytes, staging: Path) -> bool:
    """Whether the staged files hold exactly the content of the entry ``manifest``."""
    try:
        resolved = repo.resolve(manifest)
    except Corrupt:
        return False
    expected = {disk_file_names(n)[0]: t for n, t in resolved.disks.items()}
    expected.update({n: t for n, (t, _) in resolved.files.items()})
    for rel, table in expected.items():
        path = staging / rel
        try:
            if path.stat().st_size != table.size:
                return False
            with open(path, "rb") as f:
                for i in range(table.count):
                    data = f.read(table.chunk_length(i))
                    want = table.digest(i)
                    if want == HOLE:
                        if data.count(0) != len(data):
                            return False
                    elif digest(data) != want:
                        return False
        except OSError:
            return False
    return True


def _adopt(target: Repository, name: str, source: Repository, manifest: bytes) -> Entry:
    """Add entry ``manifest`` to ``target`` as ``name``, copying what it lacks from ``source``."""
    from .maintenance import live_objects

    with target.store.lock(f"vml copy {name}"):
        if name in target.refs():
            raise VmlError(f"entry {name!r} already exists in repository {target.name}")
        try:
            for obj in live_objects(source, [manifest]):
                if target.store.has(obj):
                    continue
                blob = source.store.read_raw(obj)
                decode(blob, obj, METADATA_LIMIT, f"object {obj.hex()} of {source.name}")
                target.store.put_raw(obj, blob)
            target.store.sync()
            target.store.update_refs({name: manifest})
        except OSError as e:
            raise storage_error(e, f"copying entry {name!r} into {target.store.path}") from None
    return target.entry(name)


def pending(home: Path) -> list[tuple[str, str, Path]]:
    """Every staged copy: (repository, name, staging directory)."""
    out = []
    root = incoming_dir(home)
    if root.is_dir():
        for repo_dir in sorted(root.iterdir()):
            for d in sorted(repo_dir.iterdir()) if repo_dir.is_dir() else ():
                out.append((repo_dir.name, d.name, d))
    return out


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        os.unlink(path)
