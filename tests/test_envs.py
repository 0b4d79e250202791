"""Environment backups on real ext4 images: capture from an entry, restore through the mount into another base."""

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from vml.entries.envtree import Record
from vml.envs import guestfs

from conftest import need
from helpers import ENV_UID, OLD_NS, crafted_backup, d, f

ALICE_SRC, ALICE_DST = ENV_UID, 1001  # alice's number differs between the two guests: mapped by name
OLD = 1_600_000_000  # a time long past: files in the backup are older than the target's newer one


def guest_tree(root: Path, version: str, alice_uid: int, home: dict | None = None) -> Path:
    """A guest's root: os-release, passwd, group and (optionally) alice's home."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text(f'ID=cernvm\nVERSION_ID="{version}"\nPRETTY_NAME="CernVM {version}"\n')
    (root / "etc" / "passwd").write_text(
        f"root:x:0:0:root:/root:/bin/sh\nbob:x:999:999::/home/bob:/bin/sh\n"
        f"alice:x:{alice_uid}:{alice_uid}::/home/alice:/bin/bash\n"
    )
    (root / "etc" / "group").write_text(f"root:x:0:\nbob:x:999:\nalice:x:{alice_uid}:\n")
    (root / "etc" / "environment").write_text('LANG="en_US.UTF-8"\n')
    (root / "home").mkdir()
    for rel, content in (home or {}).items():
        p = root / "home" / "alice" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, tuple):  # ("symlink", target) or ("link", path in the home)
            if content[0] == "symlink":
                os.symlink(content[1], p)
            else:
                os.link(root / "home" / "alice" / content[1], p)
        else:
            p.write_bytes(content)
    alice = root / "home" / "alice"
    if alice.exists():
        for p in [alice, *alice.rglob("*")]:
            os.lchown(p, alice_uid, alice_uid)
            if not p.is_symlink():
                os.utime(p, (OLD, OLD))
    return root


def ext4_image(tree: Path, image: Path, size: str = "32M", offset: int = 0) -> Path:
    need("mkfs.ext4", "debugfs", "e2fsck")
    extra = ["-E", f"offset={offset}"] if offset else []
    subprocess.run(["mkfs.ext4", "-q", "-F", *extra, "-d", str(tree), str(image), size], check=True)
    return image


HOME = {
    "analysis/run.C": b"void run() {}\n" * 100,
    "analysis/big.dat": os.urandom(300_000),  # more than one slot
    "secret.key": b"k" * 32,
    ".bash_history": b"root -l\nmake\n",
    ".profile": b'export ANALYSIS=/data/atlas\nPATH="$HOME/bin:$PATH"\nSTAMP=$(date)\n',
    "Downloads/big.iso": b"iso" * 1000,
    "notes.txt": b"old notes\n",
    "latest": ("symlink", "analysis"),
    "zz-hardlink.C": ("link", "analysis/run.C"),
}


@pytest.fixture
def guests(vml, tmp_path):
    """rep with `src` (CernVM 4.1, alice's home) and `dst` (CernVM 5.0, alice with another uid, a newer notes.txt)."""
    src = guest_tree(tmp_path / "src", "4.1", ALICE_SRC, HOME)
    os.chmod(src / "home" / "alice" / "secret.key", 0o600)
    os.setxattr(src / "home" / "alice" / "analysis" / "run.C", "user.origin", b"cernvm 4.1")
    cache = src / "var" / "lib" / "cvmfs" / "shared"
    cache.mkdir(parents=True)
    (cache / "chunk").write_bytes(b"cached object" * 100)
    dst = guest_tree(tmp_path / "dst", "5.0", ALICE_DST, {"notes.txt": b"notes written on the new base\n"})
    os.utime(dst / "home" / "alice" / "notes.txt", (OLD + 10**6, OLD + 10**6))
    vml("init", tmp_path / "rep")
    vml("save", "src", "--from", ext4_image(src, tmp_path / "src.img"))
    vml("save", "dst", "--from", ext4_image(dst, tmp_path / "dst.img"))
    return tmp_path


@contextlib.contextmanager
def read_guest(image: Path, offset: int = 0):
    """The file system at ``offset`` of ``image``, read as vml reads it (closed after: the mount must unmount)."""
    with open(image, "rb") as fh:
        found = guestfs.filesystems("d", fh, image.stat().st_size, str(image))
        yield next(fs for fs in found if fs.offset == offset)


def test_a_home_opens_on_a_newer_base_with_owners_modes_and_environment(vml, guests, mounted):
    r = vml(
        "env",
        "save",
        "env1",
        "--from",
        "src",
        "--user",
        "alice",
        "--exclude",
        "Downloads",
        "--add",
        "/var/lib/cvmfs",
        "-m",
        "before",
    )
    assert "env1" in r.stdout and "environment" in r.stdout
    info = json.loads(vml("env", "show", "env1", "--json").stdout)
    assert {"name", "os", "user", "home", "files", "bytes", "environment", "source"} <= info.keys()
    assert info["os"]["version_id"] == "4.1" and info["home"] == "/home/alice" and info["user"] == "alice"
    assert info["environment"]["ANALYSIS"]["value"] == "/data/atlas"
    assert info["environment"]["PATH"]["raw"] == '"$HOME/bin:$PATH"'
    assert info["environment"]["LANG"]["value"] == "en_US.UTF-8"  # from /etc/environment
    assert [s["name"] for s in info["skipped"]] == ["STAMP"]  # computed by a command: never run
    assert "/home/alice/.bash_history" in info["histories"]
    assert "parsed, not executed" in info["source"]
    assert "environment" in vml("log").stdout
    shown = mounted / "rep" / "env1" / "home" / "alice"  # the captured tree, read-only, in the mount
    assert (shown / "analysis" / "big.dat").read_bytes() == HOME["analysis/big.dat"]
    assert (shown / "secret.key").stat().st_mode & 0o777 == 0o400
    assert sorted(os.listdir(shown)) == [
        ".bash_history",
        ".profile",
        "analysis",
        "notes.txt",
        "secret.key",
        "zz-hardlink.C",
    ]
    assert json.loads((mounted / "rep" / "env1" / "entry.json").read_text())["kind"] == "environment"

    before = vml("show", "dst", "--json").stdout
    vml("open", "dst", "--area", "a2")
    r = vml("env", "restore", "env1", "--area", "a2", "--add", "/var/lib/cvmfs/")
    assert "warning: entry 'env1' was saved on cernvm 4.1; area 'a2' runs cernvm 5.0" in r.stderr
    assert "/home/alice/notes.txt.vml-restored" in r.stdout

    disk = mounted / "areas" / "a2" / f"{json.loads(before)['disks'][0]['name']}.img"
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    with read_guest(disk) as fs:
        check_restored(fs)
        assert fs.read_text("/var/lib/cvmfs/shared/chunk") == "cached object" * 100  # --add, /var made for it

    assert vml("show", "dst", "--json").stdout == before  # the entry the area builds on is untouched
    vml("umount", mounted)
    assert vml("verify").returncode == 0


def check_restored(fs) -> None:
    walked = {it.path: it for it in fs.walk("/home/alice", lambda p, d: True)}
    run = walked["/home/alice/analysis/run.C"]
    assert (run.uid, run.gid, run.mode, run.mtime_ns) == (ALICE_DST, ALICE_DST, 0o644, OLD * 10**9)
    assert fs.read_file(run, 0, run.size) == HOME["analysis/run.C"]
    big = walked["/home/alice/analysis/big.dat"]
    assert fs.read_file(big, 0, big.size) == HOME["analysis/big.dat"]
    assert walked["/home/alice/secret.key"].mode == 0o600
    assert walked["/home/alice/zz-hardlink.C"].inum == run.inum  # still one file with two names
    assert run.xattrs == {"user.origin": b"cernvm 4.1"}
    assert walked["/home/alice/latest"].type == "l" and walked["/home/alice/latest"].target == "analysis"
    assert not any("Downloads" in p for p in walked)
    notes = walked["/home/alice/notes.txt"]
    assert fs.read_file(notes, 0, notes.size) == b"notes written on the new base\n"  # newer: kept
    kept = walked["/home/alice/notes.txt.vml-restored"]
    assert fs.read_file(kept, 0, kept.size) == b"old notes\n"
    profile = fs.read_text("/home/alice/.profile")
    assert profile.startswith("export ANALYSIS=/data/atlas") and '. "$HOME/.vml-environment"' in profile
    envfile = fs.read_text("/home/alice/.vml-environment")
    assert "export ANALYSIS=/data/atlas" in envfile and "export LANG=en_US.UTF-8" in envfile
    assert "STAMP" not in envfile


def test_a_second_backup_with_parent_stores_only_what_changed(vml, guests, tmp_path):
    vml("env", "save", "env1", "--from", "src", "--user", "alice")
    guest_tree(
        tmp_path / "src2",
        "4.1",
        ALICE_SRC,
        {**HOME, "notes.txt": b"new notes\n", "new.txt": b"x", ".profile": HOME[".profile"] + b"export NEW=1\n"},
    )
    vml("save", "src2", "--from", ext4_image(tmp_path / "src2", tmp_path / "src2.img"))
    r = vml("env", "save", "env2", "--from", "src2", "--user", "alice", "--parent", "env1")
    show = json.loads(vml("show", "env2", "--json").stdout)
    assert show["kind"] == "environment" and show["parent"] == "env1"
    assert show["stored_bytes"] < 100 << 10, r.stdout
    diff = vml("env", "diff", "env1", "env2").stdout.splitlines()
    assert "+ /home/alice/new.txt" in diff and "M /home/alice/notes.txt" in diff
    assert "+ $NEW=1" in diff and "M /home/alice/.profile" in diff
    assert "M /home/alice/analysis/run.C" not in diff and "M /home/alice/analysis/big.dat" not in diff
    bundle = tmp_path / "env2.vmlb"
    vml("export", "env2", "-o", bundle)
    assert bundle.stat().st_size < 200 << 10


def test_a_gpt_partitioned_disk_is_read_and_written(vml, tmp_path, mounted):
    need("sfdisk")
    images = {}
    for name, version, home in (("g1", "4.1", HOME), ("g2", "5.0", None)):
        tree = guest_tree(tmp_path / name, version, ALICE_SRC, home)
        img = tmp_path / f"{name}.img"
        with open(img, "wb") as f:
            f.truncate(48 << 20)
        subprocess.run(["sfdisk", "-q", str(img)], input="label: gpt\n,,L\n", text=True, check=True)
        images[name] = ext4_image(tree, img, "40M", offset=1 << 20)
    vml("init", tmp_path / "rep")
    for name, img in images.items():
        vml("save", name, "--from", img)
    vml("env", "save", "genv", "--from", "g1", "--user", "alice")
    assert json.loads(vml("env", "show", "genv", "--json").stdout)["files"] >= len(HOME)
    vml("open", "g2", "--area", "ga")
    vml("env", "restore", "genv", "--area", "ga")
    disk = next((mounted / "areas" / "ga").glob("*.img"))
    fsck = subprocess.run(["e2fsck", "-fn", f"{disk}?offset={1 << 20}"], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout
    with read_guest(disk, 1 << 20) as fs:
        assert fs.read_text("/home/alice/analysis/run.C") == HOME["analysis/run.C"].decode()


def test_bad_input_gives_one_line_and_writes_nothing(vml, guests, tmp_path, mounted):
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(4 << 20))
    vml("save", "blank", "--from", blank)
    entries = vml("log").stdout
    assert "no home directory /home/nobody" in vml.fails("env", "save", "e", "--from", "src", "--user", "nobody")
    assert "no ext2/3/4 file system" in vml.fails("env", "save", "e", "--from", "blank", "--user", "alice")
    missing = tmp_path / "no-such-patterns"
    line = vml.fails("env", "save", "e", "--from", "src", "--user", "alice", "--exclude-file", missing)
    assert str(missing) in line
    assert vml("log").stdout == entries  # nothing saved
    vml("env", "save", "env1", "--from", "src", "--user", "alice")
    vml("open", "dst", "--area", "a2")
    assert "not an environment backup" in vml.fails("env", "restore", "src", "--area", "a2")
    assert "environment backup, not a VM" in vml.fails("open", "env1", "--area", "x")
    assert "environment backup" in vml.fails("checkout", "env1", tmp_path / "out")
    assert "do not build on each other" in vml.fails("save", "x", "--from", blank, "--parent", "env1")
    disk = next((mounted / "areas" / "a2").glob("*.img"))
    before = disk.read_bytes()
    with running_vm(tmp_path / "home", "a2"):
        assert "its VM is running" in vml.fails("env", "restore", "env1", "--area", "a2")
    assert disk.read_bytes() == before
    # A backup larger than the room left in the area's file system: refused before anything is written.
    big = guest_tree(tmp_path / "big", "4.1", ALICE_SRC, {"data.bin": os.urandom(40 << 20)})
    vml("save", "big", "--from", ext4_image(big, tmp_path / "big.img", "64M"))
    vml("env", "save", "bigenv", "--from", "big", "--user", "alice")
    assert "MiB and" in vml.fails("env", "restore", "bigenv", "--area", "a2")
    assert disk.read_bytes() == before
    # A VM that stopped without unmounting leaves a journal to replay, which would undo what debugfs writes.
    subprocess.run(["debugfs", "-w", "-R", "feature needs_recovery", str(disk)], check=True, capture_output=True)
    before = disk.read_bytes()
    assert "journal recovery" in vml.fails("env", "restore", "env1", "--area", "a2")
    assert disk.read_bytes() == before


class running_vm:
    """A real, idle QEMU process recorded as area ``area``'s VM, as `vml boot` records one."""

    def __init__(self, home: Path, area: str):
        self.home, self.area = home, area

    def __enter__(self):
        from vml.vms import boot

        need("qemu-system-x86_64")
        qmp = self.home / f"{self.area}.qmp"
        self.proc = subprocess.Popen(
            [
                "qemu-system-x86_64",
                "-accel",
                "tcg",
                "-m",
                "32",
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
                f"unix:{qmp},server=on,wait=off",
            ]
        )
        deadline = time.monotonic() + 30
        while not qmp.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        rec = boot.VmRecord(self.area, "qemu", str(self.proc.pid), "", {}, {"pid": self.proc.pid, "qmp": str(qmp)})
        boot._write_record(self.home, rec)
        assert boot.vm_state(self.home, rec) == "running"
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        (self.home / "areas" / self.area / "vm.json").unlink(missing_ok=True)


def test_an_environment_travels_by_bundle_and_by_copying_its_directory(vml, guests, tmp_path, mounted):
    vml("env", "save", "env1", "--from", "src", "--user", "alice", "--exclude", "Downloads")
    want = json.loads(vml("env", "show", "env1", "--json").stdout)
    vml("init", tmp_path / "rep2")
    vml("export", "env1", "-o", tmp_path / "env1.vmlb")
    vml("import", tmp_path / "env1.vmlb", "--repo", "rep2")
    got = json.loads(vml("env", "show", "env1", "--json", "--repo", "rep2").stdout)
    assert {k: v for k, v in got.items() if k != "repository"} == {k: v for k, v in want.items() if k != "repository"}

    vml("init", tmp_path / "rep3")
    deadline = time.monotonic() + 10
    while "rep3" not in os.listdir(mounted) and time.monotonic() < deadline:
        time.sleep(0.1)
    subprocess.run(["cp", "-r", str(mounted / "rep" / "env1"), str(mounted / "rep3") + "/"], check=True)
    deadline = time.monotonic() + 60
    while "env1" not in json.loads((tmp_path / "rep3" / "refs.json").read_text())["entries"]:
        assert time.monotonic() < deadline, "the copy did not become an entry"
        time.sleep(0.2)
    copied = json.loads(vml("show", "env1", "--json", "--repo", "rep3").stdout)
    assert copied["manifest"] == json.loads(vml("show", "env1", "--json").stdout)["manifest"]
    assert vml("verify", "--repo", "rep3").returncode == 0


def test_a_published_environment_is_shown_and_captured_from_over_http(vml, guests, tmp_path):
    need("nginx")
    from servers import Nginx

    vml("env", "save", "env1", "--from", "src", "--user", "alice")
    want = json.loads(vml("env", "show", "env1", "--json").stdout)
    vml("keygen", tmp_path / "key")
    vml("publish", tmp_path / "pub", "--key", tmp_path / "key")
    server = Nginx(tmp_path / "pub")
    try:
        other = type(vml)(tmp_path / "home2", tmp_path)
        other("init", tmp_path / "rep2")
        other("remote", "add", "site", server.url, "--key", tmp_path / "key.pub")
        got = json.loads(other("env", "show", "site:env1", "--json").stdout)
        assert got["files"] == want["files"] and got["environment"] == want["environment"]
        # A backup taken from the remote's entry, read over HTTP, into the local repository.
        other("env", "save", "env2", "--from", "site:src", "--user", "alice", "--repo", "rep2")
        again = json.loads(other("env", "show", "env2", "--json", "--repo", "rep2").stdout)
        assert again["files"] == want["files"] and again["bytes"] == want["bytes"]
        assert other("env", "diff", "site:env1", "rep2:env2").stdout.strip() == ""
    finally:
        server.stop()


def metadata_places(image: Path, paths: list[str]) -> list[tuple[int, int]]:
    """(byte offset, length) of the superblock, and of the inode and first block of each path."""

    def ask(request: str) -> str:
        return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True).stdout

    block = int(ask("stats").split("Block size:")[1].split()[0])
    inode_size = int(ask("stats").split("Inode size:")[1].split()[0])
    places = [(1024, 1024)]
    for p in paths:
        where = ask(f"imap {p}").split("located at block ")[1]
        blk, off = where.split(", offset ")
        places.append((int(blk) * block + int(off.split()[0], 16), inode_size))
        places.append((int(ask(f"bmap {p} 0").strip()) * block, block))
    return places


