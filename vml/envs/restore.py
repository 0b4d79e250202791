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
from ..errors import BadSource, NotFound, StorageError, UsageError
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
    warnings: list[str] = field(default_factory=list)
    disk: str = ""


def check_stopped(home: Path, area: str) -> None:
    rec = boot.load_record(home, area)
    if rec is not None and boot.vm_state(home, rec) in ("running", "paused"):
        raise UsageError(f"working area {area!r}: its VM is running; stop it first (`vml stop {area}`)")


def restore_environment(
    home: Path, repo: Repository, entry: Entry, area: str, force: bool = False, warn=lambda msg: None
) -> Report:
    """Write environment entry ``entry`` into the root file system of area ``area``'s disks."""
    records, data = env_records(repo, entry)
    meta = entry.manifest.extra[envtree.KEY]
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
        tops = [meta.get("home", ""), *meta.get("patterns", {}).get("add", [])]
        existing = {it.path: it for top in tops if top for it in root_fs.walk(top, lambda p, d: True)}
        if root_fs.needs_recovery():
            raise BadSource(
                f"{where}: the file system on {disks[root_fs.disk].name} has a journal to replay (its VM did not "
                "shut down cleanly): boot and shut the VM down once, then restore; a restore now would be undone"
                " by the journal recovery"
            )
        _check_clean(disks[root_fs.disk], root_fs.offset, where)
        _warn_os(meta, root_fs, entry.name, area, warn, report)
        with tempfile.TemporaryDirectory(prefix="vml-env-") as staging:
            script = _Script(Path(staging))
            _parents(script, root_fs, [t for t in tops if t])
            _plan(script, records, data, existing, uid_map, gid_map, force, report, entry.manifest.chunk_size)
            _environment_files(script, meta, root_fs, existing)
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


class _Script:
    """A debugfs command file and the staged contents it writes."""

    def __init__(self, staging: Path):
        self.staging, self.lines, self.count = staging, [], 0
        self.written: dict[str, bytes] = {}  # guest path -> content, for files written whole

    def write(self, path: str, content: bytes) -> None:
        parent, name = os.path.split(path)
        self.add("cd", quote(parent))
        self.add("write", quote(self.stage(content)), quote(name))
        if len(content) < 1 << 20:
            self.written[path] = content

    def add(self, *words: str) -> None:
        self.lines.append(" ".join(words))

    def stage(self, data: bytes) -> str:
        self.count += 1
        p = self.staging / f"{self.count}"
        p.write_bytes(data)
        return str(p)

    def attrs(self, path: str, mode: int, uid: int, gid: int, mtime_ns: int, atime_ns: int) -> None:
        q = quote(path)
        self.add("sif", q, "uid", str(uid))
        self.add("sif", q, "gid", str(gid))
        self.add("sif", q, "mode", f"0{mode:o}")
        for field_name, ns in (("mtime", mtime_ns), ("atime", atime_ns)):
            if ns:
                self.add("sif", q, field_name, f"@{ns // 1_000_000_000}")
                self.add("sif", q, f"{field_name}_extra", str((ns % 1_000_000_000) << 2))


def quote(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


_S_IF = {"f": 0o100000, "d": 0o040000, "l": 0o120000, "p": 0o010000, "c": 0o020000, "b": 0o060000, "s": 0o140000}


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


def _plan(script, records, data, existing, uid_map, gid_map, force, report, cs) -> None:
    links: dict[str, int] = {}
    for r in records:
        if "\n" in r.path or "\n" in r.target:
            report.skipped.append(r.path)
            continue
        uid, gid = uid_map.get(r.uid, r.uid), gid_map.get(r.gid, r.gid)
        old = existing.get(r.path)
        parent, name = os.path.split(r.path)
        path = r.path
        if r.type == "d":
            if old is None:
                script.add("mkdir", quote(path))
            elif old.type != "d":
                report.skipped.append(path)
                continue
            script.attrs(path, _S_IF["d"] | r.mode, uid, gid, r.mtime_ns, r.atime_ns)
            continue
        if old is not None:
            newer = old.mtime_ns > r.mtime_ns
            if old.type == "d" or (newer and not force and r.type in "fl"):
                path = r.path + CONFLICT_SUFFIX
                name = name + CONFLICT_SUFFIX
                report.conflicts.append(r.path)
                if path in existing:
                    script.add("rm", quote(path))
            else:
                script.add("rm", quote(path))
        if r.type == "f":
            script.write(path, data.read(r.slot * cs, r.size) if r.size else b"")
            report.files += 1
            report.bytes += r.size
        elif r.type == "l":
            script.add("symlink", quote(path), quote(r.target))
        elif r.type == "h":
            script.add("ln", quote(r.target), quote(path))
            links[r.target] = links.get(r.target, 1) + 1
            continue
        elif r.type in "pcb":
            script.add("cd", quote(parent))
            dev = [] if r.type == "p" else [str(os.major(r.rdev)), str(os.minor(r.rdev))]
            script.add("mknod", quote(name), r.type, *dev)
        else:  # a socket: meaningless without the process that made it
            report.skipped.append(r.path)
            continue
        script.attrs(path, _S_IF[r.type] | r.mode, uid, gid, r.mtime_ns, r.atime_ns)
        for key, value in (r.xattrs or {}).items():
            script.add("ea_set", "-f", quote(script.stage(value.encode("latin-1"))), quote(path), quote(key))
    for target, count in links.items():
        script.add("sif", quote(target), "links_count", str(count))


def _environment_files(script: _Script, meta: dict, root_fs, existing) -> None:
    """~/.vml-environment with the variables, and the line in ~/.profile that reads it."""
    home = meta.get("home") or ""
    variables = (meta.get("environment") or {}).get("variables") or {}
    node = root_fs.lookup(home) if home.startswith("/") else None
    if node is None or not variables:
        return
    owner = root_fs.item(home, node)
    envfile, profile = f"{home}/{ENV_FILE}", f"{home}/.profile"
    if envfile in existing:
        script.add("rm", quote(envfile))
    script.write(envfile, loginenv.script(variables).encode())
    script.attrs(envfile, 0o100644, owner.uid, owner.gid, 0, 0)
    # ~/.profile as restored (the backup's, if it has one), plus the line.
    before = script.written.get(profile)
    text = (before or b"").decode(errors="surrogateescape") if before is not None else root_fs.read_text(profile) or ""
    if loginenv.PROFILE_LINE in text:
        return
    text += ("\n" if text and not text.endswith("\n") else "") + loginenv.PROFILE_LINE + "\n"
    if before is not None or profile in existing:
        script.add("rm", quote(profile))
    script.write(profile, text.encode(errors="surrogateescape"))
    script.attrs(profile, 0o100644, owner.uid, owner.gid, 0, 0)


def _check_clean(disk: Path, offset: int, where: str) -> None:
    """Refuse a file system with errors, or with a journal still to replay (the next boot would undo our writes)."""
    exe = shutil.which("e2fsck") or "/usr/sbin/e2fsck"
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
