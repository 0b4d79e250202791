"""Bundles: one file carrying entries to another repository.

A bundle is an uncompressed POSIX tar (so `tar tf` lists it) of::

    vml-bundle.json    {"format": 1, "entries": [...], "requires": [...],
                       "objects": N}
    objects/<hex>      objects exactly as stored (already compressed)

"entries" are the entries the bundle adds, each {"name", "manifest"};
"requires" are entries the receiver must already have, because objects
they hold were left out. Export writes plain ustar headers; import reads the
tar with `tarstream`, the only parser of its headers, and accepts nothing
but these members, each once and in this order, each under its size limit.
Import trusts nothing in the file: every object is checked against its
digest, every manifest and chunk map is parsed, and every object the new
entries need must be in the bundle or the repository before anything is
written. The objects are staged in the repository's tmp/, linked into
place, flushed, and the new refs then land in one atomic update.
"""

import contextlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import (
    AlreadyExists,
    BadBundle,
    BadSignature,
    Corrupt,
    MissingAncestor,
    ObjectMissing,
    UsageError,
    VmlError,
)
from ..files import open_regular, storage_error
from ..names import check_name
from ..progress import SILENT, Progress
from ..repo import certificates
from ..repo.chunkmap import chunk_length
from ..repo.objects import HOLE, MAX_OBJECT, decode, parse_hex
from ..repo.repack import pack_loose
from ..repo.repository import Repository
from ..repo.store import METADATA_LIMIT
from .tarstream import TarReader, shown

FORMAT = 1
INDEX = "vml-bundle.json"
INDEX_LIMIT = 1 << 20
# An object's stored size can exceed its content by zstd's framing overhead.
OBJECT_FILE_LIMIT = MAX_OBJECT


@dataclass(frozen=True)
class BundleSummary:
    entries: list[str]
    requires: list[str]
    objects: int
    size: int


def export(
    repo: Repository,
    name: str,
    out: Path | str,
    *,
    against: str | None = None,
    full: bool = False,
    progress: Progress = SILENT,
) -> BundleSummary:
    """Write entry ``name`` (and the entries it builds on) to bundle ``out``.

    By default the receiver is assumed to hold the base of the entry's
    parent; ``against`` names another entry it holds; ``full`` assumes
    nothing.
    """
    if full and against:
        raise UsageError("--full and --against exclude each other")
    out = Path(out)
    entry = repo.entry(name)
    held: tuple[str, bytes] | None = None  # an entry the receiver is assumed to have
    known_manifests: set[bytes] = set()
    known_objects: set[bytes] = set()
    local = [] if repo.read_only else repo.local_chain(entry.digest)
    requires_remote = None
    if not full and not against and local and local[-1][1].reference is not None:
        # The entry builds on a remote's entry: the receiver fetches that
        # part from the remote, so the bundle holds only the local part.
        link = local[-1][1].reference
        known_manifests.add(link.manifest)
        requires_remote = {"name": link.name, "manifest": link.manifest.hex()}
    elif against:
        held_entry = repo.entry(against)
        held = held_entry.name, held_entry.digest
    elif not full and entry.manifest.parent is not None:
        with contextlib.suppress(Corrupt):  # the parent's chain is gone here: send everything
            base_digest, base_manifest = repo.base_of(entry.manifest.parent.manifest)
            held = base_manifest.name, base_digest
    if held:
        for d, m in repo.data_chain(held[1]):
            known_manifests.add(d)
            known_objects |= repo.objects_of(d, m)

    chain = local if requires_remote else repo.data_chain(entry.digest)
    included = []
    for d, m in chain:
        if d in known_manifests:
            break
        included.append((d, m))
    names = {d: n for n, d in repo.refs().items()}
    wanted: dict[bytes, None] = {}  # ordered set
    omitted = False
    for d, m in included:
        for obj in repo.objects_of(d, m):
            if obj in known_objects:
                omitted = True
            else:
                wanted[obj] = None
    requires = [requires_remote] if requires_remote else []
    if held and (omitted or len(included) < len(chain)):
        requires.append({"name": held[0], "manifest": held[1].hex()})
    index = {
        "format": FORMAT,
        "entries": [{"name": names.get(d, m.name), "manifest": d.hex()} for d, m in reversed(included)],
        "requires": requires,
        "objects": len(wanted),
    }
    certs = _certificates_of(repo, [d for d, _ in included])
    if certs:  # an older vml ignores the key (it reads only the ones it knows): the format stays 1
        index["certificates"] = certs
    progress.start(sum(repo.object_size(obj) for obj in wanted))
    fd, tmp = tempfile.mkstemp(dir=out.parent if out.parent.exists() else None, prefix=f".{out.name}.")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            _add(tar, INDEX, json.dumps(index, indent=1).encode())
            for obj in wanted:
                blob = repo.read_raw(obj)
                _add(tar, f"objects/{obj.hex()}", blob)
                progress.advance(len(blob))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise storage_error(e, f"writing bundle {out}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return BundleSummary(
        [e["name"] for e in index["entries"]], [r["name"] for r in requires], len(wanted), out.stat().st_size
    )