def test_a_damaged_guest_image_is_captured_or_refused_in_one_line(tmp_path, home, faults):
    """Bytes flipped in an ext4 image's metadata: a capture succeeds or raises VmlError, in bounded time."""
    import random
    import signal

    from vml.entries.maintenance import verify
    from vml.entries.save import save_source
    from vml.envs.capture import entry_source, save_environment
    from vml.errors import VmlError

    from helpers import registered

    tree = guest_tree(tmp_path / "src", "4.1", ALICE_SRC, HOME)
    image = ext4_image(tree, tmp_path / "clean.img", "8M")
    clean = image.read_bytes()
    targets = metadata_places(image, ["/home", "/home/alice", "/home/alice/analysis", "/home/alice/.profile"])
    repo = registered(home, tmp_path / "rep", chunk_size=64 << 10)
    rnd = random.Random(13)
    damaged = tmp_path / "damaged.img"

    def too_slow(*_):
        raise TimeoutError("capture took longer than 30 s")

    old = signal.signal(signal.SIGALRM, too_slow)
    loop = faults("a damaged ext4 image given to vml env save", tries=50, long_tries=500)
    try:
        for attempt in loop:
            with attempt:
                data = bytearray(clean)
                for _ in range(rnd.randint(1, 4)):
                    start, length = rnd.choice(targets)  # an inode, a directory block or the superblock
                    at = start + rnd.randrange(length)
                    data[at : at + 4] = rnd.randbytes(4)
                damaged.write_bytes(data)
                entry = save_source(repo, f"d{attempt.index}", damaged)
                signal.alarm(30)
                try:
                    with entry_source(repo, entry) as src:
                        save_environment(repo, f"env{attempt.index}", src, user="alice")
                    loop.outcome("captured")
                except VmlError as e:
                    assert "\n" not in str(e) and "entry 'd" in str(e), str(e)
                    loop.outcome("refused in one line")
                finally:
                    signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert verify(repo) == []


