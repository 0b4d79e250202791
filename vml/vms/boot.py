"""Running working areas as VMs: boot, status, stop, save while running, close.

A VM's disks are the area's files on the mount, so booting needs the
mount. What an area runs is recorded in ``areas/NAME/vm.json`` (a
hypervisors.VmRecord); ``areas/NAME/vm.lock`` is held while a command
boots, stops, saves or closes the area, so two commands never act on one
VM at once.

Saving a running VM (libvirt) writes its memory state into the area
directory, stores it in the new entry as the file ``vml-memory.state``
together with the disks, and starts the VM again from it. If that is cut
short before the VM started again, the next boot of the area on the same
hypervisor resumes from the state left in the area directory. Booting an entry
that has such a file on libvirt resumes that running state; any other save
leaves the file out, since it would no longer match the disks.
"""

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from .. import control
from ..config import Config
from ..entries.checkout import write_stream
from ..errors import CorruptManifest, HypervisorError, Locked, NotFound, UsageError
from ..files import write_atomic
from ..layout import MEMORY_FILE, memory_state
from ..repo.hardware import Hardware
from ..repo.repository import Entry, Repository
from . import areas
from .area import RECORD_FILE, AreaRecord, changed_disks, open_entry, unsaved
from .hypervisors import STATES, VmDisk, VmRecord, VmSpec, driver

log = logging.getLogger(__name__)

RECORD = "vm.json"
STOP_TIMEOUT = 60.0


def _area_dir(home: Path, area: str) -> Path:
    d = areas.areas_dir(home) / area
    if not (d / RECORD_FILE).is_file():
        raise NotFound(f"no working area {area!r} (see `vml status`)")
    return d


