"""Reading an entry's disk through the mount, against qemu-storage-daemon.

Same bytes on both sides: a 2 GiB ext4 image made with mkfs.ext4 -d from
1 GiB of real files, and two later states of it (files added with
debugfs), kept as a chain of three entries (base plus two deltas) in a VML
repository and as a zstd-compressed qcow2 backing chain that
qemu-storage-daemon exports as a raw file through FUSE (--export
type=fuse, read-only blockdevs). The top of each chain is read with fio:

- cold: 1 MiB sequential reads, page cache dropped, daemons restarted;
- warm: the same reads again;
- random: 4 KiB random reads for a fixed time, from cold; and the same
  with O_DIRECT, which keeps the page cache out and so measures each
  daemon's own service of a request.

Targets: cold >= 1.5x, warm >= 5x, random >= 1x, random O_DIRECT >= 1x
qemu-storage-daemon; the mount's peak memory within its bound (512 MiB by
default). Also: `vml save` of a working area after 20 MB written into the
2 GiB disk takes under 0.5 s (wall time of the command).

    .venv/bin/python bench/fs_read.py [--workdir DIR] [--repeat N]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import VML, drop_caches, mkfs_ext4, need, print_table, qcow2_delta, real_tree, run, vml_env

SIZE = 2 << 30


def fio(path: Path, rw: str, bs: str, runtime: int | None = None, direct: bool = False) -> dict:
    cmd = [
        "fio",
        "--name=bench",
        f"--filename={path}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--size={SIZE}",
        "--ioengine=psync",
        f"--direct={int(direct)}",
        "--invalidate=0",
        "--output-format=json",
    ]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}", "--randrepeat=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out)["jobs"][0]["read"]
    return {"MB/s": job["bw_bytes"] / 1e6, "iops": job["iops"]}


def debugfs_add(image: Path, files: dict[str, bytes], tmp: Path) -> None:
    tmp.mkdir(exist_ok=True)
    for name, data in files.items():
        src = tmp / name
        src.write_bytes(data)
        subprocess.run(["debugfs", "-w", "-R", f"write {src} /{name}", str(image)], capture_output=True, check=True)


def prepare(w: Path, env: dict) -> None:
    if (w / "ready").exists():
        return
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    base = mkfs_ext4(w / "base.img", "2G", real_tree(w / "tree", 1024))
    shutil.rmtree(w / "tree")
    states = [base]
    for i in (1, 2):
        img = w / f"d{i}.img"
        subprocess.run(["cp", "--sparse=always", str(states[-1]), str(img)], check=True)
        debugfs_add(img, {f"new{i}-{k}.dat": os.urandom(4 << 20) for k in range(10)}, w / "new")
        states.append(img)
    run([*VML, "init", w / "repo", "--name", "bench"], env=env)
    run([*VML, "save", "e0", "--from", base, "--repo", w / "repo"], env=env)
    run([*VML, "save", "e1", "--from", states[1], "--parent", "e0", "--repo", w / "repo"], env=env)
    run([*VML, "save", "e2", "--from", states[2], "--parent", "e1", "--repo", w / "repo"], env=env)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd", base, w / "q0.qcow2"])
    qcow2_delta(states[1], w / "q0.qcow2", "qcow2", w / "q1.qcow2")
    qcow2_delta(states[2], w / "q1.qcow2", "qcow2", w / "q2.qcow2")
    (w / "ready").touch()


class Qsd:
    """qemu-storage-daemon exporting the qcow2 chain as a raw file through FUSE."""

    def __init__(self, w: Path):
        self.w, self.file, self.proc = w, w / "qsd-export.raw", None

    def start(self) -> Path:
        self.file.touch()
        args = ["qemu-storage-daemon"]
        backing = None
        for i in range(3):
            args += ["--blockdev", f"driver=file,node-name=f{i},filename={self.w / f'q{i}.qcow2'},read-only=on"]
            spec = {"driver": "qcow2", "node-name": f"q{i}", "file": f"f{i}", "read-only": True, "backing": backing}
            args += ["--blockdev", json.dumps(spec)]
            backing = f"q{i}"
        args += ["--export", f"type=fuse,id=exp,node-name=q2,mountpoint={self.file},writable=off"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while self.file.stat().st_size != SIZE:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"bench: qemu-storage-daemon did not start: {self.proc.stderr.read().decode()}")
            time.sleep(0.05)
        return self.file

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None


class Vmlfs:
    def __init__(self, w: Path, env: dict):
        self.w, self.env, self.mp = w, env, w / "mnt"

    def start(self) -> Path:
        self.mp.mkdir(exist_ok=True)
        run([*VML, "mount", self.mp], env=self.env)
        return self.mp / "bench" / "e2" / "base.img"

    def stop(self) -> None:
        self.peak_rss = max(getattr(self, "peak_rss", 0), mount_peak_rss(Path(self.env["VML_HOME"])))
        run([*VML, "umount", self.mp], env=self.env)


def mount_peak_rss(home: Path) -> int:
    """The mount process's peak resident memory so far (VmHWM), in bytes."""
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from vml import control

    state = control.mount_state(home)
    for line in Path(f"/proc/{state['pid']}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(system, repeat: int) -> dict:
    results = {"cold": [], "warm": [], "random": [], "direct": []}
    for _ in range(repeat):
        drop_caches()
        path = system.start()
        try:
            results["cold"].append(fio(path, "read", "1M")["MB/s"])
            results["warm"].append(fio(path, "read", "1M")["MB/s"])
        finally:
            system.stop()
        drop_caches()
        path = system.start()
        try:
            results["random"].append(fio(path, "randread", "4k", runtime=20)["iops"])
        finally:
            system.stop()
        drop_caches()
        path = system.start()
        try:
            results["direct"].append(fio(path, "randread", "4k", runtime=20, direct=True)["iops"])
        finally:
            system.stop()
    return {k: statistics.median(v) for k, v in results.items()}


def area_save_time(w: Path, env: dict) -> float:
    fs = Vmlfs(w, env)
    fs.start()
    try:
        subprocess.run([*VML, "close", "bench-area", "--discard"], env=env, capture_output=True, check=False)
        run([*VML, "open", "e2", "--area", "bench-area", "--repo", "bench"], env=env)
        disk = fs.mp / "areas" / "bench-area" / "base.img"
        with open(disk, "r+b") as f:  # 20 MB as a guest writes: scattered 1 MiB extents
            for i in range(20):
                f.seek((i * 97 % 2000) << 20)
                f.write(os.urandom(1 << 20))
            f.flush()
            os.fsync(f.fileno())
        name = f"saved{int(time.time())}"
        seconds = run([*VML, "save", name, "--area", "bench-area"], env=env).seconds
        run([*VML, "close", "bench-area"], env=env)
        return seconds
    finally:
        fs.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/vml-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    need("mkfs.ext4", "debugfs", "qemu-img", "qemu-storage-daemon", "fio", "fusermount3")
    if os.geteuid() != 0:
        sys.exit("bench: run as root (it drops the page cache and mounts)")
    w = args.workdir / "fsread"
    env = vml_env(w / "home")
    prepare(w, env)

    vml_fs, qsd = Vmlfs(w, env), Qsd(w)
    for system in (vml_fs, qsd):  # both show the same bytes
        path = system.start()
        try:
            run(["cmp", path, w / "d2.img"])
        finally:
            system.stop()
    v = measure(vml_fs, args.repeat)
    q = measure(qsd, args.repeat)
    rows = [
        ["cold sequential 1 MiB (MB/s)", f"{v['cold']:.0f}", f"{q['cold']:.0f}", f"{v['cold'] / q['cold']:.2f}", "1.5"],
        ["warm sequential 1 MiB (MB/s)", f"{v['warm']:.0f}", f"{q['warm']:.0f}", f"{v['warm'] / q['warm']:.2f}", "5"],
        [
            "random 4 KiB, 20 s (IOPS)",
            f"{v['random']:.0f}",
            f"{q['random']:.0f}",
            f"{v['random'] / q['random']:.2f}",
            "1",
        ],
        [
            "random 4 KiB O_DIRECT, 20 s (IOPS)",
            f"{v['direct']:.0f}",
            f"{q['direct']:.0f}",
            f"{v['direct'] / q['direct']:.2f}",
            "1",
        ],
    ]
    print_table(
        f"Top of a 3-entry chain on a 2 GiB ext4 image, median of {args.repeat}",
        ["read", "vmlfs", "qemu-storage-daemon", "ratio", "target"],
        rows,
    )
    peak = vml_fs.peak_rss
    print(f"\nmount's peak resident memory over these reads: {peak / 2**20:.0f} MiB (bound 512 MiB, the default)")
    t = area_save_time(w, env)
    print(
        f"\nvml save --area after 20 MB written into the 2 GiB disk: {t:.2f} s "
        f"(target < 0.5 s: {'met' if t < 0.5 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
