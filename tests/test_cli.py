"""End to end: every `vml` command on real ext4 images made with mkfs.ext4 -d."""

import json
import os
import re
import subprocess
import tarfile

import pytest

from conftest import allocated, debugfs_write, hold_lock, need


@pytest.fixture
def rep1(vml, tmp_path):
    vml("init", tmp_path / "rep1")
    return tmp_path / "rep1"


def test_init_registers_repositories_and_the_first_is_the_default(vml, tmp_path, home):
    r = vml("init", tmp_path / "a", "--chunk-size", "64K")
    assert "created repository a (default)" in r.stdout and "64.0 KiB" in r.stdout
    vml("init", tmp_path / "b", "--name", "second")
    cfg = (home / "config.toml").read_text()
    assert 'default = "a"' in cfg and "[repositories.second]" in cfg
    vml("init", tmp_path / "b", "--name", "second", "--default")  # registering again is fine
    assert 'default = "second"' in (home / "config.toml").read_text()
    assert "already a VML" not in vml("init", tmp_path / "a").stdout
    assert "exists and is not an empty directory" in vml.fails("init", home)
    assert "invalid chunk size" in vml.fails("init", tmp_path / "c", "--chunk-size", "3000")
    assert "invalid repository name 'areas'" in vml.fails("init", tmp_path / "areas")


def test_save_log_show_checkout_on_real_images(vml, rep1, image_copy, tmp_path):
    disk = image_copy()
    vml("save", "entry1", "--from", disk, "-m", "fresh appliance")
    original = disk.read_bytes()
    debugfs_write(disk, {"results.txt": b"histogram 1 2 3\n" * 5000}, tmp_path / "w")
    assert disk.read_bytes() != original
    vml("save", "entry2", "--from", disk, "--parent", "entry1")
    vml("save", "entry3", "--from", disk, "--parent", "entry2", "--kind", "differential", "-m", "diff")
    vml("save", "other", "--from", disk)

    log = vml("log").stdout.splitlines()
    stamp = r"\(\d\d/\d\d/\d\d - \d\d:\d\d:\d\d - "
    assert re.fullmatch(r"\+---entry1" + stamp + r"full\)", log[0])
    # entry1 has a later sibling (other), so a bar runs down beside its subtree
    assert re.fullmatch(r"\|   \+---entry2" + stamp + r"incremental\)", log[1])
    assert re.fullmatch(r"\|       \+---entry3" + stamp + r"differential\)", log[2])
    assert re.fullmatch(r"\+---other" + stamp + r"full\)", log[3])
    assert vml("log", "rep1").stdout.splitlines() == log

    info = json.loads(vml("show", "entry2", "--json").stdout)
    assert info["name"] == "entry2" and info["parent"] == "entry1" and info["kind"] == "incremental"
    assert info["disks"] == [{"name": "disk", "size": 64 << 20}]
    assert info["chain"] == ["entry2", "entry1"] and info["base"] == "entry1"
    full = json.loads(vml("show", "entry1", "--json").stdout)
    assert 0 < info["stored_bytes"] < 200_000 < full["stored_bytes"]  # the delta is small, the base is not
    text = vml("show", "entry3").stdout
    assert "kind:      differential" in text and "message:   diff" in text and "entry3 -> entry1" in text

    vml("checkout", "entry1", tmp_path / "co1")
    vml("checkout", "entry3", tmp_path / "co3")
    assert (tmp_path / "co1/disk.img").read_bytes() == original
    assert (tmp_path / "co3/disk.img").read_bytes() == disk.read_bytes()
    assert allocated(tmp_path / "co1/disk.img") < (40 << 20)  # sparse: the free space is holes
    assert "already exists" in vml.fails("checkout", "entry1", tmp_path / "co1")


def test_consult_lists_repositories_areas_and_trees(vml, rep1, image_copy, tmp_path):
    vml("init", tmp_path / "rep2")
    vml("save", "entry1", "--from", image_copy())
    out = vml("consult").stdout
    assert re.search(r"^rep1\*\s+\['entry1'\]\s+" + re.escape(str(rep1)) + "$", out, re.M)
    assert re.search(r"^rep2\s+\[\]\s+", out, re.M)
    assert "Working areas:" in out and "Entries in repository rep1:\n+---entry1(" in out


