"""Shared fixtures: a private VML home, the `vml` command, real ext4 images.

With VML_REQUIRE_ALL=1 (as .ci/run sets it) a test that skips for a missing
prerequisite is reported as a failure: CI must run everything.
"""

import importlib.util
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from vml.repo.repository import Repository
from vml.repo.store import Store

from servers import Nginx

REQUIRE_ALL = os.environ.get("VML_REQUIRE_ALL") == "1"


def pytest_addoption(parser):
    parser.addoption(
        "--faults-long",
        action="store_true",
        help="run the fault loops of tests/test_faults.py 1000 times each instead of 50 (or VML_FAULTS_LONG=1)",
    )


# -- the fault suite's tally -----------------------------------------------------

FAULT_TALLY: list[dict] = []  # one row per fault loop: what, tries, held, outcomes


class FaultLoop:
    """Repeat a fault ``tries`` times; each try's checks run in ``with attempt:``.

    A try whose checks fail is counted, not raised at once, so that the tally
    shows how often the property held; the loop then fails the test.
    """

    def __init__(self, what: str, tries: int):
        self.what, self.tries = what, tries
        self.failures: list[str] = []
        self.outcomes: dict[str, int] = {}

    def __iter__(self):
        for i in range(self.tries):
            yield _Attempt(self, i)
        FAULT_TALLY.append(
            {"fault": self.what, "tries": self.tries, "held": self.tries - len(self.failures), **self.outcomes}
        )
        assert not self.failures, (
            f"{self.what}: {len(self.failures)} of {self.tries} tries failed; first: " + (self.failures[0])
        )

    def outcome(self, label: str) -> None:
        self.outcomes[label] = self.outcomes.get(label, 0) + 1


class _Attempt:
    def __init__(self, loop: FaultLoop, index: int):
        self.loop, self.index = loop, index

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None and issubclass(kind, Exception):
            self.loop.failures.append(f"try {self.index}: {kind.__name__}: {exc}")
            return True
        return False


@pytest.fixture
def faults(request):
    """``faults(what)`` makes a FaultLoop of 50 tries, or 1000 with --faults-long."""
    long = request.config.getoption("--faults-long") or os.environ.get("VML_FAULTS_LONG") == "1"

    def make(what: str, tries: int = 50, long_tries: int = 1000) -> FaultLoop:
        return FaultLoop(what, long_tries if long else tries)

    return make


def pytest_terminal_summary(terminalreporter):
    if not FAULT_TALLY:
        return
    terminalreporter.section("fault suite: tries and how many held")
    for row in FAULT_TALLY:
        extra = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("fault", "tries", "held"))
        terminalreporter.write_line(
            f"{row['fault']:<58} {row['tries']:>5} tries {row['held']:>5} held" + (f"  ({extra})" if extra else "")
        )
    report = os.environ.get("VML_FAULTS_REPORT")
    if report:
        import json

        Path(report).write_text(json.dumps(FAULT_TALLY, indent=1) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but VML_REQUIRE_ALL=1 forbids skips: {reason}"


def need(*tools: str) -> None:
    """Skip (a failure in CI) unless every tool is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (run scripts/install-deps)")


def need_fuse() -> None:
    need("fusermount3")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    if os.geteuid() != 0:
        pytest.skip("the mount tests run as root (they mount with allow_other)")


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (to mount a small tmpfs)")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private $VML_HOME for the test."""
    h = tmp_path / "home"
    monkeypatch.setenv("VML_HOME", str(h))
    return h


class Vml:
    """Runs the real `vml` command in a subprocess."""

    def __init__(self, home: Path, cwd: Path):
        self.env = dict(os.environ, VML_HOME=str(home))
        self.cwd = cwd

    def __call__(self, *args, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [sys.executable, "-m", "vml", *map(str, args)],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.cwd,
            timeout=timeout,
            check=False,
        )
        if ok and r.returncode != 0:
            raise AssertionError(f"vml {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        return r

    def fails(self, *args, status: int | None = None) -> str:
        """Run a command that must fail with one line of error; return that line."""
        r = self(*args, ok=False)
        assert r.returncode != 0, f"vml {' '.join(map(str, args))} unexpectedly succeeded:\n{r.stdout}"
        if status is not None:
            assert r.returncode == status, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vml: error: "), r.stderr
        return lines[0]

    def popen(self, *args) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "vml", *map(str, args)],
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )


@pytest.fixture
def vml(home, tmp_path) -> Vml:
    return Vml(home, tmp_path)