def test_hostile_names_and_a_symlinked_directory_never_reach_outside(vml, tmp_path, mounted):
    """Names debugfs must not misread, and a directory of the area that is a symlink to /etc."""
    pwned = tmp_path / "PWNED"
    deep = "/".join(["d" * 195] * 20) + f"/!touch {pwned}"  # too long for one debugfs line with another name
    home = {
        'quote"d name': b"q",
        "!bang": b"b",
        "sp ace": b"s",
        f"x\n!touch {pwned}": b"n",
        deep: b"deep",
        "analysis/run.C": b"run",
    }
    src = guest_tree(tmp_path / "src", "4.1", ALICE_SRC, home)
    dst = guest_tree(tmp_path / "dst", "4.1", ALICE_DST, {"keep": b"k"})
    os.symlink("/etc", dst / "home" / "alice" / "analysis")
    vml("init", tmp_path / "rep")
    vml("save", "src", "--from", ext4_image(src, tmp_path / "src.img", "64M"))
    vml("save", "dst", "--from", ext4_image(dst, tmp_path / "dst.img"))
    r = vml("env", "save", "env1", "--from", "src", "--user", "alice")
    assert "left out" in r.stderr and "a name with a line break" in r.stderr
    vml("open", "dst", "--area", "a")
    r = vml("env", "restore", "env1", "--area", "a")
    assert "skipped /home/alice/analysis" in r.stdout and f"skipped /home/alice/{deep}" in r.stdout
    assert not pwned.exists()
    disk = next((mounted / "areas" / "a").glob("*.img"))
    assert subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True).returncode == 0
    with read_guest(disk) as fs:
        for name in ('quote"d name', "!bang", "sp ace"):
            assert fs.read_text(f"/home/alice/{name}") == home[name].decode()
        assert fs.lookup("/etc/run.C") is None  # nothing went through the symlink
        assert fs.item("/etc/passwd", fs.lookup("/etc/passwd")).mode == 0o644


