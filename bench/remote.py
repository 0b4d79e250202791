"""Remotes over HTTP, side by side with curl and with a local repository, in one run.

Origin: nginx on loopback serving a published repository (tests/servers.py).
The entry is a 2 GiB ext4 image made with mkfs.ext4 -d from 600 MiB of real
system files and 800 MiB of random bytes, so that it stores over 1 GiB.
"The same bytes" is the concatenation of every file the entry needs (packs,
indexes, pack set, manifest and maps), placed beside them on the same nginx,
so curl and vml move the same bytes over the same path.

1. Preload (`vml cache preload`, whole command, fresh cache) against curl of
   the one file, on plain loopback and through the tests' latency relay at
   20 ms round trip (10 ms each way, bandwidth untouched). Two anchors:
   curl writing the file into the same file system as the cache (the same
   job: keep the bytes) and curl writing to /dev/null. Target >= 0.8x.
2. Cold sequential read of the remote entry's disk through the mount (empty
   cache, page cache dropped), against the same entry read from the
   publisher's local repository through a mount, in the same run. Target
   >= 0.95x. The origin's log gives the bytes fetched: target <= 1.05x the
   stored bytes.
3. Cold 4 MiB reads at random places of the remote disk (fresh cache): the
   bytes of packs and objects fetched for each read. Target <= 8 MiB.
4. Boot: the test guest's boot files in a 1 GiB FAT disk that also holds
   600 MiB of real system files the guest never reads (as an OS image holds
   far more than its boot touches); the guest boots under TCG from a working
   area opened on the remote entry, and nginx's log gives the bytes fetched.
   Target < 10% of the entry's stored bytes.
5. Squid fan-out: 8 clients, each with its own VML home and mount, read the
   entry at once through one real Squid configured with exactly the
   settings docs/remote.md prescribes; nginx's log gives the bytes the
   origin served. Target <= 1.1x the entry's stored bytes.

    .venv/bin/python bench/remote.py [--workdir DIR] [--repeat N]
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from common import drop_caches, mkfs_ext4, need, print_table, real_tree, run
from helpers import stored_files
from servers import FaultProxy, Nginx, Squid, documented_squid_settings

VML = [sys.executable, "-m", "vml"]


def vml(home: Path, *args, check=True) -> str:
    r = subprocess.run(
        [*VML, *map(str, args)], env=dict(os.environ, VML_HOME=str(home)), capture_output=True, text=True
    )
    if check and r.returncode != 0:
        sys.exit(f"bench: vml {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r.stdout


def publish(work: Path, name: str, source: Path) -> tuple[Path, Path]:
    """Save ``source`` as entry ``name`` and publish it; return (published dir, public key)."""
    home = work / f"pub-home-{name}"
    shutil.rmtree(home, ignore_errors=True)
    repo, pub, key = work / f"repo-{name}", work / f"pub-{name}", work / f"key-{name}"
    for p in (repo, pub):
        shutil.rmtree(p, ignore_errors=True)
    for p in (key, key.with_name(key.name + ".pub")):
        p.unlink(missing_ok=True)
    vml(home, "init", repo)
    vml(home, "save", name, "--from", source)
    vml(home, "keygen", key)
    vml(home, "publish", pub, "--key", key)
    # The same bytes as one file, on the same server: every object and pack (and index) published.
    with open(pub / "all-objects.bin", "wb") as out:
        for p in stored_files(pub):
            out.write((pub / p).read_bytes())
    return pub, key.with_name(key.name + ".pub")


def served_bytes(origin: Nginx, since: int = 0, data_only: bool = False) -> int:
    """Body bytes the origin served for objects, packs, indexes and pack sets (``data_only``: packs and objects)."""
    out = 0
    for _, p, _, n in origin.requests()[since:]:
        top = p.split("/")[1]
        if top in ("objects", "packs") if data_only else top in ("objects", "packs", "packsets"):
            out += 0 if data_only and p.endswith(".idx") else n
    return out


def client(work: Path, tag: str, url: str, pubkey: Path, *extra) -> Path:
    home = work / f"client-{tag}"
    shutil.rmtree(home, ignore_errors=True)
    vml(home, "remote", "add", "cern", url, "--key", pubkey, *extra)
    return home


def curl_seconds(url: str, out: Path | None = None) -> float:
    """curl's time for ``url``, writing into ``out`` (removed after) or /dev/null. Neither curl nor a preload
    flushes what it wrote: both leave it in the page cache."""
    r = run(["curl", "-sf", "-o", out or "/dev/null", url])
    if out is not None:
        out.unlink()
    return r.seconds


def bench_preload(work: Path, pub: Path, pubkey: Path, url: str, label: str, repeat: int) -> list[list]:
    size = (pub / "all-objects.bin").stat().st_size
    to_file, to_null, ours = [], [], []
    for i in range(repeat):
        drop_caches()
        to_file.append(curl_seconds(f"{url}/all-objects.bin", work / "curl.out"))
        to_null.append(curl_seconds(f"{url}/all-objects.bin"))
        home = client(work, f"preload{i}", url, pubkey)
        drop_caches()
        t0 = time.perf_counter()
        vml(home, "cache", "preload", "cern:disk")
        ours.append(time.perf_counter() - t0)
        shutil.rmtree(home)
    f, n, o = statistics.median(to_file), statistics.median(to_null), statistics.median(ours)
    return [
        [
            f"preload, {label}: vml against curl into a file",
            f"{size / f / 1e6:.0f} MB/s",
            f"{size / o / 1e6:.0f} MB/s",
            f"{f / o:.2f}x",
            ">= 0.8x",
        ],
        [
            f"preload, {label}: vml against curl into /dev/null",
            f"{size / n / 1e6:.0f} MB/s",
            f"{size / o / 1e6:.0f} MB/s",
            f"{n / o:.2f}x",
            "",
        ],
    ]


def the_disk(mp: Path) -> Path:
    (disk,) = [p for p in (mp / "cern" / "disk").iterdir() if p.suffix == ".img"]
    return disk


def bench_cold_read(work: Path, pub: Path, pubkey: Path, origin: Nginx, repeat: int) -> list[list]:
    """The remote entry's disk read cold through a mount, against the same entry read from the publisher's
    local repository through a mount; and the bytes the origin served for the remote read."""
    stored = sum((pub / p).stat().st_size for p in stored_files(pub))
    ours, local, fetched, disk_bytes = [], [], [], 0
    for i in range(repeat):
        mp = work / f"mnt-local{i}"
        mp.mkdir(exist_ok=True)
        vml(work / "pub-home-disk", "mount", mp)
        try:
            drop_caches()
            local.append(run(["dd", f"if={mp / 'repo-disk' / 'disk' / 'disk.img'}", "of=/dev/null", "bs=1M"]).seconds)
        finally:
            vml(work / "pub-home-disk", "umount", mp)
        home = client(work, f"read{i}", origin.url, pubkey)
        mp = work / f"mnt{i}"
        mp.mkdir(exist_ok=True)
        vml(home, "mount", mp)
        try:
            disk = the_disk(mp)
            disk_bytes = disk.stat().st_size
            drop_caches()
            before = len(origin.requests())
            ours.append(run(["dd", f"if={disk}", "of=/dev/null", "bs=1M"]).seconds)
            fetched.append(served_bytes(origin, before))
        finally:
            vml(home, "umount", mp)
        shutil.rmtree(home)
    o, lo = statistics.median(ours), statistics.median(local)
    return [
        [
            f"cold sequential read of a {disk_bytes >> 20} MiB disk, remote against local repository",
            f"{disk_bytes / lo / 1e6:.0f} MB/s of disk",
            f"{disk_bytes / o / 1e6:.0f} MB/s of disk",
            f"{lo / o:.2f}x",
            ">= 0.95x",
        ],
        [
            "bytes fetched for that read, against the stored bytes",
            f"{stored / 2**20:.0f} MiB stored",
            f"{max(fetched) / 2**20:.0f} MiB fetched",
            f"{max(fetched) / stored:.3f}x",
            "<= 1.05x",
        ],
    ]


def bench_random_reads(work: Path, pubkey: Path, origin: Nginx, reads: int = 8) -> list:
    """Cold 4 MiB reads at random places: the bytes of packs and objects the origin served for each."""
    home = client(work, "random", origin.url, pubkey)
    mp = work / "mnt-random"
    mp.mkdir(exist_ok=True)
    vml(home, "mount", mp)
    rng = random.Random(7)
    fetched = []
    try:
        disk = the_disk(mp)
        size = disk.stat().st_size
        with open(disk, "rb", buffering=0) as f:
            f.read(1)  # opened: its pack set and indexes are loaded, not counted below
            for _ in range(reads):
                offset = rng.randrange(size >> 22) << 22
                before = len(origin.requests())
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                os.pread(f.fileno(), 4 << 20, offset)
                fetched.append(served_bytes(origin, before, data_only=True))
    finally:
        vml(home, "umount", mp)
        shutil.rmtree(home)
    return [
        f"cold 4 MiB reads at {reads} random places",
        "",
        f"{max(fetched) / 2**20:.1f} MiB fetched at most (median {statistics.median(fetched) / 2**20:.1f})",
        "",
        "<= 8 MiB",
    ]


def boot_disk(work: Path) -> Path:
    """The test guest's boot files in a 1 GiB FAT disk with 600 MiB of files it never reads."""
    need("mkfs.vfat", "syslinux", "mcopy", "qemu-system-x86_64")
    import importlib.util

    spec = importlib.util.spec_from_file_location("guest_build", Path(__file__).parent.parent / "tests/guest/build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    small = module.build()
    vm = work / "bootvm"
    disk = vm / "disk.img"
    if disk.exists():
        return vm
    vm.mkdir(parents=True, exist_ok=True)
    files = work / "bootfiles"
    shutil.rmtree(files, ignore_errors=True)
    files.mkdir()
    for name in ("vmlinuz", "initrd.gz", "syslinux.cfg", "BASE.TXT"):
        subprocess.run(["mcopy", "-i", small, f"::{name}", files / name], check=True)
    payload = real_tree(work / "bootpayload", 600)
    tmp = vm / "disk.tmp"
    tmp.unlink(missing_ok=True)
    subprocess.run(["mkfs.vfat", "-C", tmp, str(1 << 20)], check=True, capture_output=True)
    subprocess.run(["syslinux", "--install", tmp], check=True)
    subprocess.run(["mcopy", "-i", tmp, *sorted(files.iterdir()), "::"], check=True)
    subprocess.run(["mcopy", "-s", "-i", tmp, payload / "usr", "::"], check=True, capture_output=True)
    os.rename(tmp, disk)
    return vm


def bench_boot(work: Path, origin_dir: Path, pubkey: Path) -> list:
    origin = Nginx(origin_dir)
    home = client(work, "boot", origin.url, pubkey)
    vml(home, "init", work / "client-boot-repo")
    mp = work / "mnt-boot"
    mp.mkdir(exist_ok=True)
    vml(home, "mount", mp)
    try:
        vml(home, "open", "cern:guest", "--area", "run")
        t0 = time.perf_counter()
        r = subprocess.run(
            [
                *("qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot"),
                *("-drive", f"file={mp / 'areas' / 'run' / 'disk.img'},format=raw,if=virtio,cache=writeback"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        seconds = time.perf_counter() - t0
        if "VML-GUEST-DONE" not in r.stdout:
            sys.exit(f"bench: the guest did not finish booting:\n{r.stdout[-2000:]}")
        fetched = served_bytes(origin)
        stored = sum((origin_dir / p).stat().st_size for p in stored_files(origin_dir))
        vml(home, "close", "run", "--discard")
    finally:
        vml(home, "umount", mp, check=False)
        origin.stop()
    return [
        f"boot from a remote entry ({seconds:.0f} s under TCG)",
        f"{stored >> 20} MiB stored",
        f"{fetched / 2**20:.1f} MiB fetched",
        f"{100 * fetched / stored:.1f}%",
        "< 10%",
    ]


def bench_fanout(work: Path, pub: Path, pubkey: Path, origin: Nginx, clients: int = 8) -> list:
    need("squid")
    squid = Squid(documented_squid_settings())
    mounts = []
    try:
        homes = [client(work, f"fanout{i}", origin.url, pubkey, "--proxy", squid.url) for i in range(clients)]
        for i, home in enumerate(homes):
            mp = work / f"mnt-fanout{i}"
            mp.mkdir(exist_ok=True)
            vml(home, "mount", mp)
            mounts.append((home, mp))
        drop_caches()
        before = len(origin.requests())
        t0 = time.perf_counter()
        procs = []
        for _, mp in mounts:
            disk = the_disk(mp)
            procs.append(subprocess.Popen(["dd", f"if={disk}", "of=/dev/null", "bs=1M"], stderr=subprocess.DEVNULL))
        if any(p.wait() != 0 for p in procs):
            sys.exit("bench: a fan-out reader failed")
        seconds = time.perf_counter() - t0
        served = served_bytes(origin, before)
    finally:
        for home, mp in mounts:
            vml(home, "umount", mp, check=False)
        squid.stop()
    stored = sum((pub / p).stat().st_size for p in stored_files(pub))
    return [
        f"Squid fan-out: {clients} mounts read the entry at once ({seconds:.0f} s)",
        f"{stored >> 20} MiB stored",
        f"{served / 2**20:.0f} MiB from the origin",
        f"{served / stored:.2f}x",
        "<= 1.1x",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/vml-bench/remote2"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-boot", action="store_true")
    ap.add_argument("--skip-fanout", action="store_true")
    args = ap.parse_args()
    need("nginx", "curl", "mkfs.ext4", "dd")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    image = work / "disk.img"
    if not image.exists():
        tree = real_tree(work / "tree", 600)
        with open(tree / "random.bin", "wb") as f:  # what does not compress: over 1 GiB stored
            for _ in range(800):
                f.write(os.urandom(1 << 20))
        mkfs_ext4(image, "2G", tree)
    if not (work / "pub-disk" / "all-objects.bin").exists():
        publish(work, "disk", image)
    pub, pubkey = work / "pub-disk", work / "key-disk.pub"
    origin = Nginx(pub)
    rows = []
    try:
        rows += bench_preload(work, pub, pubkey, origin.url, "loopback", args.repeat)
        proxy = FaultProxy(origin.port, delay=0.010)
        try:
            rows += bench_preload(work, pub, pubkey, proxy.url, "20 ms RTT", args.repeat)
        finally:
            proxy.stop()
        rows += bench_cold_read(work, pub, pubkey, origin, args.repeat)
        rows.append(bench_random_reads(work, pubkey, origin))
        if not args.skip_fanout:
            rows.append(bench_fanout(work, pub, pubkey, origin))
    finally:
        origin.stop()
    if not args.skip_boot:
        vm = boot_disk(work)
        boot_pub, boot_key = publish(work, "guest", vm)
        rows.append(bench_boot(work, boot_pub, boot_key))
    print_table(
        "Remotes over loopback HTTP (nginx origin), against curl of the same bytes and a local repository",
        ["case", "anchor", "vml", "ratio", "target"],
        rows,
    )
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
