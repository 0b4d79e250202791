"""vml open, boot, stop, status, close, mount, umount: working areas, their VMs, and the mount."""

import json
from pathlib import Path

from .. import config, control
from ..names import parse_size
from ..vms import areas, boot
from ..vms.hypervisors import NAMES, command_options
from .output import table


def _hv_options(args) -> dict:
    """The hypervisor options given on the command line, as the drivers read them."""
    return {opt.key: getattr(args, opt.key) for opt, _ in command_options() if getattr(args, opt.key, None)}


def _memory(text: str | None) -> int | None:
    if not text:
        return None
    return int(text) if text.isdigit() else parse_size(text) >> 20


def _booted(home: Path, area: str, hypervisor: str, rec) -> str:
    where = rec.details.get("connect") or rec.details.get("host")
    what = f"({where}) as {rec.vm}" if where else f"as process {rec.vm}"
    hw = rec.hardware
    log = areas.areas_dir(home) / area / "console.log"
    console = f"; serial console in {log}" if hypervisor != "vmware" else ""
    return f"booted area {area} on {hypervisor} {what}: {hw['memory_mib']} MiB, {hw['vcpus']} vCPU{console}\n"


def cmd_open(args) -> int:
    cfg = config.Config.load()
    home = cfg.home
    rec = areas.open_area(home, cfg, args.entry, args.repo, args.area)
    state = control.mount_state(home)
    where = f"at {Path(state['mountpoint']) / 'areas' / rec.name}" if state else "(run `vml mount` to use its files)"
    saves = f"; saves go to {cfg.local(rec.save_to).name}" if rec.save_to else ""
    booted = ""
    if args.boot and args.dry_run:
        booted = boot.describe(home, rec.name, args.boot, _hv_options(args), _memory(args.memory), args.vcpus)
    elif args.boot:
        vm = boot.boot_new_area(home, rec.name, args.boot, _hv_options(args), _memory(args.memory), args.vcpus)
        booted = _booted(home, rec.name, args.boot, vm)
    print(f"opened working area {rec.name} on {rec.entry} of {rec.repository} {where}{saves}")
    print(booted, end="")
    return 0


def cmd_boot(args) -> int:
    home = config.vml_home()
    options, memory = _hv_options(args), _memory(args.memory)
    if args.dry_run:
        print(boot.describe(home, args.area, args.hypervisor, options, memory, args.vcpus), end="")
        return 0
    rec = boot.boot(home, args.area, args.hypervisor, options, memory, args.vcpus)
    print(_booted(home, args.area, args.hypervisor, rec), end="")
    return 0


def cmd_stop(args) -> int:
    how = boot.stop(config.vml_home(), args.area, args.force, args.timeout, _hv_options(args))
    print(f"area {args.area}: {how}")
    return 0


def cmd_status(args) -> int:
    items = boot.status(config.vml_home(), _hv_options(args))
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    rows = [
        [i["area"], i["entry"], i["hypervisor"] or "-", i["vm"] or "-", i["state"], i.get("error", "")] for i in items
    ]
    print("\n".join(table(rows, ["area", "entry", "hypervisor", "vm", "state", ""])) if rows else "(no working areas)")
    return 0


def cmd_close(args) -> int:
    boot.close(config.vml_home(), args.area, args.discard, _hv_options(args))
    print(f"closed working area {args.area}" + (" and discarded its changes" if args.discard else ""))
    return 0


def cmd_mount(args) -> int:
    from vmlfs import daemon  # the mount package needs pyfuse3; only these commands load it

    home = config.vml_home()
    mountpoint = Path(args.mountpoint or control.default_mountpoint()).absolute()
    daemon.mount(home, mountpoint, args.foreground, args.debug)
    if not args.foreground:
        print(f"mounted the logbook of {home} at {mountpoint}")
    return 0


def cmd_umount(args) -> int:
    from vmlfs import daemon

    home = config.vml_home()
    state = control.mount_state(home)
    mountpoint = Path(args.mountpoint or (state or {}).get("mountpoint") or control.default_mountpoint()).absolute()
    daemon.stop(home, mountpoint)
    print(f"unmounted {mountpoint}")
    return 0


def register(cli) -> None:
    hv = cli.parent()
    g = hv.add_argument_group("hypervisor options")
    for opt, help_text in command_options():
        if opt.switch:
            g.add_argument(opt.flag, action="store_true", help=help_text)
        else:
            g.add_argument(opt.flag, metavar=opt.metavar, choices=opt.choices, help=help_text)
    vm = cli.parent()
    g = vm.add_argument_group("VM options")
    g.add_argument("--memory", metavar="SIZE", help="memory in MiB, or e.g. 2G (default: the entry's)")
    g.add_argument("--vcpus", type=int, metavar="N", help="virtual CPUs (default: the entry's)")
    g.add_argument("--dry-run", action="store_true", help="print the configuration instead of booting")
    which = f"{', '.join(NAMES[:-1])} or {NAMES[-1]}"

    sp = cli.add("open", cmd_open, "open an entry in a writable working area (and boot it)", hv, vm)
    sp.add_argument("entry", metavar="ENTRY")
    sp.add_argument("--area", metavar="NAME", help="name of the area (default: the entry's name)")
    sp.add_argument("--boot", choices=NAMES, metavar="HYPERVISOR", help=f"then boot it: {which}")

    sp = cli.add("boot", cmd_boot, "start a VM on a working area's disks", hv, vm)
    sp.add_argument("area", metavar="NAME")
    sp.add_argument("--hypervisor", required=True, choices=NAMES, help=which)

    sp = cli.add("stop", cmd_stop, "stop the VM of a working area: orderly shutdown, then power off", hv)
    sp.add_argument("area", metavar="NAME")
    sp.add_argument("--force", action="store_true", help="power off at once")
    sp.add_argument("--timeout", type=float, default=boot.STOP_TIMEOUT, metavar="SECONDS", help="wait (default 60)")

    sp = cli.add("status", cmd_status, "working areas and their VMs: hypervisor, running or not", hv)
    sp.add_argument("--json", action="store_true", help="print a list of objects (area, hypervisor, state, ...)")

    sp = cli.add("close", cmd_close, "remove a working area (and forget its stopped VM)", hv)
    sp.add_argument("area", metavar="NAME")
    sp.add_argument("--discard", action="store_true", help="even if it has unsaved changes")

    sp = cli.add("mount", cmd_mount, "show every repository and working area as a file system")
    sp.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT", help="default /vml for root, ~/vml otherwise")
    sp.add_argument("--foreground", action="store_true", help="stay attached (logs to stderr)")

    sp = cli.add("umount", cmd_umount, "unmount the logbook")
    sp.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT")