def test_a_home_given_in_another_form_or_a_system_directory_is_refused_at_capture(vml, tmp_path):
    src = guest_tree(tmp_path / "src", "4.1", ALICE_SRC, {"notes": b"n"})
    passwd = src / "etc" / "passwd"
    passwd.write_text(passwd.read_text() + "carol:x:1002:1002::/:/bin/sh\n")
    vml("init", tmp_path / "rep")
    vml("save", "src", "--from", ext4_image(src, tmp_path / "src.img"))
    for how in (["--home", "/home//alice"], ["--home", "/home/bob/../alice"], ["--user", "carol"]):
        line = vml.fails("env", "save", "e", "--from", "src", *how)
        assert how[1] in line or "'/'" in line, line
    assert "/home/alice/./x" in vml.fails(
        "env", "save", "e", "--from", "src", "--user", "alice", "--add", "/home/alice/./x"
    )
    assert "environment" not in vml("log").stdout  # nothing saved


def test_dates_before_1970_and_after_2038_are_captured_and_restored(vml, tmp_path, mounted):
    src = guest_tree(tmp_path / "src", "4.1", ALICE_SRC, {"old.txt": b"o"})
    os.utime(src / "home" / "alice" / "old.txt", (-(10**9), -(10**9)))  # 1938
    image = ext4_image(src, tmp_path / "src.img")
    sif = "sif /home/alice/old.txt atime @4102444800"  # 2100: ext4 keeps it in the inode's extra epoch bits
    subprocess.run(["debugfs", "-w", "-R", sif, str(image)], check=True, capture_output=True)
    vml("init", tmp_path / "rep")
    vml("save", "src", "--from", image)
    vml("env", "save", "e", "--from", "src", "--user", "alice")
    dst = guest_tree(tmp_path / "dst", "4.1", ALICE_DST)
    vml("save", "dst", "--from", ext4_image(dst, tmp_path / "dst.img"))
    vml("open", "dst", "--area", "a")
    vml("env", "restore", "e", "--area", "a")
    with read_guest(next((mounted / "areas" / "a").glob("*.img"))) as fs:
        old = fs.item("/home/alice/old.txt", fs.lookup("/home/alice/old.txt"))
        assert (old.mtime_ns, old.atime_ns) == (-(10**18), 4102444800 * 10**9)


