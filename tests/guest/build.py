"""Build the self-booting test guest from Debian packages only.

The guest is a FAT disk image holding syslinux, the Debian kernel and a
busybox initramfs. Booted with `qemu-system-x86_64 -accel tcg`, its init
loads the virtio and FAT modules, mounts its own disk (/dev/vda), reads
BASE.TXT (a file of the base image), writes GUEST.TXT holding what it read
plus the `vmltag=` value from the kernel command line, syncs and powers off:
about 5 seconds under TCG. If the disk holds STAY.TXT, it stays up instead,
printing "VML-GUEST-ALIVE N" once a second (N counts up from 1), so a
resumed memory state shows by its count going on. `mtype -i disk.img ::GUEST.TXT` shows the result.

    python tests/guest/build.py [OUTPUT_DIR]     # prints the path of disk.img

The packages are fetched with `apt-get download` and the result is cached in
OUTPUT_DIR (default ~/.cache/vml-test-guest/<kernel version>).
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODULES = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
    "fs/fat/fat.ko",
    "fs/fat/vfat.ko",
    "fs/nls/nls_cp437.ko",
    "fs/nls/nls_ascii.ko",
    "fs/nls/nls_utf8.ko",
    "fs/nls/nls_iso8859-1.ko",
]

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {modules}; do insmod /lib/modules/$m; done
tag=$(sed -n 's/.*vmltag=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done
mkdir -p /mnt
stay=no
if mount -t vfat /dev/vda /mnt; then
    echo "guest read: $(cat /mnt/BASE.TXT) tag: $tag" > /mnt/GUEST.TXT
    [ -f /mnt/STAY.TXT ] && stay=yes
    sync
    umount /mnt
    echo "VML-GUEST-DONE $tag"
else
    echo "VML-GUEST-FAILED cannot mount /dev/vda"
fi
if [ $stay = yes ]; then
    n=0
    while true; do n=$((n+1)); echo "VML-GUEST-ALIVE $n"; sleep 1; done
fi
poweroff -f
"""

SYSLINUX_CFG = """DEFAULT vml
PROMPT 0
TIMEOUT 0
LABEL vml
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND console=ttyS0 quiet panic=-1 vmltag={tag}
"""

BASE_TEXT = "hello from the base image\n"


def kernel_package() -> str:
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-") and line.endswith("-amd64"):
            return line.split()[-1]
    raise SystemExit("build.py: cannot find the Debian kernel package (apt-get update first?)")


def run(*cmd, cwd=None):
    subprocess.run([str(c) for c in cmd], cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def build(out_dir: Path | None = None, tag: str = "base") -> Path:
    """Build (or reuse) the guest; return the path of its disk image."""
    pkg = kernel_package()
    version = pkg.removeprefix("linux-image-")
    recipe = hashlib.sha256((INIT + SYSLINUX_CFG + BASE_TEXT).encode()).hexdigest()[:8]
    out_dir = out_dir or Path.home() / ".cache" / "vml-test-guest" / f"{version}-{recipe}"
    disk = out_dir / "disk.img"
    if disk.exists():
        return disk
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp = Path(tmp)
        tmp.chmod(0o755)  # apt-get download drops to the _apt user to fetch
        try:
            run("apt-get", "download", "-q", pkg, "busybox-static", cwd=tmp)
        except subprocess.CalledProcessError:
            run("apt-get", "update", "-qq")  # stale package lists: refresh once and retry
            run("apt-get", "download", "-q", pkg, "busybox-static", cwd=tmp)
        for deb in tmp.glob("*.deb"):
            run("dpkg-deb", "-x", deb, tmp / "root")
        root = tmp / "root"
        initramfs = tmp / "initramfs"
        for d in ("bin", "proc", "sys", "dev", "mnt", "lib/modules"):
            (initramfs / d).mkdir(parents=True)
        shutil.copy(root / "bin/busybox", initramfs / "bin/busybox")
        names = []
        for m in MODULES:
            shutil.copy(root / "lib/modules" / version / "kernel" / m, initramfs / "lib/modules")
            names.append(Path(m).name)
        init = initramfs / "init"
        init.write_text(INIT.format(modules=" ".join(names)))
        init.chmod(0o755)
        files = sorted(str(p.relative_to(initramfs)) for p in initramfs.rglob("*"))
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            input="\n".join(files).encode(),
            cwd=initramfs,
            capture_output=True,
            check=True,
        ).stdout
        (tmp / "initrd.gz").write_bytes(
            subprocess.run(["gzip", "-9"], input=cpio, capture_output=True, check=True).stdout
        )
        shutil.copy(root / "boot" / f"vmlinuz-{version}", tmp / "vmlinuz")
        (tmp / "syslinux.cfg").write_text(SYSLINUX_CFG.format(tag=tag))
        (tmp / "BASE.TXT").write_text(BASE_TEXT)
        image = tmp / "disk.img"
        run("mkfs.vfat", "-C", image, "65536")
        run("syslinux", "--install", image)
        run("mcopy", "-i", image, tmp / "vmlinuz", tmp / "initrd.gz", tmp / "syslinux.cfg", tmp / "BASE.TXT", "::")
        os.rename(image, disk)
    return disk


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
