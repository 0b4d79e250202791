"""Where VML keeps things: the one place each path layout is written.

A repository, a published directory and a remote's cache keep objects the
same way, under ``objects/ab/cdef...`` (the hex digest split after two
digits, so no directory holds more than 1/256 of them). A VML home holds::

    config.toml           registered repositories and remotes (vml.config)
    areas/NAME/           working areas (vml.vms.areas)
    cache/NAME/           a remote's cached objects, catalog and counters (vml.remotes)
    incoming/REPO/NAME/   entries being copied into a repository in the mount (vml.entries.copies)
    run/                  the running mount's state and lock (vml.control)
    log/vmlfs.log         the mount's log
"""

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .repo.objects import parse_hex

OBJECTS = "objects"


def object_name(digest: bytes) -> str:
    """``ab/cdef...``: where an object lies below ``objects/``, and its URL below a published root."""
    h = digest.hex()
    return f"{h[:2]}/{h[2:]}"


def object_path(root: Path, digest: bytes) -> Path:
    return root / OBJECTS / object_name(digest)


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


def _not_a_directory(path: Path) -> str:
    return "a symbolic link where a directory belongs, not followed" if path.is_symlink() else "not a directory"


def objects_in(root: Path) -> Iterator[tuple[bytes | None, Path, str | None]]:
    """Every file under ``root/objects``: (digest, path, None), or (None, path, what is wrong) for what is not an
    object (a name that is no digest, a link, a directory)."""
    for path, problem in fanout(root / OBJECTS):
        d = None if problem else parse_hex(path.parent.name + path.name)
        if d is None or len(path.parent.name) != 2:
            yield None, path, problem or "stray file among the objects (not an object name)"
        else:
            yield d, path, None


def real_directory(path: Path) -> str | None:
    """What is wrong with ``path`` where a directory of the repository belongs: None if it is a directory
    or absent."""
    try:
        return None if stat.S_ISDIR(os.lstat(path).st_mode) else _not_a_directory(path)
    except FileNotFoundError:
        return None


def config_path(home: Path) -> Path:
    return home / "config.toml"


def areas_dir(home: Path) -> Path:
    return home / "areas"


MEMORY_FILE = "vml-memory.state"  # a running VM's memory, saved with its disks (see vml.vms.boot)


def memory_state(home: Path, area: str) -> Path:
    """Where a running VM's memory state is written before it is saved with the area's disks."""
    return areas_dir(home) / area / MEMORY_FILE


def cache_dir(home: Path, remote: str) -> Path:
    return home / "cache" / remote


def incoming_dir(home: Path) -> Path:
    return home / "incoming"


def run_dir(home: Path) -> Path:
    return home / "run"


def log_path(home: Path) -> Path:
    return home / "log" / "vmlfs.log"