def test_a_path_too_long_for_any_restore_is_refused_at_capture(vml, tmp_path):
    vml("init", tmp_path / "rep")
    deep = ext4_image(guest_tree(tmp_path / "deep", "4.1", ALICE_SRC, {"notes": b"n"}), tmp_path / "deep.img")
    # 4200 bytes of path: more than an index record (and PATH_MAX) holds. Made in the image, not on the host,
    # where a tree this deep is more than shutil.rmtree (pytest's cleanup) can remove.
    commands = tmp_path / "deep.commands"
    commands.write_text("cd /home/alice\n" + "mkdir d\ncd d\n" * 2100)
    subprocess.run(["debugfs", "-w", "-f", str(commands), str(deep)], check=True, capture_output=True)
    vml("save", "deep", "--from", deep)
    line = vml.fails("env", "save", "e2", "--from", "deep", "--user", "alice")
    assert "/home/alice/d/d/d/" in line and "--exclude" in line
    assert "e2" not in vml("log").stdout


def link(path: str, target: str) -> tuple[Record, bytes]:
    return Record(path, "l", 0o777, ALICE_SRC, ALICE_SRC, OLD_NS, target=target), b""


@pytest.fixture
def area(vml, tmp_path, mounted):
    """rep with entry `dst` (alice's home holds `keep` and a symlink `etc` to /etc), open as area `a`: its disk."""
    dst = guest_tree(tmp_path / "dst", "4.1", ALICE_DST, {"keep": b"k", "etc": ("symlink", "/etc")})
    vml("init", tmp_path / "rep")
    vml("save", "dst", "--from", ext4_image(dst, tmp_path / "dst.img", "96M"))
    vml("open", "dst", "--area", "a")
    return next((mounted / "areas" / "a").glob("*.img"))


