"""Guest writes while a working area saves, against the same writes with no save running.

A working area on a 2 GiB disk gets 1.5 GiB of changes (1 MiB extents of
random data written through the mount and fsync'd). Then fio writes 4 KiB
O_DIRECT blocks to another part of the disk (as a guest with cache=none
does) while `vml save --area` stores the changes; fio's completion-latency
log gives each write's wait. The anchor is the same fio job on the same
area with no save running. Target: no guest write waits more than 50 ms
while the area saves.

    .venv/bin/python bench/area_stall.py [--workdir DIR] [--changes MIB] [--repeat N]

Run it with PYTHONPATH pointing at another checkout's tree to measure that
version's vml the same way (both sides use `python -m vml`).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import VML, need, print_table, run, vml_env

SIZE = 2 << 30
WRITE_REGION = (1792 << 20, 256 << 20)  # where fio writes: past the saved changes


def prepare(w: Path, env: dict) -> None:
    if (w / "ready").exists():
        return
    w.mkdir(parents=True, exist_ok=True)
    img = w / "disk.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(64 << 20))
    run([*VML, "init", w / "repo", "--name", "stall"], env=env)
    run([*VML, "save", "e0", "--from", img, "--repo", w / "repo"], env=env)
    img.unlink()
    (w / "ready").touch()


def write_changes(disk: Path, mib: int) -> None:
    fd = os.open(disk, os.O_WRONLY)
    try:
        for i in range(mib):
            os.pwrite(fd, os.urandom(1 << 20), i << 20)
        os.fsync(fd)
    finally:
        os.close(fd)


def fio(disk: Path, seconds: int, log: Path) -> subprocess.Popen:
    for old in log.parent.glob(f"{log.name}_*.log"):
        old.unlink()  # fio appends to a log that is there
    offset, size = WRITE_REGION
    return subprocess.Popen(
        [
            "fio",
            "--name=guest",
            f"--filename={disk}",
            "--rw=randwrite",
            "--bs=4k",
            f"--offset={offset}",
            f"--size={size}",
            "--ioengine=psync",
            "--direct=1",
            "--time_based",
            f"--runtime={seconds}",
            f"--write_lat_log={log}",
            "--log_avg_msec=0",
            "--per_job_logs=0",
            "--output-format=json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def latencies(log: Path, start_ms: float = 0, end_ms: float = float("inf")) -> list[float]:
    """Completion latencies in ms of the writes that completed between ``start_ms`` and ``end_ms``."""
    out = []
    for line in Path(f"{log}_clat.log").read_text().splitlines():
        t, lat, *_ = (x.strip() for x in line.split(","))
        if start_ms <= int(t) <= end_ms:
            out.append(int(lat) / 1e6)  # fio logs nanoseconds
    return out


def stats(lat: list[float]) -> dict:
    lat = sorted(lat)
    return {
        "writes": len(lat),
        "p50": statistics.median(lat),
        "p99": lat[int(0.99 * (len(lat) - 1))],
        "max": lat[-1],
    }


def one_round(w: Path, env: dict, mp: Path, changes: int, n: int) -> tuple[dict, dict, float]:
    area = f"stall{n}"
    # An area left by a run cut short goes first.
    subprocess.run([*VML, "close", area, "--discard"], env=env, capture_output=True, check=False)
    run([*VML, "open", "e0", "--area", area, "--repo", "stall"], env=env)
    disk = mp / "areas" / area / "disk.img"
    try:
        write_changes(disk, changes)
        anchor_log = w / f"anchor{n}"
        p = fio(disk, 10, anchor_log)
        p.wait()
        anchor = stats(latencies(anchor_log))
        during_log = w / f"during{n}"
        t0 = time.monotonic()
        p = fio(disk, 60, during_log)
        time.sleep(2)  # fio is writing
        started = time.monotonic()
        run([*VML, "save", f"s{n}-{time.time_ns()}", "--area", area], env=env)
        ended = time.monotonic()
        p.wait()
        if p.returncode != 0:
            sys.exit(f"bench: fio failed: {p.stderr.read().decode()}")
        # fio's log times count from its start, a few ms after t0: the window is widened by that much.
        during = stats(latencies(during_log, (started - t0) * 1000 - 50, (ended - t0) * 1000 + 50))
        return anchor, during, ended - started
    finally:
        subprocess.run([*VML, "close", area, "--discard"], env=env, capture_output=True, check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/vml-bench"))
    ap.add_argument("--changes", type=int, default=1536, metavar="MIB", help="MiB written before the save")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    need("fio", "fusermount3")
    if os.geteuid() != 0:
        sys.exit("bench: run as root (it mounts)")
    w = args.workdir / "stall"
    env = vml_env(w / "home")
    prepare(w, env)
    mp = w / "mnt"
    mp.mkdir(exist_ok=True)
    run([*VML, "mount", mp], env=env)
    rounds = []
    try:
        for n in range(args.repeat):
            rounds.append(one_round(w, env, mp, args.changes, n))
    finally:
        run([*VML, "umount", mp], env=env)
    rows = []
    for label, pick in (("no save running (anchor)", 0), ("while vml save --area runs", 1)):
        s = [r[pick] for r in rounds]
        rows.append(
            [
                label,
                f"{statistics.median(x['writes'] for x in s):.0f}",
                f"{statistics.median(x['p50'] for x in s):.2f}",
                f"{statistics.median(x['p99'] for x in s):.2f}",
                f"{statistics.median(x['max'] for x in s):.1f}",
            ]
        )
    worst = max(r[1]["max"] for r in rounds)
    print_table(
        f"4 KiB O_DIRECT guest writes, median of {args.repeat} rounds; the save stores {args.changes} MiB "
        f"(median {statistics.median(r[2] for r in rounds):.1f} s)",
        ["", "writes", "p50 ms", "p99 ms", "max ms"],
        rows,
    )
    verdict = "met" if worst < 50 else "MISSED"
    print(f"\nlongest wait of any write during a save: {worst:.1f} ms (target < 50 ms: {verdict})")


if __name__ == "__main__":
    main()
