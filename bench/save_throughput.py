"""Save throughput: `vml save` against borg and qemu-img on the same 2 GiB ext4 image.

The image is made with mkfs.ext4 -d from about 1 GiB of real system files,
so half of it is free space, as the issue asks. Each tool runs into a fresh
destination, with the page cache warm (the image just read) and cold
(caches dropped, root only). Targets: vml full save >= 600 MB/s logical,
and format 2 (packs) no more than 10% slower than format 1 (a file per chunk).

    .venv/bin/python bench/save_throughput.py [--workdir DIR] [--repeat N]
"""

import argparse
import os
import shutil
from pathlib import Path

from common import VML, drop_caches, median_run, mkfs_ext4, need, print_table, real_tree, run, vml_env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/vml-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--data-mb", type=int, default=1024)
    args = ap.parse_args()
    need("mkfs.ext4", "borg", "qemu-img")
    w = args.workdir / "save"
    w.mkdir(parents=True, exist_ok=True)
    image = w / "disk.img"
    if not image.exists():
        tree = real_tree(w / "tree", args.data_mb)
        mkfs_ext4(image, args.size, tree)
        shutil.rmtree(tree)
    size = image.stat().st_size
    used = os.stat(image).st_blocks * 512
    print(f"image: {image}, {size / 2**30:.1f} GiB, {used / 2**30:.2f} GiB allocated, {os.cpu_count()} cores")

    env = vml_env(w / "home")
    borg_env = dict(os.environ, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", BORG_BASE_DIR=str(w / "borgbase"))
    runs = w / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()

    # Every run writes into a new destination. Deleting the previous one
    # just before would penalise whoever runs next: ext4 avoids reusing
    # inodes freed in the last seconds, and that search costs more than the
    # save itself.
    def dest(tool: str, mode: str, i: int) -> Path:
        return runs / f"{tool}-{mode}-{i}"

    def prepare(tool, mode):
        def before(i):
            d = dest(tool, mode, i)
            if tool == "vml":
                run([*VML, "init", d, "--name", d.name], env=env)
            elif tool == "vml1":
                run([*VML, "init", d, "--name", d.name, "--format", "1"], env=env)
            elif tool == "borg":
                run(["borg", "init", "-e", "none", d], env=borg_env)
            if mode == "warm":
                run(["cat", image])
            else:
                drop_caches()

        return before

    tools = {
        "vml save (full)": ("vml", lambda d, i: [*VML, "save", "e", "--from", image, "--repo", d], env),
        "vml save (full), format 1": ("vml1", lambda d, i: [*VML, "save", "e", "--from", image, "--repo", d], env),
        "borg create (zstd,3)": (
            "borg",
            lambda d, i: ["borg", "create", "--compression", "zstd,3", f"{d}::a", image],
            borg_env,
        ),
        "qemu-img convert -c (qcow2, zstd)": (
            "qemu",
            lambda d, i: [
                "qemu-img",
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-c",
                "-o",
                "compression_type=zstd",
                image,
                d,
            ],
            None,
        ),
    }
    can_drop = drop_caches()
    rows = []
    results = {}
    for name, (tool, cmd, tool_env) in tools.items():
        for mode in ("warm", "cold"):
            if mode == "cold" and not can_drop:
                continue
            r = median_run(
                lambda i, tool=tool, mode=mode, cmd=cmd: cmd(dest(tool, mode, i), i),
                args.repeat,
                before=prepare(tool, mode),
                env=tool_env,
            )
            results[(name, mode)] = r.seconds
            rows.append([name, mode, f"{r.seconds:.2f}", f"{size / r.seconds / 1e6:.0f}", f"{r.max_rss / 2**20:.0f}"])
    vml_warm = results[("vml save (full)", "warm")]
    for row in rows:
        row.append(f"{results[(row[0], row[1])] / results[('vml save (full)', row[1])]:.2f}")
    print_table(
        f"Full save of a {size / 2**30:.0f} GiB ext4 image (median of {args.repeat})",
        ["tool", "cache", "seconds", "logical MB/s", "peak RSS MiB", "time / vml's"],
        rows,
    )

    # Saving the same image again on its parent: the delta path (hash and compare only).
    repo = dest("vml", "incremental", 0)
    run([*VML, "init", repo, "--name", "incremental"], env=env)
    run([*VML, "save", "base", "--from", image, "--repo", repo], env=env)
    r = median_run(
        lambda i: [*VML, "save", f"again{i}", "--from", image, "--parent", "base", "--repo", repo],
        args.repeat,
        before=lambda i: run(["cat", image]),
        env=env,
    )
    print(f"\nincremental save of the unchanged image: {r.seconds:.2f} s, {size / r.seconds / 1e6:.0f} MB/s logical")
    verdict = "met" if size / vml_warm / 1e6 >= 600 else "MISSED"
    print(f"target >= 600 MB/s logical (warm): {size / vml_warm / 1e6:.0f} MB/s, {verdict}")
    for mode in ("warm", "cold"):
        if (name := ("vml save (full), format 1", mode)) in results:
            slower = results[("vml save (full)", mode)] / results[name] - 1
            verdict = "met" if slower <= 0.10 else "MISSED"
            print(f"format 2 against format 1 ({mode}): {100 * slower:+.0f}% time (target at most +10%), {verdict}")
    shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    main()
