"""Packs over time (format 2): gc drops dead packs and rewrites mostly dead and small ones;
loose chunks (a format-1 repository's, a bundle's) move into packs.

As restic's prune: a pack whose live objects fill less than ``KEEP_LIVE``
of it, or one of several small packs, has its live objects copied, in
their order, into new packs; then every pack set is rewritten; only then
are the old packs removed. So a kill at any moment leaves every pack set
naming packs that exist (old or new), and at worst some packs no pack set
names, which the next gc removes.
"""

import errno
import os
from dataclasses import dataclass

from ..errors import Corrupt
from . import leases
from .chunkmap import HOLE
from .objects import decode
from .packs import PACK_SIZE, PackBuilder
from .repository import Repository
from .store import METADATA_LIMIT

KEEP_LIVE = 0.8  # a pack stays as it is while at least this share of it is live
SMALL = PACK_SIZE // 4  # smaller packs are merged when there are two or more


@dataclass(frozen=True)
class RepackSummary:
    removed: int  # packs removed
    rewritten: int  # packs whose live objects were copied into new ones
    written: int  # new packs
    freed: int  # bytes
    skipped: str = ""  # why rewriting was left for a later gc (a full disk)


def repack(repo: Repository, live: set[bytes]) -> RepackSummary | None:
    """Collect the packs of ``repo`` (whose lock the caller holds), keeping the objects in ``live``; None for a
    repository that keeps its chunks loose (format 1).

    Dead packs go first, which needs no room: no live entry's pack set names
    a pack without a live object. Rewriting needs room for the copies; on a
    full disk it is left for a later gc, and what was freed stays freed.
    """
    store = repo.store
    if not store.packs_chunks:
        return None
    files = store.packs
    packed, _ = files.inventory()  # loads every readable index
    contents: dict[bytes, list] = {}  # pack -> [(digest, Location)]
    for d, loc in packed:
        contents.setdefault(loc.pack, []).append((d, loc))
    sizes = {pack: sum(loc.length for _, loc in objs) for pack, objs in contents.items()}
    live_bytes = {pack: sum(loc.length for d, loc in objs if d in live) for pack, objs in contents.items()}
    for manifest in files.packset_manifests():
        if manifest not in live:
            files.remove_packset(manifest)
    store.sync()
    dead = [p for p in contents if live_bytes[p] == 0]
    freed = 0
    for pack in dead:
        freed += sizes[pack]
        files.remove_pack(pack)
    freed += files.remove_leftovers()

    # A copy that readers do not use (the object was stored again elsewhere, after damage, or by a gc
    # killed before it removed its old packs) is dead weight; a damaged one that a good one replaced
    # goes whatever else its pack holds.
    used = {
        p: sum(loc.length for d, loc in objs if d in live and files.located(d) == loc) for p, objs in contents.items()
    }
    replaced = {p for d, p in store.damage.copies() if p in contents and _elsewhere(files.located(d), p)}
    sparse = [p for p in contents if live_bytes[p] > 0 and (used[p] < KEEP_LIVE * sizes[p] or p in replaced)]
    small = [p for p in contents if p not in sparse and live_bytes[p] > 0 and sizes[p] < SMALL]
    rewrite = sparse + (small if len(small) >= 2 else [])
    in_order = [r for p in rewrite for r in sorted(contents[p], key=lambda r: r[1].offset)]
    written: set[bytes] = set()
    try:
        _copy_live(repo, in_order, live, written)
        store.sync()
    except BaseException as e:  # the copies made so far go; the old packs are still named, and kept
        for pack in written - set(contents):
            files.remove_pack(pack)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return RepackSummary(len(dead), 0, 0, freed, skipped=os.strerror(e.errno).lower())
        raise
    # A rewrite can come out byte for byte as a pack that is there (the same live objects in the
    # same order): packs are named by content, so that one is kept, not removed below.
    rewrite = [p for p in rewrite if p not in written]
    # Every live pack set anew, from where its entry's objects lie now; then the old packs go.
    for manifest in files.packset_manifests():
        files.write_packset(manifest, repo.packs_of(manifest))
    store.sync()
    for pack in rewrite:
        freed += sizes[pack]
        files.remove_pack(pack)
    return RepackSummary(len(dead), len(rewrite), len(written - set(contents)), freed)


