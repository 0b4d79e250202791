"""libvirt: QEMU/KVM, Xen, and the same on other hosts through remote URIs.

The domain is named after the area and carries VML metadata (the home and
the area) so that a domain of the same name that VML did not define is
never touched. QEMU runs as the user who owns the mount (a static DAC label
with relabel='no'), so libvirt neither needs other users to reach the mount
nor changes the owner of the area's files.

Saving a running VM uses libvirt's save-to-file, which stops the domain
after writing its memory, and restore, which starts it again. A saved
state is tied to the domain's name and UUID, which libvirt checks against
any XML given at restore; resuming it in another area rewrites the XML in
the save image's header instead (see _rewrite_save_image).
"""

import contextlib
import os
import struct
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlsplit

from ...errors import HypervisorError, UsageError
from ...times import now_iso
from . import ACCEL, Driver, Option, VmRecord, VmSpec, accel, wait_until

DEFAULT_URI = "qemu:///system"
NS = "https://vml.invalid/xmlns/vm/1"
DEV_PREFIX = {"virtio": "vd", "ide": "hd", "sata": "sd", "scsi": "sd", "xen": "xvd"}


def _libvirt():
    try:
        import libvirt
    except ImportError:
        raise HypervisorError("the libvirt driver needs libvirt-python (pip install libvirt-python)") from None
    libvirt.registerErrorHandler(lambda *_: None, None)  # errors arrive as exceptions; do not print them too
    return libvirt


def _message(e) -> str:
    return (e.get_error_message() or str(e)).splitlines()[0]


def _local_qemu(uri: str) -> bool:
    parts = urlsplit(uri)
    return parts.scheme == "qemu" and not parts.hostname


