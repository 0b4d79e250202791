"""How fast the release manager's pages render with 500 entries in 5 repositories.

Target (issue 14): each page under 200 ms. Side by side in one run:

- each page of a real `vml web`, fetched over HTTP on loopback with a kept-alive
  connection (median of --repeat fetches after one warm-up);
- the anchor: `vml log` of the same 5 repositories, the CLI's own gathering and
  formatting of the same trees, timed in-process (no interpreter start-up), so the
  ratio shows what the web layer costs on top of reading the entries.

Usage: python bench/web_pages.py [--entries 500] [--repos 5] [--repeat 15]
"""

import argparse
import http.client
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import VML, print_table, vml_env

PAGES = [
    "/static/vml.css",
    "/",
    "/running",
    "/configure",
    "/cache",
    "/usage",
    "/backup",
    "/share",
    "/start?entry=rep0:e0-0",
]


def make_entries(home: Path, root: Path, repos: int, entries: int) -> None:
    """``entries`` tiny entries over ``repos`` repositories: chains of 10 (a root and 9 incrementals)."""
    os.environ["VML_HOME"] = str(home)
    from vml import config
    from vml import home as vml_home
    from vml.entries.save import save_source
    from vml.repo.store import DEFAULT_CHUNK_SIZE

    image = root / "disk.img"
    per_repo = entries // repos
    for r in range(repos):
        vml_home.init_repository(home, root / f"rep{r}", f"rep{r}", DEFAULT_CHUNK_SIZE, r == 0)
        repo = config.Config.load(home).open(f"rep{r}")
        for i in range(per_repo):
            chain, step = divmod(i, 10)
            with open(image, "wb") as f:
                f.truncate(4 << 20)
                f.seek((step * 256) << 10)
                f.write(os.urandom(4096))
            parent = f"e{chain}-{step - 1}" if step else None
            save_source(repo, f"e{chain}-{step}", image, parent=parent, message=f"chain {chain}, step {step}")


def fetch_times(port: int, page: str, repeat: int) -> tuple[float, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times, size = [], 0
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        conn.request("GET", page)
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            sys.exit(f"bench: GET {page} answered {r.status}: {body[:300]!r}")
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
        size = len(body)
    conn.close()
    return statistics.median(times), size


def log_time(home: Path, repos: int, repeat: int) -> tuple[float, int]:
    from vml import config
    from vml.cli.output import tree_lines

    times, lines = [], 0
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        cfg = config.Config.load(home)
        lines = sum(len(tree_lines(cfg.open(f"rep{r}"))) for r in range(repos))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=500)
    ap.add_argument("--repos", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vml-bench-web.") as tmp:
        root = Path(tmp)
        home = root / "home"
        t0 = time.perf_counter()
        make_entries(home, root, args.repos, args.entries)
        print(f"made {args.entries} entries in {args.repos} repositories in {time.perf_counter() - t0:.1f} s")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(
            [*VML, "web", "--listen", f"127.0.0.1:{port}"],
            env=vml_env(home),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
                if time.monotonic() > deadline or proc.poll() is not None:
                    sys.exit(f"bench: vml web did not start: {proc.stderr.read().decode()}")
                time.sleep(0.1)
            anchor, lines = log_time(home, args.repos, args.repeat)
            rows = []
            for page in PAGES:
                took, size = fetch_times(port, page, args.repeat)
                entries = "-"
                if page == "/":
                    conn = http.client.HTTPConnection("127.0.0.1", port)
                    conn.request("GET", page)
                    entries = len(re.findall(rb'data-entry="', conn.getresponse().read()))
                    conn.close()
                verdict = "met" if took < 0.2 else "MISSED"
                rows.append(
                    [page, f"{took * 1000:.1f} ms", f"{size / 1024:.0f} KiB", entries, f"{took / anchor:.2f}x", verdict]
                )
            print_table(
                f"pages of vml web with {args.entries} entries in {args.repos} repositories "
                f"(median of {args.repeat}); anchor: `vml log` of the {args.repos} repositories in-process, "
                f"{anchor * 1000:.1f} ms for {lines} lines",
                ["page", "time", "size", "entries listed", "vs vml log", "target < 200 ms"],
                rows,
            )
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
