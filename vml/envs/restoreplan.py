"""What a restore writes, decided and checked whole before the first write.

A backup may come from anyone (a bundle, a remote), so every record is
planned against the area's file system as read, and as the records before
it in the same restore change it; only a plan that passed every check is
carried out (restore.py):

- Only paths under the tops are written: the backup's home, and the --add
  paths the user named again at restore. Directories the area lacks above
  a top are made (as mkdir -p does, owned by root); one that is there and
  is not a directory refuses the restore.
- Each record's parents, from its top down, must be directories once the
  records before it are written. A symlink, a file or nothing on the way
  refuses the whole restore: a capture never makes such a backup, and a
  symlink on the way would lead a write out of the home. A directory of the
  backup where the area keeps something else (a stow-style symlink, a
  file) is not written, nor anything under it: those paths are skipped.
- A file newer in the area than in the backup stays, and the backup's copy
  is written beside it (FILE.vml-restored), unless forced.
- What gives a file power is not taken from a backup: setuid and setgid
  bits of files are dropped, and so are extended attributes other than
  user.* and POSIX ACLs (security.capability, SELinux labels, trusted.*).
  Devices and sockets are not made; a hard link only to a file this
  restore wrote.
"""

from dataclasses import dataclass, field

from ..entries.envtree import Record
from ..errors import UnsafeBackup
from . import guestfs, loginenv
from .debugfs import Unsafe, check_names, quote

CONFLICT_SUFFIX = ".vml-restored"
ENV_FILE = ".vml-environment"
KEPT_XATTRS = ("user.", "system.posix_acl_access", "system.posix_acl_default")
_WHAT = {
    "f": "a file",
    "h": "a hard link",
    "l": "a symbolic link",
    "p": "a FIFO",
    "c": "a device",
    "b": "a device",
    "s": "a socket",
}


@dataclass
class Report:
    files: int = 0
    bytes: int = 0
    conflicts: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    not_added: list[str] = field(default_factory=list)  # --add paths of the backup the user did not name
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    disk: str = ""


@dataclass
class Step:
    """One record, as it is written."""

    record: Record
    path: str  # its own path, or the copy beside a newer file of the area
    uid: int
    gid: int
    replace: bool = False  # remove the file (not directory) at ``path`` first
    create: bool = True  # False for a directory the area has: only its owner, mode and times are set
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Plan:
    mkdirs: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    links: dict[str, int] = field(default_factory=dict)  # a file's path -> its count of names
    env_files: list[Step] = field(default_factory=list)  # records made here; contents in ``contents``
    contents: dict[str, bytes] = field(default_factory=dict)


def _short(path: str) -> str:
    return path if len(path) <= 200 else f"{path[:120]}...{path[-60:]}"


def under(path: str, tops: list[str]) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in tops)


