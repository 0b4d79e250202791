"""The real mount: layout, read-only entries, working areas, crashes, copies, errors."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from vml.repo.repository import Repository
from vml.repo.store import Store
from vml.times import parse_iso
from vmlfs import mount

from conftest import debugfs_write, mount_pid, need, need_root
from helpers import remove_stored


@pytest.fixture
def logbook(vml, tmp_path, image_copy):
    """rep1 with entry1 (full, an ext4 disk plus a config file) and entry2 (incremental)."""
    vml("init", tmp_path / "rep1")
    vm = tmp_path / "vm"
    vm.mkdir()
    disk = image_copy("vm/disk.img")
    (vm / "vm.xml").write_text("<domain type='qemu'><name>analysis</name></domain>\n")
    vml("save", "entry1", "--from", vm, "-m", "fresh")
    debugfs_write(disk, {"results.txt": b"histogram\n" * 30000}, tmp_path / "w")
    vml("save", "entry2", "--from", vm, "--parent", "entry1")
    return vm


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_entries_are_directories_of_their_files(vml, logbook, mounted, tmp_path):
    assert sorted(os.listdir(mounted)) == ["areas", "rep1"]
    assert sorted(os.listdir(mounted / "rep1")) == ["entry1", "entry2"]
    e2 = mounted / "rep1" / "entry2"
    assert sorted(os.listdir(e2)) == ["disk-flat.vmdk", "disk.img", "disk.vmdk", "entry.json", "vm.xml"]
    img, flat = os.stat(e2 / "disk.img"), os.stat(e2 / "disk-flat.vmdk")
    assert img.st_ino == flat.st_ino and img.st_nlink == 2 and img.st_size == 64 << 20
    assert img.st_mode & 0o777 == 0o444 and img.st_blocks * 512 < 40 << 20  # sparse, as stored
    show = json.loads(vml("show", "entry2", "--json").stdout)
    assert show.pop("certificates") == []  # they can come later: an entry's immutable files leave them out
    assert json.loads((e2 / "entry.json").read_text()) == show
    created = parse_iso(show["created"]).timestamp()
    assert abs(img.st_mtime - created) < 1 and abs(os.stat(e2).st_mtime - created) < 1
    refs = tmp_path / "rep1" / "refs.json"
    assert os.stat(mounted / "rep1").st_mtime_ns == os.stat(refs).st_mtime_ns  # changes with its entries
    assert os.stat(mounted).st_mtime > 1e9 and os.stat(mounted / "areas").st_mtime > 1e9
    assert (e2 / "disk.img").read_bytes() == (logbook / "disk.img").read_bytes()
    assert (e2 / "vm.xml").read_text() == (logbook / "vm.xml").read_text()
    assert (mounted / "rep1/entry1/disk.img").read_bytes() != (logbook / "disk.img").read_bytes()


def test_the_vmdk_descriptor_reads_the_same_bytes(logbook, mounted):
    need("qemu-img")
    e2 = mounted / "rep1" / "entry2"
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(e2 / "disk.vmdk")], capture_output=True, text=True, check=True
        ).stdout
    )
    assert info["format"] == "vmdk" and info["virtual-size"] == 64 << 20
    r = subprocess.run(
        ["qemu-img", "compare", "-f", "vmdk", "-F", "raw", str(e2 / "disk.vmdk"), str(logbook / "disk.img")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_mount_reads_ahead_a_mebibyte_once_vml_mount_returns(mounted):
    """The kernel's default (128 KiB) halves a cold sequential read (docs/mount.md); a file takes its
    mount's readahead when opened, so it must be set by the time `vml mount` returns."""
    need_root()
    dev = os.stat(mounted).st_dev
    kib = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text()
    assert int(kib) == mount.READAHEAD_KB == 1024


def test_entries_cannot_be_changed(logbook, mounted):
    e1 = mounted / "rep1" / "entry1"
    for action in (
        lambda: os.open(e1 / "disk.img", os.O_RDWR),
        lambda: (e1 / "new.txt").write_text("x"),
        lambda: os.unlink(e1 / "vm.xml"),
        lambda: os.mkdir(e1 / "sub"),
        lambda: os.truncate(e1 / "disk.img", 10),
    ):
        with pytest.raises(OSError) as err:
            action()
        assert err.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    assert os.stat(e1 / "disk.img").st_size == 64 << 20


