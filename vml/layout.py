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


def objects_in(root: Path) -> Iterator[tuple[bytes | None, Path]]:
    """Every file under ``root/objects``: (digest, path), digest None for names that are not objects."""
    for sub in sorted((root / OBJECTS).iterdir()):
        if not sub.is_dir():
            yield None, sub
            continue
        for p in sorted(sub.iterdir()):
            d = parse_hex(sub.name + p.name)
            yield (d if d is not None and len(sub.name) == 2 else None), p


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
