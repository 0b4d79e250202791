"""Booting working areas on real hypervisors: plain QEMU, libvirtd (QEMU under TCG), and
govmomi's vSphere simulator through pyvmomi. Also the hardware description
that entries keep, read from .vmx files and libvirt domain XML.
"""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import need
from helpers import mtype

WAIT = 180

DOMAIN_XML = """<domain type='kvm'>
  <name>from-libvirt</name>
  <memory unit='KiB'>262144</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/disk.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='default'/><mac address='52:54:00:12:34:56'/><model type='e1000'/>
    </interface>
    <serial type='pty'/>
  </devices>
</domain>
"""


@pytest.fixture(scope="session")
def libvirtd():
    need("libvirtd", "virtlogd", "virsh")
    pytest.importorskip("libvirt")
    from hypervisors import Libvirtd

    daemon = Libvirtd()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def vcsim_binary():
    need("go")
    pytest.importorskip("pyVmomi")
    if not Path("/usr/share/gocode/src/github.com/vmware/govmomi/simulator").is_dir():
        pytest.skip("needs golang-github-vmware-govmomi-dev")
    from hypervisors import build_vcsim

    return build_vcsim()


@pytest.fixture
def vcsim(vcsim_binary):
    from hypervisors import Vcsim

    sim = Vcsim(vcsim_binary)
    yield sim
    sim.stop()


@pytest.fixture
def guest_vm(tmp_path, guest_disk) -> Path:
    """A VM directory: the test guest's disk and a libvirt description (256 MiB, 1 vCPU)."""
    vm = tmp_path / "vm"
    vm.mkdir()
    shutil.copy(guest_disk, vm / "disk.img")
    (vm / "domain.xml").write_text(DOMAIN_XML)
    return vm


@pytest.fixture
def cleanup(vml):
    """Stop and close, at the end, every area a test left running."""
    yield
    r = vml("status", "--json", ok=False)
    for item in json.loads(r.stdout or "[]"):
        if item["state"] in ("running", "paused"):
            vml("stop", item["area"], "--force", ok=False)
        vml("close", item["area"], "--discard", ok=False)


def status(vml, area: str) -> dict:
    items = {i["area"]: i for i in json.loads(vml("status", "--json").stdout)}
    return items[area]


