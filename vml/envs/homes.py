"""Which guest paths a backup may hold as its home or as an --add path: the rules capture and restore share.

A backup may come from anyone, so its home is where a restore writes: never
the root, a system directory or anything under one, and never the top of
many homes (/home): a home lies at least two levels deep (/home/alice,
/data/alice). Homes under /var/home (Fedora's atomic desktops) are homes.
"""

from ..entries.envtree import check_path

SYSTEM = frozenset(
    ("etc", "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "boot", "dev", "proc", "sys", "run", "var", "root")
)
HOMES_UNDER_SYSTEM = ("var", "home")


def normal(path: str) -> str:
    """``path`` without trailing slashes; ValueError unless it is then absolute and normal."""
    trimmed = path.rstrip("/") or "/"
    if not trimmed.startswith("/"):
        raise ValueError("not an absolute path")
    try:
        return check_path(trimmed)
    except ValueError:
        raise ValueError("not a normal absolute path (no //, . or ..)") from None


def home_problem(path: str) -> str | None:
    """Why ``path`` (absolute and normal) cannot be a home a restore writes into, or None if it can."""
    parts = path.strip("/").split("/")
    system = path == "/" or parts[0] in SYSTEM
    if system and not (len(parts) > 2 and tuple(parts[:2]) == HOMES_UNDER_SYSTEM):
        return "a system directory or under one"
    if len(parts) < 2:
        return "not a home (a home lies two levels deep or more, as /home/alice)"
    return None


def checked_add(path: str) -> str:
    """``path`` normalised as an --add path (what capture stores and restore names); ValueError saying why not."""
    p = normal(path)
    if problem := add_problem(p):
        raise ValueError(f"{problem}, not a path to add")
    return p


def add_problem(path: str) -> str | None:
    """Why ``path`` (absolute and normal) cannot be an --add path, or None if it can."""
    return "the whole file system" if path == "/" else None
