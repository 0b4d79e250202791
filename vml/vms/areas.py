"""Working areas: writable copy-on-write views of an entry.

An area lives in ``$VML_HOME/areas/NAME/``::

    area.json             the entry it builds on (repository, name, manifest
                          digest), the generation of its live overlays, and
                          the generations of overlays frozen by a save
    lock                  flock()ed by the one process serving the area
    DISK.GEN.overlay      sparse files as long as the disk (see vml.vms.overlay)

A disk of an area is a stack: the entry's bytes, then the overlays frozen by
a save that has not finished (oldest first), then the live overlay, which
takes the writes. The repository records the area as a lease (see
vml.repo.leases), so that no home's gc frees what it reads.

Saving never holds up the guest for longer than it takes to create empty
files and replace area.json. It runs in three steps:

1. freeze (under the mutex): empty overlays of the next generation are
   created, area.json names them live and the old ones frozen, and writes
   go to them from then on;
2. store (no mutex): the chunks holding written blocks of the frozen
   layers are read and stored as an incremental entry on the area's entry;
3. rebase (under the mutex): the live overlays now rest on the new entry,
   whose bytes are those of the frozen stack; area.json says so, and the
   frozen overlays are removed.

A crash at any point leaves area.json naming a stack whose bytes are the
guest's, and overlay files it does not name are removed when the area is
opened. A save that fails leaves the frozen layers in the stack, and the
next save stores them too.

Concurrency rules, for the mount's worker threads: writes and the freeze
and rebase steps hold the area's mutex; one save runs at a time (and close
waits for it). Reads take no lock: they use the overlay current when they
start, which stays usable (its file descriptor closes only with the
object) and shows the same bytes before and after each step.
"""

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .. import control
from ..config import Config
from ..errors import AlreadyExists, Locked, UsageError, VmlError
from ..files import fsync_dir, storage_error
from ..layout import areas_dir
from ..names import check_name
from ..progress import SILENT, Progress
from ..repo import leases
from ..repo.hardware import Hardware
from ..repo.repository import Entry, Repository
from ..times import now_iso
from .area import BLOCK, RECORD_FILE, Area, AreaRecord
from .overlay import check_sparse_files

log = logging.getLogger(__name__)


def list_areas(home: Path) -> list[AreaRecord]:
    """Every area under ``home``, by name; damaged ones are skipped."""
    out = []
    d = areas_dir(home)
    if d.is_dir():
        for p in sorted(d.iterdir()):
            if p.name.startswith("."):
                continue
            with contextlib.suppress(VmlError):
                out.append(AreaRecord.load(p / RECORD_FILE))
    return out


def open_area(home: Path, cfg: Config, spec: str, repo_ref: str | None, name: str | None = None) -> AreaRecord:
    """Open a working area on ``spec`` (ENTRY of ``repo_ref``, or REPO:ENTRY), named ``name`` or after the entry.

    An area on a remote's entry saves into the local repository ``repo_ref``
    (or the default one).
    """
    repo, entry = cfg.find_entry(spec, repo_ref)
    cfg.check_certified(repo, entry)
    save_to = cfg.open(repo_ref) if repo.read_only else None
    return create_area(home, name or entry.name, repo, entry, save_to)


def create_area(home: Path, name: str, repo: Repository, entry: Entry, save_to: Repository | None = None) -> AreaRecord:
    """Create area ``name`` on ``entry``; it is empty until written.

    An area on a remote's entry saves into the local repository ``save_to``.
    """
    check_name(name, "area")
    if entry.manifest.is_environment:
        raise UsageError(
            f"entry {entry.name!r} is an environment backup, not a VM: open a VM's entry and "
            f"restore it there with `vml env restore {entry.name} --area AREA`"
        )
    parent = areas_dir(home)
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / name
    if target.exists():
        raise AlreadyExists(f"working area {name!r} already exists; pick another name with --area")
    block = max(BLOCK, os.statvfs(parent).f_bsize)
    check_sparse_files(parent, block)
    if block > entry.manifest.chunk_size:
        raise UsageError(f"{parent}: file system blocks of {block} bytes are larger than the chunk size")
    if repo.read_only and (save_to is None or save_to.read_only):
        raise UsageError(f"{repo.name} is a remote: name a local repository to save the area into with --repo")
    path = "" if repo.read_only else str(repo.store.path)
    save_path = str(save_to.store.path) if repo.read_only else ""
    rec = AreaRecord(name, repo.name, path, entry.name, entry.digest.hex(), 1, block, now_iso(), save_to=save_path)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.creating."))
    try:
        rec.write(staging / RECORD_FILE)
        (staging / "lock").touch()
        os.chmod(staging, 0o700)
        os.rename(staging, target)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):  # opened at the same moment by another command
            raise AlreadyExists(f"working area {name!r} already exists; pick another name with --area") from None
        raise storage_error(e, f"opening working area {name!r}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(parent)
    # The repository records the area, so that no home's gc frees what it
    # reads; after the area exists, so that no one takes the lease for stale.
    if not repo.read_only:
        try:
            leases.take(repo, leases.here(home, name, entry.name, entry.digest))
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
    return rec


def remove_area(home: Path, name: str, discard: bool = False) -> None:
    """Delete an area; refuses while it holds unsaved changes, unless ``discard``."""
    with Area(home, name) as area:
        area.destroy(discard)


def roots(home: Path, repo: Repository) -> tuple[bytes, ...]:
    """The manifests that working areas on ``repo`` build on (gc must keep them)."""
    here = repo.store.path.resolve()
    return tuple(bytes.fromhex(r.manifest) for r in list_areas(home) if Path(r.repository_path).resolve() == here)


def overlay_bytes(home: Path, rec: AreaRecord) -> int:
    """Bytes the area's overlays hold on disk: what was written since its last save, read without its lock."""
    total = 0
    gens = {str(g) for g in [*rec.frozen, rec.generation]}
    for p in (areas_dir(home) / rec.name).glob("*.overlay"):
        if p.name.rsplit(".", 2)[1] not in gens:  # DISK.GEN.overlay
            continue
        with contextlib.suppress(OSError):
            total += p.stat().st_blocks * 512
    return total


def save_area(
    home: Path,
    name: str,
    entry: str,
    message: str = "",
    progress: Progress = SILENT,
    files: dict[str, Path] | None = None,
    drop: tuple[str, ...] = (),
    hardware: Hardware | None = None,
) -> AreaRecord:
    """Save area ``name`` as entry ``entry``, here or through the mount that serves it.

    Returns the area's record afterwards (it then builds on ``entry``).
    See Area.save for ``files``, ``drop`` and ``hardware``.
    """
    try:
        with Area(home, name) as area:
            area.save_changes(entry, message, progress, files, drop, hardware)
    except Locked:
        if control.mount_state(home) is None:
            raise
        control.ask_save(home, name, entry, message, files, drop, hardware)
    return AreaRecord.load(areas_dir(home) / name / RECORD_FILE)


def close_area(home: Path, name: str, discard: bool = False) -> None:
    """Remove area ``name``, here or through the mount that serves it."""
    try:
        remove_area(home, name, discard)
    except Locked:
        if control.mount_state(home) is None:
            raise
        control.ask_close(home, name, discard)