def wait_state(vml, area: str, state: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while status(vml, area)["state"] != state:
        assert time.monotonic() < deadline, f"area {area} did not become {state}: {status(vml, area)}"
        time.sleep(0.5)


def console(home: Path, area: str) -> str:
    path = home / "areas" / area / "console.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_console(home: Path, area: str, pattern: str, timeout: float = WAIT, first: bool = False) -> re.Match:
    """The last (or ``first``) match of ``pattern`` in the console log, once there is one."""
    deadline = time.monotonic() + timeout
    while True:
        matches = list(re.finditer(pattern, console(home, area)))
        if matches:
            return matches[0 if first else -1]
        assert time.monotonic() < deadline, f"no {pattern!r} on the console of {area}:\n{console(home, area)[-2000:]}"
        time.sleep(0.5)


def guest_wrote(image: Path) -> str:
    r = mtype(image, "GUEST.TXT")
    return r.stdout.strip() if r.returncode == 0 else ""


EXPECTED = "guest read: hello from the base image tag: base"


# -- the hardware description ----------------------------------------------------


def test_a_libvirt_vm_directory_keeps_its_description(vml, tmp_path, guest_vm):
    vml("init", tmp_path / "rep1")
    vml("save", "guest", "--from", guest_vm)
    hw = json.loads(vml("show", "guest", "--json").stdout)["hardware"]
    assert hw["source"] == "libvirt" and hw["memory_mib"] == 256 and hw["vcpus"] == 1
    assert hw["disks"] == [{"name": "disk", "bus": "virtio"}]
    assert hw["nics"] == [{"model": "e1000", "mac": "52:54:00:12:34:56"}] and hw["console"] == "serial"
    assert "256 MiB, 1 vCPU" in vml("show", "guest").stdout
    # An entry saved on it from a bare image keeps the parent's description.
    vml("save", "next", "--from", guest_vm / "disk.img", "--parent", "guest")
    assert json.loads(vml("show", "next", "--json").stdout)["hardware"] == hw


def test_a_vmware_vm_directory_keeps_its_description(vml, tmp_path):
    need("qemu-img")
    vm = tmp_path / "vmware-vm"
    vm.mkdir()
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\1" * (1 << 20))
    subprocess.run(
        ["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", raw, vm / "sys.vmdk"], check=True
    )
    (vm / "cernvm.vmx").write_text(
        '.encoding = "UTF-8"\nmemsize = "2048"\nnumvcpus = "2"\nfirmware = "efi"\n'
        'scsi0.present = "TRUE"\nscsi0.virtualDev = "pvscsi"\nscsi0:0.present = "TRUE"\n'
        'scsi0:0.fileName = "sys.vmdk"\nethernet0.present = "TRUE"\nethernet0.virtualDev = "vmxnet3"\n'
        'ethernet0.addressType = "generated"\nethernet0.generatedAddress = "00:0C:29:AB:CD:EF"\n'
    )
    vml("init", tmp_path / "rep1")
    vml("save", "cernvm", "--from", vm)
    info = json.loads(vml("show", "cernvm", "--json").stdout)
    hw = info["hardware"]
    assert (hw["source"], hw["memory_mib"], hw["vcpus"], hw["firmware"]) == ("vmx", 2048, 2, "uefi")
    assert hw["disks"] == [{"name": "sys", "bus": "scsi"}]
    assert hw["nics"] == [{"model": "vmxnet3", "mac": "00:0c:29:ab:cd:ef"}]
    assert [f["name"] for f in info["files"]] == ["cernvm.vmx"]  # kept as a file too


def test_a_bad_description_is_refused_naming_the_file(vml, tmp_path, guest_vm):
    (guest_vm / "domain.xml").write_text(DOMAIN_XML.replace("<vcpu>1</vcpu>", "<vcpu>many</vcpu>"))
    vml("init", tmp_path / "rep1")
    err = vml.fails("save", "guest", "--from", guest_vm, status=9)
    assert "domain.xml" in err and "hardware" in err
    assert "(repository rep1 has no entries)" in vml("log").stdout


# -- plain QEMU ----------------------------------------------------------------------


def test_qemu_boots_the_guest_from_an_area_and_its_write_is_saved(vml, home, mounted, tmp_path, guest_vm, cleanup):
    need("qemu-system-x86_64")
    vml("init", tmp_path / "rep1")
    vml("save", "guest", "--from", guest_vm)
    out = vml("open", "guest", "--area", "q", "--boot", "qemu", "--accel", "tcg").stdout
    assert "booted area q on qemu" in out and "256 MiB" in out
    wait_state(vml, "q", "stopped")  # the guest powers itself off
    assert "VML-GUEST-DONE" in console(home, "q")
    vml("save", "after-qemu", "--area", "q")
    assert guest_wrote(mounted / "rep1" / "after-qemu" / "disk.img") == EXPECTED


def test_qemu_stop_powers_off_a_guest_that_ignores_acpi(vml, home, mounted, tmp_path, guest_vm, cleanup):
    need("qemu-system-x86_64", "mcopy")
    subprocess.run(["mcopy", "-i", guest_vm / "disk.img", "-", "::STAY.TXT"], input=b"stay\n", check=True)
    vml("init", tmp_path / "rep1")
    vml("save", "stayer", "--from", guest_vm)
    vml("open", "stayer", "--area", "q", "--boot", "qemu", "--accel", "tcg")
    wait_console(home, "q", r"VML-GUEST-ALIVE \d+")
    assert status(vml, "q")["state"] == "running"
    err = vml.fails("save", "x", "--area", "q", status=2)
    assert "vml stop q" in err
    assert "did not shut down in 1 s: powered off" in vml("stop", "q", "--timeout", "1").stdout
    assert status(vml, "q")["state"] == "stopped"


# -- libvirt ---------------------------------------------------------------------------


def test_libvirt_boots_the_guest_as_a_qemu_domain_and_save_captures_its_write(
    vml, home, mounted, tmp_path, guest_vm, libvirtd, cleanup
):
    vml("init", tmp_path / "rep1")
    vml("save", "guest", "--from", guest_vm)
    out = vml("open", "guest", "--area", "lv", "--boot", "libvirt", "--accel", "tcg").stdout
    assert "booted area lv on libvirt (qemu:///system) as lv" in out
    xml = libvirtd.virsh("dumpxml", "lv").stdout
    assert "type='qemu'" in xml and f"{mounted}/areas/lv/disk.img" in xml and "<memory unit='KiB'>262144<" in xml
    wait_state(vml, "lv", "stopped")
    assert "VML-GUEST-DONE" in console(home, "lv")
    out = vml("save", "after-libvirt", "--area", "lv").stdout
    assert "memory state" not in out  # the VM had stopped: disks only
    assert guest_wrote(mounted / "rep1" / "after-libvirt" / "disk.img") == EXPECTED
    vml("close", "lv")
    assert "lv" not in libvirtd.domains()  # undefined with its area


def test_libvirt_saves_a_running_guest_with_its_memory_and_reopening_resumes_it(
    vml, home, mounted, tmp_path, guest_vm, libvirtd, cleanup
):
    subprocess.run(["mcopy", "-i", guest_vm / "disk.img", "-", "::STAY.TXT"], input=b"stay\n", check=True)
    vml("init", tmp_path / "rep1")
    vml("save", "stayer", "--from", guest_vm)
    vml("open", "stayer", "--area", "run1", "--boot", "libvirt", "--accel", "tcg")
    before = int(wait_console(home, "run1", r"VML-GUEST-ALIVE (\d+)")[1])
    out = vml("save", "running", "--area", "run1", "-m", "while it runs").stdout
    assert "with the running VM's memory state" in out
    assert status(vml, "run1")["state"] == "running"  # resumed after the save
    # Saved twice while running: the second state is stored as a delta of the first.
    vml("save", "running2", "--area", "run1")
    info = json.loads(vml("show", "running2", "--json").stdout)
    assert [f["name"] for f in info["files"]] == ["domain.xml", "vml-memory.state"]
    assert info["hardware"]["memory_mib"] == 256 and info["parent"] == "running"
    assert guest_wrote(mounted / "rep1" / "running2" / "disk.img") == EXPECTED  # the disks were saved too
    # Reopened in another area, the saved state resumes: the count goes on, nothing boots.
    vml("open", "running2", "--area", "run2", "--boot", "libvirt", "--accel", "tcg")
    first = int(wait_console(home, "run2", r"VML-GUEST-ALIVE (\d+)", first=True)[1])
    later = int(wait_console(home, "run2", rf"VML-GUEST-ALIVE ({first + 2})")[1])
    log = console(home, "run2")
    assert before < first < later and "VML-GUEST-DONE" not in log, log[:2000]  # DONE is printed at boot
    assert {"run1", "run2"} <= libvirtd.domains()

    # A save cut short after libvirt wrote the state: the next boot resumes it.
    code = (
        "import sys; from pathlib import Path; from vml.layout import MEMORY_FILE; from vml.vms import boot\n"
        "from vml.vms.hypervisors import driver\n"
        "home = Path(sys.argv[1]); rec = boot.load_record(home, 'run1')\n"
        "driver('libvirt', {}).save_memory(rec, home / 'areas' / 'run1' / MEMORY_FILE)"
    )
    subprocess.run([sys.executable, "-c", code, str(home)], check=True)
    cut = int(wait_console(home, "run1", r"VML-GUEST-ALIVE (\d+)")[1])
    assert status(vml, "run1")["state"] == "stopped"
    log = home / "areas" / "run1" / "console.log"
    log.rename(log.with_name("console.before"))  # libvirt may start the log afresh when it restores
    vml("boot", "run1", "--hypervisor", "libvirt", "--accel", "tcg")
    assert int(wait_console(home, "run1", r"VML-GUEST-ALIVE (\d+)", first=True)[1]) == cut + 1
    assert not (home / "areas" / "run1" / "vml-memory.state").exists()

    # Once the area's disk has changed, the entry's state no longer fits it: a fresh boot.
    vml("stop", "run2", "--force")
    subprocess.run(["mcopy", "-i", mounted / "areas" / "run2" / "disk.img", "-", "::NOTE.TXT"], input=b"x", check=True)
    vml("boot", "run2", "--hypervisor", "libvirt", "--accel", "tcg")
    wait_console(home, "run2", "VML-GUEST-DONE")
    # Saved once stopped, the stale memory state is left out.
    vml("stop", "run2", "--force")
    vml("save", "stopped", "--area", "run2")
    assert [f["name"] for f in json.loads(vml("show", "stopped", "--json").stdout)["files"]] == ["domain.xml"]


def test_libvirt_refusals_leave_nothing_behind(vml, home, mounted, tmp_path, guest_vm, libvirtd, cleanup):
    vml("init", tmp_path / "rep1")
    vml("save", "guest", "--from", guest_vm)
    # A domain VML did not define keeps its name.
    foreign = tmp_path / "foreign.xml"
    foreign.write_text(DOMAIN_XML.replace("from-libvirt", "taken").replace("type='kvm'", "type='qemu'"))
    assert libvirtd.virsh("define", str(foreign)).returncode == 0
    try:
        err = vml.fails("open", "guest", "--area", "taken", "--boot", "libvirt", "--accel", "tcg", status=15)
        assert "already has a domain named 'taken' that VML did not define" in err
        assert "<memory unit='KiB'>262144<" in libvirtd.virsh("dumpxml", "taken").stdout  # untouched
        assert status_areas(vml) == []  # the area opened for it was closed again
    finally:
        libvirtd.virsh("undefine", "taken")
    # No libvirt at that address.
    err = vml.fails(
        "open", "guest", "--area", "x", "--boot", "libvirt", "--connect", "qemu+unix:///system?socket=/nonexistent"
    )
    assert "cannot reach libvirt" in err and "--connect" in err
    # A VM that does not start: more vCPUs than the machine type has.
    err = vml.fails("open", "guest", "--area", "huge", "--boot", "libvirt", "--accel", "tcg", "--vcpus", "1000")
    assert "did not start area huge" in err
    assert "huge" not in libvirtd.domains() and status_areas(vml) == []
    # An area that already runs.
    shutil.copy(guest_vm / "disk.img", tmp_path / "stay.img")
    subprocess.run(["mcopy", "-i", tmp_path / "stay.img", "-", "::STAY.TXT"], input=b"stay\n", check=True)
    vml("save", "stayer", "--from", tmp_path / "stay.img", "--parent", "guest")
    vml("open", "stayer", "--area", "busy", "--boot", "libvirt", "--accel", "tcg")
    err = vml.fails("boot", "busy", "--hypervisor", "qemu", "--accel", "tcg", status=2)
    assert "already runs on libvirt" in err and "vml stop busy" in err
    err = vml.fails("close", "busy", status=2)
    assert "vml stop busy" in err
    assert "did not shut down in 1 s: destroyed" in vml("stop", "busy", "--timeout", "1").stdout


def status_areas(vml) -> list[str]:
    return [i["area"] for i in json.loads(vml("status", "--json").stdout)]


def test_the_xen_domain_xml_validates(vml, mounted, tmp_path, guest_vm):
    need("virt-xml-validate")
    vml("init", tmp_path / "rep1")
    vml("save", "guest", "--from", guest_vm)
    vml("open", "guest", "--area", "xen")
    for uri in ("xen:///system", "qemu:///system"):
        xml = vml("boot", "xen", "--hypervisor", "libvirt", "--connect", uri, "--dry-run").stdout
        path = tmp_path / "domain.xml"
        path.write_text(xml)
        r = subprocess.run(["virt-xml-validate", path, "domain"], capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr + xml
        if uri.startswith("xen"):
            assert 'type="xen"' in xml and 'bus="xen"' in xml and "xvda" in xml


# -- VMware --------------------------------------------------------------------------------


def vmware_env(vml, sim, password: str = "pass") -> None:
    vml.env.update(VML_VMWARE_HOST=sim.url, VML_VMWARE_USER="user", VML_VMWARE_PASSWORD=password)


def test_vmware_registers_powers_and_unregisters_a_vm_on_the_mount(vml, mounted, tmp_path, guest_vm, vcsim, cleanup):
    from pyVmomi import vim

    si = vcsim.connect()
    content = si.RetrieveContent()
    host = content.viewManager.CreateContainerView(content.rootFolder, [vim.HostSystem], True).view[0]
    host.configManager.datastoreSystem.CreateLocalDatastore("vml", str(mounted))
    vml("init", tmp_path / "rep1")
    vml("save", "guest", "--from", guest_vm)
    vmware_env(vml, vcsim)

    def find():
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True).view
        return {vm.name: vm for vm in view}.get("vw")

    # A datastore that does not reach the mount is reported, and nothing is registered.
    err = vml.fails("open", "guest", "--area", "vw", "--boot", "vmware", "--datastore", "LocalDS_0", status=15)
    assert "does not see the mount through datastore LocalDS_0" in err and find() is None

    vml("open", "guest", "--area", "vw", "--boot", "vmware", "--datastore", "vml")
    vm = find()
    assert vm.runtime.powerState == "poweredOn" and vm.config.hardware.memoryMB == 256
    disks = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    assert [d.backing.fileName for d in disks] == ["[vml] areas/vw/disk.vmdk"]
    assert vm.config.files.vmPathName.startswith("[LocalDS_0] vml-vw/")  # its own files are not in the entry
    item = status(vml, "vw")
    assert (item["hypervisor"], item["state"]) == ("vmware", "running")

    assert "powered off" in vml("stop", "vw").stdout
    assert find().runtime.powerState == "poweredOff" and status(vml, "vw")["state"] == "stopped"
    vml("close", "vw")
    assert find() is None  # unregistered
    # UnregisterVM, not Destroy_Task: the entry's disk is whole.
    assert "ok" in vml("verify").stdout
    assert mtype(mounted / "rep1" / "guest" / "disk.img", "BASE.TXT").stdout == "hello from the base image\n"


def test_vmware_wrong_password_and_unreachable_host(vml, mounted, tmp_path, guest_vm, vcsim, cleanup):
    vml("init", tmp_path / "rep1")
    vml("save", "guest", "--from", guest_vm)
    vmware_env(vml, vcsim, password="wrong")
    err = vml.fails("open", "guest", "--area", "vw", "--boot", "vmware", "--datastore", "vml", status=15)
    assert "refused user 'user': wrong user name or password" in err
    from servers import free_port

    vmware_env(vml, vcsim)
    dead = f"http://127.0.0.1:{free_port()}/sdk"
    err = vml.fails("open", "guest", "--area", "vw", "--boot", "vmware", "--datastore", "vml", "--host", dead)
    assert f"cannot reach VMware host {dead}" in err
    assert status_areas(vml) == []


def test_descriptions_this_version_cannot_use_leave_the_entry_readable():
    from vml.repo.hardware import Hardware
    from vml.repo.manifest import Manifest

    m = Manifest(name="e", kind="full", created="2026-11-22T00:00:00Z", chunk_size=4096, disks=())
    assert b"hardware" not in m.encode()  # entries without one keep their old encoding
    doc = json.loads(m.encode())
    for hw in ({"memory_mib": 512, "firmware": "coreboot"}, {"kernel": "../../etc/shadow"}):
        doc["hardware"] = hw
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        decoded = Manifest.decode(data, "test")
        assert decoded.hardware is None and decoded.encode() == data  # kept as it was, not used
    for bad in ({"kernel": "/etc/passwd"}, {"initrd": "x"}, {"memory_mib": 0}, {"disks": [{"name": "d", "bus": "fd"}]}):
        with pytest.raises((ValueError, TypeError)):
            Hardware.from_json(bad)
    hw = Hardware.from_json({"disks": [{"name": "a", "bus": "ide"}, {"name": "a", "bus": "scsi"}]})
    assert [s.bus for s in hw.slots(["a", "b"])] == ["ide", "virtio"]  # one slot per disk, never twice
