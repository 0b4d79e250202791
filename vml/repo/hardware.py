"""The virtual hardware an entry runs on, in a neutral description.

Each hypervisor driver turns it into its own configuration (libvirt domain
XML, a VMware config spec, a QEMU command line). Saving a VM directory
reads it from the VMware ``.vmx`` or libvirt domain XML found there, as far
as the two map onto it; an entry saved from a bare image gets the defaults.
A manifest keeps it under ``"hardware"``; entries saved on a parent inherit
the parent's.
"""

import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import BadSource, UsageError

BUSES = ("virtio", "ide", "sata", "scsi", "nvme")
NIC_MODELS = ("virtio", "e1000", "e1000e", "rtl8139", "vmxnet3")
FIRMWARES = ("bios", "uefi")
CONSOLES = ("serial", "graphics")
MAX_MEMORY_MIB = 1 << 24  # 16 TiB
MAX_VCPUS = 1024


@dataclass(frozen=True)
class DiskSlot:
    """Where a disk of the entry is attached: its bus, in boot order."""

    name: str
    bus: str = "virtio"


@dataclass(frozen=True)
class Nic:
    model: str = "virtio"
    mac: str = ""


@dataclass(frozen=True)
class Hardware:
    memory_mib: int = 1024
    vcpus: int = 1
    arch: str = "x86_64"
    firmware: str = "bios"
    disks: tuple[DiskSlot, ...] = ()
    nics: tuple[Nic, ...] = (Nic(),)
    kernel: str = ""  # direct kernel boot: files of the entry
    initrd: str = ""
    cmdline: str = ""
    console: str = "serial"
    source: str = "default"  # where the description came from: default, vmx, libvirt
    extra: dict = field(default_factory=dict, compare=False)  # unknown keys of a newer writer

    def __post_init__(self):
        check(self)

    def to_json(self) -> dict:
        doc = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**self.extra, **doc}

    @classmethod
    def from_json(cls, doc) -> "Hardware":
        """Read a manifest's description; ValueError or TypeError if it is malformed."""
        if not isinstance(doc, dict):
            raise TypeError("hardware is not a JSON object")
        known = {k for k in cls.__dataclass_fields__ if k != "extra"}
        fields = {k: v for k, v in doc.items() if k in known}
        if "disks" in fields:
            fields["disks"] = tuple(DiskSlot(**_obj(d, ("name", "bus"))) for d in _list(fields["disks"]))
        if "nics" in fields:
            fields["nics"] = tuple(Nic(**_obj(n, ("model", "mac"))) for n in _list(fields["nics"]))
        return cls(**fields, extra={k: v for k, v in doc.items() if k not in known})

    def slots(self, disk_names: list[str]) -> list[DiskSlot]:
        """A slot for each disk of the entry: described ones first, in their order, then the rest on virtio."""
        known, named = [], set()
        for s in self.disks:
            if s.name in disk_names and s.name not in named:  # never the same image twice
                known.append(s)
                named.add(s.name)
        return known + [DiskSlot(n) for n in disk_names if n not in named]

    def with_options(self, memory_mib: int | None = None, vcpus: int | None = None) -> "Hardware":
        """This description with the memory or vCPUs a boot asks for."""
        changes = {}
        if memory_mib:
            changes["memory_mib"] = memory_mib
        if vcpus:
            changes["vcpus"] = vcpus
        try:
            return replace(self, **changes)
        except ValueError as e:
            raise UsageError(f"--memory or --vcpus: {e}") from None