def test_entries_saved_while_mounted_appear(vml, logbook, mounted):
    vml("save", "entry3", "--from", logbook, "--parent", "entry2")
    wait_for(lambda: "entry3" in os.listdir(mounted / "rep1"), 5, "entry3 in the listing")
    assert (mounted / "rep1/entry3/disk.img").read_bytes() == (logbook / "disk.img").read_bytes()


def test_a_working_area_writes_saves_and_continues(vml, logbook, mounted, tmp_path):
    r = vml("open", "entry2", "--area", "wa")
    assert str(mounted / "areas" / "wa") in r.stdout
    img = mounted / "areas" / "wa" / "disk.img"
    assert os.stat(img).st_mode & 0o200
    expected = bytearray((logbook / "disk.img").read_bytes())
    writes = [
        (0, b"boot sector!"),
        (4095, os.urandom(9000)),
        (10 << 20, os.urandom(3 << 20)),
        ((64 << 20) - 7, b"tail!!!"),
    ]
    fd = os.open(img, os.O_RDWR)
    try:
        for off, data in writes:
            os.pwrite(fd, data, off)
            expected[off : off + len(data)] = data
        os.fsync(fd)
        with pytest.raises(OSError) as err:  # disks keep their size
            os.pwrite(fd, b"x", 64 << 20)
        assert err.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert img.read_bytes() == bytes(expected)
    assert re.search(
        r"^wa\s+entry2\s+rep1\s+3\.\d MiB\s+" + re.escape(str(mounted / "areas" / "wa")), vml("consult").stdout, re.M
    )
    assert "unsaved changes" in vml.fails("close", "wa")

    out = vml("save", "work1", "--area", "wa", "-m", "first session").stdout
    assert "saved work1 (incremental on entry2)" in out and "the area now builds on work1" in out
    info = json.loads(vml("show", "work1", "--json").stdout)
    assert info["parent"] == "entry2" and 3 << 20 < info["stored_bytes"] < 4 << 20
    wait_for(lambda: "work1" in os.listdir(mounted / "rep1"), 5, "work1 in the listing")
    assert (mounted / "rep1/work1/disk.img").read_bytes() == bytes(expected)
    assert (mounted / "rep1/entry2/disk.img").read_bytes() == (logbook / "disk.img").read_bytes()
    assert img.read_bytes() == bytes(expected)  # the area goes on from work1

    with open(img, "r+b") as f:
        f.seek(20 << 20)
        f.write(b"second session")
    vml("save", "work2", "--area", "wa")
    assert json.loads(vml("show", "work2", "--json").stdout)["parent"] == "work1"
    expected[20 << 20 : (20 << 20) + 14] = b"second session"
    assert (mounted / "rep1/work2/disk.img").read_bytes() == bytes(expected)
    vml("close", "wa")
    wait_for(lambda: "wa" not in os.listdir(mounted / "areas"), 5, "the closed area to go")


def test_several_areas_are_written_at_once(vml, logbook, mounted):
    names = ["a1", "a2", "a3"]
    for n in names:
        vml("open", "entry1", "--area", n)
    data = {n: os.urandom(2 << 20) for n in names}
    errors = []

    def writer(n):
        try:
            with open(mounted / "areas" / n / "disk.img", "r+b") as f:
                for i in range(8):
                    f.seek(i * (4 << 20))
                    f.write(data[n][i * (256 << 10) : (i + 1) * (256 << 10)])
                f.flush()
                os.fsync(f.fileno())
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for n in names:
        with open(mounted / "areas" / n / "disk.img", "rb") as f:
            for i in range(8):
                f.seek(i * (4 << 20))
                assert f.read(256 << 10) == data[n][i * (256 << 10) : (i + 1) * (256 << 10)]


