"""Checking, removing and collecting: verify, rm, gc."""

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from ..errors import Corrupt, HasChildren, ObjectMissing, UsageError
from ..files import storage_error
from ..progress import SILENT, Progress
from ..repo import certificates, chunkmap, leases, paths
from ..repo.manifest import Link, Manifest, Stream
from ..repo.packs import Location
from ..repo.repack import RepackSummary, repack
from ..repo.repository import Entry, Repository
from ..repo.store import METADATA_LIMIT
from .save import ChunkWriter

MAX_PROBLEMS_PER_ENTRY = 5


# -- verify ---------------------------------------------------------------


def verify(
    repo: Repository, name: str | None = None, *, progress: Progress = SILENT, workers: int | None = None
) -> list[str]:
    """Check objects against their digests and entries against their objects.

    Without ``name``: every object in the store and every entry. With it:
    that entry and everything it needs. Returns one line per problem.
    """
    problems: list[str] = []
    checked: dict[bytes, int | None] = {}  # digest -> decompressed size, None if bad
    with ThreadPoolExecutor(workers or os.cpu_count() or 2, thread_name_prefix="vml-verify") as pool:
        if name is None:
            copies: list[tuple[bytes, Location | None]] = []  # every copy of every object: each is checked
            problems += repo.store.layout_problems()
            for d, path, problem in repo.store.iter_objects():
                if d is None:
                    problems.append(f"{path}: {problem}")
                else:
                    copies.append((d, None))
            packed, bad_packs = repo.store.inventory()
            copies += packed
            problems += bad_packs
            progress.start(len(copies))
            _check_copies(repo, copies, checked, problems, pool, progress)
            try:
                refs = repo.refs()
            except Corrupt as e:
                return [*problems, str(e)]
        else:
            refs = {name: repo.entry(name).digest}
        for entry_name, digest in refs.items():
            _check_entry(repo, entry_name, digest, checked, problems, pool, progress)
    return problems


def _check_copies(repo, copies, checked, problems, pool, progress) -> None:
    """Check each copy; an object is damaged when none of its copies is right (a damaged copy is recorded
    either way, so that gc drops it once a good one is there and a save stores the object anew if not)."""

    def one(copy):
        d, where = copy
        try:
            return d, len(repo.store.read_copy(d, where)), None
        except Corrupt as e:
            return d, None, str(e)

    bad: dict[bytes, str] = {}
    for d, size, problem in pool.map(one, copies):
        if problem:
            bad.setdefault(d, problem)
        else:
            checked[d] = size
        progress.advance(1)
    for d, problem in bad.items():
        if d not in checked:
            checked[d] = None
            problems.append(problem)


def _check_objects(repo, digests, checked, problems, pool, progress) -> None:
    def one(d: bytes):
        try:
            return d, len(repo.store.read(d, METADATA_LIMIT)), None
        except Corrupt as e:
            return d, None, str(e)

    for d, size, problem in pool.map(one, [d for d in digests if d not in checked]):
        checked[d] = size
        if problem:
            problems.append(problem)
        progress.advance(1)


def _check_entry(repo, name, digest, checked, problems, pool, progress) -> None:
    try:
        local = repo.local_chain(digest)
        if local[-1][1].reference is None:
            resolved = repo.resolve(digest)
            tables = [(f"disk {n}", t) for n, t in resolved.disks.items()]
            tables += [(f"file {n}", t) for n, (t, _) in resolved.files.items()]
        else:  # it builds on a remote's entry: check what is here, the remote's part is checked as it comes
            tables = [(f"{s.name} of {m.name}", _own_table(repo, m, s)) for _, m in local for s in m.disks + m.files]
    except Corrupt as e:
        problems.append(f"entry {name!r}: {e}")
        return
    for chain_digest, m in local:
        _check_objects(repo, [chain_digest, *m.map_digests()], checked, problems, pool, progress)
    _check_objects(repo, set().union(*(t.digest_set() for _, t in tables)), checked, problems, pool, progress)
    found = []
    for label, table in tables:
        for i, d, _ in table.records():
            size = checked.get(d)
            if size is None:
                found.append(f"entry {name!r}, {label}, chunk {i}: object {d.hex()} is missing or damaged")
            elif size != table.chunk_length(i):
                found.append(
                    f"entry {name!r}, {label}, chunk {i}: object {d.hex()} has {size} bytes, "
                    f"expected {table.chunk_length(i)}"
                )
    problems.extend(found[:MAX_PROBLEMS_PER_ENTRY])
    if len(found) > MAX_PROBLEMS_PER_ENTRY:
        problems.append(f"entry {name!r}: ... and {len(found) - MAX_PROBLEMS_PER_ENTRY} more damaged chunks")


