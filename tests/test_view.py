"""The logbook as the mount shows it, driven without FUSE: entries, areas and copies through Logbook.

As S3QL's t3_fs_api drives its operations without mounting, these tests call
the Logbook (vml/view) directly, so a failure here is a failure of the view,
not of the kernel path; tests/test_mount.py checks the same through a real
mount.
"""

import json
import os

import pytest

from vml.entries.checkout import checkout
from vml.entries.copies import staging_path
from vml.entries.reader import ChunkCache
from vml.entries.save import save_source
from vml.entries.vmdk import descriptor
from vml.errors import Corrupt, Locked, NotFound, ReadOnly, UsageError
from vml.repo import paths
from vml.repo.manifest import RESERVED_FILE
from vml.repo.repository import Repository
from vml.repo.store import Store
from vml.view.fileset import FileHandle, entry_files
from vml.view.logbook import AREAS, Logbook
from vml.vms import areas

from helpers import registered

CS = 4096


@pytest.fixture
def book(home, tmp_path):
    """A logbook of home with repository rep1: e1 (a disk and vm.xml), e2 on e1; rep2 empty."""
    repo = registered(home, tmp_path / "rep1", "rep1")
    registered(home, tmp_path / "rep2", "rep2")
    vm = tmp_path / "vm"
    vm.mkdir()
    disk = bytearray(os.urandom(8 * CS) + bytes(8 * CS))
    (vm / "disk.img").write_bytes(disk)
    (vm / "vm.xml").write_text("<domain type='qemu'><name>v</name></domain>\n")
    save_source(repo, "e1", vm)
    disk[CS : 2 * CS] = b"2" * CS
    (vm / "disk.img").write_bytes(disk)
    save_source(repo, "e2", vm, parent="e1")
    book = Logbook(home)
    yield book, repo, bytes(disk)
    book.close()


def read_all(handle, size: int) -> bytes:
    return handle.read(0, size)


def test_repositories_entries_and_their_files(book, tmp_path):
    book, repo, disk = book
    top = book.listdir(())
    assert set(top) == {AREAS, "rep1", "rep2"} and top["rep1"].is_dir
    entries = book.listdir(("rep1",))
    assert set(entries) == {"e1", "e2"} and all(n.immutable for n in entries.values())
    files = book.listdir(("rep1", "e2"))
    assert sorted(files) == ["disk-flat.vmdk", "disk.img", "disk.vmdk", "entry.json", "vm.xml"]
    img, flat = files["disk.img"], files["disk-flat.vmdk"]
    assert img.key == flat.key and img.size == len(disk) and img.allocated == 8 * CS  # holes cost nothing
    assert read_all(book.open(("rep1", "e2", "disk.img")), len(disk)) == disk
    assert book.open(("rep1", "e2", "disk.vmdk")).read(0, 4096) == descriptor("disk", len(disk))
    checkout(repo, "e1", tmp_path / "co")
    assert read_all(book.open(("rep1", "e1", "disk.img")), len(disk)) == (tmp_path / "co/disk.img").read_bytes()
    with pytest.raises(ReadOnly):
        book.open(("rep1", "e2", "disk.img"), write=True)
    with pytest.raises(NotFound):
        book.lookup(("rep1", "nope"))


def test_a_damaged_entry_hides_nothing_else(book):
    book, repo, _ = book
    digest = repo.refs()["e1"]
    path = paths.object_path(repo.store.path, digest)
    path.write_bytes(b"damaged")
    fresh = Logbook(book.home)
    try:
        assert set(fresh.listdir(("rep1",))) == {"e2"}  # e1 is left out, and logged
        with pytest.raises(Corrupt):
            fresh.listdir(("rep1", "e2"))  # e2 builds on e1: its files cannot be shown
    finally:
        fresh.close()


