"""Validation of user-chosen names and sizes.

Entry and repository names become file names (refs, mount directories), so
they are restricted to a portable set: no path separators, no "..", no
leading dot or dash, and no ":" (reserved for REPO:ENTRY).
"""

import re

from .errors import UsageError

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}")
_FILE_PART = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9_.+ @=,-]{0,199}")
RESERVED_REPOSITORY_NAMES = frozenset({"areas"})


def check_name(name: str, what: str = "entry") -> str:
    """Return ``name`` if it is a valid entry or repository name, else raise."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise UsageError(
            f"invalid {what} name {name!r}: use letters, digits and . _ + - "
            "(at most 100, not starting with . or -, no '/', '..' or ':')"
        )
    return name


def check_repository_name(name: str, what: str = "repository") -> str:
    """A repository's or remote's name: an entry name, and none the mount keeps for itself."""
    check_name(name, what)
    if name in RESERVED_REPOSITORY_NAMES:
        raise UsageError(f"invalid {what} name {name!r}: it is reserved")
    return name


def check_relative_path(path: str, what: str = "file") -> str:
    """Return ``path`` if it is a safe relative POSIX path inside an entry."""
    parts = path.split("/")
    if not path or any(not _FILE_PART.fullmatch(p) or ".." in p for p in parts):
        raise UsageError(f"invalid {what} name {path!r} in entry")
    return path


_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse "262144", "256K", "256KiB", "1M" or "2G" into bytes (powers of 1024)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise UsageError(f"invalid size {text!r}: expected a number with an optional K, M, G or T")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def format_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