class LibvirtDriver(Driver):
    name = "libvirt"
    OPTIONS = (
        Option("--connect", "qemu:///system (default, or VML_LIBVIRT_URI), xen:///system, qemu+ssh://...", "URI"),
        ACCEL,
        Option("--network", "a libvirt network (default: user-mode NAT)", "NAME"),
    )

    @property
    def saves_memory(self) -> bool:
        """Memory states are files on the libvirt host, in QEMU's format: only a local QEMU/KVM qualifies."""
        return _local_qemu(self.uri)

    @property
    def uri(self) -> str:
        return self.options.get("connect") or os.environ.get("VML_LIBVIRT_URI") or DEFAULT_URI

    def _connect(self, uri: str | None = None):
        libvirt = _libvirt()
        uri = uri or self.uri
        try:
            return libvirt.open(uri)
        except libvirt.libvirtError as e:
            raise HypervisorError(
                f"cannot reach libvirt at {uri} ({_message(e)}): start libvirtd, or pick another host with --connect"
            ) from None

    # -- the domain XML ----------------------------------------------------

    def domain_type(self, uri: str) -> str:
        scheme = urlsplit(uri).scheme.split("+")[0]
        if scheme in ("xen", "libxl"):
            return "xen"
        remote = bool(urlsplit(uri).hostname)
        return "kvm" if accel(self.options.get("accel"), remote) == "kvm" else "qemu"

    def domain_xml(self, spec: VmSpec, uri: str, vm_uuid: str | None = None) -> str:
        hw = spec.hardware
        kind = self.domain_type(uri)
        local = not urlsplit(uri).hostname
        dom = ET.Element("domain", type=kind)
        ET.SubElement(dom, "name").text = spec.area
        ET.SubElement(dom, "uuid").text = vm_uuid or str(uuid.uuid4())
        meta = ET.SubElement(ET.SubElement(dom, "metadata"), f"{{{NS}}}vm")
        ET.SubElement(meta, f"{{{NS}}}home").text = str(spec.home)
        ET.SubElement(meta, f"{{{NS}}}area").text = spec.area
        ET.SubElement(dom, "memory", unit="MiB").text = str(hw.memory_mib)
        ET.SubElement(dom, "vcpu").text = str(hw.vcpus)
        os_el = ET.SubElement(dom, "os", **({"firmware": "efi"} if hw.firmware == "uefi" else {}))
        ET.SubElement(os_el, "type", arch=hw.arch).text = "hvm"
        if spec.kernel:
            ET.SubElement(os_el, "kernel").text = str(spec.kernel)
            if spec.initrd:
                ET.SubElement(os_el, "initrd").text = str(spec.initrd)
            if hw.cmdline:
                ET.SubElement(os_el, "cmdline").text = hw.cmdline
        features = ET.SubElement(dom, "features")
        ET.SubElement(features, "acpi")  # so the guest's poweroff ends the domain
        ET.SubElement(features, "apic")
        ET.SubElement(dom, "on_poweroff").text = "destroy"
        ET.SubElement(dom, "on_reboot").text = "restart"
        ET.SubElement(dom, "on_crash").text = "destroy"
        if kind != "xen":
            label = ET.SubElement(dom, "seclabel", type="static", model="dac", relabel="no")
            ET.SubElement(label, "label").text = f"+{os.getuid()}:+{os.getgid()}"
        devices = ET.SubElement(dom, "devices")
        used: dict[str, int] = {}
        for i, d in enumerate(spec.disks):
            bus = "xen" if kind == "xen" else {"nvme": "sata"}.get(d.bus, d.bus)
            prefix = DEV_PREFIX[bus]
            n = used.get(prefix, 0)
            used[prefix] = n + 1
            disk = ET.SubElement(devices, "disk", type="file", device="disk")
            ET.SubElement(disk, "driver", name="qemu", type="raw", cache="writeback")
            ET.SubElement(disk, "source", file=str(d.image))
            ET.SubElement(disk, "target", dev=prefix + "abcdefghijklmnopqrstuvwxyz"[n], bus=bus)
            if i == 0 and not spec.kernel:
                ET.SubElement(disk, "boot", order="1")
        if "scsi" in {d.bus for d in spec.disks} and kind != "xen":
            ET.SubElement(devices, "controller", type="scsi", model="virtio-scsi")
        for nic in hw.nics:
            network = self.options.get("network")
            if network:
                iface = ET.SubElement(devices, "interface", type="network")
                ET.SubElement(iface, "source", network=network)
            elif kind == "xen":
                iface = ET.SubElement(devices, "interface", type="bridge")
                ET.SubElement(iface, "source", bridge="xenbr0")
            else:
                iface = ET.SubElement(devices, "interface", type="user")
            if nic.mac:
                ET.SubElement(iface, "mac", address=nic.mac)
            ET.SubElement(iface, "model", type="netfront" if kind == "xen" else nic.model)
        if hw.console == "serial" or local:
            for tag in ("serial", "console"):
                el = ET.SubElement(devices, tag, type="file" if local else "pty")
                if local:
                    ET.SubElement(el, "source", path=str(spec.console_log))
                ET.SubElement(el, "target", **({"type": "serial"} if tag == "console" else {}), port="0")
        if hw.console == "graphics":
            ET.SubElement(devices, "graphics", type="vnc", port="-1", listen="127.0.0.1")
            ET.SubElement(ET.SubElement(devices, "video"), "model", type="xen" if kind == "xen" else "vga")
        ET.register_namespace("vml", NS)
        ET.indent(dom)
        return ET.tostring(dom, encoding="unicode") + "\n"

    def describe(self, spec: VmSpec) -> str:
        return self.domain_xml(spec, self.uri)

    # -- life cycle ----------------------------------------------------------

    def _ours(self, dom, spec_home: Path, area: str) -> bool:
        libvirt = _libvirt()
        try:
            text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, 0)
        except libvirt.libvirtError:
            return False
        values = {el.tag.rpartition("}")[2]: el.text for el in ET.fromstring(text).iter()}
        return values.get("home") == str(spec_home) and values.get("area") == area

    def start(self, spec: VmSpec) -> VmRecord:
        libvirt = _libvirt()
        uri = self.uri
        conn = self._connect(uri)
        try:
            old_uuid = None
            with contextlib.suppress(libvirt.libvirtError):
                old = conn.lookupByName(spec.area)
                if not self._ours(old, spec.home, spec.area):
                    raise HypervisorError(
                        f"libvirt at {uri} already has a domain named {spec.area!r} that VML did not define: "
                        f"open the entry in an area of another name (--area), or undefine that domain"
                    )
                if old.isActive():
                    raise HypervisorError(
                        f"domain {spec.area!r} at {uri} is already running: `vml stop {spec.area}` first"
                    )
                old_uuid = old.UUIDString()
            xml = self.domain_xml(spec, uri, old_uuid)
            try:
                if spec.memory_state:
                    self._restore_into(conn, spec, xml)
                else:
                    dom = conn.defineXML(xml)
                    try:
                        dom.create()
                    except libvirt.libvirtError:
                        with contextlib.suppress(libvirt.libvirtError):
                            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
                        raise
            except libvirt.libvirtError as e:
                raise HypervisorError(f"libvirt at {uri} did not start area {spec.area}: {_message(e)}") from None
            details = {"connect": uri}
            return VmRecord(spec.area, self.name, spec.area, now_iso(), spec.hardware.to_json(), details)
        finally:
            conn.close()

    def _restore_into(self, conn, spec: VmSpec, xml: str) -> None:
        """Start the domain from a saved running state, as the domain ``xml`` describes it."""
        libvirt = _libvirt()
        self._check_local_qemu(conn.getURI())
        new = ET.fromstring(xml)
        saved = ET.fromstring(conn.saveImageGetXMLDesc(str(spec.memory_state), 0))
        for tag in ("name", "uuid"):
            saved.find(tag).text = new.findtext(tag)
        for old_meta in saved.findall("metadata"):
            saved.remove(old_meta)
        saved.insert(2, new.find("metadata"))
        sources = [d.find("source") for d in saved.iterfind("devices/disk[@device='disk']")]
        if len(sources) != len(spec.disks):
            raise HypervisorError(f"the saved state has {len(sources)} disks, area {spec.area} has {len(spec.disks)}")
        for src, disk in zip(sources, spec.disks, strict=True):
            src.set("file", str(disk.image))
        for el in saved.iterfind("devices/*[@type='file']/source[@path]"):
            el.set("path", str(spec.console_log))
        ET.register_namespace("vml", NS)
        _rewrite_save_image(spec.memory_state, ET.tostring(saved, encoding="unicode"))
        conn.restoreFlags(str(spec.memory_state), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)
        dom = conn.lookupByName(spec.area)
        if not dom.isPersistent():
            conn.defineXML(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))

    def _domain(self, conn, rec: VmRecord):
        """The domain of ``rec``, or None if libvirt does not know it."""
        libvirt = _libvirt()
        try:
            return conn.lookupByName(rec.vm)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"libvirt could not look up domain {rec.vm}: {_message(e)}") from None

    def state(self, rec: VmRecord) -> str:
        libvirt = _libvirt()
        try:
            conn = self._connect(rec.details["connect"])
        except HypervisorError:
            return "unreachable"
        try:
            dom = self._domain(conn, rec)
            if dom is None:
                return "gone"
            st, _ = dom.state()
        except (HypervisorError, libvirt.libvirtError):
            return "unreachable"
        finally:
            conn.close()
        if st in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
            return "running"
        if st in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
            return "paused"
        return "stopped"

    def stop(self, rec: VmRecord, force: bool, timeout: float) -> str:
        libvirt = _libvirt()
        conn = self._connect(rec.details["connect"])
        try:
            dom = self._domain(conn, rec)
            if dom is None or not dom.isActive():
                return "had already stopped"
            if not force:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                if wait_until(lambda: not dom.isActive(), timeout, 0.5):
                    return "shut down"
            try:
                dom.destroy()
            except libvirt.libvirtError as e:
                if dom.isActive():
                    raise HypervisorError(f"libvirt could not stop domain {rec.vm}: {_message(e)}") from None
            return "destroyed" if force else f"did not shut down in {timeout:g} s: destroyed"
        finally:
            conn.close()

    def release(self, rec: VmRecord) -> None:
        libvirt = _libvirt()
        conn = self._connect(rec.details["connect"])
        try:
            dom = self._domain(conn, rec)
            if dom is not None:
                try:
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
                except libvirt.libvirtError as e:
                    raise HypervisorError(f"libvirt could not undefine domain {rec.vm}: {_message(e)}") from None
        finally:
            conn.close()

    def _check_local_qemu(self, uri: str) -> None:
        if not _local_qemu(uri):
            raise UsageError(
                f"saving or resuming a running VM's memory works with a local QEMU/KVM (qemu:///...), not {uri}: "
                "stop the VM to save its disks"
            )

    def save_memory(self, rec: VmRecord, path: Path) -> None:
        libvirt = _libvirt()
        self._check_local_qemu(rec.details["connect"])
        conn = self._connect(rec.details["connect"])
        try:
            dom = self._domain(conn, rec)
            if dom is None:
                raise HypervisorError(f"domain {rec.vm} is gone")
            dom.save(str(path))  # pauses the VM, writes its memory, then stops it
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt could not save the state of domain {rec.vm}: {_message(e)}") from None
        finally:
            conn.close()

    def resume(self, rec: VmRecord, path: Path) -> None:
        libvirt = _libvirt()
        conn = self._connect(rec.details["connect"])
        try:
            conn.restoreFlags(str(path), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)
        except libvirt.libvirtError as e:
            raise HypervisorError(
                f"libvirt could not resume domain {rec.vm} from {path}: {_message(e)}; "
                f"the state is kept there (virsh restore {path})"
            ) from None
        finally:
            conn.close()


SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_HEADER = struct.Struct("<16s5I56x")  # magic, version, data_len, was_running, compressed, cookie_offset


def _rewrite_save_image(path: Path, xml: str) -> None:
    """Replace the domain XML in the header of a libvirt QEMU save image, keeping its cookie.

    libvirt leaves room after the XML for such edits (`virsh
    save-image-edit`), but refuses a new name or UUID there; the XML here
    differs from the saved one only in name, UUID, metadata and file paths.
    """
    with open(path, "r+b") as f:
        head = f.read(SAVE_HEADER.size)
        if len(head) < SAVE_HEADER.size:
            raise HypervisorError(f"{path}: not a libvirt save image (too short)")
        magic, version, data_len, running, compressed, cookie_at = SAVE_HEADER.unpack(head)
        if magic != SAVE_MAGIC or version != 2:
            raise HypervisorError(f"{path}: not a libvirt QEMU save image of format 2")
        data = f.read(data_len)
        if cookie_at:
            end = data.find(b"\0", cookie_at)
            cookie = data[cookie_at : end if end >= 0 else len(data)]
        else:
            cookie = b""
        body = xml.encode() + b"\0"
        new = body + cookie + b"\0" if cookie else body
        if len(new) > data_len:
            raise HypervisorError(f"{path}: the new domain XML does not fit the save image's header")
        f.seek(0)
        f.write(SAVE_HEADER.pack(magic, version, data_len, running, compressed, len(body) if cookie else 0))
        f.write(new + bytes(data_len - len(new)))
        f.flush()
        os.fsync(f.fileno())


DRIVER = LibvirtDriver