class Planner:
    """The plan of one restore; UnsafeBackup as soon as a record would be written through anything but directories.

    ``existing`` holds the area's items under the tops (walked without
    following symlinks); ``kinds`` the type each path the plan writes will
    have, which wins over what the area has.
    """

    def __init__(self, root_fs, tops: list[str], existing: dict, owners: tuple[dict, dict], force: bool, names: str):
        self.fs, self.tops, self.existing, self.force, self.names = root_fs, tops, existing, force, names
        self.uid_map, self.gid_map = owners
        self.kinds: dict[str, str] = {}
        self.blocked: list[str] = []  # directories of the backup not written: nothing goes under them
        self.fresh: dict[str, Record] = {}  # regular files written at their own path: links may point at them
        self.owner: dict[str, tuple[int, int]] = {}
        self.plan, self.report = Plan(), Report()
        self.dropped = 0

    def kind(self, path: str) -> str | None:
        if path in self.kinds:
            return self.kinds[path]
        if path in self.existing:
            return self.existing[path].type
        if under(path, self.tops):
            return None  # walked: not there
        node = self.fs.lookup(path)
        return None if node is None else self.fs.item(path, node).type

    def above_tops(self, home: str) -> None:
        """Directories to make above each top; a top's ancestor (or the home) that is not a directory refuses."""
        for top in self.tops:
            parts = top.split("/")[1:]
            for i in range(1, len(parts) + (top == home)):
                path = "/" + "/".join(parts[:i])
                kind = self.kind(path)
                if kind is None and path != home:
                    self.plan.mkdirs.append(path)
                    self.kinds[path] = "d"
                elif kind not in (None, "d"):
                    raise UnsafeBackup(
                        f"{self.names}: {path} is {_WHAT.get(kind, 'not a directory')} in the area, not a directory:"
                        f" nothing can be restored under it ({top}); refused, nothing written"
                    )

    def records(self, records: list[Record], home: str, unnamed: list[str]) -> None:
        for r in records:
            if not under(r.path, self.tops):
                if not under(r.path, unnamed):  # an --add path not named again: reported once, as a whole
                    self.report.skipped.append(r.path)
                continue
            if under(r.path, self.blocked):
                self.report.skipped.append(r.path)
                continue
            if r.path == home and r.type != "d":
                raise UnsafeBackup(f"{self.names}: its home {home} is {_WHAT.get(r.type)}: refused, nothing written")
            self._check_parents(r.path)
            try:
                self._record(r)
            except Unsafe:  # a name debugfs cannot take: the record, and anything under it, is skipped
                self.blocked.append(r.path)
                self.report.skipped.append(r.path)
        if self.dropped:
            self.report.notes.append(
                f"{self.dropped} extended attributes not restored (security.*, trusted.*: not taken from a backup)"
            )

    def _check_parents(self, path: str) -> None:
        top = max((t for t in self.tops if under(path, [t])), key=len)
        if path == top:
            return  # above_tops checked what lies above it
        chain, at = [top], top.rstrip("/")
        for name in path[len(at) + 1 :].split("/")[:-1]:
            at = f"{at}/{name}"
            chain.append(at)
        for parent in chain:
            kind = self.kind(parent)
            if kind == "d":
                continue
            if kind is None:
                how = "a directory neither the backup nor the area has"
            elif parent in self.kinds:
                how = f"{_WHAT.get(kind)} in the backup"
            else:
                how = f"{_WHAT.get(kind)} in the area, and no directory in the backup"
            what = f"{_short(path)} lies under {_short(parent)}, {how}"
            raise UnsafeBackup(f"{self.names}: {what}: refused, nothing written")

    def _record(self, r: Record) -> None:
        uid, gid = self.uid_map.get(r.uid, r.uid), self.gid_map.get(r.gid, r.gid)
        kind = self.kind(r.path)
        if r.type == "d":
            if kind not in (None, "d"):  # the area keeps a file or a symlink there: not replaced, nor entered
                self.blocked.append(r.path)
                self.report.skipped.append(r.path)
                return
            check_names(r.path)
            self.plan.steps.append(Step(r, r.path, uid, gid, create=kind is None))
            self.kinds[r.path], self.owner[r.path] = "d", (uid, gid)
            return
        if r.type not in "flhp" or (r.type == "h" and r.target not in self.fresh):
            self.report.skipped.append(r.path)  # devices and sockets are not made; nor a link to a file not written
            return
        check_names(r.path)
        quote(r.target)
        path, replace = r.path, kind is not None
        older = kind is not None and r.path not in self.kinds and self.existing[r.path].mtime_ns > r.mtime_ns
        if kind == "d" or (older and not self.force):
            if r.path in self.tops:
                self.report.skipped.append(r.path)  # a copy beside a top would lie outside it
                return
            path = r.path + CONFLICT_SUFFIX
            check_names(path)
            if self.kind(path) == "d":
                self.report.skipped.append(r.path)
                return
            replace = self.kind(path) is not None
            self.report.conflicts.append(r.path)
        xattrs = {k: v.encode("latin-1") for k, v in (r.xattrs or {}).items() if k.startswith(KEPT_XATTRS)}
        self.dropped += len(r.xattrs or {}) - len(xattrs)
        self.plan.steps.append(Step(r, path, uid, gid, replace=replace, xattrs=xattrs))
        self.kinds[path] = "f" if r.type == "h" else r.type
        if r.type == "h":
            self.plan.links[r.target] = self.plan.links.get(r.target, 1) + 1
        elif r.type == "f":
            self.report.files += 1
            self.report.bytes += r.size
            if path == r.path:
                self.fresh[r.path] = r

    def environment(self, home: str, variables: dict, read) -> None:
        """~/.vml-environment with the variables, and the line in ~/.profile that reads it.

        ``read(record)`` gives the content of a small file of the backup.
        """
        if not variables:
            return
        if self.kind(home) != "d":
            self.report.notes.append(f"the variables are not restored: there is no directory {home}")
            return
        owner = self.owner.get(home) or (lambda it: (it.uid, it.gid))(self.existing[home])
        text, refused = loginenv.script(variables)
        self.report.notes += [f"variable {name} not restored: its stored value is not plain" for name in refused]
        if self._env_file(f"{home}/{ENV_FILE}", text.encode(), owner) is None:
            return
        profile = f"{home}/.profile"
        known = self._small_text(profile, read)
        if known is None:  # a symlink, a directory, a very large file: not rewritten behind the user's back
            self.report.notes.append(f"add this line to {profile} to set the saved variables: {loginenv.PROFILE_LINE}")
            return
        text = known.decode(errors="surrogateescape")
        if loginenv.PROFILE_LINE not in text:
            text += ("\n" if text and not text.endswith("\n") else "") + loginenv.PROFILE_LINE + "\n"
            self._env_file(profile, text.encode(errors="surrogateescape"), owner)

    def _env_file(self, path: str, content: bytes, owner: tuple[int, int]) -> Step | None:
        kind = self.kind(path)
        try:
            if kind == "d":
                raise Unsafe("a directory")
            check_names(path)
        except Unsafe:
            self.report.notes.append(f"the variables are not restored: {_short(path)} cannot be written")
            return None
        step = Step(Record(path, "f", 0o644, *owner, 0), path, *owner, replace=kind is not None)
        self.plan.env_files.append(step)
        self.plan.contents[path] = content
        self.kinds[path] = "f"
        return step

    def _small_text(self, path: str, read) -> bytes | None:
        """The content ``path`` has after the records: the backup's, the area's, or b"" if none."""
        if path in self.fresh:
            r = self.fresh[path]
            return read(r) if r.size < guestfs.MAX_TEXT else None
        if self.kind(path) is None:
            return b""
        it = self.existing.get(path)
        if path in self.kinds or it is None or it.type != "f" or it.size >= guestfs.MAX_TEXT:
            return None
        return self.fs.read_file(it, 0, it.size)
