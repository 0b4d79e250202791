"""Every name of the repository format: objects, packs, indexes, pack sets.

A repository, a published directory and a remote's cache hold the same
files under the same names, relative to their root (docs/format.md)::

    objects/ab/cdef...        a loose object, named by its digest split after two hex digits
    packs/ab/<pack>           object frames back to back, named by the BLAKE3 of its bytes
    packs/ab/<pack>.idx       the pack's index (vml.repo.packs)
    packsets/<manifest>       the packs holding the chunks of that entry's data chain

A name is also the file's URL below a published root, so one function
builds each, for a directory and for HTTP alike. ``fanout`` is the one walk
of the ``ab/`` directories.
"""

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from .objects import parse_hex

OBJECTS = "objects"
PACKS = "packs"
PACKSETS = "packsets"


def object_name(digest: bytes) -> str:
    """``objects/ab/cdef...``"""
    h = digest.hex()
    return f"{OBJECTS}/{h[:2]}/{h[2:]}"


def pack_name(pack: bytes) -> str:
    """``packs/ab/<pack>``"""
    h = pack.hex()
    return f"{PACKS}/{h[:2]}/{h}"


def index_name(pack: bytes) -> str:
    """``packs/ab/<pack>.idx``"""
    return pack_name(pack) + ".idx"


def packset_name(manifest: bytes) -> str:
    """``packsets/<manifest>``"""
    return f"{PACKSETS}/{manifest.hex()}"


def object_path(root: Path, digest: bytes) -> Path:
    return root / object_name(digest)


def pack_path(root: Path, pack: bytes) -> Path:
    return root / pack_name(pack)


def index_path(root: Path, pack: bytes) -> Path:
    return root / index_name(pack)


def packset_path(root: Path, manifest: bytes) -> Path:
    return root / packset_name(manifest)


def fanout(top: Path) -> Iterator[tuple[Path, str | None]]:
    """Every file of the fan-out directory ``top`` (``top/ab/NAME``, as objects/ and packs/ are), in name order:
    (path, None), or (path, what is wrong with it) for whatever is not a regular file in a fan-out directory.

    Never follows a symbolic link: a link in place of a fan-out directory or of a file is reported,
    never walked into or read, so that no walk of a repository or a cache, and nothing that removes
    what a walk found, reaches outside it. A ``top`` that is not a directory (a link too) yields nothing:
    ``real_directory`` says what it is.
    """
    if real_directory(top) or not top.exists():
        return
    for sub in _entries(top):
        if sub.is_symlink():
            yield Path(sub.path), "a symbolic link, not followed"
        elif not sub.is_dir(follow_symlinks=False):
            yield Path(sub.path), "stray file (outside the fan-out directories)"
        else:
            for e in _entries(Path(sub.path)):
                if e.is_symlink():
                    yield Path(e.path), "a symbolic link, not followed"
                elif not e.is_file(follow_symlinks=False):
                    yield Path(e.path), "not a regular file"
                else:
                    yield Path(e.path), None


def _entries(directory: Path) -> list[os.DirEntry]:
    with os.scandir(directory) as it:
        return sorted(it, key=lambda e: e.name)


def objects_in(root: Path) -> Iterator[tuple[bytes | None, Path, str | None]]:
    """Every file under ``root/objects``: (digest, path, None), or (None, path, what is wrong) for what is not an
    object (a name that is no digest, a link, a directory)."""
    for path, problem in fanout(root / OBJECTS):
        d = None if problem else parse_hex(path.parent.name + path.name)
        if d is None or len(path.parent.name) != 2:
            yield None, path, problem or "stray file among the objects (not an object name)"
        else:
            yield d, path, None


def packs_in(root: Path) -> Iterator[tuple[bytes | None, Path, str | None]]:
    """Every file under ``root/packs``: (pack digest, path, None) for a pack or an index (``path.suffix``
    tells which), or (None, path, what is wrong)."""
    for path, problem in fanout(root / PACKS):
        d = None if problem else parse_hex(path.name.removesuffix(".idx"))
        if d is None or not path.name.startswith(path.parent.name) or len(path.parent.name) != 2:
            yield None, path, problem or "stray file among the packs"
        else:
            yield d, path, None


def is_index(path: Path) -> bool:
    return path.suffix == ".idx"


def packsets_in(root: Path) -> list[bytes]:
    """The manifests that have a pack set (a link in place of packsets/ is not followed: it names none)."""
    top = root / PACKSETS
    if real_directory(top):
        return []
    try:
        names = os.listdir(top)
    except FileNotFoundError:
        return []
    return [d for n in sorted(names) if (d := parse_hex(n)) is not None]


# What a killed writer of a published directory leaves: files whose names start with a dot.
LEFTOVERS = (f"{OBJECTS}/*/.*", f"{PACKS}/*/.*", f"{PACKSETS}/.*")


def real_directory(path: Path) -> str | None:
    """What is wrong with ``path`` where a directory of the repository belongs: None if it is a directory
    or absent."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            return None
        return "a symbolic link where a directory belongs, not followed" if path.is_symlink() else "not a directory"
    except FileNotFoundError:
        return None


def kind(name: str) -> str:
    """What the file ``name`` is, as messages say it: pack, pack index, pack set, object."""
    if name.startswith(PACKS + "/"):
        return "pack index" if name.endswith(".idx") else "pack"
    return {PACKSETS: "pack set", OBJECTS: "object"}.get(name.partition("/")[0], "file")


def move_old_indexes(cache: Path) -> None:
    """Move the indexes an earlier vml kept in a remote's cache under ``indexes/`` beside their packs, under
    the origin's names, so that entries opened before still open offline (each index is checked against the
    catalog again when loaded)."""
    old = cache / "indexes"
    if real_directory(old) or not old.exists():
        return
    for entry in os.scandir(old):
        pack = parse_hex(entry.name.removesuffix(".idx"))
        if pack is not None and entry.name.endswith(".idx") and entry.is_file(follow_symlinks=False):
            try:
                index_path(cache, pack).parent.mkdir(exist_ok=True)
                os.rename(entry.path, index_path(cache, pack))
            except OSError:
                pass  # fetched again when needed
    shutil.rmtree(old, ignore_errors=True)
