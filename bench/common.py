"""Shared pieces of the benchmarks: real test images, timing, peak memory, tables.

Benchmarks run VML and an anchor (a well-known tool doing the same job) side
by side in one run on the same input, and print ratios; absolute figures on
a shared 2-core machine are noisy, ratios much less so.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VML = [sys.executable, "-m", "vml"]


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit(f"bench: needs {', '.join(missing)}; run scripts/install-deps --bench")


def real_tree(dest: Path, megabytes: int, sources=("/usr/lib", "/usr/share", "/usr/bin")) -> Path:
    """A directory of real system files (hard links when possible), about ``megabytes`` MiB."""
    budget = megabytes << 20
    dest.mkdir(parents=True, exist_ok=True)
    for src_root in sources:
        for dirpath, dirnames, filenames in os.walk(src_root):
            dirnames.sort()
            for fn in sorted(filenames):
                src = Path(dirpath) / fn
                if src.is_symlink() or not src.is_file():
                    continue
                size = src.stat().st_size
                if size == 0 or size > budget:
                    continue
                target = dest / src.relative_to("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, target)
                except OSError:
                    shutil.copy2(src, target)
                budget -= size
                if budget <= 0:
                    return dest
    return dest


def mkfs_ext4(image: Path, size: str, tree: Path) -> Path:
    image.unlink(missing_ok=True)
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
    return image


def drop_caches() -> bool:
    """Drop the page cache (root only); False when not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


@dataclass
class Run:
    seconds: float
    max_rss: int  # bytes


def run(cmd, env=None, cwd=None) -> Run:
    """Run a command; return wall time and the child's peak resident memory.

    Output goes to temporary files, not pipes, so a chatty command cannot
    block on a full pipe while we wait for it.
    """
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        p = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=out)
        _, status, usage = os.wait4(p.pid, 0)
        elapsed = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            out.seek(0)
            sys.exit(f"bench: {' '.join(map(str, cmd))} failed ({p.returncode}):\n{out.read().decode()}")
    return Run(elapsed, usage.ru_maxrss * 1024)


def median_run(cmd_factory, repeat: int, before=None, env=None) -> Run:
    """Median wall time over ``repeat`` runs; ``cmd_factory(i)`` gives the i-th command."""
    runs = []
    for i in range(repeat):
        if before:
            before(i)
        runs.append(run(cmd_factory(i), env=env))
    return Run(statistics.median(r.seconds for r in runs), max(r.max_rss for r in runs))


def vml_env(home: Path) -> dict:
    return dict(os.environ, VML_HOME=str(home))


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}\n")
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    print(line.format(*cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line.format(*r))
    sys.stdout.flush()


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def qcow2_delta(top_raw: Path, backing: Path, backing_fmt: str, out: Path) -> Path:
    """A zstd-compressed qcow2 over ``backing`` holding only the clusters where ``top_raw`` differs.

    `qemu-img convert -B` copies the input's top layer, which for a raw input
    is everything; so first make an empty overlay on the raw image and rebase
    it (safe mode) onto ``backing``, which copies exactly the clusters that
    differ, then compress that layer.
    """
    overlay = out.with_suffix(".overlay.qcow2")
    for p in (overlay, out):
        p.unlink(missing_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", top_raw, "-F", "raw", overlay])
    run(["qemu-img", "rebase", "-f", "qcow2", "-b", backing, "-F", backing_fmt, overlay])
    run(
        [
            "qemu-img",
            "convert",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            "-c",
            "-o",
            "compression_type=zstd",
            "-B",
            backing,
            "-F",
            backing_fmt,
            overlay,
            out,
        ]
    )
    overlay.unlink()
    return out
