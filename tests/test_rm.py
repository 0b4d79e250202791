"""Removing entries through the command: reparenting across repositories and on a full disk; bad names;
saving a checkout's copy; a full disk during a save."""

import json
import os
import subprocess

import pytest

from helpers import CS, assert_untouched, fill, snapshot


@pytest.fixture
def rep(vml, tmp_path):
    vml("init", tmp_path / "rep", "--chunk-size", "4K")
    return tmp_path / "rep"


def test_invalid_entry_names_are_refused(vml, tmp_path, image_copy):
    vml("init", tmp_path / "rep1")
    disk = image_copy()
    for bad in ("a/b", "..", "../etc", "x..y", "a:b"):
        assert f"invalid entry name {bad!r}" in vml.fails("save", bad, "--from", disk, status=2)
    assert json.loads((tmp_path / "rep1/refs.json").read_text()) == {"entries": {}}


def test_rm_reparent_when_the_parent_was_never_imported(vml, tmp_path):
    vml("init", tmp_path / "r1", "--chunk-size", "4K")
    vml("init", tmp_path / "r2", "--chunk-size", "4K")
    disk = tmp_path / "d.img"
    versions = []
    for i, kind in enumerate(["full", "incremental", "differential"]):
        data = bytearray(os.urandom(8 * CS) if i == 0 else disk.read_bytes())
        data[i * CS : (i + 1) * CS] = os.urandom(CS)
        disk.write_bytes(bytes(data))
        versions.append(bytes(data))
        vml("save", f"e{i}", "--from", disk, "--kind", kind, *(["--parent", f"e{i - 1}"] if i else []), "--repo", "r1")
    vml("export", "e0", "-o", tmp_path / "e0.vml", "--repo", "r1")
    vml("export", "e2", "-o", tmp_path / "e2.vml", "--repo", "r1")
    vml("import", tmp_path / "e0.vml", "--repo", "r2")
    vml("import", tmp_path / "e2.vml", "--repo", "r2")  # without its tree parent e1
    data = bytearray(versions[2])
    data[5 * CS : 6 * CS] = os.urandom(CS)
    disk.write_bytes(bytes(data))
    vml("save", "e3", "--from", disk, "--parent", "e2", "--repo", "r2")
    vml("rm", "e2", "--reparent", "--repo", "r2")
    vml("checkout", "e3", tmp_path / "co", "--repo", "r2")
    assert (tmp_path / "co/d.img").read_bytes() == bytes(data)
    assert vml("verify", "--repo", "r2").returncode == 0


def test_rm_reparent_on_a_full_disk(vml, tmp_path, tmpfs):
    mnt = tmpfs("3m")
    vml("init", mnt / "rep", "--chunk-size", "4K")
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(64 * CS))
    vml("save", "a", "--from", disk, "--repo", mnt / "rep")
    vml("save", "b", "--from", disk, "--parent", "a", "--repo", mnt / "rep")
    vml("save", "c", "--from", disk, "--parent", "b", "--repo", mnt / "rep")
    filler = fill(mnt)
    before = snapshot(mnt / "rep")
    msg = vml.fails("rm", "a", "--reparent", "--repo", mnt / "rep", status=10)
    assert "rewriting the entries built on 'a'" in msg and "no space left" in msg
    filler.unlink()
    assert_untouched(vml, mnt / "rep", before)


def test_saving_a_copy_of_a_checkout_keeps_one_disk_and_no_reserved_file(vml, rep, tmp_path):
    src = tmp_path / "vm"
    src.mkdir()
    (src / "d.img").write_bytes(os.urandom(3 * CS))
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            str(src / "d.img"),
            str(src / "d.vmdk"),
        ],
        check=True,
    )
    (src / "entry.json").write_text(json.dumps({"name": "e", "manifest": "00", "disks": []}))
    vml("save", "e", "--from", src)
    info = json.loads(vml("show", "e", "--json").stdout)
    assert [d["name"] for d in info["disks"]] == ["d"] and info["files"] == []
    (src / "entry.json").write_text("my own notes")
    assert "entry.json is a reserved name" in vml.fails("save", "e2", "--from", src)


def test_a_full_disk_during_save_leaves_the_repository_as_it_was(vml, tmp_path, tmpfs):
    small_tmpfs = tmpfs("6m")
    vml("init", small_tmpfs / "rep", "--chunk-size", "64K")
    (tmp_path / "small.img").write_bytes(os.urandom(1 << 20))
    vml("save", "e1", "--from", tmp_path / "small.img")
    before = snapshot(small_tmpfs / "rep")
    big = tmp_path / "big.img"
    big.write_bytes(os.urandom(12 << 20))  # twice the room there is
    msg = vml.fails("save", "e2", "--from", big, "--parent", "e1", status=10)
    assert "saving entry 'e2'" in msg and "no space left on device" in msg
    assert_untouched(vml, small_tmpfs / "rep", before)
    vml("checkout", "e1", tmp_path / "co")  # and the old entry still reads
    assert (tmp_path / "co/small.img").read_bytes() == (tmp_path / "small.img").read_bytes()
