"""vml verify --repair: store anew the objects whose every copy is damaged, from a source that holds them.

Verify (and any read) records each damaged copy (vml.repo.damage). Repair
looks for the objects left with no good copy in the sources it is given:
a disk image or VM directory (its disks are cut into chunks at the
repository's chunk sizes, and a chunk whose digest is wanted is taken), a
bundle (its objects, each checked), or a configured remote (fetched by
digest, checked). What it finds is stored as a save stores it: damaged
loose files are replaced, chunks go into a new pack, and the pack sets
name it; `vml gc` then drops the damaged copies. Every object is checked
against its digest before it is stored, so a source can never put wrong
bytes in place: at worst it holds nothing wanted.
"""

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadBundle, FetchError, ObjectMissing
from ..progress import SILENT, Progress
from ..repo import objects
from ..repo.repository import Repository
from . import bundle
from .sources import discover, raw_view


@dataclass
class RepairSummary:
    wanted: int  # objects with no good copy before
    found: dict[str, int] = field(default_factory=dict)  # source -> objects it gave
    left: list[bytes] = field(default_factory=list)  # still with no good copy


def unrepaired(repo: Repository) -> set[bytes]:
    """The objects whose every copy here is recorded damaged."""
    return {d for d, _ in repo.store.damage.copies() if not repo.store.has_good(d)}


def repair(repo: Repository, sources: list, progress: Progress = SILENT) -> RepairSummary:
    """Store anew, from ``sources`` (paths and RemoteStores, tried in order), what has no good copy here."""
    store = repo.store
    with store.lock("vml verify --repair"):
        wanted = unrepaired(repo)
        summary = RepairSummary(len(wanted))
        writer = store.packs.writer() if store.format == 2 else None
        for source in sources:
            if not wanted:
                break
            label = str(source) if isinstance(source, Path) else f"remote {source.name}"
            got = 0
            for d, blob in _found(repo, source, set(wanted)):
                if d in wanted:
                    _store_anew(store, writer, d, blob)
                    wanted.discard(d)
                    got += 1
                    progress.advance(1)
            summary.found[label] = got
        if writer is not None:
            writer.flush()
            store.sync()
            for manifest in store.packs.packset_manifests():  # readers of an entry find the new copies at once
                store.packs.write_packset(manifest, repo.packs_of(manifest))
        store.sync()
        summary.left = sorted(wanted)
    return summary


def _store_anew(store, writer, digest: bytes, blob: bytes) -> None:
    if store.damage.damaged(digest, None) or writer is None:
        store.put_raw(digest, blob)  # a loose copy is replaced in place
    else:
        writer.add(digest, blob)


def _found(repo: Repository, source, wanted: set[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """(digest, stored bytes) of the wanted objects ``source`` holds, each checked against its digest."""
    if not isinstance(source, Path):  # a remote
        for d in sorted(wanted):
            with contextlib.suppress(ObjectMissing, FetchError):
                yield d, source.read_raw(d)
        return
    if source.is_file():
        try:
            yield from bundle.objects_in(source, wanted).items()
            return
        except BadBundle as e:
            if "not a VML bundle" not in str(e):
                raise
    yield from _chunks_of_image(repo, source, wanted)


def _chunks_of_image(repo: Repository, path: Path, wanted: set[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """The wanted chunks of the disks and files of an image or VM directory, cut at every chunk size
    entries here use."""
    sizes = sorted({repo.store.chunk_size} | {e.manifest.chunk_size for e in repo.entries()})
    disks, files = discover(path)
    tmp = repo.store.staging_dir("repair.")
    try:
        for disk in disks:
            with raw_view(disk, tmp) as raw:
                yield from _chunks_of(raw, sizes, wanted)
        for f in files:
            yield from _chunks_of(f.path, sizes, wanted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _chunks_of(path: Path, sizes: list[int], wanted: set[bytes]) -> Iterator[tuple[bytes, bytes]]:
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        for cs in sizes:
            for offset in range(0, end, cs):
                data = os.pread(f.fileno(), cs, offset)
                d = objects.digest(data)
                if d in wanted:
                    yield d, objects.compress(data)
