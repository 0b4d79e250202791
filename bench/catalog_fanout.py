"""The catalog behind a Squid: origin requests of 8 clients over 5 minutes, with and without sharing.

The one file a client fetches again and again is the catalog (every
``catalog_ttl``, 60 s). Two setups side by side in one run, each with its
own nginx origin (docs/remote.md's headers: the catalog ``public,
max-age=61``) and its own Squid (docs/remote.md's settings), 8 clients each:

- anchor: clients ask for the catalog with ``catalog_max_age = 0``
  (``Cache-Control: no-cache``), as vml did before: every refresh of every
  node reaches the origin;
- vml: ``catalog_max_age = 60`` (``Cache-Control: max-age=60``): the Squid
  answers from its copy while it is at most a minute old, as CernVM-FS lets
  Squids keep ``.cvmfspublished`` for 61 s.

Each client is its own process and VML home, starts at a random moment in
the first minute (as nodes do), and asks for the catalog every second (the
TTL decides when it really fetches). Half-way, the publisher re-signs the
catalog (revision + 1); the run also reports how long the last client took
to see it.

    .venv/bin/python bench/catalog_fanout.py [--seconds 300] [--clients 8]
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from common import need, print_table
from servers import Nginx, Squid, documented_squid_settings

VML = [sys.executable, "-m", "vml"]

CLIENT = """
import random, sys, time
from vml.config import Config
from vml.remotes.remote import open_remote
home, seconds, start = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
store = open_remote(__import__("pathlib").Path(home), Config.load(__import__("pathlib").Path(home)).remotes["cern"])
time.sleep(random.uniform(0, 60))
first = None
while time.time() < start + seconds:
    rev = store.catalog().revision
    first = first or rev
    if rev > first:
        print(f"new {time.time():.3f}", flush=True)
        first = rev
    time.sleep(1)
"""


def vml(home: Path, *args) -> None:
    subprocess.run([*VML, *map(str, args)], env={"VML_HOME": str(home), "PATH": "/usr/bin:/bin"}, check=True,
                   capture_output=True)  # fmt: skip


def setup(work: Path, name: str, source: Path, key: Path, clients: int, max_age: int):
    pub = work / f"pub-{name}"
    shutil.copytree(source, pub)
    origin, squid = Nginx(pub), Squid(documented_squid_settings())
    homes = []
    for i in range(clients):
        h = work / f"{name}-{i}"
        vml(
            h, "remote", "add", "cern", origin.url, "--key", key.with_suffix(".pub"), "--proxy", squid.url, "--no-check"
        )
        with open(h / "config.toml", "a") as f:
            f.write(f"catalog_max_age = {max_age}\n")  # [remotes.cern] is the last table
        homes.append(h)
    return pub, origin, squid, homes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    need("nginx", "squid")
    work = Path(tempfile.mkdtemp(prefix="vml-bench-catalog."))
    try:
        img = work / "d.img"
        img.write_bytes(b"\0" * (4 << 20))
        vml(work / "publisher", "init", work / "rep")
        vml(work / "publisher", "save", "base", "--from", img)
        key = work / "key"
        vml(work / "publisher", "keygen", key)
        vml(work / "publisher", "publish", work / "pub", "--key", key)
        setups = {n: setup(work, n, work / "pub", key, args.clients, age) for n, age in (("anchor", 0), ("vml", 60))}
        start = time.time()
        procs = {
            n: [subprocess.Popen([sys.executable, "-c", CLIENT, str(h), str(args.seconds), str(start)],
                                 stdout=subprocess.PIPE, text=True) for h in s[3]]
            for n, s in setups.items()
        }  # fmt: skip
        time.sleep(args.seconds / 2)
        published = time.time()
        for pub, *_ in setups.values():
            vml(work / "publisher", "publish", pub, "--key", key, "--resign")
        outputs = {n: [p.communicate()[0] for p in ps] for n, ps in procs.items()}
        rows, counts = [], {}
        for n, (_, origin, squid, _) in setups.items():
            cat = [(st, size) for _, p, st, size in origin.requests() if p == "/catalog.json"]
            counts[n] = len(cat)
            seen = [float(line.split()[1]) - published for out in outputs[n] for line in out.splitlines()]
            late = f"{max(seen):.0f} s ({len(seen)}/{args.clients} saw it)" if seen else "none saw it"
            full = sum(1 for st, _ in cat if st == 200)
            rows.append([n, len(cat), full, len(cat) - full, sum(s for _, s in cat), late])
            squid.stop()
            origin.stop()
        print_table(
            f"Catalog requests reaching the origin: {args.clients} clients behind one Squid, {args.seconds:.0f} s",
            ["setup", "origin requests", "200", "other (304)", "bytes", "last client saw the re-signed catalog after"],
            rows,
        )
        print(f"\nratio (anchor / vml): {counts['anchor'] / max(1, counts['vml']):.1f}x fewer origin requests")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