def test_fsynced_writes_survive_kill_9_and_remount(vml, home, logbook, mounted):
    vml("open", "entry2", "--area", "wa")
    img = mounted / "areas" / "wa" / "disk.img"
    payload = os.urandom(5 << 20)
    fd = os.open(img, os.O_RDWR)
    os.pwrite(fd, payload, 7 << 20)
    os.fsync(fd)
    os.close(fd)
    os.kill(mount_pid(home), signal.SIGKILL)
    wait_for(lambda: mount_pid(home) is None, 10, "the mount to die")
    with pytest.raises(OSError):  # a dead mount, not an empty directory
        os.listdir(mounted)
    assert re.search(r"^wa\s+entry2\s+rep1\s+5\.0 MiB", vml("consult").stdout, re.M)  # kept on disk
    vml("umount", mounted)
    vml("mount", mounted)
    with open(img, "rb") as f:
        f.seek(7 << 20)
        assert f.read(5 << 20) == payload
    vml("umount", mounted)  # a clean unmount, and once more
    assert not os.path.ismount(mounted)
    vml("mount", mounted)
    vml("save", "after", "--area", "wa")
    with open(mounted / "rep1/after/disk.img", "rb") as f:
        f.seek(7 << 20)
        assert f.read(5 << 20) == payload


def test_an_unreadable_chunk_is_eio_and_the_mount_stays_up(vml, home, logbook, mounted, tmp_path):
    repo = Repository(Store(tmp_path / "rep1"))
    table = repo.resolve(repo.entry("entry1").digest).disks["disk"]
    index = next(i for i in range(table.count) if table.digest(i) != bytes(32))
    remove_stored(repo.store.path, table.digest(index))  # format 2: the pack it lies in
    t0 = time.monotonic()
    with open(mounted / "rep1/entry1/disk.img", "rb") as f:
        f.seek(index * table.chunk_size)
        with pytest.raises(OSError) as err:
            f.read(4096)
    assert err.value.errno == errno.EIO and time.monotonic() - t0 < 5
    assert (mounted / "rep1/entry1/vm.xml").read_text().startswith("<domain")
    log = (home / "log" / "vmlfs.log").read_text()
    assert re.search(
        rf"read of rep1/entry1/disk.img at offset \d+.*entry 'entry1', disk disk, chunk {index}.*missing", log
    )


