"""`vml env restore`: push an environment entry's files and variables into a working area's disk.

The area's disk is written through the running mount (never behind it), by
e2fsprogs' debugfs: one process runs one command file that creates
directories, writes files, sets owners, modes and times, links and extended
attributes. No root, no kernel mount, no appliance. Owners are mapped by
name where both guests know the name and kept by number otherwise. A file
newer in the area than in the backup is written beside it as
``FILE.vml-restored``, unless forced. The captured variables go to
``~/.vml-environment``, which one marked line in ``~/.profile`` sources.
"""

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..entries import envtree
from ..entries.envtree import env_records
from ..errors import BadSource, CorruptManifest, NotFound, StorageError, UsageError
from ..repo.repository import Entry, Repository
from ..vms import boot
from . import guestfs, loginenv
from .capture import area_disk_paths

CONFLICT_SUFFIX = ".vml-restored"
DEBUGFS = "debugfs"
ENV_FILE = ".vml-environment"


@dataclass
class Report:
    files: int = 0
    bytes: int = 0
    conflicts: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    disk: str = ""


def checked_meta(entry: Entry) -> dict:
    """The parts of an environment entry's description a restore acts on, checked as hostile input."""
    meta = entry.manifest.extra[envtree.KEY]
    try:
        home = envtree.check_path(meta["home"])
        adds = [envtree.check_path(p) for p in meta.get("patterns", {}).get("add", [])]
        variables = meta.get("environment", {}).get("variables", {})
        if not isinstance(variables, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("raw"), str) and "\n" not in v["raw"] for v in variables.values()
        ):
            raise ValueError("bad variables")
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CorruptManifest(f"entry {entry.name!r}: invalid environment description ({e})") from None
    return {
        "home": home,
        "patterns": {"add": adds},
        "environment": {"variables": variables},
        "os": meta.get("os") if isinstance(meta.get("os"), dict) else {},
        "owners": meta.get("owners") if isinstance(meta.get("owners"), dict) else {},
    }


def check_stopped(home: Path, area: str) -> None:
    rec = boot.load_record(home, area)
    if rec is not None and boot.vm_state(home, rec) in ("running", "paused"):
        raise UsageError(f"working area {area!r}: its VM is running; stop it first (`vml stop {area}`)")


def restore_environment(
    home: Path, repo: Repository, entry: Entry, area: str, force: bool = False, warn=lambda msg: None
) -> Report:
    """Write environment entry ``entry`` into the root file system of area ``area``'s disks."""
    records, data = env_records(repo, entry)
    meta = checked_meta(entry)
    disks = area_disk_paths(home, area)
    with boot.vm_lock(home, area):  # no VM of the area starts while its disk is written
        check_stopped(home, area)
        return _restore(repo, entry, area, force, warn, records, data, meta, disks)


def _restore(repo, entry, area, force, warn, records, data, meta, disks) -> Report:
    where = f"area {area!r}"
    handles = []
    try:
        found = []
        for name, path in disks.items():
            handles.append(open(path, "rb"))  # noqa: SIM115 - closed below
            found += guestfs.filesystems(name, handles[-1], path.stat().st_size, f"{where}, disk {name}")
        root_fs = guestfs.root_of(found, where)
        report = Report(disk=str(disks[root_fs.disk]))
        uid_map, gid_map = _owner_maps(meta, root_fs)
        tops = [meta["home"], *meta["patterns"]["add"]]
        existing = {it.path: it for top in tops for it in root_fs.walk(top, lambda p, d: True)}
        if root_fs.needs_recovery():
            raise BadSource(
                f"{where}: the file system on {disks[root_fs.disk].name} has a journal to replay (its VM did not "
                "shut down cleanly): boot and shut the VM down once, then restore; a restore now would be undone"
                " by the journal recovery"
            )
        _check_clean(disks[root_fs.disk], root_fs.offset, where)
        _check_room(root_fs, records, disks[root_fs.disk].name, where)
        _warn_os(meta, root_fs, entry.name, area, warn, report)
        with tempfile.TemporaryDirectory(prefix="vml-env-") as staging:
            script = _Script(Path(staging))
            _parents(script, root_fs, tops)
            cs = entry.manifest.chunk_size
            _plan(script, records, data, existing, uid_map, gid_map, force, report, cs, tops)
            _environment_files(script, meta, root_fs, existing, report)
            _run(script, disks[root_fs.disk], root_fs.offset, where)
    finally:
        for h in handles:
            h.close()
    return report