def hold_lock(repo: Path, command: str, then: str = "", seconds: float = 2) -> subprocess.Popen:
    """Another process holding ``repo``'s writer lock for ``seconds``; ``then`` runs once it has it.

    Returns once the lock is held; ``then`` is Python with ``s`` the Store.
    """
    code = (
        "import sys, time\nfrom vml.repo import objects\nfrom vml.repo.store import Store\ns = Store(sys.argv[1])\n"
        f"with s.lock({command!r}):\n    {then or 'pass'}\n    print('held', flush=True)\n    time.sleep({seconds})"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(repo)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def mount_pid(home: Path) -> int | None:
    from vml import control

    state = control.mount_state(home)
    return state["pid"] if state else None


@pytest.fixture
def mounted(vml, home, tmp_path):
    """Start `vml mount` on a fresh mount point; always unmount in teardown."""
    need_fuse()
    mp = tmp_path / "mnt"
    vml("mount", mp)
    yield mp
    subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)
    pid = mount_pid(home)
    if pid:
        deadline = time.monotonic() + 10
        while mount_pid(home) and time.monotonic() < deadline:
            time.sleep(0.05)
        if mount_pid(home):
            os.kill(pid, 9)


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)`` mounts a small tmpfs (a disk that fills up) under tmp_path; all go in teardown."""
    need_root()
    need("mount", "umount")
    mounted = []

    def make(size: str) -> Path:
        mnt = tmp_path / f"small{len(mounted)}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def repo(tmp_path) -> Repository:
    """A library-level repository with small chunks, for fast tests."""
    return Repository(Store.create(tmp_path / "repo", chunk_size=4096), "repo")


# -- real images ----------------------------------------------------------------


def file_tree(dest: Path, megabytes: int, seed: int = 0) -> Path:
    """A directory of real files: Python stdlib sources plus some random data."""
    rng = random.Random(seed)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in stdlib.glob("*.py"))
    budget = megabytes << 20
    dest.mkdir(parents=True, exist_ok=True)
    i = 0
    while budget > 0:
        src = sources[i % len(sources)]
        target = dest / f"d{i // 50}" / f"{i}_{src.name}"
        target.parent.mkdir(exist_ok=True)
        data = src.read_bytes()
        if i % 7 == 0:
            data += rng.randbytes(min(budget, 64 << 10))
        target.write_bytes(data)
        budget -= len(data)
        i += 1
    return dest


def mkfs_ext4(image: Path, size_mb: int, tree: Path) -> Path:
    need("mkfs.ext4")
    subprocess.run(["truncate", "-s", f"{size_mb}M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
    return image


def debugfs_write(image: Path, files: dict[str, bytes], workdir: Path) -> None:
    """Add files to an ext4 image without mounting it."""
    need("debugfs")
    workdir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        src = workdir / name.replace("/", "_")
        src.write_bytes(data)
        r = subprocess.run(
            ["debugfs", "-w", "-R", f"write {src} /{name}", str(image)], capture_output=True, text=True, check=False
        )
        assert r.returncode == 0 and "error" not in r.stderr.lower(), r.stderr


@pytest.fixture(scope="session")
def ext4_image(tmp_path_factory) -> Path:
    """A 64 MiB ext4 image with ~20 MiB of real files (shared; copy before changing)."""
    d = tmp_path_factory.mktemp("ext4")
    return mkfs_ext4(d / "base.img", 64, file_tree(d / "tree", 20))


@pytest.fixture
def image_copy(ext4_image, tmp_path):
    def copy(name: str = "disk.img") -> Path:
        dest = tmp_path / name
        subprocess.run(["cp", "--sparse=always", str(ext4_image), str(dest)], check=True)
        return dest

    return copy


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# -- a published repository, and remotes on it --------------------------------------


@pytest.fixture(scope="session")
def published(tmp_path_factory, ext4_image):
    """rep1 with base (the ext4 image) and e2 (8 MB of files added), published with a key."""
    need("nginx")
    d = tmp_path_factory.mktemp("publisher")
    vml = Vml(d / "home", d)
    img = d / "disk.img"
    shutil.copy(ext4_image, img)
    vml("init", d / "rep1")
    vml("save", "base", "--from", img)
    shutil.copy(img, d / "base.img")
    debugfs_write(img, {"added.bin": os.urandom(4 << 20), "notes.txt": b"hello remote\n" * 300000}, d / "w")
    vml("save", "e2", "--from", img, "--parent", "base")
    vml("keygen", d / "key")
    vml("publish", d / "pub", "--key", d / "key")
    return {
        "dir": d,
        "pub": d / "pub",
        "key": d / "key",
        "pubkey": d / "key.pub",
        "image": img,
        "base_image": d / "base.img",
        "vml": vml,
    }


@pytest.fixture(scope="session")
def origin(published):
    """nginx serving the published repository (shared: tests must not change its files)."""
    server = Nginx(published["pub"])
    yield server
    server.stop()


def add_remote(vml, origin, published, *extra, name="cern"):
    vml("remote", "add", name, origin.url, "--key", published["pubkey"], *extra)


def set_remote(home: Path, name: str = "cern", **settings) -> None:
    """Change settings of a remote in config.toml, as a user would."""
    import tomllib

    import tomli_w

    path = home / "config.toml"
    doc = tomllib.loads(path.read_text())
    doc["remotes"][name].update(settings)
    path.write_text(tomli_w.dumps(doc))


@pytest.fixture(scope="session")
def guest_disk() -> Path:
    need("qemu-system-x86_64", "apt-get", "dpkg-deb", "cpio", "mkfs.vfat", "syslinux", "mcopy", "mtype")
    spec = importlib.util.spec_from_file_location("guest_build", Path(__file__).parent / "guest" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build()