@contextlib.contextmanager
def vm_lock(home: Path, area: str) -> Iterator[None]:
    """Held while a command boots, stops, saves or writes into area ``area``: no VM starts meanwhile."""
    fd = os.open(_area_dir(home, area) / "vm.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Locked(f"another vml command is booting, stopping or saving area {area!r}; try again") from None
        yield
    finally:
        os.close(fd)


def load_record(home: Path, area: str) -> VmRecord | None:
    path = areas.areas_dir(home) / area / RECORD
    try:
        doc = json.loads(path.read_bytes())
        return VmRecord(**doc)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise CorruptManifest(f"{path}: invalid VM record ({e}); remove it if no VM runs") from None


def _write_record(home: Path, rec: VmRecord) -> None:
    write_atomic(
        areas.areas_dir(home) / rec.area / RECORD, (json.dumps(dataclasses.asdict(rec), indent=1) + "\n").encode()
    )


def _clear_record(home: Path, area: str) -> None:
    (areas.areas_dir(home) / area / RECORD).unlink(missing_ok=True)


def _mount_dir(home: Path, area: str) -> tuple[Path, Path]:
    state = control.mount_state(home)
    if state is None:
        raise UsageError(f"a VM runs on the area's files on the mount: run `vml mount` first, then boot {area}")
    mountpoint = Path(state["mountpoint"])
    return mountpoint, mountpoint / "areas" / area


def check_may_run(home: Path, area: str) -> tuple[Path, AreaRecord, Repository, Entry]:
    """The area's directory, record, repository and entry, if the certification policy in force lets it boot.

    Every way a VM starts comes here (boot, its dry run, open --boot, the
    release manager's Start, a deploy task): the entry must be accepted,
    and a policy without --allow-user-changes also refuses an area whose
    disks no longer hold the entry's bytes (NotCertified).
    """
    d = _area_dir(home, area)
    rec = AreaRecord.load(d / RECORD_FILE)
    repo, entry = open_entry(home, rec)

    def changes() -> list[str]:
        return [f"disk {n!r} of working area {area!r}" for n in changed_disks(home, rec, repo, entry)]

    Config.load(home).check_certified(repo, entry, changes)
    return d, rec, repo, entry


def spec(
    home: Path, area: str, memory_mib: int | None = None, vcpus: int | None = None, resume: bool = False
) -> VmSpec:
    """What a VM of ``area`` runs: the entry's hardware (with the given changes) on the area's disks."""
    d, rec, repo, entry = check_may_run(home, area)
    mountpoint, mount_dir = _mount_dir(home, area)
    m = entry.manifest
    memory_state = None
    # A saved running state resumes only on the disks it was saved with: once
    # the area holds changes, it would corrupt them, so the VM boots afresh.
    if resume and any(f.name == MEMORY_FILE for f in m.files) and not areas.overlay_bytes(home, rec):
        if memory_mib or vcpus:
            raise UsageError(
                f"entry {entry.name} holds a running VM's state, which resumes with the memory and vCPUs it had"
            )
        memory_state = d / MEMORY_FILE
        memory_state.unlink(missing_ok=True)
        table, _ = repo.resolve(entry.digest).files[MEMORY_FILE]
        write_stream(repo, table, memory_state, f"entry {entry.name!r}, file {MEMORY_FILE}")
    hw = (m.hardware or Hardware()).with_options(memory_mib, vcpus)
    disks = tuple(
        VmDisk(s.name, s.bus, mount_dir / f"{s.name}.img", mount_dir / f"{s.name}.vmdk")
        for s in hw.slots([disk.name for disk in m.disks])
    )
    if not disks:
        raise UsageError(f"entry {entry.name} has no disk to boot from")
    return VmSpec(
        area,
        home,
        d,
        mount_dir,
        mountpoint,
        hw,
        disks,
        kernel=mount_dir / hw.kernel if hw.kernel else None,
        initrd=mount_dir / hw.initrd if hw.initrd else None,
        memory_state=memory_state,
    )


def describe(home: Path, area: str, hypervisor: str, options: dict, memory_mib=None, vcpus=None) -> str:
    """The configuration a boot would use (`vml boot --dry-run`)."""
    return driver(hypervisor, options).describe(spec(home, area, memory_mib, vcpus))


def boot(home: Path, area: str, hypervisor: str, options: dict, memory_mib=None, vcpus=None) -> VmRecord:
    """Start a VM on ``area``; returns once it runs."""
    drv = driver(hypervisor, options)
    with vm_lock(home, area):
        old = load_record(home, area)
        leftover = _area_dir(home, area) / MEMORY_FILE
        resumable = leftover.exists() and old and old.hypervisor == hypervisor and drv.saves_memory
        if resumable and vm_state(home, old, options) == "stopped":
            # A save while running was cut short before the VM resumed; the
            # disks have not changed since, so its state is still good.
            check_may_run(home, area)  # if the policy in force still lets it run
            try:
                drv.resume(old, leftover)
                leftover.unlink()
                return old
            except HypervisorError as e:
                log.warning("area %s: the state an interrupted save left is not usable, booting afresh: %s", area, e)
        if old is not None:
            state = driver(old.hypervisor, options).state(old)
            if state in ("running", "paused"):
                raise UsageError(f"area {area} already runs on {old.hypervisor} as {old.vm}: `vml stop {area}` first")
            if state == "unreachable":
                raise HypervisorError(
                    f"area {area} was booted on {old.hypervisor}, which does not answer now: it may still run "
                    f"there; `vml stop {area} --force` once it answers"
                )
            if old.hypervisor != hypervisor:
                with contextlib.suppress(HypervisorError):
                    driver(old.hypervisor, options).release(old)
            _clear_record(home, area)
        leftover.unlink(missing_ok=True)
        s = spec(home, area, memory_mib, vcpus, resume=drv.saves_memory)
        s.console_log.unlink(missing_ok=True)
        try:
            rec = drv.start(s)
        finally:
            if s.memory_state:
                s.memory_state.unlink(missing_ok=True)
        _write_record(home, rec)
        return rec


def boot_new_area(home: Path, area: str, hypervisor: str, options: dict, memory_mib=None, vcpus=None) -> VmRecord:
    """Boot an area just opened; if the VM does not start, the area is closed again (nothing was written)."""
    try:
        return boot(home, area, hypervisor, options, memory_mib, vcpus)
    except BaseException:
        areas.close_area(home, area, discard=True)
        raise


def vm_state(home: Path, rec: VmRecord, options: dict | None = None) -> str:
    state = driver(rec.hypervisor, options or {}).state(rec)
    assert state in STATES, state
    return state


def status(home: Path, options: dict | None = None) -> list[dict]:
    """One dict per area: area, entry, hypervisor, vm, state ("none" when it never booted)."""
    out = []
    for arec in areas.list_areas(home):
        item = {"area": arec.name, "entry": arec.entry, "repository": arec.repository}
        try:
            rec = load_record(home, arec.name)
        except CorruptManifest as e:
            out.append(item | {"hypervisor": None, "vm": None, "state": "unknown", "error": str(e)})
            continue
        if rec is None:
            out.append(item | {"hypervisor": None, "vm": None, "state": "none"})
            continue
        item |= {"hypervisor": rec.hypervisor, "vm": rec.vm, "started": rec.started}
        try:
            item["state"] = vm_state(home, rec, options)
        except (HypervisorError, UsageError) as e:
            item |= {"state": "unreachable", "error": str(e)}
        item.update({k: v for k, v in rec.details.items() if k in ("connect", "host", "pid")})
        out.append(item)
    return out


def stop(home: Path, area: str, force: bool = False, timeout: float = STOP_TIMEOUT, options: dict | None = None) -> str:
    with vm_lock(home, area):
        rec = load_record(home, area)
        if rec is None:
            raise NotFound(f"area {area} runs no VM (boot it with `vml boot {area} --hypervisor ...`)")
        return driver(rec.hypervisor, options or {}).stop(rec, force, timeout)


def save_with_vm(home: Path, area: str, entry: str, message: str = "", progress=None, options: dict | None = None):
    """Save ``area`` as ``entry``; with a running libvirt VM, its memory state too.

    Returns (area record afterwards, whether the memory state was saved).
    """
    options = options or {}
    with vm_lock(home, area):
        rec = load_record(home, area)
        state = vm_state(home, rec, options) if rec else "none"
        hardware = Hardware.from_json(rec.hardware) if rec else None
        extra = {} if progress is None else {"progress": progress}
        if state == "unreachable":
            raise HypervisorError(
                f"area {area} was booted on {rec.hypervisor}, which does not answer: its VM may still be writing; "
                "save once it answers"
            )
        if state not in ("running", "paused"):
            saved = areas.save_area(home, area, entry, message, drop=(MEMORY_FILE,), hardware=hardware, **extra)
            return saved, False
        drv = driver(rec.hypervisor, options)
        if not drv.saves_memory:
            raise UsageError(
                f"area {area} runs on {rec.hypervisor}, which cannot save a running VM: `vml stop {area}` first "
                "(or boot it with libvirt to save it while it runs)"
            )
        state_file = memory_state(home, area)
        state_file.unlink(missing_ok=True)
        drv.save_memory(rec, state_file)  # the VM is stopped from here until resume()
        try:
            saved = areas.save_area(
                home, area, entry, message, files={MEMORY_FILE: state_file}, hardware=hardware, **extra
            )
        finally:
            drv.resume(rec, state_file)
            state_file.unlink(missing_ok=True)
        return saved, True


def close(home: Path, area: str, discard: bool = False, options: dict | None = None) -> None:
    """Close ``area``: refuse while its VM runs, forget the VM, then remove the area."""
    with vm_lock(home, area):
        rec = load_record(home, area)
        if rec is not None:
            drv = driver(rec.hypervisor, options or {})
            state = drv.state(rec)
            if state in ("running", "paused"):
                raise UsageError(f"area {area}'s VM runs on {rec.hypervisor}: `vml stop {area}` first")
            if state == "unreachable":
                raise HypervisorError(
                    f"area {area}'s VM is on {rec.hypervisor}, which does not answer: close it once it does"
                )
            if not discard:
                changed = areas.overlay_bytes(home, AreaRecord.load(_area_dir(home, area) / RECORD_FILE))
                if changed:
                    raise unsaved(area, changed)
            drv.release(rec)
            _clear_record(home, area)
        areas.close_area(home, area, discard)