def test_export_import_moves_only_the_delta(vml, rep1, image_copy, tmp_path):
    disk = image_copy()
    vml("save", "base", "--from", disk)
    debugfs_write(disk, {"new.bin": os.urandom(1 << 20)}, tmp_path / "w")
    vml("save", "work", "--from", disk, "--parent", "base")
    vml("export", "base", "-o", tmp_path / "base.vml")
    out = vml("export", "work", "-o", tmp_path / "work.vml").stdout
    assert "the receiver needs base" in out
    delta, whole = (tmp_path / "work.vml").stat().st_size, (tmp_path / "base.vml").stat().st_size
    assert (1 << 20) < delta < (1 << 20) + 300_000 < whole
    with tarfile.open(tmp_path / "work.vml") as t:  # a plain tar that standard tools list
        assert t.getnames()[0] == "vml-bundle.json"

    vml("init", tmp_path / "rep2")
    msg = vml.fails("import", tmp_path / "work.vml", "--repo", "rep2", status=8)
    assert "needs entry 'base'" in msg and "work.vml" in msg
    assert json.loads((tmp_path / "rep2/refs.json").read_text()) == {"entries": {}}
    assert list((tmp_path / "rep2/tmp").iterdir()) == []
    vml("import", tmp_path / "base.vml", "--repo", "rep2")
    assert "imported work" in vml("import", tmp_path / "work.vml", "--repo", "rep2").stdout
    assert "nothing new" in vml("import", tmp_path / "work.vml", "--repo", "rep2").stdout
    vml("checkout", "work", tmp_path / "co", "--repo", "rep2")
    assert (tmp_path / "co/disk.img").read_bytes() == disk.read_bytes()
    assert "ok" in vml("verify", "--repo", "rep2").stdout
    same_log = vml("log", "rep2").stdout.splitlines()
    assert [ln.split("(")[0] for ln in same_log] == ["+---base", "    +---work"]

    vml("export", "work", "-o", tmp_path / "full.vml", "--full")
    vml("init", tmp_path / "rep3")
    assert "imported base, work" in vml("import", tmp_path / "full.vml", "--repo", "rep3").stdout
    vml("export", "work", "-o", tmp_path / "against.vml", "--against", "base")
    assert (tmp_path / "against.vml").stat().st_size == delta


def test_rm_gc_verify(vml, rep1, image_copy, tmp_path):
    disk = image_copy()
    vml("save", "e1", "--from", disk)
    debugfs_write(disk, {"a.txt": b"a" * 300_000}, tmp_path / "w")
    vml("save", "e2", "--from", disk, "--parent", "e1")
    debugfs_write(disk, {"b.txt": os.urandom(300_000)}, tmp_path / "w")
    vml("save", "e3", "--from", disk, "--parent", "e2")
    msg = vml.fails("rm", "e2", status=11)
    assert "'e2' has entries built on it (e3)" in msg and "--reparent" in msg
    vml("rm", "e2", "--reparent")
    assert [ln.split("(")[0] for ln in vml("log").stdout.splitlines()] == ["+---e1", "    +---e3"]
    gc = vml("gc").stdout
    assert re.search(r"removed [1-9]\d* objects, freed", gc)
    vml("checkout", "e3", tmp_path / "co")
    assert (tmp_path / "co/disk.img").read_bytes() == disk.read_bytes()
    assert vml("verify").stdout.strip() == "repository rep1: ok"
    assert vml("verify", "e3").stdout.strip() == "entry e3: ok"
    objs = sorted(p for p in (rep1 / "objects").rglob("*") if p.is_file() and p.stat().st_size > 1000)
    objs[0].write_bytes(objs[0].read_bytes()[:-100] + bytes(100))
    r = vml("verify", ok=False)
    assert r.returncode == 1 and str(objs[0]) in r.stdout
    vml("rm", "e1", "--recursive")
    assert vml("log").stdout.strip() == "(repository rep1 has no entries)"