def _warn_os(meta: dict, root_fs, entry: str, area: str, warn, report: Report) -> None:
    saved = meta.get("os", {})
    now = guestfs.os_release(root_fs.read_text("/etc/os-release"))
    a = f"{saved.get('id', '')} {saved.get('version_id', '')}".strip() or "unknown"
    b = f"{now.get('ID', '')} {now.get('VERSION_ID', '')}".strip() or "unknown"
    if a != b:
        msg = f"warning: entry {entry!r} was saved on {a}; area {area!r} runs {b}"
        report.warnings.append(msg)
        warn(msg)


def _owner_maps(meta: dict, root_fs) -> tuple[dict[int, int], dict[int, int]]:
    owners = meta.get("owners", {})
    users = guestfs.accounts(root_fs.read_text("/etc/passwd"))
    groups = guestfs.accounts(root_fs.read_text("/etc/group"))

    def mapping(saved: dict, known: dict) -> dict[int, int]:
        out = {}
        for number, name in (saved or {}).items():
            if isinstance(name, str) and name in known and str(number).isdigit():
                out[int(number)] = known[name][0]
        return out

    return mapping(owners.get("users"), users), mapping(owners.get("groups"), groups)


class Unsafe(ValueError):
    """A name debugfs could not take safely (a line break, a NUL, too long): that record is skipped."""


MAX_LINE = 8000  # debugfs reads its command file in lines of at most 8191 bytes


class _Script:
    """A debugfs command file and the staged contents it writes."""

    def __init__(self, staging: Path):
        self.staging, self.lines, self.count = staging, [], 0
        self.written: dict[str, bytes] = {}  # guest path -> content, for regular files written whole
        self.paths: set[str] = set()  # every guest path the script creates
        self.owners: dict[str, tuple[int, int]] = {}  # guest path -> the owner the script gives it

    def write(self, path: str, content: bytes) -> None:
        parent, name = os.path.split(path)
        self.add("cd", quote(parent))
        self.add("write", quote(self.stage(content)), quote(name))
        self.paths.add(path)
        if len(content) < 1 << 20:
            self.written[path] = content

    def add(self, *words: str) -> None:
        line = " ".join(words)
        if len(line.encode(errors="surrogateescape")) > MAX_LINE:
            raise Unsafe("command line too long")
        self.lines.append(line)

    def stage(self, data: bytes) -> str:
        self.count += 1
        p = self.staging / f"{self.count}"
        p.write_bytes(data)
        return str(p)

    def attrs(self, path: str, mode: int, uid: int, gid: int, mtime_ns: int, atime_ns: int) -> None:
        q = quote(path)
        self.owners[path] = (uid, gid)
        self.add("sif", q, "uid", str(uid))
        self.add("sif", q, "gid", str(gid))
        self.add("sif", q, "mode", f"0{mode:o}")
        for field_name, ns in (("mtime", mtime_ns), ("atime", atime_ns)):
            if ns:
                sec, nsec = divmod(ns, 1_000_000_000)
                low = sec & 0xFFFFFFFF
                epoch = ((sec - (low - (1 << 32) if low >= 1 << 31 else low)) >> 32) & 3
                self.add("sif", q, field_name, f"@{sec}")
                self.add("sif", q, f"{field_name}_extra", str((nsec << 2) | epoch))


def quote(s: str) -> str:
    """One debugfs argument: in double quotes, a quote doubled (the ss parser's rule).

    A line break or NUL would end the command and start another (debugfs runs
    a line starting with "!" in a shell), and a name over 3900 bytes could
    push a line past the 8191 bytes debugfs reads at once: both are Unsafe.
    """
    try:
        size = len(s.encode(errors="surrogateescape"))
    except UnicodeEncodeError:
        raise Unsafe(f"unencodable name {s[:60]!r}") from None
    if any(c in s for c in "\n\r\0") or size > 3900:
        raise Unsafe(f"unsafe name {s[:60]!r}")
    return '"' + s.replace('"', '""') + '"'