def _certificates_of(repo: Repository, manifests: list[bytes]) -> dict[str, list[dict]]:
    """The certificates that verify of the entries the bundle carries, for its index (the receiver takes no others)."""
    out = {}
    for d in manifests:
        good = []
        for data in repo.certificates(d):
            with contextlib.suppress(BadSignature):
                certificates.check(data, d, "certificate")
                good.append(certificates.as_object(data))
        if good:
            out[d.hex()] = good
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class _StagedStore:
    """An ObjectSource of the objects a bundle brings (staged) and those the repository has."""

    def __init__(self, store, staging: Path, sizes: dict[bytes, int]):
        self.store, self.staging, self.sizes = store, staging, sizes
        self.path = store.path

    def read(self, digest: bytes, limit: int) -> bytes:
        if digest in self.sizes:
            p = self.staging / digest.hex()
            return decode(p.read_bytes(), digest, limit, f"bundle object {digest.hex()}")
        return self.store.read(digest, limit)

    def prepare(self, manifest: bytes) -> None:
        """Nothing to load before reading an entry: objects are found by name."""

    def has(self, digest: bytes) -> bool:
        return digest in self.sizes or self.store.has(digest)

    def read_raw(self, digest: bytes) -> bytes:
        if digest in self.sizes:
            return (self.staging / digest.hex()).read_bytes()
        return self.store.read_raw(digest)

    def object_size(self, digest: bytes) -> int:
        return len(self.read_raw(digest))

    def refs(self) -> dict[str, bytes]:
        return self.store.refs()

    def certificates(self, manifest: bytes) -> list[bytes]:
        return self.store.certificates(manifest)


def import_bundle(
    repo: Repository, path: Path | str, *, progress: Progress = SILENT, trusted: Collection[str] = ()
) -> list[str]:
    """Add a bundle's entries to ``repo``; return the names added.

    The bundle's certificates of the entries it carries are kept beside
    them; ``trusted`` (the keys whose certificates count here) says which
    of them the cap on certificates per entry must never leave out.
    """
    path = Path(path)
    with _open_bundle(path) as f:
        tar = TarReader(f, str(path))
        index = _read_index(tar, path)
        with repo.store.lock(f"vml import {path.name}"):
            # Checked under the lock, so no other writer can take a name
            # between the check and the refs update.
            entries, carried = _check_index(repo, index, path)
            certs = _check_certificates(index, path, carried)
            if not entries:
                _keep_certificates(repo, certs, trusted)
                return []
            progress.start(os.fstat(f.fileno()).st_size)
            staging = repo.store.staging_dir("import.")
            try:
                sizes = _stage_objects(tar, index["objects"], staging, path, progress)
                _check_complete(repo, _StagedStore(repo.store, staging, sizes), entries, path)
                for obj in sizes:
                    repo.store.link_in(obj, staging / obj.hex())
                pack_loose(repo, entries.values())  # the bundle's chunks came loose: into packs, in disk order
                repo.store.sync()
                _keep_certificates(repo, certs, trusted)
                repo.store.update_refs(entries)
            except OSError as e:
                raise storage_error(e, f"importing {path} into {repo.store.path}") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return list(entries)


