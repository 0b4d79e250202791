"""Plain QEMU: `qemu-system-ARCH` run directly, for hosts with neither libvirt nor VMware.

QEMU daemonizes once the VM has started (so a VM that does not start is an
error of the boot command, not a silent death later), writes its pid to the
area directory and listens there on a QMP socket; `vml stop` asks it for an
ACPI shutdown through QMP, then quits it after the timeout. The serial
console goes to the area's console.log.
"""

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from ...errors import HypervisorError, UsageError
from ...times import now_iso
from . import ACCEL, Driver, Option, VmRecord, VmSpec, accel, wait_until

START_TIMEOUT = 60
NIC_DEVICES = {"virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e", "rtl8139": "rtl8139"}
NIC_DEVICES["vmxnet3"] = "vmxnet3"
OVMF = ("/usr/share/ovmf/OVMF.fd", "/usr/share/qemu/OVMF.fd")


class QemuDriver(Driver):
    name = "qemu"
    OPTIONS = (
        ACCEL,
        Option("--qemu", "the emulator (default qemu-system-ARCH)", "BINARY"),
        Option("--network", "user (NAT, the default) or none", "NAME"),
    )

    def command(self, spec: VmSpec) -> list[str]:
        hw = spec.hardware
        binary = self.options.get("qemu") or f"qemu-system-{hw.arch}"
        cmd = [binary, "-name", f"vml-{spec.area}", "-accel", accel(self.options.get("accel"))]
        cmd += ["-m", str(hw.memory_mib), "-smp", str(hw.vcpus), "-no-user-config", "-nodefaults"]
        if hw.firmware == "uefi":
            firmware = next((p for p in OVMF if Path(p).exists()), None)
            if firmware is None:
                raise HypervisorError("this entry boots with UEFI: install OVMF (Debian package ovmf)")
            cmd += ["-bios", firmware]
        if spec.kernel:
            cmd += ["-kernel", str(spec.kernel)]
            if spec.initrd:
                cmd += ["-initrd", str(spec.initrd)]
            if hw.cmdline:
                cmd += ["-append", hw.cmdline]
        scsi = False
        for i, d in enumerate(spec.disks):
            drive = f"file={d.image},format=raw,if=none,id=disk{i},cache=writeback"
            cmd += ["-drive", drive]
            if d.bus == "virtio":
                device = f"virtio-blk-pci,drive=disk{i}"
            elif d.bus == "scsi":
                if not scsi:
                    cmd += ["-device", "virtio-scsi-pci,id=scsi0"]
                    scsi = True
                device = f"scsi-hd,drive=disk{i},bus=scsi0.0"
            elif d.bus == "nvme":
                device = f"nvme,drive=disk{i},serial=vml{i}"
            else:  # ide, and sata on the pc machine's IDE controller
                device = f"ide-hd,drive=disk{i}"
            cmd += ["-device", device + (",bootindex=1" if i == 0 and not spec.kernel else "")]
        network = self.options.get("network") or "user"
        if network not in ("user", "none"):
            raise HypervisorError(f"network {network!r}: QEMU offers user (NAT) or none")
        for i, nic in enumerate(hw.nics if network == "user" else ()):
            mac = f",mac={nic.mac}" if nic.mac else ""
            cmd += ["-netdev", f"user,id=net{i}", "-device", f"{NIC_DEVICES[nic.model]},netdev=net{i}{mac}"]
        if hw.console == "serial":
            cmd += ["-display", "none", "-serial", f"file:{spec.console_log}"]
        else:
            cmd += [
                "-vga",
                "std",
                "-display",
                "none",
                "-vnc",
                "127.0.0.1:0,to=99",
                "-serial",
                f"file:{spec.console_log}",
            ]
        cmd += ["-qmp", f"unix:{self._qmp_path(spec.area_dir)},server=on,wait=off"]
        cmd += ["-pidfile", str(spec.area_dir / "qemu.pid"), "-daemonize"]
        return cmd

    @staticmethod
    def _qmp_path(area_dir: Path) -> Path:
        return area_dir / "qmp.sock"

    def describe(self, spec: VmSpec) -> str:
        return shlex.join(self.command(spec))

    def start(self, spec: VmSpec) -> VmRecord:
        if spec.memory_state:
            raise UsageError("plain QEMU does not resume a saved running state: boot this entry with libvirt")
        cmd = self.command(spec)
        if shutil.which(cmd[0]) is None:
            raise HypervisorError(f"{cmd[0]} is not installed (Debian package qemu-system-x86)")
        pidfile = spec.area_dir / "qemu.pid"
        pidfile.unlink(missing_ok=True)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise HypervisorError(f"QEMU did not start the VM of area {spec.area} in {START_TIMEOUT} s") from None
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()] or ["no message"]
            raise HypervisorError(f"QEMU did not start the VM of area {spec.area}: {lines[-1].strip()}")
        try:
            pid = int(pidfile.read_text().strip())
        except FileNotFoundError:
            pid = 0  # QEMU removes it on exit: the guest has already powered off
        details = {"pid": pid, "qmp": str(self._qmp_path(spec.area_dir)), "command": cmd}
        return VmRecord(spec.area, self.name, str(pid), now_iso(), spec.hardware.to_json(), details)

    def _alive(self, rec: VmRecord) -> bool:
        """Whether our QEMU still runs: the pid is alive and its command line names our QMP socket."""
        pid = rec.details["pid"]
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            return False
        return any(rec.details["qmp"].encode() in a for a in args)

    def state(self, rec: VmRecord) -> str:
        if not self._alive(rec):
            return "stopped"  # a QEMU process is the VM: once it ends, the VM is off
        try:
            status = _qmp(Path(rec.details["qmp"]), "query-status")
        except OSError:
            return "running"  # alive, but its QMP socket is busy
        return "paused" if status.get("status") == "paused" else "running"

    def stop(self, rec: VmRecord, force: bool, timeout: float) -> str:
        if not self._alive(rec):
            return "had already stopped"
        if not force:
            with contextlib.suppress(OSError):
                _qmp(Path(rec.details["qmp"]), "system_powerdown")
                if wait_until(lambda: not self._alive(rec), timeout):
                    return "shut down"
        with contextlib.suppress(OSError):
            _qmp(Path(rec.details["qmp"]), "quit")
        if not wait_until(lambda: not self._alive(rec), 10):
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.details["pid"], signal.SIGKILL)
            wait_until(lambda: not self._alive(rec), 10)
        return "powered off" if force else f"did not shut down in {timeout:g} s: powered off"


def _qmp(path: Path, command: str) -> dict:
    """Run one QMP command; return its "return" value. OSError if QEMU does not answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        f = s.makefile("rwb")
        f.readline()  # the greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline()
                if not line:
                    if cmd == "quit":
                        return {}
                    raise ConnectionResetError("QMP closed")
                reply = json.loads(line)
                if "return" in reply or "error" in reply:
                    break  # events ("event" key) are skipped
        return reply.get("return", {})


DRIVER = QemuDriver
