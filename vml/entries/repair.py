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
import errno
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FetchError, ObjectMissing
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
    """Store anew, from ``sources`` (paths and RemoteStores, tried in order), what has no good copy here.

    The sources are read without the lock (converting and reading a whole
    image takes long, and what is found is checked by digest); only storing
    what was found holds it.
    """
    store = repo.store
    wanted = unrepaired(repo)
    summary = RepairSummary(len(wanted))
    found: dict[bytes, bytes] = {}
    for source in sources:
        if wanted <= found.keys():
            break
        label = str(source) if isinstance(source, Path) else f"remote {source.name}"
        got = dict(_found(repo, source, wanted - found.keys()))
        found |= got
        summary.found[label] = len(got)
        progress.advance(len(got))
    with store.lock("vml verify --repair"):
        writer = store.pack_writer()
        for d, blob in found.items():
            if not store.has_good(d):  # another writer may have stored it meanwhile
                _store_anew(store, writer, d, blob)
        if writer is not None:
            writer.flush()
            store.sync()
            for manifest in store.packs.packset_manifests():  # readers of an entry find the new copies at once
                store.packs.write_packset(manifest, repo.packs_of(manifest))
        store.sync()
    summary.left = sorted(wanted - found.keys())
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
    if source.is_file() and bundle.is_bundle(source):
        yield from bundle.objects_in(source, wanted).items()
    else:
        yield from _chunks_of_image(repo, source, wanted)


def _chunks_of_image(repo: Repository, path: Path, wanted: set[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """The wanted chunks of the disks and files of an image or VM directory, cut at every chunk size
    entries here use. An image that is not raw is converted in the temporary directory ($TMPDIR)."""
    sizes = sorted({repo.store.chunk_size} | {e.manifest.chunk_size for e in repo.entries()})
    disks, files = discover(path)
    with tempfile.TemporaryDirectory(prefix="vml-repair-") as tmp:
        for disk in disks:
            with raw_view(disk, Path(tmp)) as raw:
                yield from _chunks_of(raw, sizes, wanted)
    for f in files:
        yield from _chunks_of(f.path, sizes, wanted)


def _chunks_of(path: Path, sizes: list[int], wanted: set[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """The wanted chunks of a file; its holes are skipped (all zeros: never stored, so never damaged)."""
    with open(path, "rb") as f:
        fd, end = f.fileno(), os.fstat(f.fileno()).st_size
        for cs in sizes:
            offset = 0
            while offset < end:
                try:
                    offset = max(offset, os.lseek(fd, offset, os.SEEK_DATA) // cs * cs)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # nothing but a hole from here
                        break
                data = os.pread(fd, cs, offset)
                d = objects.digest(data)
                if d in wanted:
                    yield d, objects.compress(data)
                offset += cs
