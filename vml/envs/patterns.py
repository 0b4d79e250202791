"""Include and exclude patterns, by restic's rules, matched against absolute guest paths.

A pattern is split at "/" into parts; each part is a shell wildcard for one
path component (``*``, ``?``, ``[abc]``, ``[^abc]``), and ``**`` stands for
any number of components. A pattern that starts with "/" is anchored at the
root; any other pattern may match a run of components anywhere in the path,
so both ``Downloads`` and ``*/Downloads`` exclude /home/u/Downloads. A
pattern matches a path when it matches the path or one of its parents: a
matched directory covers everything under it. In an exclude list a pattern
starting with "!" re-includes what it matches; the last matching pattern
decides. Exclude files hold one pattern per line; blank lines and lines
starting with "#" are ignored, and surrounding whitespace is removed.
"""

import fnmatch
from functools import lru_cache
from pathlib import Path

from ..errors import UsageError


def _parts(pattern: str) -> tuple[str, ...]:
    pattern = pattern.rstrip("/") or "/"
    head = ("/",) if pattern.startswith("/") else ()
    return head + tuple(p for p in pattern.split("/") if p)


def _split(path: str) -> tuple[str, ...]:
    return ("/", *(p for p in path.split("/") if p))


@lru_cache(maxsize=4096)
def _component(pattern: str, name: str) -> bool:
    if not any(c in pattern for c in "*?[\\"):
        return pattern == name
    return fnmatch.fnmatchcase(name, pattern.replace("[^", "[!"))


def _match(parts: tuple[str, ...], comps: tuple[str, ...]) -> bool:
    if "**" in parts:
        i = parts.index("**")
        # '**' expands to zero or more '*' components, as restic expands it.
        return any(_match(parts[:i] + ("*",) * n + parts[i + 1 :], comps) for n in range(len(comps) + 1))
    if not parts or len(parts) > len(comps):
        return False
    # An anchored pattern matches from the root; any other from any component (never the root marker).
    offsets = [0] if parts[0] == "/" else range(len(comps) - len(parts), 0, -1)
    return any(all(_component(p, comps[off + i]) for i, p in enumerate(parts) if p != "/") for off in offsets)


def matches(pattern: str, path: str) -> bool:
    """Whether ``pattern`` matches the absolute ``path`` (or a directory above it)."""
    return _match(_parts(pattern), _split(path))


def check(pattern: str) -> str:
    if not pattern.strip("!").strip():
        raise UsageError("empty pattern")
    if "\n" in pattern or "\0" in pattern:
        raise UsageError(f"invalid pattern {pattern!r}")
    return pattern


def read_file(path: str | Path) -> list[str]:
    """The patterns of an exclude file; one line naming the file if it cannot be read."""
    try:
        text = Path(path).read_text(errors="surrogateescape")
    except OSError as e:
        raise UsageError(f"{path}: cannot read the pattern file ({e.strerror})") from None
    lines = (line.strip() for line in text.splitlines())
    return [check(line) for line in lines if line and not line.startswith("#")]


class Filter:
    """Decides which guest paths a capture takes."""

    def __init__(self, includes=(), excludes=()):
        self.includes = [check(p) for p in includes]
        self.excludes = [check(p) for p in excludes]

    def excluded(self, path: str) -> bool:
        decision = False
        for p in self.excludes:
            negated = p.startswith("!")
            if matches(p[1:] if negated else p, path):
                decision = not negated
        return decision

    def included(self, path: str) -> bool:
        return not self.includes or any(matches(p, path) for p in self.includes)

    def may_hold_included(self, directory: str) -> bool:
        """Whether a path under ``directory`` could be included (so the walk goes in)."""
        if not self.includes or self.included(directory):
            return True
        comps = _split(directory)
        for p in self.includes:
            parts = _parts(p)
            if parts[0] != "/" or "**" in parts:
                return True  # may match deeper anywhere
            prefix = parts[: len(comps)]
            if all(_component(a, b) for a, b in zip(prefix[1:], comps[1:], strict=False)):
                return True
        return False

    def takes(self, path: str, is_dir: bool) -> bool:
        if self.excluded(path):
            return False
        return self.may_hold_included(path) if is_dir else self.included(path)