@pytest.mark.parametrize("fmt, options", [("qcow2", []), ("vmdk", ["-o", "subformat=monolithicSparse"]), ("vdi", [])])
def test_images_in_other_formats_are_saved_as_their_raw_content(vml, rep1, image_copy, tmp_path, fmt, options):
    need("qemu-img")
    raw = image_copy()
    img = tmp_path / f"vm.{fmt}"
    subprocess.run(["qemu-img", "convert", "-O", fmt, *options, str(raw), str(img)], check=True)
    vml("save", "e1", "--from", img)
    assert json.loads(vml("show", "e1", "--json").stdout)["disks"] == [{"name": "vm", "size": 64 << 20}]
    vml("checkout", "e1", tmp_path / "co")
    assert (tmp_path / "co/vm.img").read_bytes() == raw.read_bytes()
    assert list((rep1 / "tmp").iterdir()) == []  # the conversion is gone


def test_a_vm_directory_with_a_split_vmdk_and_a_qcow2_overlay(vml, rep1, image_copy, tmp_path):
    need("qemu-img")
    raw = image_copy()
    vm = tmp_path / "vm"
    vm.mkdir()
    subprocess.run(
        ["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", str(raw), str(vm / "system.vmdk")],
        check=True,
    )
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(vm / "base.qcow2")], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(vm / "data.qcow2")],
        check=True,
    )
    (vm / "vm.vmx").write_text('scsi0:0.fileName = "system.vmdk"\n')
    vml("save", "e1", "--from", vm)
    info = json.loads(vml("show", "e1", "--json").stdout)
    assert sorted(d["name"] for d in info["disks"]) == ["data", "system"]  # extent and backing file belong to disks
    assert [f["name"] for f in info["files"]] == ["vm.vmx"]
    vml("checkout", "e1", tmp_path / "co")
    assert sorted(p.name for p in (tmp_path / "co").iterdir()) == ["data.img", "system.img", "vm.vmx"]
    assert (tmp_path / "co/system.img").read_bytes() == raw.read_bytes()
    assert (tmp_path / "co/data.img").read_bytes() == raw.read_bytes()


def test_usage_errors_are_one_line(vml, rep1, tmp_path):
    assert "no such file or directory" in vml.fails("save", "e1", "--from", tmp_path / "nope.img", status=9)
    assert "no entry 'nope' in repository rep1" in vml.fails("show", "nope", status=3)
    assert "no repository or remote named 'zz'" in vml.fails("log", "--repo", "zz", status=3)
    assert "no repository or remote named 'zz'" in vml.fails("--repo", "zz", "log", status=3)  # before the command too
    r = vml("--debug", "show", "nope", ok=False)
    assert r.returncode == 1 and "Traceback" in r.stderr and "NotFound" in r.stderr
    (tmp_path / "empty").mkdir()
    assert "no disk image found" in vml.fails("save", "e1", "--from", tmp_path / "empty")
    (tmp_path / "text.img").write_text("just text")
    vml("save", "tiny", "--from", tmp_path / "text.img")  # an odd-sized raw image is still a disk
    vml("checkout", "tiny", tmp_path / "co")
    assert (tmp_path / "co/text.img").read_text() == "just text"
    (tmp_path / "vmdir").mkdir()
    (tmp_path / "vmdir/disk.img").write_bytes(b"x" * 4096)
    os.symlink("/etc/passwd", tmp_path / "vmdir/passwd")
    assert "only regular files are saved" in vml.fails("save", "e2", "--from", tmp_path / "vmdir")


def test_a_save_waits_for_another_writer_and_says_so(vml, rep1, image_copy):
    holder = hold_lock(rep1, "vml gc")
    r = vml("save", "e1", "--from", image_copy())
    holder.wait(10)
    assert re.search(r"waiting up to 60 s for repository .*rep1: pid \d+ \(vml gc\) holds its lock", r.stderr)
    assert "saved e1" in r.stdout