def assert_outside_the_home_untouched(disk: Path, tree: Path) -> None:
    """Outside alice's home, the area's file system holds what ``tree`` (its source) did: paths, contents, modes."""
    alice = tree / "home" / "alice"
    want = {"/" + str(p.relative_to(tree)): p for p in tree.rglob("*") if alice not in (p, *p.parents)}
    with read_guest(disk) as fs:
        got = {it.path: it for it in fs.walk("/", lambda p, is_dir: p != "/home/alice")}
        assert got.keys() - {"/", "/lost+found"} == want.keys()
        for path, p in want.items():
            it = got[path]
            assert (it.mode, it.xattrs) == (p.stat().st_mode & 0o7777, None), path
            if it.type == "f":
                assert fs.read_file(it, 0, it.size) == p.read_bytes(), path


CAPABILITY = "\x01\x00\x00\x02" + "\xff" * 16  # a vfs_cap_data granting every capability, as latin-1 text


@pytest.mark.parametrize(
    "hostile",
    [
        [link("/home/alice/lnk", "/etc"), f("/home/alice/lnk/passwd", b"evil\n", 0o666)],  # the backup's symlink
        [f("/home/alice/file", b"x"), f("/home/alice/file/passwd", b"evil\n", 0o666)],  # under one of its files
        [f("/home/alice/etc/passwd", b"evil\n", 0o666)],  # under the area's symlink, no directory on the way
        [f("/home/alice/none/passwd", b"evil\n", 0o666)],  # under a directory neither side has
    ],
    ids=["backup-symlink", "backup-file", "area-symlink", "no-parent"],
)
def test_a_crafted_backup_writing_through_a_symlink_is_refused_before_anything_is_written(
    vml, home, tmp_path, area, hostile
):
    for r, _ in hostile:
        if r.path.endswith("passwd"):
            r.xattrs = {"security.capability": CAPABILITY}
    crafted_backup(home, "evil", [d("/home/alice"), f("/home/alice/first", b"1"), *hostile])
    before = area.read_bytes()
    line = vml.fails("env", "restore", "evil", "--area", "a")
    assert hostile[-1][0].path.rpartition("/")[0] in line
    assert area.read_bytes() == before  # refused before a single write
    assert_outside_the_home_untouched(area, tmp_path / "dst")


