"""VMware ESXi or vCenter through the vSphere API (pyvmomi).

The host reaches the area's disks through a datastore whose root is the
mount point (an NFS export of it, or a local datastore on the same
machine): the VM's disks are the area's ``.vmdk`` descriptors there, used
as they are (no copy, no new disk). The VM's own files (.vmx, logs, NVRAM)
go to another, writable datastore, in ``vml-AREA/``. Closing the area
unregisters the VM with UnregisterVM and deletes only that folder; never
Destroy_Task, which would delete the disks from the datastore.

Credentials come from --host/--user/--password or VML_VMWARE_HOST,
VML_VMWARE_USER, VML_VMWARE_PASSWORD.
"""

import contextlib
import os
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from ...errors import HypervisorError, UsageError
from ...times import now_iso
from . import Driver, Option, VmRecord, VmSpec, wait_until

TIMEOUT = 30
NIC_CLASSES = {"vmxnet3": "VirtualVmxnet3", "e1000": "VirtualE1000", "e1000e": "VirtualE1000e"}
TAG = "vml:"


def _vim():
    try:
        from pyVim import connect
        from pyVmomi import vim
    except ImportError:
        raise HypervisorError("the vmware driver needs pyvmomi (pip install pyvmomi)") from None
    return connect, vim


class VmwareDriver(Driver):
    name = "vmware"
    OPTIONS = (
        Option("--host", "https://HOST/sdk (or VML_VMWARE_HOST)", "URL"),
        Option("--user", "user name (or VML_VMWARE_USER)", "USER"),
        Option("--password", "better given as VML_VMWARE_PASSWORD", "PASSWORD"),
        Option("--datastore", "the datastore whose root is the mount point", "NAME"),
        Option("--vm-datastore", "where the VM's own files go (default: another)", "NAME"),
        Option("--network", "a port group (default: VM Network)", "NAME"),
        Option("--insecure", "do not verify the host's TLS certificate", switch=True),
    )

    def _setting(self, key: str, required: bool = True) -> str:
        value = self.options.get(key) or os.environ.get(f"VML_VMWARE_{key.upper()}", "")
        if required and not value:
            raise UsageError(f"VMware needs --{key} (or VML_VMWARE_{key.upper()} in the environment)")
        return value

    def _connect(self, host: str | None = None, user: str | None = None):
        connect, vim = _vim()
        url = host or self._setting("host")
        parts = urlsplit(url if "://" in url else f"https://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"VMware host {url!r}: use https://HOST[:PORT][/sdk]")
        user = user or self._setting("user")
        kwargs = {}
        if parts.scheme == "https":
            if self.options.get("insecure"):
                kwargs["disableSslCertValidation"] = True
            else:
                kwargs["sslContext"] = ssl.create_default_context()
        try:
            return connect.SmartConnect(
                protocol=parts.scheme,
                host=parts.hostname,
                port=parts.port or (443 if parts.scheme == "https" else 80),
                path=parts.path or "/sdk",
                user=user,
                pwd=self._setting("password"),
                httpConnectionTimeout=TIMEOUT,
                connectionPoolTimeout=TIMEOUT,
                **kwargs,
            )
        except vim.fault.InvalidLogin:
            raise HypervisorError(f"VMware host {url} refused user {user!r}: wrong user name or password") from None
        except (TimeoutError, OSError, ssl.SSLError) as e:
            raise HypervisorError(f"cannot reach VMware host {url} ({e}): check --host and the network") from None
        except Exception as e:  # pyvmomi raises its own types for protocol-level failures
            raise HypervisorError(f"VMware host {url} did not answer as vSphere does ({e})") from None

    @staticmethod
    def _disconnect(si) -> None:
        connect, _ = _vim()
        with contextlib.suppress(Exception):
            connect.Disconnect(si)

    @staticmethod
    def _all(si, kind) -> list:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
        try:
            return list(view.view)
        finally:
            view.Destroy()

    @staticmethod
    def _wait(task, what: str):
        _, vim = _vim()
        busy = (vim.TaskInfo.State.queued, vim.TaskInfo.State.running)
        if not wait_until(lambda: task.info.state not in busy, 600):
            raise HypervisorError(f"VMware did not finish {what} in 600 s")
        if task.info.state != vim.TaskInfo.State.success:
            err = task.info.error
            msg = getattr(err, "msg", None) or str(err)
            raise HypervisorError(f"VMware could not {what}: {msg}")
        return task.info.result

    def _find_vm(self, si, name: str):
        _, vim = _vim()
        for vm in self._all(si, vim.VirtualMachine):
            if vm.name == name:
                return vm
        return None

    @staticmethod
    def _tag(spec_home: Path, area: str) -> str:
        return f"{TAG}home={spec_home};area={area}"

    # -- life cycle ----------------------------------------------------------

    def start(self, spec: VmSpec) -> VmRecord:
        if spec.memory_state:
            raise UsageError("VMware does not resume a libvirt memory state: boot this entry with libvirt")
        _, vim = _vim()
        host_url = self._setting("host")
        si = self._connect(host_url)
        try:
            datastores = {ds.name: ds for ds in self._all(si, vim.Datastore)}
            ds_name = self._setting("datastore")
            if ds_name not in datastores:
                raise HypervisorError(
                    f"VMware host {host_url} has no datastore {ds_name!r} (it has {', '.join(sorted(datastores))})"
                )
            rel = spec.mount_dir.relative_to(spec.mountpoint).as_posix()
            self._check_sees_mount(datastores[ds_name], ds_name, rel, spec)
            vm_ds = self.options.get("vm_datastore") or next((n for n in sorted(datastores) if n != ds_name), None)
            if vm_ds is None or vm_ds not in datastores:
                raise HypervisorError(
                    f"VMware host {host_url} has no writable datastore for the VM's own files: name one "
                    f"with --vm-datastore (the entry's datastore {ds_name} is read-only)"
                )
            old = self._find_vm(si, spec.area)
            if old is not None:
                if (old.config.annotation if old.config else "") != self._tag(spec.home, spec.area):
                    raise HypervisorError(
                        f"VMware host {host_url} already has a VM named {spec.area!r} that VML did not register: "
                        "open the entry in an area of another name (--area)"
                    )
                if old.runtime.powerState != vim.VirtualMachinePowerState.poweredOff:
                    raise HypervisorError(f"VM {spec.area!r} on {host_url} is already running: `vml stop` first")
            dc = next(iter(self._all(si, vim.Datacenter)))
            if old is not None:
                old.UnregisterVM()
                self._delete_folder(si, dc, vm_ds, spec.area)
            config = self._config(spec, ds_name, rel, vm_ds)
            compute = next(iter(self._all(si, vim.ComputeResource)))
            try:
                vm = self._wait(
                    dc.vmFolder.CreateVM_Task(config=config, pool=compute.resourcePool), f"register VM {spec.area}"
                )
            except BaseException:
                self._delete_folder(si, dc, vm_ds, spec.area)
                raise
            try:
                self._wait(vm.PowerOnVM_Task(), f"power on VM {spec.area}")
            except BaseException:
                with contextlib.suppress(Exception):
                    vm.UnregisterVM()
                self._delete_folder(si, dc, vm_ds, spec.area)
                raise
            details = {"host": host_url, "user": self._setting("user"), "vm_datastore": vm_ds, "datastore": ds_name}
            details["tag"] = config.annotation
            return VmRecord(spec.area, self.name, spec.area, now_iso(), spec.hardware.to_json(), details)
        finally:
            self._disconnect(si)

    def _check_sees_mount(self, ds, ds_name: str, rel: str, spec: VmSpec) -> None:
        """Raise unless the datastore shows the area's first disk descriptor where the mount has it."""
        _, vim = _vim()
        want = spec.disks[0].vmdk.name
        search = vim.host.DatastoreBrowser.SearchSpec(matchPattern=[want])
        try:
            found = self._wait(
                ds.browser.SearchDatastore_Task(datastorePath=f"[{ds_name}] {rel}", searchSpec=search), "browse"
            )
            ok = any(f.path == want for f in found.file)
        except HypervisorError:
            ok = False
        if not ok:
            raise HypervisorError(
                f"the VMware host does not see the mount through datastore {ds_name} ([{ds_name}] {rel}/{want} "
                f"is missing): make the datastore's root the mount point {spec.mountpoint} (an NFS export of it), "
                "or name the right datastore with --datastore"
            )

    def _config(self, spec: VmSpec, ds_name: str, rel: str, vm_ds: str):
        _, vim = _vim()
        hw = spec.hardware
        changes = []
        ctrl_keys = {}
        buses = {d.bus for d in spec.disks}
        if buses - {"ide"}:
            ctrl = vim.vm.device.ParaVirtualSCSIController(key=1000, busNumber=0)
            ctrl.sharedBus = vim.vm.device.VirtualSCSIController.Sharing.noSharing
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=ctrl))
            ctrl_keys["scsi"] = 1000
        if "ide" in buses:
            ctrl_keys["ide"] = 200  # the IDE controller every VM has
        units: dict[int, int] = {}
        for i, d in enumerate(spec.disks):
            key = ctrl_keys["ide" if d.bus == "ide" else "scsi"]
            unit = units.get(key, 0)
            units[key] = unit + 1 + (1 if key == 1000 and unit + 1 == 7 else 0)  # SCSI unit 7 is the controller
            backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[{ds_name}] {rel}/{d.vmdk.name}", diskMode="persistent"
            )
            disk = vim.vm.device.VirtualDisk(
                key=2000 + i,
                controllerKey=key,
                unitNumber=unit,
                backing=backing,
                capacityInKB=-(-d.image.stat().st_size // 1024),
            )
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=disk))
        for i, nic in enumerate(hw.nics):
            cls = getattr(vim.vm.device, NIC_CLASSES.get(nic.model, "VirtualVmxnet3"))
            backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                deviceName=self.options.get("network") or "VM Network"
            )
            card = cls(key=4000 + i, backing=backing)
            if nic.mac:
                card.addressType, card.macAddress = "manual", nic.mac
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=card))
        return vim.vm.ConfigSpec(
            name=spec.area,
            memoryMB=hw.memory_mib,
            numCPUs=hw.vcpus,
            guestId="otherLinux64Guest",
            firmware="efi" if hw.firmware == "uefi" else "bios",
            annotation=self._tag(spec.home, spec.area),
            files=vim.vm.FileInfo(vmPathName=f"[{vm_ds}] vml-{spec.area}"),
            deviceChange=changes,
        )

    def _delete_folder(self, si, dc, vm_ds: str, area: str) -> None:
        with contextlib.suppress(Exception):
            fm = si.RetrieveContent().fileManager
            self._wait(fm.DeleteDatastoreFile_Task(name=f"[{vm_ds}] vml-{area}", datacenter=dc), "delete")

    def _ours(self, si, rec: VmRecord):
        """The VM of ``rec``, if it still exists and still carries our tag."""
        vm = self._find_vm(si, rec.vm)
        if vm is None or not vm.config or vm.config.annotation != rec.details["tag"]:
            return None
        return vm

    def state(self, rec: VmRecord) -> str:
        _, vim = _vim()
        try:
            si = self._connect(rec.details["host"], rec.details["user"])
        except (HypervisorError, UsageError):
            return "unreachable"
        try:
            vm = self._ours(si, rec)
            if vm is None:
                return "gone"
            power = vm.runtime.powerState
            return {
                vim.VirtualMachinePowerState.poweredOn: "running",
                vim.VirtualMachinePowerState.suspended: "paused",
            }.get(power, "stopped")
        finally:
            self._disconnect(si)

    def stop(self, rec: VmRecord, force: bool, timeout: float) -> str:
        _, vim = _vim()
        si = self._connect(rec.details["host"], rec.details["user"])
        try:
            vm = self._ours(si, rec)
            if vm is None or vm.runtime.powerState == vim.VirtualMachinePowerState.poweredOff:
                return "had already stopped"
            if not force and vm.guest and vm.guest.toolsRunningStatus == "guestToolsRunning":
                with contextlib.suppress(Exception):
                    vm.ShutdownGuest()
                off = vim.VirtualMachinePowerState.poweredOff
                if wait_until(lambda: vm.runtime.powerState == off, timeout, 0.5):
                    return "shut down"
            self._wait(vm.PowerOffVM_Task(), f"power off VM {rec.vm}")
            return "powered off" if force else "powered off (no orderly shutdown: VMware Tools do not run in it)"
        finally:
            self._disconnect(si)

    def release(self, rec: VmRecord) -> None:
        _, vim = _vim()
        si = self._connect(rec.details["host"], rec.details["user"])
        try:
            vm = self._ours(si, rec)
            if vm is not None:
                vm.UnregisterVM()  # never Destroy_Task: it would delete the disks on the mount
            dc = next(iter(self._all(si, vim.Datacenter)))
            self._delete_folder(si, dc, rec.details["vm_datastore"], rec.area)
        finally:
            self._disconnect(si)


DRIVER = VmwareDriver
