"""The main job on a small built-in example, command by command.

A physicist's VM (an ext4 disk image plus its libvirt XML) is saved as a full
entry; work inside the VM changes a few files; the new state is saved as an
incremental entry, exported as a small bundle, and a colleague who already
has the base imports it and rebuilds the exact same disk.

Everything happens under ./demo (VML_HOME=./demo/home), so it leaves the
user's own VML configuration alone. Run it again to start over.
"""

import filecmp
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
VML = [sys.executable, "-m", "vml"]

VM_XML = """<domain type='qemu'>
  <name>analysis</name>
  <memory unit='MiB'>512</memory>
  <devices><disk type='file' device='disk'><source file='disk.img'/><target dev='vda' bus='virtio'/></disk></devices>
</domain>
"""


def run(*cmd, show=True):
    if show:
        print("$ " + " ".join(str(c) for c in cmd).replace(sys.executable + " -m vml", "vml"), flush=True)
    r = subprocess.run([str(c) for c in cmd], text=True, capture_output=True, check=False)
    out = (r.stdout + r.stderr).rstrip()
    if show and out:
        print(out)
    if r.returncode != 0:
        sys.exit(f"demo: command failed with status {r.returncode}: {' '.join(map(str, cmd))}")
    return r.stdout


def vml(*args):
    return run(*VML, *args)


def make_guest_disk(path: Path) -> None:
    """A 256 MiB ext4 image holding real files (the Python standard library)."""
    tree = DEMO / "rootfs"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shutil.copytree(
        stdlib,
        tree / "usr/lib/python",
        ignore=shutil.ignore_patterns(
            "__pycache__",
            "site-packages",
            "test",
            "tests",
            "idlelib",
            "tkinter",
            "lib2to3",
            "ensurepip",
            "config-*",
            "*.so",
        ),
    )
    (tree / "home/physicist").mkdir(parents=True)
    (tree / "home/physicist/README").write_text("analysis VM\n")
    run("truncate", "-s", "256M", path, show=False)
    run("mkfs.ext4", "-q", "-F", "-d", tree, path, show=False)


def work_in_guest(disk: Path) -> None:
    """What a session in the VM leaves behind: a few new files on its disk."""
    results = DEMO / "results"
    results.mkdir()
    for i in range(4):
        lines = [f"event {n} energy {n * 7.3 + i:.3f} GeV track {n % 17}\n" for n in range(20000)]
        (results / f"histo{i}.txt").write_text("".join(lines))
    run("debugfs", "-w", "-R", "mkdir /home/physicist/results", disk, show=False)
    for f in sorted(results.iterdir()):
        run("debugfs", "-w", "-R", f"write {f} /home/physicist/results/{f.name}", disk, show=False)


def main() -> None:
    if os.path.ismount(DEMO / "mnt") or subprocess.run(["mountpoint", "-q", str(DEMO / "mnt")]).returncode == 0:
        subprocess.run(["fusermount3", "-u", "-z", str(DEMO / "mnt")], check=False)  # left by an interrupted demo
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir()
    os.environ["VML_HOME"] = str(DEMO / "home")
    vm = DEMO / "vm"
    vm.mkdir()
    (vm / "analysis.xml").write_text(VM_XML)
    make_guest_disk(vm / "disk.img")

    print("== A physicist saves the VM as it comes, then again after a day's work")
    vml("init", DEMO / "rep1")
    vml("save", "entry1", "--from", vm, "-m", "fresh analysis appliance")
    work_in_guest(vm / "disk.img")
    vml("save", "entry2", "--from", vm, "--parent", "entry1", "-m", "first histograms")
    vml("log")
    vml("show", "entry2")

    print("\n== They share entry2 as a small bundle against the common base")
    vml("export", "entry1", "-o", DEMO / "entry1-base.vml")
    vml("export", "entry2", "-o", DEMO / "entry2.vml")

    print("\n== A colleague who has the base imports it and gets the same disk, byte for byte")
    vml("init", DEMO / "rep2", "--name", "colleague")
    vml("import", DEMO / "entry1-base.vml", "--repo", "colleague")
    vml("import", DEMO / "entry2.vml", "--repo", "colleague")
    vml("consult")
    vml("checkout", "entry2", DEMO / "rebuilt", "--repo", "colleague")
    vml("verify", "--repo", "colleague")
    same = filecmp.cmp(vm / "disk.img", DEMO / "rebuilt" / "disk.img", shallow=False)
    bundle = (DEMO / "entry2.vml").stat().st_size
    disk = (vm / "disk.img").stat().st_size
    print(f"\nrebuilt disk identical to the original: {same}")
    print(f"entry2 travelled as {bundle / 2**20:.1f} MiB for a {disk / 2**20:.0f} MiB disk")
    if not same:
        sys.exit("demo: the rebuilt disk differs from the original")
    mount_part()


def mount_part() -> None:
    """The logbook as a file system, and a working area saved back as an entry."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        print("\n(skipping the file-system part: it needs root and /dev/fuse)")
        return
    mnt = DEMO / "mnt"
    print("\n== The logbook as a file system: every entry is a directory")
    vml("mount", mnt)
    try:
        run("ls", "-l", mnt / "rep1" / "entry2")
        print("\n== Work in a writable area; saving stores only what changed")
        vml("open", "entry2", "--area", "work")
        notes = DEMO / "notes.txt"
        notes.write_text("cuts tightened, see histo3\n")
        run("debugfs", "-w", "-R", f"write {notes} /home/physicist/notes.txt", mnt / "areas" / "work" / "disk.img")
        vml("save", "entry3", "--area", "work", "-m", "notes")
        vml("log")
    finally:
        vml("umount", mnt)


if __name__ == "__main__":
    main()
