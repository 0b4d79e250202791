"""Hypervisor drivers: start, inspect and stop a VM on a working area's disks.

Each driver turns a VmSpec (the neutral hardware description plus the
paths of the area's disks on the mount) into its own configuration. A
driver's start() returns what it needs to find the VM again; that goes into
the area's vm.json (see vml.vms.boot) and comes back as a VmRecord.

State names are shared by all drivers: ``running``, ``paused``,
``stopped`` (defined or registered, not running), ``gone`` (the hypervisor
no longer knows the VM) and ``unreachable`` (the hypervisor did not answer).
"""

import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import HypervisorError, UsageError
from ...repo.hardware import Hardware

NAMES = ("libvirt", "vmware", "qemu")
__all__ = [
    "ACCEL",
    "NAMES",
    "STATES",
    "Driver",
    "HypervisorError",
    "Option",
    "VmDisk",
    "VmRecord",
    "VmSpec",
    "accel",
    "command_options",
    "driver",
    "driver_class",
    "wait_until",
]
STATES = ("running", "paused", "stopped", "gone", "unreachable")


@dataclass(frozen=True)
class VmDisk:
    name: str
    bus: str
    image: Path  # NAME.img on the mount
    vmdk: Path  # NAME.vmdk on the mount, for VMware


@dataclass(frozen=True)
class VmSpec:
    area: str
    home: Path
    area_dir: Path  # the area's own local directory, for logs, sockets and state files
    mount_dir: Path  # the area's directory on the mount
    mountpoint: Path
    hardware: Hardware
    disks: tuple[VmDisk, ...]
    kernel: Path | None = None
    initrd: Path | None = None
    memory_state: Path | None = None  # a saved running state to resume from (libvirt)

    @property
    def console_log(self) -> Path:
        return self.area_dir / "console.log"


@dataclass
class VmRecord:
    """What vm.json holds about an area's VM."""

    area: str
    hypervisor: str
    vm: str  # the VM's name (libvirt domain, VMware VM) or process id (QEMU)
    started: str
    hardware: dict
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Option:
    """A setting a driver reads from its options (under ``key``), offered on the command line as ``flag``."""

    flag: str
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    switch: bool = False  # a flag without a value

    @property
    def key(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


ACCEL = Option("--accel", "KVM or emulation (default auto, or VML_ACCEL)", choices=("auto", "kvm", "tcg"))


class Driver:
    """One hypervisor. Every method raises HypervisorError with a one-line message on failure."""

    name = ""
    saves_memory = False
    OPTIONS: tuple[Option, ...] = ()  # what the command line offers for this driver

    def __init__(self, options: dict):
        self.options = options

    def describe(self, spec: VmSpec) -> str:
        """The configuration start() would use, as text (for --dry-run)."""
        raise UsageError(f"--dry-run is not available for {self.name}")

    def start(self, spec: VmSpec) -> VmRecord:
        """Create and start the VM; leave nothing behind if it does not start."""
        raise NotImplementedError

    def state(self, rec: VmRecord) -> str:
        raise NotImplementedError

    def stop(self, rec: VmRecord, force: bool, timeout: float) -> str:
        """Stop the VM (orderly unless ``force``); return how it ended."""
        raise NotImplementedError

    def release(self, rec: VmRecord) -> None:
        """Forget the stopped VM (undefine, unregister) when its area closes."""

    def save_memory(self, rec: VmRecord, path: Path) -> None:
        """Write the running VM's memory state to ``path``; the VM stops."""
        raise UsageError(f"{self.name} cannot save a running VM's memory")

    def resume(self, rec: VmRecord, path: Path) -> None:
        """Start the VM again from the state save_memory() wrote."""
        raise UsageError(f"{self.name} cannot resume a saved memory state")


def driver_class(name: str) -> type[Driver]:
    if name not in NAMES:
        raise UsageError(f"unknown hypervisor {name!r}: use one of {', '.join(NAMES)}")
    return importlib.import_module(f".{name}", __name__).DRIVER


def driver(name: str, options: dict) -> Driver:
    return driver_class(name)(options)


def command_options() -> list[tuple[Option, str]]:
    """Every driver's options, once per flag, each with a help text saying which drivers read it."""
    merged: dict[str, tuple[Option, list[str]]] = {}
    for name in NAMES:
        for opt in driver_class(name).OPTIONS:
            merged.setdefault(opt.flag, (opt, []))[1].append(f"{name}: {opt.help}")
    out = []
    for opt, helps in merged.values():
        texts = [h.partition(": ")[2] for h in helps]
        if len(set(texts)) == 1:  # the same meaning for all: name them once
            names = ", ".join(h.partition(": ")[0] for h in helps)
            out.append((opt, f"{names}: {texts[0]}"))
        else:
            out.append((opt, "; ".join(helps)))
    return out


def accel(choice: str | None, remote: bool = False) -> str:
    """ "kvm" or "tcg": as asked (--accel, or VML_ACCEL), else KVM when usable here (and assumed on a remote host)."""
    choice = choice or os.environ.get("VML_ACCEL") or "auto"
    if choice not in ("auto", "kvm", "tcg"):
        raise UsageError(f"--accel {choice!r}: use auto, kvm or tcg")
    if choice == "auto":
        return "kvm" if remote or os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    return choice


def wait_until(done, timeout: float, interval: float = 0.2) -> bool:
    """Poll ``done()`` until it is true (True) or ``timeout`` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
