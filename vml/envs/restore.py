"""`vml env restore`: push an environment entry's files and variables into a working area's disk.

The area's disk is written through the running mount (never behind it), by
e2fsprogs' debugfs, one checked command at a time (debugfs.py). No root, no
kernel mount, no appliance. Nothing is written before the whole restore is
planned and checked (restoreplan.py): the home against the area's own
/etc/passwd, every record's parents, the room, the file system's state.
Owners are mapped by name where both guests know the name and kept by
number otherwise. The captured variables go to ``~/.vml-environment``,
which one marked line in ``~/.profile`` sources.
"""

import subprocess
import tempfile
from pathlib import Path

from ..entries import envtree
from ..entries.envtree import env_records
from ..errors import BadSource, CorruptManifest, UnsafeBackup, UsageError
from ..repo.repository import Entry, Repository
from ..vms import boot
from . import guestfs, homes
from .capture import area_disk_paths
from .debugfs import Debugfs, find, quote
from .restoreplan import Planner, Report, Step

CACHE_BYTES = 2 << 20  # the data is read once, in order: a few chunks decompressed at a time
_S_IF = {"f": 0o100000, "d": 0o040000, "l": 0o120000, "p": 0o010000}
_DROPPED = 0o6000  # setuid and setgid: an entry may come from anyone (a directory keeps setgid)


def checked_meta(entry: Entry) -> dict:
    """The parts of an environment entry's description a restore acts on, checked as hostile input."""
    meta = entry.manifest.extra[envtree.KEY]
    try:
        home = envtree.check_path(meta["home"])
        adds = [envtree.check_path(p) for p in meta.get("patterns", {}).get("add", [])]
        user = meta.get("user")
        if user is not None and not isinstance(user, str):
            raise ValueError("bad user")
        variables = meta.get("environment", {}).get("variables", {})
        if not isinstance(variables, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("raw"), str) and "\n" not in v["raw"] for v in variables.values()
        ):
            raise ValueError("bad variables")
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CorruptManifest(f"entry {entry.name!r}: invalid environment description ({e})") from None
    problem = homes.home_problem(home)
    if problem:
        raise UnsafeBackup(f"entry {entry.name!r}: its home {home!r} is {problem}: refused, nothing written")
    return {
        "home": home,
        "user": user,
        "patterns": {"add": adds},
        "environment": {"variables": variables},
        "os": meta.get("os") if isinstance(meta.get("os"), dict) else {},
        "owners": meta.get("owners") if isinstance(meta.get("owners"), dict) else {},
    }


def named_adds(entry: Entry, meta: dict, adds) -> list[str]:
    """The --add paths of the backup the user named again at restore (UsageError for one it does not hold)."""
    saved = meta["patterns"]["add"]
    out = []
    for p in adds:
        try:
            path = homes.checked_add(p)
        except ValueError as e:
            raise UsageError(f"--add {p!r}: {e}") from None
        if path not in saved:
            holds = ", ".join(saved) or "none"
            raise UsageError(f"--add {p!r}: entry {entry.name!r} holds no such --add path (it holds: {holds})")
        out.append(path)
    return out


def check_stopped(home: Path, area: str) -> None:
    rec = boot.load_record(home, area)
    if rec is not None and boot.vm_state(home, rec) in ("running", "paused"):
        raise UsageError(f"working area {area!r}: its VM is running; stop it first (`vml stop {area}`)")


def restore_environment(
    home: Path,
    repo: Repository,
    entry: Entry,
    area: str,
    force: bool = False,
    warn=lambda msg: None,
    adds=(),
    confirmed_home: str | None = None,
) -> Report:
    """Write environment entry ``entry`` into the root file system of area ``area``'s disks.

    ``adds`` are the backup's --add paths to restore too (the others are
    listed in the report, not written). ``confirmed_home``: the user's word
    that the backup's home may be written when the area's /etc/passwd does
    not give it to the backup's user.
    """
    records, data = env_records(repo, entry, CACHE_BYTES)
    meta = checked_meta(entry)
    tops = [meta["home"], *named_adds(entry, meta, adds)]
    disks = area_disk_paths(home, area)
    with boot.vm_lock(home, area):  # no VM of the area starts while its disk is written
        check_stopped(home, area)
        return _restore(entry, area, force, warn, records, data, meta, tops, disks, confirmed_home)


def _restore(entry, area, force, warn, records, data, meta, tops, disks, confirmed_home) -> Report:
    where = f"area {area!r}"
    handles = []
    try:
        found = []
        for name, path in disks.items():
            handles.append(open(path, "rb"))  # noqa: SIM115 - closed below
            found += guestfs.filesystems(name, handles[-1], path.stat().st_size, f"{where}, disk {name}")
        root_fs = guestfs.root_of(found, where)
        disk = disks[root_fs.disk]
        _check_home(meta, root_fs, entry.name, where, confirmed_home)
        _check_state(root_fs, disk, records, where)
        cs = entry.manifest.chunk_size
        planner = _plan(root_fs, entry.name, area, meta, tops, force, records, lambda r: b"".join(_chunks(data, r, cs)))
        report = planner.report
        report.disk = str(disk)
        _warn_os(meta, root_fs, entry.name, area, warn, report)
        with (
            tempfile.TemporaryDirectory(prefix="vml-env-") as staging,
            Debugfs(disk, root_fs.offset, where, Path(staging), root_fs.inode_size > 128) as dbg,
        ):
            _carry_out(planner.plan, dbg, data, cs, report)
    finally:
        for h in handles:
            h.close()
    return report


