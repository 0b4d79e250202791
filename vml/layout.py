"""Where VML keeps things: the one place each path layout is written.

The names of a repository's own files are in vml.repo.paths. A VML home holds::

    config.toml           registered repositories and remotes (vml.config)
    areas/NAME/           working areas (vml.vms.areas)
    cache/NAME/           a remote's cached objects, catalog and counters (vml.remotes)
    incoming/REPO/NAME/   entries being copied into a repository in the mount (vml.entries.copies)
    run/                  the running mount's state and lock (vml.control)
    log/vmlfs.log         the mount's log
"""

from pathlib import Path


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