def check(hw: Hardware) -> None:
    """Raise ValueError or TypeError if a field is out of range or of the wrong type."""
    for name, value, hi in (("memory_mib", hw.memory_mib, MAX_MEMORY_MIB), ("vcpus", hw.vcpus, MAX_VCPUS)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
            raise ValueError(f"{name} {value!r} out of range 1..{hi}")
    for name, value, allowed in (("firmware", hw.firmware, FIRMWARES), ("console", hw.console, CONSOLES)):
        if value not in allowed:
            raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
    for name in ("arch", "kernel", "initrd", "cmdline", "source"):
        if not isinstance(getattr(hw, name), str):
            raise TypeError(f"{name} is not a string")
    if not re.fullmatch(r"[a-z0-9_]{1,20}", hw.arch):
        raise ValueError(f"architecture {hw.arch!r} is not valid")
    for d in hw.disks:
        if not isinstance(d.name, str) or d.bus not in BUSES:
            raise ValueError(f"disk {d.name!r}: bus {d.bus!r} is not one of {', '.join(BUSES)}")
    for n in hw.nics:
        if n.model not in NIC_MODELS:
            raise ValueError(f"network model {n.model!r} is not one of {', '.join(NIC_MODELS)}")
        if not isinstance(n.mac, str) or (n.mac and not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", n.mac)):
            raise ValueError(f"MAC address {n.mac!r} is not valid")
    if hw.initrd and not hw.kernel:
        raise ValueError("an initrd without a kernel")
    for name in (hw.kernel, hw.initrd):  # names of the entry's own files, never paths
        if (name and not re.fullmatch(r"[A-Za-z0-9_.+-]{1,255}", name)) or name in (".", ".."):
            raise ValueError(f"kernel or initrd {name!r} is not a file name of the entry")


def _obj(v, keys: tuple[str, ...]) -> dict:
    if not isinstance(v, dict):
        raise TypeError("expected a JSON object")
    return {k: v[k] for k in keys if k in v}


def _list(v) -> list:
    if not isinstance(v, list):
        raise TypeError("expected a list")
    return v


# -- reading a VM directory's description ------------------------------------

VMX_BUSES = {"ide": "ide", "sata": "sata", "scsi": "scsi", "nvme": "nvme"}
VMX_NICS = {"vmxnet3": "vmxnet3", "e1000": "e1000", "e1000e": "e1000e", "vmxnet": "vmxnet3", "vlance": "e1000"}
LIBVIRT_NICS = {"virtio": "virtio", "e1000": "e1000", "e1000e": "e1000e", "rtl8139": "rtl8139", "vmxnet3": "vmxnet3"}


def parse_vmx(path: Path, disk_of: dict[str, str]) -> Hardware:
    """The description in a VMware .vmx file; ``disk_of`` maps file names to the entry's disk names."""
    keys = {}
    for line in _read_text(path).splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, v = line.split("=", 1)
        keys[k.strip().lower()] = v.strip().strip('"')
    slots = []
    for k, v in keys.items():
        m = re.fullmatch(r"(ide|sata|scsi|nvme)(\d+):(\d+)\.filename", k)
        if m and Path(v).name in disk_of and keys.get(f"{m[1]}{m[2]}:{m[3]}.present", "false").lower() == "true":
            slots.append(((m[1], int(m[2]), int(m[3])), DiskSlot(disk_of[Path(v).name], VMX_BUSES[m[1]])))
    nics = []
    for i in range(10):
        if keys.get(f"ethernet{i}.present", "false").lower() != "true":
            continue
        mac = keys.get(f"ethernet{i}.address") or keys.get(f"ethernet{i}.generatedaddress") or ""
        nics.append(Nic(VMX_NICS.get(keys.get(f"ethernet{i}.virtualdev", "e1000").lower(), "e1000"), mac.lower()))
    try:
        return Hardware(
            memory_mib=int(keys.get("memsize", 1024)),
            vcpus=int(keys.get("numvcpus", 1)),
            firmware="uefi" if keys.get("firmware", "bios").lower() == "efi" else "bios",
            disks=tuple(s for _, s in sorted(slots, key=lambda p: p[0])),
            nics=tuple(nics),
            console="serial" if keys.get("serial0.present", "false").lower() == "true" else "graphics",
            source="vmx",
        )
    except (ValueError, TypeError) as e:
        raise BadSource(f"{path}: cannot read the VM's hardware ({e})") from None


def parse_domain_xml(path: Path, disk_of: dict[str, str], file_names: set[str]) -> Hardware:
    """The description in a libvirt domain XML file; kernel and initrd are kept if they are files of the entry."""
    try:
        root = ET.fromstring(_read_text(path))
    except ET.ParseError as e:
        raise BadSource(f"{path}: not valid XML ({e})") from None
    try:
        mem = root.find("memory")
        unit = (mem.get("unit") or "KiB") if mem is not None else "KiB"
        scale = {"b": 1 / (1 << 20), "bytes": 1 / (1 << 20), "kb": 1000 / (1 << 20), "mb": 1e6 / (1 << 20)}
        scale |= {"gb": 1e9 / (1 << 20), "tb": 1e12 / (1 << 20), "k": 1 / 1024, "kib": 1 / 1024, "m": 1, "mib": 1}
        scale |= {"g": 1024, "gib": 1024, "t": 1 << 20, "tib": 1 << 20}
        memory = int(int(mem.text) * scale[unit.lower()]) if mem is not None else 1024
        vcpus = int(root.findtext("vcpu", "1"))
        os_el = root.find("os")
        arch = "x86_64"
        firmware = "bios"
        kernel = initrd = cmdline = ""
        if os_el is not None:
            arch = (os_el.find("type").get("arch") if os_el.find("type") is not None else None) or arch
            loader = os_el.find("loader")
            if os_el.get("firmware") == "efi" or (loader is not None and loader.get("type") == "pflash"):
                firmware = "uefi"
            kernel, initrd = (_entry_file(os_el.findtext(k, ""), file_names) for k in ("kernel", "initrd"))
            cmdline = os_el.findtext("cmdline", "") if kernel else ""
        slots = []
        for disk in root.iterfind("devices/disk"):
            if disk.get("device", "disk") != "disk":
                continue
            src = disk.find("source")
            name = Path(src.get("file", "") if src is not None else "").name
            target = disk.find("target")
            bus = target.get("bus", "virtio") if target is not None else "virtio"
            if name in disk_of:
                slots.append(DiskSlot(disk_of[name], bus if bus in BUSES else "virtio"))
        nics = []
        for iface in root.iterfind("devices/interface"):
            model = iface.find("model")
            mac = iface.find("mac")
            nics.append(
                Nic(
                    LIBVIRT_NICS.get(model.get("type", "") if model is not None else "", "virtio"),
                    (mac.get("address", "") if mac is not None else "").lower(),
                )
            )
        console = "serial" if root.find("devices/serial") is not None else "graphics"
        return Hardware(
            memory, vcpus, arch, firmware, tuple(slots), tuple(nics), kernel, initrd, cmdline, console, "libvirt"
        )
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise BadSource(f"{path}: cannot read the VM's hardware ({e})") from None


def is_domain_xml(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return re.search(rb"^\s*(<\?xml[^>]*\?>\s*)?(<!--.*?-->\s*)*<domain[\s>]", head, re.S) is not None


def _entry_file(path: str, file_names: set[str]) -> str:
    name = Path(path).name if path else ""
    return name if name in file_names else ""


def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > 1 << 20:
            raise BadSource(f"{path}: too large for a VM description")
        return path.read_text(errors="replace")
    except OSError as e:
        raise BadSource(f"{path}: {e.strerror}") from None


def describe_directory(root: Path, disk_of: dict[str, str], file_names: set[str]) -> Hardware | None:
    """The hardware of a VM directory, from its .vmx or domain XML; None if it has neither."""
    vmx = sorted(p for p in root.glob("*.vmx") if p.is_file())
    xml = sorted(p for p in root.glob("*.xml") if p.is_file() and is_domain_xml(p))
    if len(vmx) + len(xml) > 1:
        found = ", ".join(p.name for p in vmx + xml)
        raise BadSource(f"{root}: more than one VM description ({found}); keep one")
    if vmx:
        return parse_vmx(vmx[0], disk_of)
    if xml:
        return parse_domain_xml(xml[0], disk_of, file_names)
    return None