def _elsewhere(loc, pack: bytes) -> bool:
    return loc is not None and loc.pack != pack


def _copy_live(repo: Repository, objects, live: set[bytes], written: set[bytes]) -> None:
    """Copy the live ones of ``objects`` ((digest, Location) in order) into new packs, added to ``written``."""
    files = repo.store.packs
    builder, data = PackBuilder(), bytearray()
    for d, loc in objects:
        if d not in live or d in builder or files.located(d) != loc:  # a copy readers do not use stays behind
            continue
        frame = files.read(loc)
        try:  # a damaged object is never copied, and its pack is kept for `vml verify` to name
            decode(frame, d, METADATA_LIMIT, files.pack_name(loc.pack))
        except Corrupt as e:
            raise type(e)(f"not repacking: {e}; run vml verify") from None
        builder.add(d, frame)
        data += frame
        if builder.size >= PACK_SIZE:
            written.add(files.add_pack(builder, data))
            builder, data = PackBuilder(), bytearray()
    if len(builder):
        written.add(files.add_pack(builder, data))


def pack_loose(repo: Repository, manifests) -> int:
    """Move the loose chunks of these entries into packs, where the repository packs its chunks (see
    _pack_loose); 0 for one that keeps them loose (format 1)."""
    return _pack_loose(repo, manifests) if repo.store.packs_chunks else 0


def _pack_loose(repo: Repository, manifests, drop_loose: bool = True) -> int:
    """Move the loose chunks of these entries into packs, in disk order, and write their pack sets.

    For a repository being upgraded and for entries a bundle or a copy
    brought as loose objects. The caller holds the lock. Packs and pack
    sets are flushed before any loose chunk is removed, so a kill leaves
    each chunk loose, packed, or both (the next upgrade or gc ends that).
    With ``drop_loose`` False the loose copies stay (a format-1
    repository must keep them until it says format 2). Returns how many
    chunks were packed.
    """
    store = repo.store
    files = store.packs
    writer = files.writer()
    moved: list[bytes] = []
    manifests = list(dict.fromkeys(manifests))
    for manifest in manifests:
        for _, m in reversed(repo.local_chain(manifest)):  # parents first, each disk front to back
            for s in m.disks + m.files:
                for _, c, _ in repo.read_map(m, s):
                    if c != HOLE and files.good(c) is None and store.has(c) and writer.add(c, store.read_raw(c)):
                        moved.append(c)
    writer.flush()
    for manifest in manifests:
        files.write_packset(manifest, repo.packs_of(manifest))
    store.sync()
    if drop_loose:
        for d in moved:
            store.remove_object(d)
    return len(moved)


@dataclass(frozen=True)
class UpgradeSummary:
    was: int  # the format before
    packed: int  # chunks moved into packs
    dropped: int  # loose copies of chunks already in packs, removed


def upgrade(repo: Repository) -> UpgradeSummary:
    """Convert a repository to format 2 in place; safe to kill and to run again.

    Every chunk an entry (or a working area's lease) needs moves into
    packs; the repository says format 2 only once they are all flushed;
    loose copies go after that. Manifests and chunk maps stay loose, with
    their digests, so nothing that names an entry changes.
    """
    store = repo.store
    with store.lock("vml upgrade"):
        was = store.format
        roots = [*repo.refs().values(), *(d for lease in leases.roots(repo) for d in lease.digests)]
        manifests = [d for root in roots for d, _ in repo.local_chain(root)]
        packed = _pack_loose(repo, manifests, drop_loose=False)  # format 1 reads only loose objects
        if was == 1:
            store.set_format(2)
        dropped = 0
        for d, _, _ in store.iter_objects():
            if d is not None and store.packs.locate(d) is not None:  # a loose copy a killed run left
                store.remove_object(d)
                dropped += 1
    return UpgradeSummary(was, packed, dropped)
