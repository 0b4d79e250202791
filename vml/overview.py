"""What a home holds, gathered once for the command line and the web pages.

The entry trees of every repository and remote, the state of each remote's
cache, and the disk space repositories, areas and caches take. `vml
consult`, `vml cache status` and `vml web` show these; none of them gathers
anything itself.
"""

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import layout
from .config import Config
from .errors import VmlError
from .remotes import remote
from .repo.repository import Entry, Repository
from .vms import areas


@dataclass(frozen=True)
class TreeRow:
    """One line of an entry tree: the entry (or a damaged name) and where it sits."""

    name: str
    lasts: tuple[bool, ...]  # for each level down to this one: was that node its parent's last child
    entry: Entry | None = None  # None when its manifest is damaged
    damage: str = ""
    note: str = ""  # for a root whose parent is elsewhere: "[on REMOTE:PARENT]" or why it is missing

    @property
    def depth(self) -> int:
        return len(self.lasts) - 1

    @property
    def size(self) -> int:
        """The bytes of the entry's disks and files as a VM sees them (not what they take stored)."""
        m = self.entry.manifest if self.entry else None
        return sum(s.size for s in m.disks + m.files) if m else 0


def tree(repo: Repository, damaged: dict[str, tuple[bytes, str]] | None = None) -> list[TreeRow]:
    """The entry tree of ``repo`` in the order `vml log` prints it, damaged entries as roots after the rest."""
    damaged = {} if damaged is None else damaged
    children = repo.children(damaged)
    rows: list[TreeRow] = []

    def walk(node: Entry | str, lasts: tuple[bool, ...]) -> None:
        if isinstance(node, str):
            name = node
            rows.append(TreeRow(name, lasts, damage=damaged[name][1]))
        else:
            name, note, parent = node.name, "", node.manifest.parent
            if parent and len(lasts) == 1:
                remote = repo.on_remote(parent.manifest)
                note = f"[on {remote}:{parent.name}]" if remote else f"[parent {parent.name} not in this repository]"
            rows.append(TreeRow(name, lasts, node, note=note))
        kids = children.get(name, [])
        for i, kid in enumerate(kids):
            walk(kid, (*lasts, i == len(kids) - 1))

    roots: list[Entry | str] = [*children.get(None, []), *sorted(damaged)]
    for i, root in enumerate(roots):
        walk(root, (i == len(roots) - 1,))
    return rows


@dataclass
class Logbook:
    """A repository or remote as the Available page lists it."""

    name: str
    remote: bool
    location: str  # a local repository's path, a remote's URL
    default: bool = False
    cache_dir: Path | None = None
    rows: list[TreeRow] = field(default_factory=list)
    error: str = ""  # why it cannot be read now


def logbooks(cfg: Config) -> list[Logbook]:
    """Every local repository, then every remote, each with its entry tree (or why it cannot be read)."""
    out = []
    for name, path in sorted(cfg.repositories.items()):
        out.append(Logbook(name, False, str(path), default=name == cfg.default))
    for name, rc in sorted(cfg.remotes.items()):
        out.append(Logbook(name, True, rc.url, cache_dir=layout.cache_dir(cfg.home, name)))
    for book in out:
        try:
            book.rows = tree(cfg.open(book.name))
        except VmlError as e:
            book.error = str(e)
    return out


def cache_status(cfg: Config, names: list[str] | None = None) -> list[dict]:
    """Per remote: objects, packs and bytes cached, quota, pinned entries, and the cache's counters."""
    out = []
    for n in names if names is not None else sorted(cfg.remotes):
        store = remote.open_remote(cfg.home, cfg.remotes[n])
        objects, packs, size = store.cache.usage()
        out.append(
            {"remote": n, "objects": objects, "packs": packs, "size": size, "quota": store.cache.quota}
            | {"pinned": sorted(store.pins()), "path": str(store.cache.path)}
            | store.cache.stats()
        )
    return out


def tree_size(path: Path) -> int:
    """Bytes a directory tree takes on disk (allocated blocks, so sparse files count what they hold)."""
    total = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if e.is_dir(follow_symlinks=False):
                        stack.append(Path(e.path))
        except OSError:
            continue
    return total


def disk_usage(cfg: Config) -> list[dict]:
    """What each repository, working area and cache takes on disk, and the room left where it lies.

    Each item: ``what`` (repository, area or cache), ``name``, ``path``,
    ``bytes``, ``free`` (bytes free on its file system, None if unknown).
    """
    items = [("repository", n, Path(p)) for n, p in sorted(cfg.repositories.items())]
    items += [("area", rec.name, areas.areas_dir(cfg.home) / rec.name) for rec in areas.list_areas(cfg.home)]
    items += [("cache", n, layout.cache_dir(cfg.home, n)) for n in sorted(cfg.remotes)]
    out = []
    for what, name, path in items:
        try:
            free = shutil.disk_usage(path).free
        except OSError:
            free = None
        out.append({"what": what, "name": name, "path": str(path), "bytes": tree_size(path), "free": free})
    return out
