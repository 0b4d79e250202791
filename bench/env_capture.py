"""Environment backups: capturing a home from a disk image, and what a second backup adds.

A home of 50,000 small files (about 500 MB: 500 directories of 100 files of
2-18 KB, half random, half text) in an ext4 image made with mkfs.ext4 -d.
Side by side, cold page cache before each run:

- `vml env save --from ENTRY` (the image saved as an entry first, not timed:
  a user captures from entries that exist);
- anchor 1: `tar -c` of the home from a read-only loop mount (root only);
- anchor 2: libguestfs's tar-out, what `virt-tar-out` runs (guestfish, as
  virt-tar-out wants an OS it can inspect; an appliance booted under TCG here).

Then three small files of the home change in the image (debugfs, as a VM
changes them: every other inode stays as it was), the image is saved on
its parent, and `vml env save --parent` stores the second backup: the
target is under 100 KiB. Its bundle (`vml export`) is what a user would mail.

    .venv/bin/python bench/env_capture.py [--workdir DIR] [--files N] [--no-guestfs]
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import VML, drop_caches, mib, need, print_table, run, vml_env

SIZE = "1200M"


def make_home(root: Path, files: int, seed: int = 1) -> Path:
    rnd = random.Random(seed)
    home = root / "home" / "alice"
    for d in range(files // 100):
        p = home / f"proj{d // 50}" / f"dir{d}"
        p.mkdir(parents=True, exist_ok=True)
        for f in range(100):
            n = rnd.randint(2000, 18000)
            (p / f"f{f}.txt").write_bytes(rnd.randbytes(n // 2) + b"event data " * ((n - n // 2) // 11))
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "os-release").write_text('ID=cernvm\nVERSION_ID="4.1"\n')
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/bash\n")
    (home / ".bash_history").write_text("root -l\n")
    (home / ".profile").write_text("export ANALYSIS=/data\n")
    for p in [home, *home.rglob("*")]:
        os.lchown(p, 1000, 1000)
    return home


def mkfs(tree: Path, image: Path) -> Path:
    image.unlink(missing_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), SIZE], check=True)
    return image


def ratio(a, b) -> str:
    return f"{a.seconds / b.seconds:.2f}"


def show_json(env: dict, entry: str) -> dict:
    return json.loads(subprocess.run([*VML, "show", entry, "--json"], env=env, capture_output=True, check=True).stdout)


def cold() -> None:
    if not drop_caches():
        print("(cannot drop the page cache: not root; figures are warm)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--no-guestfs", action="store_true", help="leave out virt-tar-out (its appliance is slow)")
    args = ap.parse_args()
    need("mkfs.ext4", "tar", "mount")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vml-bench-env-"))
    work.mkdir(parents=True, exist_ok=True)
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    home_dir = make_home(tree, args.files)
    image = mkfs(tree, work / "home.img")
    nbytes = sum(p.stat().st_size for p in home_dir.rglob("*") if p.is_file())
    nfiles = sum(1 for _ in home_dir.rglob("*"))
    print(f"home: {nfiles} files and directories, {mib(nbytes)} in files; image {image.stat().st_size >> 20} MiB")

    vhome = work / "vmlhome"
    for d in (vhome, work / "rep"):
        shutil.rmtree(d, ignore_errors=True)
    env = vml_env(vhome)
    run([*VML, "init", work / "rep"], env=env)
    subprocess.run([*VML, "save", "vm1", "--from", image], env=env, check=True, capture_output=True)

    rows = []
    cold()
    v = run([*VML, "env", "save", "env1", "--from", "vm1", "--user", "alice"], env=env)
    rows.append(["vml env save --from ENTRY", f"{v.seconds:.1f} s", mib(v.max_rss), "1.00"])

    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop,ro", str(image), str(mnt)], check=True)
    try:
        cold()
        t = run(["sh", "-c", f"tar -C {mnt} -cf - home/alice | cat > /dev/null"])
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    rows.append(["tar -c from a loop mount (root)", f"{t.seconds:.1f} s", mib(t.max_rss), ratio(v, t)])

    if not args.no_guestfs:
        need("guestfish")
        genv = dict(os.environ, LIBGUESTFS_BACKEND="direct", LIBGUESTFS_BACKEND_SETTINGS="force_tcg")
        cold()
        # virt-tar-out itself needs an OS it can inspect (fstab, ...); guestfish does the same tar-out.
        g = run(["sh", "-c", f"guestfish --ro -a {image} -m /dev/sda tar-out /home/alice - > /dev/null"], env=genv)
        rows.append(["libguestfs tar-out (virt-tar-out's job; TCG)", f"{g.seconds:.1f} s", mib(g.max_rss), ratio(v, g)])
    print_table(
        f"capturing a home of {nfiles} files ({mib(nbytes)}) from a disk image",
        ["what", "time", "peak memory", "vml time / this"],
        rows,
    )

    # Three small files change in the image, as a VM changes them: the other inodes stay as they were.
    image2 = work / "home2.img"
    shutil.copyfile(image, image2)
    changes = {"proj0/dir0/f1.txt": b"changed\n", "proj3/dir170/f7.txt": b"changed too\n", ".bash_history": b"make\n"}
    script = work / "changes.debugfs"
    lines = []
    for i, (rel, data) in enumerate(changes.items()):
        (work / f"change{i}").write_bytes(data)
        parent, name = os.path.split(f"/home/alice/{rel}")
        lines += [f"cd {parent}", f"rm {name}", f"write {work / f'change{i}'} {name}", f"sif {name} uid 1000"]
    script.write_text("\n".join(lines) + "\n")
    subprocess.run(["debugfs", "-w", "-f", str(script), str(image2)], check=True, capture_output=True)
    subprocess.run([*VML, "save", "vm2", "--from", image2, "--parent", "vm1"], env=env, check=True, capture_output=True)
    cold()
    p = run([*VML, "env", "save", "env2", "--from", "vm2", "--user", "alice", "--parent", "env1"], env=env)
    show = show_json(env, "env2")
    bundle = work / "env2.vmlb"
    bundle.unlink(missing_ok=True)
    subprocess.run([*VML, "export", "env2", "-o", bundle], env=env, check=True, capture_output=True)
    first = show_json(env, "env1")
    print_table(
        "a second backup (--parent) after 3 small files changed",
        ["what", "figure", "target"],
        [
            ["first backup, stored", mib(first["stored_bytes"]), ""],
            ["second backup, stored", f"{show['stored_bytes'] / 1024:.1f} KiB", "< 100 KiB"],
            ["second backup, time (unchanged files not read)", f"{p.seconds:.1f} s", ""],
            ["its bundle (vml export env2)", f"{bundle.stat().st_size / 1024:.1f} KiB", "small enough to mail"],
        ],
    )


if __name__ == "__main__":
    main()