def _own_table(repo, m: Manifest, stream) -> chunkmap.ChunkTable:
    """A table of only the chunks an entry's own map lists (the rest are holes)."""
    table = chunkmap.ChunkTable(stream.size, m.chunk_size)
    table.apply(repo.read_map(m, stream))
    return table


# -- gc -------------------------------------------------------------------


@dataclass(frozen=True)
class GcSummary:
    removed: int
    freed: int
    kept: int
    areas: int  # working areas whose entries were kept for them (leases)
    packs: RepackSummary | None = None  # format 2


def gc(repo: Repository, keep: tuple[bytes, ...] = ()) -> GcSummary:
    """Remove every object no entry needs, and leftovers of interrupted writers.

    The roots are computed under the lock: every ref, and every working
    area's entry, of any home (its lease), even if the entry was removed
    since. ``keep`` names more manifests to keep with all they need.
    """
    with repo.store.lock("vml gc"):
        held = leases.roots(repo)
        for lease in held:
            for digest in lease.digests:
                if not repo.store.has(digest):
                    raise ObjectMissing(
                        f"the entry {lease.where()} builds on (manifest {digest.hex()[:16]}) is missing; "
                        "nothing is collected until that is understood (see `vml leases`)"
                    )
        roots = [*repo.refs().values(), *keep, *(d for lease in held for d in lease.digests)]
        try:
            live = repo.needed_objects(roots, local_only=True)
        except Corrupt as e:
            raise type(e)(f"not collecting garbage while an entry is damaged ({e}); run vml verify") from None
        removed = freed = kept = 0
        for d, path, _ in repo.store.iter_objects():
            if d is None or d in live:
                kept += 1
                continue
            freed += path.stat().st_size
            repo.store.remove_object(d)
            removed += 1
        for m in certificates.manifests_with_certificates(repo.store.path):
            if m not in live:  # the entry is gone: its certificates go with it
                shutil.rmtree(repo.store.path / certificates.DIR / m.hex(), ignore_errors=True)
        try:
            packs = repack(repo, live)
        except OSError as e:  # every pack set names packs that are there
            raise storage_error(e, f"repacking {repo.name}") from None
        _forget_gone_damage(repo.store)
    if packs is not None:
        freed += packs.freed
    return GcSummary(removed, freed, kept, len(held), packs)


def _forget_gone_damage(store) -> None:
    """Drop the records of damaged copies that are no longer here (gc removed their pack or loose file)."""
    store.damage.forget(
        (d, pack)
        for d, pack in store.damage.copies()
        if not (store.packs.has_index(pack) if pack else os.path.lexists(paths.object_path(store.path, d)))
    )


# -- rm -------------------------------------------------------------------


def dependents(repo: Repository, entries: list[Entry], digest: bytes) -> list[Entry]:
    """Entries whose tree parent or data chain leads, directly or not, to ``digest``."""
    affected = {digest}
    out: list[Entry] = []
    changed = True
    while changed:
        changed = False
        for e in entries:
            if e.digest in affected:
                continue
            links = [e.manifest.parent, e.manifest.reference]
            if any(link is not None and link.manifest in affected for link in links):
                affected.add(e.digest)
                out.append(e)
                changed = True
    return out