def _plan(root_fs, name, area, meta, tops, force, records, read) -> Planner:
    """The whole restore, checked: UnsafeBackup (nothing written) for a backup that reaches outside its tops."""
    existing = {}
    for top in tops:
        for it in root_fs.walk(top, lambda p, d: True):
            it.node = None  # the inode is looked up again when needed: 50,000 parsed inodes cost memory
            existing[it.path] = it
    planner = Planner(root_fs, tops, existing, _owner_maps(meta, root_fs), force, f"entry {name!r} into area {area!r}")
    planner.report.not_added = [p for p in meta["patterns"]["add"] if p not in tops]
    planner.above_tops(meta["home"])
    planner.records(records, meta["home"], planner.report.not_added)
    planner.environment(meta["home"], meta["environment"]["variables"], read)
    return planner


def _check_home(meta: dict, root_fs, name: str, where: str, confirmed: str | None) -> None:
    """The home restored into is the user's home in the area's own /etc/passwd. A backup whose user has
    no account there never writes into another account's home, and writes its home only when the user
    confirms it (--home): the backup alone does not decide where a restore writes."""
    homes = {
        user: (entry[2].rstrip("/") or "/")
        for user, entry in guestfs.accounts(root_fs.read_text("/etc/passwd")).items()
    }
    user, home = meta["user"], meta["home"]
    if user in homes:
        if homes[user] != home:
            raise UnsafeBackup(
                f"entry {name!r} holds {home!r} as the home of user {user!r}, whose home in {where} is "
                f"{homes[user]!r}: refused, nothing written"
            )
        return
    owner = next((u for u, h in sorted(homes.items()) if h == home), None)
    if owner is not None:
        raise UnsafeBackup(
            f"entry {name!r} holds {home!r}, the home of user {owner!r} in {where}, for "
            f"{f'user {user!r}' if user else 'no user'}: refused, nothing written"
        )
    if confirmed is None or confirmed.rstrip("/") != home:
        who = f"its user {user!r} has no account in {where}" if user else "it names no user"
        raise UnsafeBackup(f"entry {name!r}: {who}; it restores into {home} only when you say so with --home {home}")


def _check_state(root_fs, disk: Path, records, where: str) -> None:
    if root_fs.needs_recovery():
        raise BadSource(
            f"{where}: the file system on {disk.name} has a journal to replay (its VM did not "
            "shut down cleanly): boot and shut the VM down once, then restore; a restore now would be undone"
            " by the journal recovery"
        )
    _check_clean(disk, root_fs.offset, where)
    _check_room(root_fs, records, disk.name, where)


def _chunks(data, r: envtree.Record, cs: int):
    """The bytes of regular file ``r``, one chunk at a time."""
    for i in range(r.slots(cs)):
        yield data.read((r.slot + i) * cs, min(cs, r.size - i * cs))


def _carry_out(plan, dbg: Debugfs, data, cs: int, report: Report) -> None:
    kept_times = True
    for path in plan.mkdirs:
        dbg.run("mkdir", quote(path))
    for step in plan.steps:
        kept_times &= _write(dbg, step, _chunks(data, step.record, cs))
    for target, count in plan.links.items():
        dbg.run("sif", quote(target), "links_count", str(count))
    for step in plan.env_files:
        kept_times &= _write(dbg, step, [plan.contents[step.path]])
    if not kept_times:
        report.notes.append("times past 2038 or before 1901 are not kept: the area's inodes are 128 bytes")


def _write(dbg: Debugfs, step: Step, chunks) -> bool:
    """Write one planned record; False if a time of it could not be kept."""
    r, q = step.record, quote(step.path)
    if step.replace:
        dbg.run("rm", q)
    if r.type == "d":
        if step.create:
            dbg.run("mkdir", q)
        return not dbg.set_attrs(step.path, _S_IF["d"] | (r.mode & 0o3777), step.uid, step.gid, r.mtime_ns, r.atime_ns)
    if r.type == "f":
        dbg.write_file(step.path, chunks)
    elif r.type == "l":
        dbg.run("symlink", q, quote(r.target))
    elif r.type == "h":
        dbg.run("ln", quote(r.target), q)
        return True
    else:  # a FIFO
        dbg.mknod_fifo(step.path)
    mode = _S_IF[r.type] | (r.mode & ~_DROPPED & 0o7777)
    dropped = dbg.set_attrs(step.path, mode, step.uid, step.gid, r.mtime_ns, r.atime_ns)
    for key, value in step.xattrs.items():
        dbg.set_xattr(step.path, key, value)
    return not dropped


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
    target = f"{disk}?offset={offset}" if offset else str(disk)
    proc = subprocess.run(
        [find("e2fsck"), "-fn", target], capture_output=True, text=True, errors="replace", check=False
    )
    if proc.returncode:
        said = [line for line in proc.stdout.splitlines() if line.strip() and not line.startswith("Pass ")]
        raise BadSource(
            f"{where}: the file system on {disk.name} needs repair or journal recovery before a restore "
            f"(e2fsck -fn: {said[0] if said else proc.returncode}); boot and shut the VM down cleanly, "
            "or repair it with e2fsck"
        )