def test_a_copied_entry_directory_boots_and_saves(vml, logbook, mounted, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(mounted / "rep1" / "entry2", copy)
    assert sorted(os.listdir(copy)) == ["disk-flat.vmdk", "disk.img", "disk.vmdk", "entry.json", "vm.xml"]
    vml("save", "copied", "--from", copy, "--parent", "entry2")
    info = json.loads(vml("show", "copied", "--json").stdout)
    assert [d["name"] for d in info["disks"]] == ["disk"] and [f["name"] for f in info["files"]] == ["vm.xml"]
    assert info["stored_bytes"] < 10_000  # nothing changed


def test_copying_an_entry_into_another_repository(vml, logbook, mounted, tmp_path):
    vml("init", tmp_path / "rep2")
    vml("export", "entry1", "-o", tmp_path / "e1.vml")
    vml("import", tmp_path / "e1.vml", "--repo", "rep2")  # rep2 already has the base
    before = {p.name for p in (tmp_path / "rep2/objects").rglob("*") if p.is_file()}
    wait_for(lambda: "rep2" in os.listdir(mounted), 5, "rep2 in the mount")
    subprocess.run(["cp", "-r", str(mounted / "rep1" / "entry2"), str(mounted / "rep2") + "/"], check=True)
    wait_for(
        lambda: "entry2" in json.loads((tmp_path / "rep2/refs.json").read_text())["entries"],
        60,
        "the copy to become an entry",
    )
    src = json.loads(vml("show", "entry2", "--json").stdout)
    dst = json.loads(vml("show", "entry2", "--json", "--repo", "rep2").stdout)
    assert dst["manifest"] == src["manifest"]  # the same entry, not a look-alike
    added = {p.name for p in (tmp_path / "rep2/objects").rglob("*") if p.is_file()} - before
    assert 0 < len(added) <= 10  # entry2's manifest, map and few changed chunks only
    assert vml("verify", "--repo", "rep2").returncode == 0
    wait_for(lambda: os.path.exists(mounted / "rep2/entry2/disk.img"), 5, "the entry in the mount")
    assert (mounted / "rep2/entry2/disk.img").read_bytes() == (logbook / "disk.img").read_bytes()
    assert list((tmp_path / "home" / "incoming" / "rep2").iterdir()) == []


def staged_copies(tmp_path, repo="rep1") -> list[str]:
    d = tmp_path / "home" / "incoming" / repo
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_anything_but_an_exact_entry_copy_stays_staged(vml, logbook, mounted, tmp_path):
    """A plain directory, a copy with a file added or changed, or cut short, never becomes an entry."""
    changed = tmp_path / "changed"
    shutil.copytree(mounted / "rep1" / "entry2", changed)
    (changed / "nvram.fd").write_bytes(b"firmware state")
    cut = tmp_path / "cut"
    shutil.copytree(mounted / "rep1" / "entry2", cut)
    os.truncate(cut / "disk.img", 1 << 20)
    for src, name in ((logbook, "plainvm"), (changed, "changed"), (cut, "cut")):
        subprocess.run(["cp", "-r", str(src), str(mounted / "rep1" / name)], check=True)
    time.sleep(4)  # well past the quiet time after which copies are looked at
    refs = json.loads((tmp_path / "rep1" / "refs.json").read_text())["entries"]
    assert sorted(refs) == ["entry1", "entry2"]
    assert staged_copies(tmp_path) == ["changed", "cut", "plainvm"]
    assert (mounted / "rep1/changed/nvram.fd").read_bytes() == b"firmware state"  # nothing lost
    assert re.search(r"^plainvm\s+rep1\s+", vml("consult").stdout, re.M)
    log = (tmp_path / "home" / "log" / "vmlfs.log").read_text()
    assert "changed stays as it is" in log and "extra ['nvram.fd']" in log
    # the user decides: save one under a name of its own, and remove the staged copies
    vml("save", "plain", "--from", mounted / "rep1" / "plainvm")
    assert json.loads(vml("show", "plain", "--json").stdout)["kind"] == "full"
    for name in ("plainvm", "changed", "cut"):
        shutil.rmtree(mounted / "rep1" / name)
    assert staged_copies(tmp_path) == []


def test_files_can_be_renamed_and_replaced_while_copying(vml, logbook, mounted, tmp_path):
    d = mounted / "rep1" / "work"
    d.mkdir()
    (d / ".tmp").write_text("hello\n")
    os.rename(d / ".tmp", d / "vm.xml")  # as rsync and editors do
    with open(d / "vm.xml", "a") as f:
        f.write("more\n")
    os.chmod(d / "vm.xml", 0o600)
    assert (d / "vm.xml").read_text() == "hello\nmore\n" and os.stat(d / "vm.xml").st_mode & 0o777 == 0o600
    (d / "f1").write_text("A")
    os.unlink(d / "f1")
    (d / "f2").write_text("B")  # may reuse f1's inode number on the staging file system
    assert (d / "f2").read_text() == "B"
    with pytest.raises(FileNotFoundError):
        os.stat(d / "f1")


def test_a_refused_close_keeps_serving_the_area(vml, home, logbook, mounted):
    vml("open", "entry2", "--area", "wa")
    img = mounted / "areas" / "wa" / "disk.img"
    fd = os.open(img, os.O_RDWR)
    try:
        os.pwrite(fd, b"X" * 5000, 1000)
        os.fsync(fd)
        assert "unsaved changes" in vml.fails("close", "wa")
        assert "open file" in vml.fails("close", "wa", "--discard")
        os.pwrite(fd, b"Z" * 100, 3000)  # still served by the mount, and kept
        os.fsync(fd)
    finally:
        os.close(fd)
    vml("save", "kept", "--area", "wa")
    with open(mounted / "rep1/kept/disk.img", "rb") as f:
        f.seek(1000)
        assert f.read(5000) == b"X" * 2000 + b"Z" * 100 + b"X" * 2900
    vml("close", "wa")


def test_control_requests_of_the_wrong_shape_change_nothing(vml, home, logbook, mounted, tmp_path):
    from vml import control

    vml("open", "entry2", "--area", "wa")
    before = (tmp_path / "rep1" / "refs.json").read_text()
    for bad in (
        {"op": "save", "area": "wa", "entry": "q", "message": {"a": 1}},
        {"op": "save", "area": 3},
        {"op": "close", "area": ["wa"]},
        {"op": "nonsense"},
    ):
        with pytest.raises(control.MountError, match="bad request"):
            control.exchange(home, (json.dumps(bad) + "\n").encode())
    assert (tmp_path / "rep1" / "refs.json").read_text() == before
    assert sorted(os.listdir(mounted / "rep1")) == ["entry1", "entry2"]