def test_an_area_is_written_saved_and_closed_through_the_view(book, home):
    book, repo, disk = book
    areas.create_area(home, "w", repo, repo.entry("e2"))
    assert set(book.listdir((AREAS,))) == {"w"}
    files = book.listdir((AREAS, "w"))
    assert files["disk.img"].writable and not files["vm.xml"].writable
    handle = book.open((AREAS, "w", "disk.img"), write=True)
    handle.write(3 * CS + 10, b"written")
    handle.sync()
    expected = bytearray(disk)
    expected[3 * CS + 10 : 3 * CS + 17] = b"written"
    assert handle.read(0, len(disk)) == bytes(expected)
    with pytest.raises(UsageError, match="unsaved changes"):
        book.close_area("w")
    entry = book.save_served_area("w", "e3")
    assert entry.manifest.parent.name == "e2" and "e3" in book.listdir(("rep1",))
    assert read_all(book.open(("rep1", "e3", "disk.img")), len(disk)) == bytes(expected)
    with pytest.raises(Locked, match="1 open file"):
        book.close_area("w")
    handle.release()
    book.close_area("w")
    assert book.listdir((AREAS,)) == {}


def test_an_exact_copy_of_an_entry_becomes_that_entry(book, home, tmp_path):
    book, repo, disk = book
    book.mkdir(("rep2", "e2"), 0o755)
    for name, node in book.listdir(("rep1", "e2")).items():
        data = read_all(book.open(("rep1", "e2", name)), node.size)
        _, handle = book.create(("rep2", "e2", name), 0o644)
        handle.write(0, data)
        handle.release()
    assert book.ready_copies(quiet=0) == [("rep2", "e2")]
    entry = book.finalize_copy("rep2", "e2")
    assert entry.digest == repo.refs()["e2"] and not staging_path(home, "rep2", "e2").exists()
    assert read_all(book.open(("rep2", "e2", "disk.img")), len(disk)) == disk
    book.mkdir(("rep2", "notanentry"), 0o755)
    _, handle = book.create(("rep2", "notanentry", "x"), 0o644)
    handle.write(0, b"plain")
    handle.release()
    with pytest.raises(Exception, match=r"no entry\.json"):
        book.finalize_copy("rep2", "notanentry")
    assert "notanentry" in book.listdir(("rep2",))  # it stays, staged, for the user to deal with


def test_an_entrys_fileset_nests_its_files_and_strips_write_bits(home, tmp_path):
    repo = Repository(Store.create(tmp_path / "rep", chunk_size=CS), "rep")
    vm = tmp_path / "vm"
    (vm / "notes" / "deep").mkdir(parents=True)
    (vm / "disk.img").write_bytes(os.urandom(2 * CS))
    (vm / "notes" / "deep" / "run.sh").write_text("echo hi\n")
    (vm / "notes" / "deep" / "run.sh").chmod(0o775)
    entry = save_source(repo, "e", vm)
    fs = entry_files(repo, entry, ChunkCache(1 << 20))
    assert set(fs.dirs) == {(), ("notes",), ("notes", "deep")}
    assert fs.dirs[()]["notes"].is_dir and fs.dirs[()]["notes"].immutable
    script = fs.dirs[("notes", "deep")]["run.sh"]
    assert script.mode == 0o555 and script.immutable and not script.writable
    assert fs.openers[("notes", "deep", "run.sh")]().read(0, 100) == b"echo hi\n"
    img, flat = fs.dirs[()]["disk.img"], fs.dirs[()]["disk-flat.vmdk"]
    assert img is flat and img.nlink == 2 and fs.disks == {"disk.img": "disk", "disk-flat.vmdk": "disk"}
    assert json.loads(fs.openers[(RESERVED_FILE,)]().read(0, 1 << 20)) == repo.describe(entry)


def test_a_staged_file_counts_as_open_only_while_it_is(tmp_path):
    opened = []
    with pytest.raises(FileNotFoundError):
        FileHandle(tmp_path / "missing", False, opened.append)
    assert sum(opened) == 0  # a failed open leaves nothing counted
    (tmp_path / "f").write_bytes(b"")
    handle = FileHandle(tmp_path / "f", True, opened.append)
    handle.write(3, b"abc")
    assert sum(opened) == 1 and handle.read(0, 10) == b"\0\0\0abc"
    handle.release()
    handle.release()  # twice is harmless
    assert sum(opened) == 0