_S_IF = {"f": 0o100000, "d": 0o040000, "l": 0o120000, "p": 0o010000}
_DROPPED = 0o6000  # setuid and setgid: an entry may come from anyone (a directory keeps setgid)


def _parents(script: _Script, root_fs, tops: list[str]) -> None:
    """Directories above each captured top that the area's guest lacks (as mkdir -p, owned by root)."""
    made: set[str] = set()
    for top in tops:
        parts = [p for p in top.split("/") if p][:-1]
        for i in range(1, len(parts) + 1):
            path = "/" + "/".join(parts[:i])
            if path not in made and root_fs.lookup(path) is None:
                script.add("mkdir", quote(path))
                made.add(path)


def _under(path: str, tops: list[str]) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in tops)


def _plan(script, records, data, existing, uid_map, gid_map, force, report, cs, tops) -> None:
    """The commands for every record under ``tops``; a record that cannot be written safely is skipped and listed."""
    links: dict[str, int] = {}
    fresh: set[str] = set()  # files this restore creates with a new inode: a hard link may point at them
    blocked: list[str] = []  # directories not written (something else is there): nothing goes under them
    for r in records:
        if not _under(r.path, tops) or _under(r.path, blocked):
            report.skipped.append(r.path)
            continue
        mark = len(script.lines)
        try:
            _plan_one(script, r, data, existing, uid_map, gid_map, force, report, cs, links, fresh, blocked)
        except Unsafe:
            del script.lines[mark:]
            report.skipped.append(r.path)
    for target, count in links.items():
        script.add("sif", quote(target), "links_count", str(count))


def _plan_one(script, r, data, existing, uid_map, gid_map, force, report, cs, links, fresh, blocked) -> None:
    uid, gid = uid_map.get(r.uid, r.uid), gid_map.get(r.gid, r.gid)
    old = existing.get(r.path)
    path = r.path
    if r.type == "d":
        if old is not None and old.type != "d":  # a file or a symlink where the directory was
            blocked.append(r.path)
            report.skipped.append(r.path)
            return
        if old is None:
            script.add("mkdir", quote(path))
            script.paths.add(path)
        script.attrs(path, _S_IF["d"] | (r.mode & 0o3777), uid, gid, r.mtime_ns, r.atime_ns)
        return
    if r.type not in "flhp" or (r.type == "h" and r.target not in fresh):
        report.skipped.append(r.path)  # devices and sockets are not restored; nor a link to a file not written
        return
    for name in (path, r.target, path + CONFLICT_SUFFIX):
        quote(name)  # Unsafe before anything is planned for this record
    if old is not None:
        if old.type == "d" or (old.mtime_ns > r.mtime_ns and not force):
            path = r.path + CONFLICT_SUFFIX
            report.conflicts.append(r.path)
            if path in existing:
                script.add("rm", quote(path))
        else:
            script.add("rm", quote(path))
    if r.type == "f":
        script.write(path, data.read(r.slot * cs, r.size) if r.size else b"")
        if path == r.path:
            fresh.add(r.path)
        report.files += 1
        report.bytes += r.size
    elif r.type == "l":
        script.add("symlink", quote(path), quote(r.target))
        script.paths.add(path)
    elif r.type == "h":
        script.add("ln", quote(r.target), quote(path))
        script.paths.add(path)
        links[r.target] = links.get(r.target, 1) + 1
        return
    else:  # a FIFO
        parent, name = os.path.split(path)
        script.add("cd", quote(parent))
        script.add("mknod", quote(name), "p")
        script.paths.add(path)
    script.attrs(path, _S_IF[r.type] | (r.mode & ~_DROPPED & 0o7777), uid, gid, r.mtime_ns, r.atime_ns)
    for key, value in (r.xattrs or {}).items():
        # -r: the value as stored on disk (ACLs included), not converted again.
        script.add("ea_set", "-r", "-f", quote(script.stage(value.encode("latin-1"))), quote(path), quote(key))