def _open_bundle(path: Path) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file (a FIFO is refused, not waited on)."""
    try:
        return open_regular(path, "file")
    except VmlError as e:
        raise BadBundle(str(e)) from None


def _read_index(tar: TarReader, path: Path) -> dict:
    first = tar.next()
    if first is None or first.name != INDEX:
        raise BadBundle(f"{path}: not a VML bundle (no {INDEX} at its start)")
    if first.size > INDEX_LIMIT:
        raise BadBundle(f"{path}: damaged bundle index ({first.size} bytes, more than {INDEX_LIMIT})")
    try:
        index = json.loads(tar.read(first))
        if index.get("format") != FORMAT:
            raise ValueError(f"unsupported bundle format {index.get('format')!r}")
        count = index.get("objects")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError("no object count")
        return index
    except (ValueError, AttributeError, RecursionError) as e:
        raise BadBundle(f"{path}: damaged bundle index ({e})") from None


def _check_certificates(index: dict, path: Path, carried: set[bytes]) -> dict[bytes, list[bytes]]:
    """The bundle's certificates of the manifests it ``carried``, each checked.

    One that does not verify refuses the whole bundle. Certificates of
    entries the bundle does not carry are left out: anyone can sign
    anything, and a bundle must not fill the certificates of entries the
    receiver got from elsewhere (an older vml put those of the entries the
    carried ones build on in the bundle too).
    """
    doc = index.get("certificates", {})
    if not isinstance(doc, dict):
        raise BadBundle(f"{path}: damaged bundle index (certificates must be an object)")
    out = {}
    for m, texts in doc.items():
        d = parse_hex(m)
        if d is None or not isinstance(texts, list):
            raise BadBundle(f"{path}: damaged bundle index (certificates must be lists by manifest)")
        if d not in carried:
            continue
        for text in texts:
            try:
                data = certificates.encode(text)
                certificates.check(data, d, f"certificate of manifest {m[:16]}")
            except BadSignature as e:
                raise BadBundle(f"{path}: {e}; refused") from None
            out.setdefault(d, []).append(data)
    return out


def _keep_certificates(repo: Repository, certs: dict[bytes, list[bytes]], trusted: Collection[str]) -> None:
    for d, texts in certs.items():
        if repo.store.has(d):  # a certificate is kept beside an entry this repository holds
            for data in texts:
                certificates.keep(repo.store.path, d, data, trusted)


def _check_index(repo: Repository, index: dict, path: Path) -> tuple[dict[str, bytes], set[bytes]]:
    """New entries by name, and the manifests of every entry the bundle carries.

    Refuses (writing nothing) on missing or conflicting entries.
    """
    try:
        listed = [(check_name(e["name"]), parse_hex(e["manifest"])) for e in index["entries"]]
        requires = [(check_name(r["name"]), parse_hex(r["manifest"])) for r in index["requires"]]
    except (KeyError, TypeError, VmlError) as e:
        raise BadBundle(f"{path}: damaged bundle index ({e})") from None
    if any(d is None for _, d in listed + requires):
        raise BadBundle(f"{path}: damaged bundle index (bad digest)")
    for name, d in requires:
        try:
            if repo.is_local(d) or not repo.on_remote(d):
                repo.data_chain(d)
        except Corrupt:
            raise MissingAncestor(
                f"{path}: needs entry {name!r} (manifest {d.hex()[:16]}), which repository {repo.name} "
                "does not have; import that entry first"
            ) from None
    refs = repo.refs()
    entries = {}
    for name, d in listed:
        if name in refs and refs[name] != d:
            raise AlreadyExists(f"{path}: entry {name!r} already exists in repository {repo.name} with other content")
        if name not in refs:
            entries[name] = d
    return entries, {d for _, d in listed}


def _stage_objects(tar: TarReader, count: int, staging: Path, path: Path, progress: Progress) -> dict[bytes, int]:
    """Read, check and stage the ``count`` objects after the index; return digest -> decompressed size."""
    sizes = {}
    while (member := tar.next()) is not None:
        d = _object_name(member.name)
        if d is None:
            raise BadBundle(f"{path}: unexpected member {shown(member.name)}")
        if d in sizes:
            raise BadBundle(f"{path}: object {d.hex()} appears twice")
        if len(sizes) == count:
            raise BadBundle(f"{path}: more objects than the {count} its index lists")
        if member.size > OBJECT_FILE_LIMIT:
            raise BadBundle(f"{path}: object {d.hex()} is larger than any object may be")
        blob = tar.read(member)
        try:
            sizes[d] = len(decode(blob, d, METADATA_LIMIT, f"object {d.hex()}"))
        except Corrupt as e:
            raise BadBundle(f"{path}: {e}") from None
        (staging / d.hex()).write_bytes(blob)
        progress.advance(len(blob))
    if len(sizes) != count:
        raise BadBundle(f"{path}: truncated: {len(sizes)} of {count} objects present")
    return sizes


def is_bundle(path: Path) -> bool:
    """Whether ``path`` starts as a bundle does (its first member is the index), read as import reads it."""
    try:
        with _open_bundle(path) as f:
            first = TarReader(f, str(path)).next()
    except BadBundle:
        return False
    return first is not None and first.name == INDEX


def objects_in(path: Path, wanted: set[bytes]) -> dict[bytes, bytes]:
    """The objects of bundle ``path`` among ``wanted``, as stored, each checked against its name
    (what `vml verify --repair` takes from a bundle)."""
    found = {}
    with _open_bundle(path) as f:
        tar = TarReader(f, str(path))
        _read_index(tar, path)
        while (member := tar.next()) is not None:
            d = _object_name(member.name)
            if d is None or member.size > OBJECT_FILE_LIMIT:
                raise BadBundle(f"{path}: unexpected member {shown(member.name)}")
            blob = tar.read(member)
            if d in wanted:
                try:
                    decode(blob, d, METADATA_LIMIT, f"object {d.hex()}")
                except Corrupt as e:
                    raise BadBundle(f"{path}: {e}") from None
                found[d] = blob
    return found


def _object_name(name: str) -> bytes | None:
    """The digest a member named ``objects/<64 lowercase hex digits>`` holds, else None."""
    hex_digits = name.removeprefix("objects/")
    if hex_digits == name or len(hex_digits) != 64 or hex_digits.strip("0123456789abcdef"):
        return None
    return bytes.fromhex(hex_digits)


def _check_complete(repo: Repository, staged: _StagedStore, entries: dict[str, bytes], path: Path) -> None:
    """Every object each new entry needs is at hand, and every chunk fits its size.

    Entries already in the repository were checked when they came; a chain
    may end at an entry that a configured remote's catalog lists, which is
    then fetched (and checked by digest) when it is read.
    """
    view = Repository(staged, repo.name, max_disk_size=repo.max_disk_size)

    def remote(d: bytes) -> bool:
        return not staged.has(d) and repo.on_remote(d)

    for name, digest in entries.items():
        if not staged.has(digest):
            raise BadBundle(f"{path}: the manifest of entry {name!r} is missing")
        try:
            chain = view.data_chain(digest, stop=remote)
        except ObjectMissing:
            missing = _first_missing_link(view, digest)
            raise MissingAncestor(
                f"{path}: entry {name!r} builds on entry {missing!r}, which is neither in the bundle nor in "
                f"repository {repo.name} nor on a configured remote; import that entry first"
            ) from None
        except Corrupt as e:
            raise BadBundle(f"{path}: entry {name!r}: {e}") from None
        for d, m in chain:
            if d in staged.sizes:
                _check_chunks(view, staged, m, f"{path}: entry {name!r}")


def _check_chunks(view: Repository, staged: _StagedStore, m, where: str) -> None:
    for s in m.disks + m.files:
        try:
            records = view.read_map(m, s)
        except Corrupt as e:
            raise BadBundle(f"{where}: {e}") from None
        for i, d, _ in records:
            if d == HOLE:
                continue
            if not staged.has(d):
                raise BadBundle(f"{where} needs object {d.hex()}, which is missing")
            size = staged.sizes.get(d)
            length = chunk_length(s.size, m.chunk_size, i)
            if size is not None and size != length:
                raise BadBundle(f"{where}, {s.name}: chunk {i} has {size} bytes, expected {length}")


def _first_missing_link(view: Repository, digest: bytes) -> str:
    m = view.manifest(digest)
    while (link := m.reference) is not None:
        if not view.store.has(link.manifest):
            return link.name
        m = view.manifest(link.manifest)
    return "?"
