"""Hostile and odd input found in review: forged bundles, damaged settings, races.

Each case must end in a one-line error with a non-zero exit (never an
internal error), and leave the repository as it was.
"""

import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from vml.repo import chunkmap, objects

from conftest import hold_lock, mount_pid, need_root
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
        ("huge_disk", "more than the limit of 17592186044416"),
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


# -- checkout of untrusted entries ------------------------------------------------


def test_checkout_drops_setuid_setgid_and_sticky_bits_unless_asked(vml, rep, tmp_path):
    chunk = os.urandom(100)
    m = chunkmap.encode([(0, objects.digest(chunk), 0)])
    run_sh = {"name": "run.sh", "size": 100, "map": objects.digest(m).hex(), "mode": 0o6777}
    empty = chunkmap.encode([])
    b = bundle(
        tmp_path / "suid.vml", [("x", manifest(map_digest=objects.digest(empty), files=[run_sh]))], [m, chunk, empty]
    )
    vml("import", b)
    vml("checkout", "x", tmp_path / "co")
    assert (tmp_path / "co/run.sh").read_bytes() == chunk
    assert stat.S_IMODE(os.stat(tmp_path / "co/run.sh").st_mode) == 0o777
    vml("checkout", "x", tmp_path / "co2", "--keep-special-bits")
    assert stat.S_IMODE(os.stat(tmp_path / "co2/run.sh").st_mode) == 0o6777


def test_checkout_never_writes_through_links_in_the_destination(vml, rep, tmp_path):
    chunk = os.urandom(100)
    m = chunkmap.encode([(0, objects.digest(chunk), 0)])
    empty = chunkmap.encode([])
    conf = {"name": "conf/x.txt", "size": 100, "map": objects.digest(m).hex(), "mode": 0o644}
    b = bundle(tmp_path / "b.vml", [("x", manifest(map_digest=objects.digest(empty), files=[conf]))], [m, chunk, empty])
    vml("import", b)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "conf").symlink_to(elsewhere)
    msg = vml.fails("checkout", "x", dest)
    assert f"{dest / 'conf'}: not a directory" in msg
    assert list(elsewhere.iterdir()) == [] and sorted(os.listdir(dest)) == ["conf"]
    (dest / "conf").unlink()
    (dest / "x.img").symlink_to(elsewhere / "victim.img")
    assert "x.img already exists" in vml.fails("checkout", "x", dest, status=4)
    assert list(elsewhere.iterdir()) == [] and sorted(os.listdir(dest)) == ["x.img"]
    (dest / "x.img").unlink()
    vml("checkout", "x", dest)  # once the way is clear, it works
    assert (dest / "conf/x.txt").read_bytes() == chunk and sorted(os.listdir(dest)) == ["conf", "x.img"]


# -- sizes that entries only declare ----------------------------------------------


def child_peak_rss(vml, *args) -> tuple[subprocess.CompletedProcess, int]:
    """Run `vml ARGS`; return its result and its peak resident memory in bytes."""
    code = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run([sys.executable, '-m', 'vml', *sys.argv[1:]], capture_output=True, text=True)\n"
        "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr)\n"
        "sys.exit(r.returncode)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], env=vml.env, capture_output=True, text=True, check=False
    )
    *err, peak = r.stderr.strip().splitlines()
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout, "\n".join(err)), int(peak)