def _environment_files(script: _Script, meta: dict, root_fs, existing, report) -> None:
    """~/.vml-environment with the variables, and the line in ~/.profile that reads it."""
    home = meta["home"]
    variables = meta["environment"]["variables"]
    node = root_fs.lookup(home)
    if (node is None and home not in script.paths) or not variables:
        return
    uid, gid = script.owners.get(home) or (lambda it: (it.uid, it.gid))(root_fs.item(home, node))
    envfile, profile = f"{home}/{ENV_FILE}", f"{home}/.profile"
    if envfile in existing or envfile in script.paths:
        script.add("rm", quote(envfile))
    text, refused = loginenv.script(variables)
    report.notes += [f"variable {name} not restored: its stored value is not a plain value" for name in refused]
    script.write(envfile, text.encode())
    script.attrs(envfile, 0o100644, uid, gid, 0, 0)
    # ~/.profile as restored (the backup's, if it has one), plus the line.
    if profile in script.paths:
        known = script.written.get(profile)
    elif profile in existing:
        it = existing[profile]
        known = root_fs.read_file(it, 0, it.size) if it.type == "f" and it.size < guestfs.MAX_TEXT else None
    else:
        known = b""
    if known is None:  # a symlink, a hard link or a very large file: not rewritten behind the user's back
        report.notes.append(f"add this line to {profile} to set the saved variables: {loginenv.PROFILE_LINE}")
        return
    text = known.decode(errors="surrogateescape")
    if loginenv.PROFILE_LINE in text:
        return
    text += ("\n" if text and not text.endswith("\n") else "") + loginenv.PROFILE_LINE + "\n"
    if profile in script.paths or profile in existing:
        script.add("rm", quote(profile))
    script.write(profile, text.encode(errors="surrogateescape"))
    script.attrs(profile, 0o100644, uid, gid, 0, 0)


def _check_room(root_fs, records: list[envtree.Record], disk: str, where: str) -> None:
    """Refuse before writing when the file system cannot hold the backup (a restore cut short by a full disk)."""
    free, inodes = root_fs.free_space()
    block = root_fs.fs.block_size
    need = sum(-(-r.size // block) * block for r in records if r.type == "f") + len(records) * block // 8
    if need > free * 0.95 or len(records) > inodes:
        raise BadSource(
            f"{where}: the file system on {disk} has {free >> 20} MiB and {inodes} inodes free; the backup needs "
            f"about {need >> 20} MiB and {len(records)} inodes: make room (or a larger disk) first"
        )


def _check_clean(disk: Path, offset: int, where: str) -> None:
    """Refuse a file system with errors, or with a journal still to replay (the next boot would undo our writes)."""
    exe = shutil.which("e2fsck") or "/usr/sbin/e2fsck"
    if not Path(exe).exists():
        raise NotFound("e2fsck (e2fsprogs) is not installed: `apt-get install e2fsprogs`")
    target = f"{disk}?offset={offset}" if offset else str(disk)
    proc = subprocess.run([exe, "-fn", target], capture_output=True, text=True, errors="replace", check=False)
    if proc.returncode:
        said = [line for line in proc.stdout.splitlines() if line.strip() and not line.startswith("Pass ")]
        raise BadSource(
            f"{where}: the file system on {disk.name} needs repair or journal recovery before a restore "
            f"(e2fsck -fn: {said[0] if said else proc.returncode}); boot and shut the VM down cleanly, "
            "or repair it with e2fsck"
        )


def _run(script: _Script, disk: Path, offset: int, where: str) -> None:
    if shutil.which(DEBUGFS) is None and not Path("/usr/sbin/debugfs").exists():
        raise NotFound("debugfs (e2fsprogs) is not installed: `apt-get install e2fsprogs`")
    exe = shutil.which(DEBUGFS) or "/usr/sbin/debugfs"
    cmdfile = script.staging / "commands"
    cmdfile.write_bytes(("\n".join(script.lines) + "\n").encode(errors="surrogateescape"))
    target = f"{disk}?offset={offset}" if offset else str(disk)
    proc = subprocess.run(
        [exe, "-w", "-f", str(cmdfile), target], capture_output=True, text=True, errors="replace", check=False
    )
    errors = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("debugfs ")]
    if proc.returncode or errors:
        detail = errors[0] if errors else f"exit status {proc.returncode}"
        raise StorageError(f"{where}: writing {disk} failed: {detail}")
