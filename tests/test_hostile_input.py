"""Hostile and odd input found in review: forged bundles, damaged settings, races.

Each case must end in a one-line error with a non-zero exit (never an
internal error), and leave the repository as it was.
"""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from vml import chunkmap, objects

from conftest import hold_lock, need_root
from test_bad_input import assert_untouched, snapshot

CS = 4096


def manifest(name="x", size=2 * CS, map_digest=None, files=(), **over) -> bytes:
    doc = {
        "format": 1,
        "name": name,
        "kind": "full",
        "created": "2026-11-21T10:00:00Z",
        "message": "",
        "chunk_size": CS,
        "parent": None,
        "base": None,
        "disks": [{"name": "x", "size": size, "map": (map_digest or objects.digest(chunkmap.MAGIC)).hex()}],
        "files": list(files),
    }
    doc.update(over)
    return json.dumps(doc).encode()


def bundle(path, entries, blobs, objects_count=None):
    """A bundle made by hand: entries [(name, manifest bytes)], plus raw contents to store."""
    contents = {objects.digest(b): b for b in blobs}
    contents.update({objects.digest(m): m for _, m in entries})
    index = {
        "format": 1,
        "entries": [{"name": n, "manifest": objects.digest(m).hex()} for n, m in entries],
        "requires": [],
        "objects": len(contents) if objects_count is None else objects_count,
    }
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for name, data in [("vml-bundle.json", json.dumps(index).encode())] + [
            (f"objects/{d.hex()}", objects.compress(b)) for d, b in contents.items()
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def rep(vml, tmp_path):
    vml("init", tmp_path / "rep", "--chunk-size", "4K")
    return tmp_path / "rep"


def test_a_well_formed_hand_made_bundle_imports(vml, rep, tmp_path):
    """The baseline the other cases bend: this one must work."""
    chunk = os.urandom(CS)
    m = chunkmap.encode([(1, objects.digest(chunk), 0)])
    b = bundle(tmp_path / "ok.vml", [("x", manifest(map_digest=objects.digest(m)))], [m, chunk])
    vml("import", b)
    vml("checkout", "x", tmp_path / "co")
    assert (tmp_path / "co/x.img").read_bytes() == bytes(CS) + chunk


@pytest.mark.parametrize(
    "case, message",
    [
        ("huge_disk", "more than the 67108864 an entry may have"),
        ("bad_created", "time data 'yesterday'"),
        ("not_an_object", "not a JSON object"),
        ("deep_json", "invalid manifest"),
        ("file_shadows_disk", "collides with a disk"),
        ("file_under_file", "collides with a disk, a directory"),
        ("short_chunk", "chunk 0 has 1000 bytes, expected 4096"),
    ],
)
def test_forged_manifests_in_bundles_are_refused(vml, rep, tmp_path, case, message):
    before = snapshot(rep)
    empty = chunkmap.encode([])
    short = os.urandom(1000)
    short_map = chunkmap.encode([(0, objects.digest(short), 0)])
    blobs = [empty, short, short_map]
    file_entry = {"name": "x.img", "size": 3, "map": objects.digest(empty).hex(), "mode": 420}
    m = {
        "huge_disk": manifest(size=1 << 50),
        "bad_created": manifest(created="yesterday"),
        "not_an_object": b"[1, 2, 3]",
        "deep_json": b"[" * 100000 + b"]" * 100000,
        "file_shadows_disk": manifest(files=[file_entry]),
        "file_under_file": manifest(files=[dict(file_entry, name="a"), dict(file_entry, name="a/b")]),
        "short_chunk": manifest(map_digest=objects.digest(short_map)),
    }[case]
    msg = vml.fails("import", bundle(tmp_path / f"{case}.vml", [("x", m)], blobs))
    assert message in msg and f"{case}.vml" in msg
    assert_untouched(vml, rep, before)


def test_a_forged_tar_header_size_is_refused_without_reading_it(vml, rep, tmp_path):
    path = tmp_path / "pax.vml"
    header = bytearray(tarfile.TarInfo("vml-bundle.json").tobuf(format=tarfile.USTAR_FORMAT))
    header[156:157] = b"x"  # a pax header...
    header[124:136] = b"\x80" + (1 << 33).to_bytes(11, "big")  # ...claiming 8 GiB (base-256 size)
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(512 + (1 << 33))  # sparse: costs nothing on disk
    r = subprocess.run(
        ["bash", "-c", f"ulimit -v 1000000; exec {sys.executable} -m vml import {path}"],
        env=vml.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 6 and "a tar header of 8589934592 bytes" in r.stderr, r.stderr


def test_import_checks_names_under_the_lock(vml, rep, tmp_path, image_copy):
    """Another writer that takes the name while import waits for the lock wins."""
    chunk = os.urandom(CS)
    m = chunkmap.encode([(0, objects.digest(chunk), 0)])
    b = bundle(tmp_path / "b.vml", [("e1", manifest(name="e1", map_digest=objects.digest(m)))], [m, chunk])
    holder = hold_lock(rep, "vml save e1", then="s.update_refs({'e1': objects.digest(b'theirs')})")
    r = vml("import", b, ok=False)
    holder.wait(10)
    assert r.returncode == 4
    assert r.stderr.splitlines()[0].startswith("vml: waiting up to 60 s for repository")
    assert "vml: error:" in r.stderr.splitlines()[1] and "entry 'e1' already exists" in r.stderr
    refs = json.loads((rep / "refs.json").read_text())["entries"]
    assert refs == {"e1": objects.digest(b"theirs").hex()}


def test_damaged_settings_give_one_line_errors(vml, rep, tmp_path, home):
    (rep / "vml-repository.json").write_text("[1]")
    assert "not a JSON object" in vml.fails("log", "--repo", rep, status=6)
    cfg = home / "config.toml"
    saved = cfg.read_text()
    cfg.write_text('repositories = "x"\n')
    assert "invalid [repositories] section" in vml.fails("consult", status=6)
    cfg.write_text('default = ["rep"]\n' + saved.replace('default = "rep"', ""))
    assert "default must be a repository name" in vml.fails("consult", status=6)
    assert "cannot create repository" in vml.fails("init", "/proc/vml-test", status=10)


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


def test_rm_reparent_on_a_full_disk(vml, tmp_path):
    need_root()
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    try:
        vml("init", mnt / "rep", "--chunk-size", "4K")
        disk = tmp_path / "d.img"
        disk.write_bytes(os.urandom(64 * CS))
        vml("save", "a", "--from", disk, "--repo", mnt / "rep")
        vml("save", "b", "--from", disk, "--parent", "a", "--repo", mnt / "rep")
        vml("save", "c", "--from", disk, "--parent", "b", "--repo", mnt / "rep")
        filler = mnt / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True, check=False)
        before = snapshot(mnt / "rep")
        msg = vml.fails("rm", "a", "--reparent", "--repo", mnt / "rep", status=10)
        assert "rewriting the entries built on 'a'" in msg and "no space left" in msg
        filler.unlink()
        assert_untouched(vml, mnt / "rep", before)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


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