def test_a_bundle_declaring_terabytes_of_holes_costs_no_memory(vml, tmp_path, home, mounted):
    """A 10 KB bundle whose disk declares 16 TiB: import, verify and ls stay cheap."""
    vml("init", tmp_path / "rep")  # the default chunk size, as found in review
    cs = 256 << 10
    chunk = (os.urandom(64) * (cs // 64))[:cs]  # compresses to almost nothing, as in the bundle found
    m = chunkmap.encode([(0, objects.digest(chunk), 0), ((16 << 40) // cs - 1, objects.digest(chunk), 0)])
    big = manifest(size=16 << 40, map_digest=objects.digest(m), chunk_size=cs)
    b = bundle(tmp_path / "holes.vml", [("x", big)], [m, chunk])
    assert b.stat().st_size < 20_000
    r, peak = child_peak_rss(vml, "import", b)
    assert r.returncode == 0 and peak < 150 << 20, (r.stderr, peak)
    started = time.monotonic()
    r, peak = child_peak_rss(vml, "verify")
    assert r.returncode == 0 and peak < 150 << 20 and time.monotonic() - started < 20, (r.stderr, peak)
    started = time.monotonic()
    st = os.stat(mounted / "rep/x/x.img")
    assert st.st_size == 16 << 40 and st.st_blocks * 512 == 2 * cs
    assert sorted(os.listdir(mounted / "rep/x")) == ["entry.json", "x-flat.vmdk", "x.img", "x.vmdk"]
    with open(mounted / "rep/x/x.img", "rb") as f:
        assert f.read(cs) == chunk and os.pread(f.fileno(), cs, (16 << 40) - cs) == chunk
    assert time.monotonic() - started < 10
    mount_rss = int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{mount_pid(home)}/status").read_text()).group(1))
    assert mount_rss < 300 << 10, f"the mount peaked at {mount_rss} kB"


def test_a_configured_size_limit_refuses_larger_entries(vml, rep, tmp_path, home):
    chunk = os.urandom(CS)
    m = chunkmap.encode([(0, objects.digest(chunk), 0)])
    b = bundle(tmp_path / "big.vml", [("x", manifest(size=2 << 40, map_digest=objects.digest(m)))], [m, chunk])
    before = snapshot(rep)
    with open(home / "config.toml", "a") as f:
        f.write('\n[limits]\nmax_disk_size = "1T"\n')
    msg = vml.fails("import", b, status=6)
    assert "x declares 2199023255552 bytes, more than the limit of 1099511627776" in msg and "big.vml" in msg
    assert_untouched(vml, rep, before)
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(CS))
    os.truncate(disk, (1 << 40) + CS)
    assert "d declares 1099511631872 bytes, more than the limit" in vml.fails("save", "big", "--from", disk, status=9)
    assert_untouched(vml, rep, before)
    (home / "config.toml").write_text((home / "config.toml").read_text().replace('"1T"', '"a lot"'))
    assert "[limits] max_disk_size" in vml.fails("log", status=6)


# -- one damaged entry -------------------------------------------------------------


def test_log_lists_every_other_entry_and_marks_a_damaged_one(vml, rep, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(4 * CS))
    vml("save", "a", "--from", disk)
    vml("save", "b", "--from", disk, "--parent", "a")
    vml("save", "c", "--from", disk, "--parent", "b")
    vml("save", "z", "--from", disk)
    digest = json.loads((rep / "refs.json").read_text())["entries"]["b"]
    victim = rep / "objects" / digest[:2] / digest[2:]
    os.chmod(victim, 0o644)
    victim.write_bytes(b"not zstd")
    r = vml("log", ok=False)
    assert r.returncode == 6
    lines = r.stdout.splitlines()
    assert lines[0].startswith("+---a(") and lines[1].startswith("+---z(")
    assert lines[2].startswith("+---b(DAMAGED: entry 'b': ") and lines[3].startswith("    +---c(")
    assert r.stderr.strip() == "vml: 1 damaged entry in rep (b): run `vml verify`"
    r = vml("consult", ok=False)
    assert r.returncode == 6 and "+---b(DAMAGED" in r.stdout and "['a', 'c', 'z']" in r.stdout


def test_special_files_given_as_key_files_fail_at_once(vml, rep, tmp_path):
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    for args in (
        ("publish", tmp_path / "pub", "--key", fifo),
        ("remote", "add", "r", "http://127.0.0.1:9", "--key", fifo),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "vml", *map(str, args)], env=vml.env, capture_output=True, text=True, timeout=20
        )
        assert (
            r.returncode == 2
            and r.stderr.strip() == f"vml: error: {fifo}: not a regular file (a key file was expected)"
        )
    assert "not a regular file" in vml.fails("publish", tmp_path / "pub", "--key", "/dev/zero", status=2)


def test_remote_names_the_mount_keeps_or_repositories_use_are_refused(vml, rep, tmp_path, home):
    cfg = home / "config.toml"
    saved = cfg.read_text()
    remote = '\n[remotes.{}]\nurl = "http://127.0.0.1:9"\nkey = "ed25519:' + "A" * 43 + '="\n'
    cfg.write_text(saved + remote.format("areas"))
    assert "invalid remote name 'areas': it is reserved" in vml.fails("consult", status=6)
    cfg.write_text(saved + remote.format("rep"))
    assert "'rep' names both a repository and a remote" in vml.fails("log", status=6)
