"""Peak memory: saving and checking out a 20 GiB sparse image.

The image is a 20 GiB ext4 file system made with mkfs.ext4 -d from real
files, plus 1 MiB blocks of random data scattered across its whole length
(so the chunk table spans all of it). Peak resident memory (ru_maxrss of the
child) is compared with qemu-img convert and cp --sparse=always doing the
same copy. Target: a few hundred MB at most.

    .venv/bin/python bench/memory.py [--workdir DIR]
"""

import argparse
import os
import shutil
from pathlib import Path

from common import VML, mkfs_ext4, need, print_table, real_tree, run, vml_env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/vml-bench"))
    ap.add_argument("--size-gb", type=int, default=20)
    args = ap.parse_args()
    need("mkfs.ext4", "qemu-img")
    w = args.workdir / "memory"
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    image = mkfs_ext4(w / "big.img", f"{args.size_gb}G", real_tree(w / "tree", 300))
    shutil.rmtree(w / "tree")
    size = image.stat().st_size
    with open(image, "r+b") as f:
        for i in range(1, 101):  # 100 MiB more, spread over the whole disk
            f.seek(size * i // 102)
            f.write(os.urandom(1 << 20))
    print(f"image: {size / 2**30:.0f} GiB, {os.stat(image).st_blocks * 512 / 2**20:.0f} MiB allocated")

    env = vml_env(w / "home")
    repo = w / "repo"
    run([*VML, "init", repo], env=env)
    rows = []
    save = run([*VML, "save", "big", "--from", image, "--repo", repo], env=env)
    checkout = run([*VML, "checkout", "big", w / "out", "--repo", repo], env=env)
    qemu = run(["qemu-img", "convert", "-f", "raw", "-O", "raw", image, w / "qemu.img"])
    cp = run(["cp", "--sparse=always", image, w / "cp.img"])
    for name, r in (
        ("vml save", save),
        ("vml checkout", checkout),
        ("qemu-img convert (raw)", qemu),
        ("cp --sparse=always", cp),
    ):
        rows.append([name, f"{r.seconds:.1f}", f"{r.max_rss / 2**20:.0f}", f"{r.max_rss / qemu.max_rss:.1f}"])
    print_table(
        f"Peak memory on a {args.size_gb} GiB sparse image",
        ["command", "seconds", "peak RSS MiB", "RSS / qemu-img's"],
        rows,
    )
    run(["cmp", image, w / "out" / "big.img"])  # exits on any difference
    peak = max(save.max_rss, checkout.max_rss)
    print("checkout identical to the image: yes (cmp)")
    print(f"target: a few hundred MB at most: peak {peak / 2**20:.0f} MiB, {'met' if peak < 300 << 20 else 'MISSED'}")
    shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