def test_security_and_trusted_attributes_are_dropped_as_setuid_is(vml, home, area):
    attrs = {"security.capability": CAPABILITY, "security.selinux": "system_u:object_r:shadow_t:s0\0"}
    attrs |= {"trusted.overlay.redirect": "/etc", "user.origin": "cernvm 4.1"}
    crafted_backup(home, "caps", [d("/home/alice"), f("/home/alice/tool", b"#!/bin/sh\n", 0o4755, xattrs=attrs)])
    vml("env", "restore", "caps", "--area", "a")
    with read_guest(area) as fs:
        tool = fs.item("/home/alice/tool", fs.lookup("/home/alice/tool"))
        assert tool.mode == 0o755
        assert tool.xattrs == {"user.origin": b"cernvm 4.1"}


HOMES = [
    ("alice", "/"),
    ("alice", "/etc"),
    (None, "/usr/local"),
    ("root", "/root"),
    (None, "/var/lib/x"),
    (None, "/home"),
    ("alice", "/home/bob"),  # not alice's home in the area
    (None, "/home/bob"),  # bob's home in the area, from a backup of no user
    ("mallory", "/home/bob"),  # ... or of a user the area does not know
]


def test_a_home_that_is_a_system_directory_or_not_the_areas_is_refused_before_anything_is_written(
    vml, home, tmp_path, area
):
    before = area.read_bytes()
    for n, (user, where) in enumerate(HOMES):
        target = "/etc/passwd" if where in ("/", "/etc") else f"{where}/passwd"
        files = [d(where), *([d("/etc")] if where == "/" else []), f(target, b"evil\n", 0o666)]
        crafted_backup(home, f"e{n}", files, user=user, home=where)
        line = vml.fails("env", "restore", f"e{n}", "--area", "a", "--home", where)  # even when confirmed
        assert repr(where) in line, line
        assert area.read_bytes() == before, where
    assert_outside_the_home_untouched(area, tmp_path / "dst")