def remove(
    repo: Repository, name: str, *, recursive: bool = False, reparent: bool = False, force: bool = False
) -> dict[str, list[str]]:
    """Remove an entry; returns {"removed": [...], "rewritten": [...]}.

    An entry that others build on is refused unless ``recursive`` (remove
    them too) or ``reparent`` (attach them to the entry's parent, folding
    its changes into their deltas). An entry that a working area of any
    home builds on, or one this would remove or rewrite, is refused unless
    ``force``; the area's lease keeps its data until the area is closed.
    """
    if recursive and reparent:
        raise UsageError("--recursive and --reparent exclude each other")
    with repo.store.lock(f"vml rm {name}"):
        entry = repo.entry(name)
        deps = dependents(repo, repo.entries(), entry.digest)
        touched = {entry.digest: name}
        if recursive or reparent:
            touched.update({e.digest: e.name for e in deps})
        held = leases.holders(repo, set(touched))
        if held and not force:
            lease = held[0]
            more = f" (and {len(held) - 1} more)" if len(held) > 1 else ""
            raise HasChildren(
                f"{lease.where()} builds on entry {touched[min(lease.digests & set(touched))]!r}{more}: "
                "close the area first, "
                "or use --force (the area keeps what it reads until it is closed)"
            )
        if not deps:
            repo.store.update_refs(delete=(name,))
            return {"removed": [name], "rewritten": []}
        if recursive:
            names = [name] + [e.name for e in deps]
            repo.store.update_refs(delete=tuple(names))
            return {"removed": names, "rewritten": []}
        if not reparent:
            listed = ", ".join(e.name for e in deps[:5]) + (", ..." if len(deps) > 5 else "")
            raise HasChildren(
                f"entry {name!r} has entries built on it ({listed}): use --recursive to remove them too, "
                "or --reparent to attach them to its parent"
            )
        new_refs = _reparent(repo, entry, deps)
        repo.store.update_refs(new_refs, delete=(name,))
        return {"removed": [name], "rewritten": sorted(new_refs)}


def _reparent(repo: Repository, removed: Entry, deps: list[Entry]) -> dict[str, bytes]:
    """New manifests for ``deps`` without ``removed``; same content, new chains.

    Every dependent keeps its disks and files exactly: its resolved chunk
    tables are computed before, and its new delta is taken against its new
    reference at the digest level, so no chunk data is read or written.
    """
    content = {e.digest: repo.resolve(e.digest) for e in deps}
    up = removed.manifest.parent
    if up is not None and not repo.store.has(up.manifest):
        up = None  # its parent is not in this repository: dependents become roots
    renamed: dict[bytes, bytes | None] = {removed.digest: up.manifest if up else None}
    names: dict[bytes, str] = {up.manifest: up.name} if up else {}
    writer = ChunkWriter(repo.store, removed.manifest.chunk_size)
    with writer.undone_on_failure(f"rewriting the entries built on {removed.name!r}"):
        todo = list(deps)
        while todo:
            ready = [e for e in todo if not _waits_on(e, todo)]
            if not ready:
                raise Corrupt(f"entries {', '.join(e.name for e in todo)} depend on each other")
            for e in ready:
                new_digest = _rewrite(repo, e, content[e.digest], renamed, names, writer)
                renamed[e.digest] = new_digest
                names[new_digest] = e.name
                todo.remove(e)
        repo.store.sync()
    return {e.name: renamed[e.digest] for e in deps}


def _waits_on(e: Entry, todo: list[Entry]) -> bool:
    pending = {t.digest for t in todo}
    return any(link is not None and link.manifest in pending for link in (e.manifest.parent, e.manifest.reference))


def _rewrite(repo, e: Entry, content, renamed, names, writer) -> bytes:
    m = e.manifest
    parent = m.parent
    if parent is not None and parent.manifest in renamed:
        target = renamed[parent.manifest]
        parent = Link(names[target], target) if target else None
    kind, base = m.kind, None
    if kind != "full" and parent is None:
        kind = "full"
    if kind == "differential":
        try:
            base_digest, base_manifest = repo.base_of(parent.manifest)
            base = Link(base_manifest.name, base_digest)
        except Corrupt:  # its tree parent is not here (shared without it)
            kind = "full"
    reference = parent if kind == "incremental" else base
    ref = repo.resolve(reference.manifest) if reference else None

    def stream(s: Stream, table, ref_table) -> Stream:
        records = table.diff(ref_table)
        return replace(s, map=writer.put_metadata(chunkmap.encode(records)))

    disks = tuple(stream(s, content.disks[s.name], ref.disks.get(s.name) if ref else None) for s in m.disks)
    files = tuple(
        stream(s, content.files[s.name][0], ref.files[s.name][0] if ref and s.name in ref.files else None)
        for s in m.files
    )
    # Only the links and the deltas change: every other field (hardware,
    # message, fields a newer version added) is kept as it is.
    new = replace(m, kind=kind, parent=parent, base=base, disks=disks, files=files)
    return writer.put_metadata(new.encode())
