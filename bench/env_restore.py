"""Environment backups: restoring a home into a working area's disk through the mount.

A home of small files (as bench/env_capture.py makes it: directories of 100
files of 2-18 KB) is captured from one image and restored into an area
opened on another (`vml env restore`, which plans every record, then
drives one debugfs process a command at a time and checks each answer),
and a home holding one 40 MiB file is restored the same way: its peak
memory shows whether files are streamed. Anchor: `tar -x` of the same home
into the area's image loop-mounted read-write (root only), what a root user
would do with a VM's disk at hand.

    .venv/bin/python bench/env_restore.py [--workdir DIR] [--files N]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from env_capture import make_home

from common import VML, Run, mib, need, print_table, run, vml_env


def guest(root: Path, image: Path, size: str) -> Path:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "os-release").write_text('ID=cernvm\nVERSION_ID="5.0"\n')
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/bash\n")
    (root / "home").mkdir(exist_ok=True)
    image.unlink(missing_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(image), size], check=True)
    return image


# A child forked from this process counts this process's memory in its peak: measure from a small one.
MEASURE = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
)


def measured(cmd, env: dict) -> Run:
    out = subprocess.run([sys.executable, "-c", MEASURE, *map(str, cmd)], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"bench: {' '.join(map(str, cmd))} failed:\n{out.stderr}")
    seconds, peak = out.stdout.split()
    return Run(float(seconds), int(peak))


def restore(env: dict, entry: str, area: str) -> Run:
    subprocess.run([*VML, "open", "dst", "--area", area], env=env, check=True, capture_output=True)
    return measured([*VML, "env", "restore", entry, "--area", area], env)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--files", type=int, default=10_000)
    args = ap.parse_args()
    need("mkfs.ext4", "debugfs", "tar", "mount", "fusermount3")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vml-bench-envr-"))
    for d in ("src", "big", "dst", "vmlhome", "rep", "mnt", "loop"):
        shutil.rmtree(work / d, ignore_errors=True)
    home_dir = make_home(work / "src", args.files)
    nbytes = sum(p.stat().st_size for p in home_dir.rglob("*") if p.is_file())
    size = f"{max(256, 3 * (nbytes >> 20))}M"
    src = guest(work / "src", work / "src.img", size)
    big_home = work / "big" / "home" / "alice"
    big_home.mkdir(parents=True)
    with open(big_home / "big.bin", "wb") as f:
        for _ in range(40):
            f.write(os.urandom(1 << 20))
    big = guest(work / "big", work / "big.img", "128M")
    dst = guest(work / "dst", work / "dst.img", size)

    env = vml_env(work / "vmlhome")
    run([*VML, "init", work / "rep"], env=env)
    for name, image in (("src", src), ("big", big), ("dst", dst)):
        subprocess.run([*VML, "save", name, "--from", image], env=env, check=True, capture_output=True)
    for name in ("src", "big"):
        run([*VML, "env", "save", f"env-{name}", "--from", name, "--user", "alice"], env=env)
    (work / "mnt").mkdir()
    run([*VML, "mount", work / "mnt"], env=env)
    try:
        v = restore(env, "env-src", "a1")
        b = restore(env, "env-big", "a2")
    finally:
        subprocess.run(["fusermount3", "-u", str(work / "mnt")], check=False)

    loop = work / "loop"
    loop.mkdir()
    subprocess.run(["mount", "-o", "loop", str(dst), str(loop)], check=True)
    try:
        copy = f"tar -C {work / 'src'} -cf - home/alice | tar -C {loop} -xpf - && sync -f {loop}"
        t = measured(["sh", "-c", copy], os.environ)
    finally:
        subprocess.run(["umount", str(loop)], check=True)
    print_table(
        f"restoring a home of {args.files} files ({mib(nbytes)}) into an area",
        ["what", "time", "peak memory"],
        [
            ["vml env restore (through the mount)", f"{v.seconds:.1f} s", mib(v.max_rss)],
            ["tar -x into the image, loop-mounted (root), synced", f"{t.seconds:.1f} s", mib(t.max_rss)],
            ["vml env restore of one 40 MiB file", f"{b.seconds:.1f} s", mib(b.max_rss)],
        ],
    )


if __name__ == "__main__":
    main()