def test_the_home_of_a_user_the_area_does_not_know_is_written_only_when_confirmed(vml, home, area):
    crafted_backup(
        home, "m", [d("/home/mallory"), f("/home/mallory/notes", b"n")], user="mallory", home="/home/mallory"
    )
    before = area.read_bytes()
    line = vml.fails("env", "restore", "m", "--area", "a")
    assert "no account in area 'a'" in line and "--home /home/mallory" in line
    assert "--home /home/mallory" in vml.fails("env", "restore", "m", "--area", "a", "--home", "/home/alice")
    assert area.read_bytes() == before
    vml("env", "restore", "m", "--area", "a", "--home", "/home/mallory")
    with read_guest(area) as fs:
        assert fs.read_text("/home/mallory/notes") == "n"


def test_add_paths_of_a_backup_are_restored_only_when_named_again(vml, home, tmp_path, area):
    files = [d("/home/alice"), f("/home/alice/mine", b"m"), d("/etc", 0), f("/etc/passwd", b"evil\n", 0o666, 0)]
    crafted_backup(home, "adds", files, patterns={"include": [], "exclude": [], "add": ["/etc"]})
    assert "add:         /etc" in vml("env", "show", "adds").stdout
    r = vml("env", "restore", "adds", "--area", "a")
    assert "not restored: /etc (saved with --add; name it with --add to restore it)" in r.stdout
    assert_outside_the_home_untouched(area, tmp_path / "dst")
    with read_guest(area) as fs:
        assert fs.read_text("/home/alice/mine") == "m"
    assert "/opt" in vml.fails("env", "restore", "adds", "--area", "a", "--add", "/opt")


def test_restore_streams_each_file_instead_of_holding_it(vml, home, tmp_path, area):
    from helpers import child_peak_rss

    crafted_backup(home, "small", [d("/home/alice"), f("/home/alice/small.bin", b"s" * 1000)])
    crafted_backup(home, "big", [d("/home/alice"), f("/home/alice/big.bin", os.urandom(40 << 20))])
    r, small = child_peak_rss(vml, "env", "restore", "small", "--area", "a")
    assert r.returncode == 0, r.stderr
    r, big = child_peak_rss(vml, "env", "restore", "big", "--area", "a")
    assert r.returncode == 0, r.stderr
    assert big - small < 12 << 20, f"a 40 MiB file took {(big - small) >> 20} MiB more than a small one"


def test_debugfs_stops_at_the_first_command_it_does_not_accept(tmp_path):
    """A failed cd used to leave the next write in the previous directory: now nothing runs after it."""
    from vml.envs.debugfs import Debugfs, quote
    from vml.errors import StorageError

    image = ext4_image(guest_tree(tmp_path / "g", "4.1", ALICE_SRC, {"x": b"x"}), tmp_path / "g.img")
    with Debugfs(image, 0, "image g", tmp_path) as dbg:
        dbg.write_file("/home/alice/made", [b"made"])
        with pytest.raises(StorageError, match=r'stopped at `cd "/home/alice/nope"`: .*not found'):
            dbg.run("cd", quote("/home/alice/nope"))
        assert dbg.proc.poll() is not None  # debugfs has ended: no command can follow
    with read_guest(image) as fs:
        assert fs.read_text("/home/alice/made") == "made"  # what came before stays, cleanly closed
    assert subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode == 0
    (tmp_path / "not-ext4.img").write_bytes(bytes(1 << 20))
    with pytest.raises(StorageError, match="stopped at opening it"):
        Debugfs(tmp_path / "not-ext4.img", 0, "image n", tmp_path)
