"""Delta size: what an incremental entry costs after a few files changed.

A 1 GiB ext4 image made with mkfs.ext4 -d from real files gets 8 MB of new
files written into it with debugfs (once text, once random bytes). Each
variant is saved on its parent and exported; the bundle is what a user
would mail. Anchors on the same bytes: a compressed qcow2 overlay holding
only the clusters that differ from the base (qemu-img convert -B), and
borg's deduplicated size of the second archive. The run also sweeps the
chunk size, with the full-save time, which is how the default was chosen.
Targets: bundle < 6 MB for text, < 10 MB for random.

    .venv/bin/python bench/delta_size.py [--workdir DIR]
"""

import argparse
import json
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

from common import VML, mkfs_ext4, need, print_table, qcow2_delta, real_tree, run, vml_env

CHUNK_SIZES = ["64K", "128K", "256K", "512K", "1M"]
NEW_BYTES = 8 << 20


def new_files(kind: str, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    if kind == "text":
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        text = b"".join(p.read_bytes() for p in sorted(stdlib.rglob("*.py")))
    else:
        text = os.urandom(NEW_BYTES)
    files = []
    for i in range(8):
        f = dest / f"{kind}{i}.dat"
        f.write_bytes(text[i * (NEW_BYTES // 8) : (i + 1) * (NEW_BYTES // 8)])
        files.append(f)
    return files


def debugfs_add(image: Path, files: list[Path]) -> None:
    subprocess.run(["debugfs", "-w", "-R", "mkdir /results", str(image)], capture_output=True, check=True)
    for f in files:
        subprocess.run(
            ["debugfs", "-w", "-R", f"write {f} /results/{f.name}", str(image)], capture_output=True, check=True
        )


def borg_delta(w: Path, base: Path, changed: Path) -> int:
    env = dict(os.environ, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", BORG_BASE_DIR=str(w / "borgbase"))
    repo = w / f"borg-{changed.stem}"
    shutil.rmtree(repo, ignore_errors=True)
    run(["borg", "init", "-e", "none", repo], env=env)
    # Both archives hold the file under the same name, as a user's backups would.
    stage = w / "borgstage"
    stage.mkdir(exist_ok=True)
    for i, img in enumerate((base, changed)):
        shutil.copy(img, stage / "disk.img")
        run(["borg", "create", "--compression", "zstd,3", f"{repo}::a{i}", "disk.img"], env=env, cwd=stage)
    out = subprocess.run(
        ["borg", "info", "--json", f"{repo}::a1"], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)["archives"][0]["stats"]["deduplicated_size"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/vml-bench"))
    args = ap.parse_args()
    need("mkfs.ext4", "debugfs", "qemu-img", "borg")
    w = args.workdir / "delta"
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    base = mkfs_ext4(w / "base.img", "1G", real_tree(w / "tree", 450))
    shutil.rmtree(w / "tree")
    changed = {}
    for kind in ("text", "random"):
        img = w / f"{kind}.img"
        subprocess.run(["cp", "--sparse=always", str(base), str(img)], check=True)
        debugfs_add(img, new_files(kind, w / f"new-{kind}"))
        changed[kind] = img

    env = vml_env(w / "home")
    rows = []
    summary = {}
    for cs in CHUNK_SIZES:
        repo = w / f"repo-{cs}"
        run([*VML, "init", repo, "--chunk-size", cs, "--name", f"r{cs}"], env=env)
        t = run([*VML, "save", "base", "--from", base, "--repo", repo], env=env).seconds
        row = [cs, f"{t:.2f}"]
        for kind, img in changed.items():
            run([*VML, "save", kind, "--from", img, "--parent", "base", "--repo", repo], env=env)
            bundle = w / f"{kind}-{cs}.vml"
            run([*VML, "export", kind, "-o", bundle, "--repo", repo], env=env)
            size = bundle.stat().st_size
            row.append(f"{size / 1e6:.2f}")
            summary[(cs, kind)] = size
        rows.append(row)
    print_table(
        "vml: bundle of the incremental entry after adding 8 MB of files to a 1 GiB ext4 image",
        ["chunk size", "full save s", "text bundle MB", "random bundle MB"],
        rows,
    )
    anchors = []
    for kind, img in changed.items():
        q = qcow2_delta(img, base, "raw", w / f"{img.stem}.qcow2").stat().st_size
        b = borg_delta(w, base, img)
        v = summary[("256K", kind)]
        anchors.append([kind, f"{v / 1e6:.2f}", f"{q / 1e6:.2f}", f"{b / 1e6:.2f}", f"{q / v:.2f}", f"{b / v:.2f}"])
    print_table(
        "Same changes, default chunk size, against the anchors",
        ["files", "vml bundle MB", "qcow2 overlay MB", "borg dedup MB", "qcow2 / vml", "borg / vml"],
        anchors,
    )
    for kind, limit in (("text", 6e6), ("random", 10e6)):
        size = summary[("256K", kind)]
        verdict = "met" if size < limit else "MISSED"
        print(f"target {kind} bundle < {limit / 1e6:.0f} MB: {size / 1e6:.2f} MB, {verdict}")


if __name__ == "__main__":
    main()
