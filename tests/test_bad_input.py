"""Bad input and crashes: one-line errors, non-zero exits, repositories left as they were."""

import io
import json
import os
import re
import signal
import subprocess
import tarfile
import time
from dataclasses import replace

import pytest

from vml import layout
from vml.repo import chunkmap, objects
from vml.repo.repository import Repository
from vml.repo.store import Store

from conftest import need, need_root


def snapshot(repo_path):
    """Everything that defines a repository's state: refs and the set of objects."""
    objs = sorted(str(p.relative_to(repo_path)) for p in (repo_path / "objects").rglob("*") if p.is_file())
    return (repo_path / "refs.json").read_text(), objs


def assert_untouched(vml, repo_path, before):
    assert snapshot(repo_path) == before
    assert list((repo_path / "tmp").iterdir()) == []
    assert vml("verify", "--repo", repo_path).returncode == 0


@pytest.fixture
def two_repos(vml, tmp_path, image_copy):
    """rep1 with base -> work; rep2 holding base only; work.vml the delta bundle."""
    disk = image_copy()
    vml("init", tmp_path / "rep1")
    vml("init", tmp_path / "rep2")
    vml("save", "base", "--from", disk)
    with open(disk, "r+b") as f:
        f.seek(30 << 20)
        f.write(os.urandom(600_000))
    vml("save", "work", "--from", disk, "--parent", "base")
    vml("export", "base", "-o", tmp_path / "base.vml")
    vml("export", "work", "-o", tmp_path / "work.vml")
    vml("import", tmp_path / "base.vml", "--repo", "rep2")
    return tmp_path / "rep2", tmp_path / "work.vml"


def rewrite_bundle(src, dst, change):
    """Copy a bundle, passing each (name, data) through ``change`` (None drops it)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin:
            data = tin.extractfile(m).read()
            new = change(m.name, data)
            if new is None:
                continue
            info = tarfile.TarInfo(new[0])
            info.size = len(new[1])
            tout.addfile(info, io.BytesIO(new[1]))


def test_truncated_bundles_are_refused(vml, two_repos, tmp_path):
    rep2, bundle = two_repos
    before = snapshot(rep2)
    data = bundle.read_bytes()
    with tarfile.open(bundle) as t:
        members = t.getmembers()
    last = members[-1]
    # inside the index, inside an object, at a member boundary, inside the last object
    for cut in (100, 1500, len(data) // 2, members[-2].offset, last.offset_data + last.size // 2):
        bad = tmp_path / f"cut{cut}.vml"
        bad.write_bytes(data[:cut])
        msg = vml.fails("import", bad, "--repo", "rep2", status=6)
        assert str(bad) in msg
        assert_untouched(vml, rep2, before)


def test_tampered_bundles_are_refused(vml, two_repos, tmp_path):
    rep2, bundle = two_repos
    before = snapshot(rep2)

    def flip_object(name, data):
        if name.startswith("objects/") and len(data) > 10_000:
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
        return name, data

    def evil_index(name, data):
        if name == "vml-bundle.json":
            index = json.loads(data)
            index["entries"][0]["name"] = "../../etc/x"
            data = json.dumps(index).encode()
        return name, data

    with tarfile.open(bundle) as t:
        big = sum(1 for m in t if m.name.startswith("objects/") and m.size > 10_000)

    def drop_big_objects(name, data):  # and keep the index's count consistent
        if name == "vml-bundle.json":
            index = json.loads(data)
            index["objects"] -= big
            return name, json.dumps(index).encode()
        return None if name.startswith("objects/") and len(data) > 10_000 else (name, data)

    def path_member(name, data):
        return ("../escape" if name.startswith("objects/") else name), data

    cases = [
        (flip_object, "does not match its name|damaged zstd data"),
        (evil_index, "invalid entry name"),
        (drop_big_objects, "needs object .* which is missing"),
        (path_member, "unexpected member '../escape'"),
    ]
    for change, message in cases:
        bad = tmp_path / f"{change.__name__}.vml"
        rewrite_bundle(bundle, bad, change)
        msg = vml.fails("import", bad, "--repo", "rep2")
        assert str(bad) in msg
        assert re.search(message, msg), msg
        assert_untouched(vml, rep2, before)
    (tmp_path / "notabundle").write_bytes(b"hello" * 100)
    assert "not a VML bundle" in vml.fails("import", tmp_path / "notabundle", "--repo", "rep2")


def test_a_chunk_that_decompresses_past_the_chunk_size_is_refused(vml, tmp_path):
    """Both in a bundle and in a repository, a chunk larger than the chunk size is an error."""
    vml("init", tmp_path / "rep1", "--chunk-size", "4K")
    vml("init", tmp_path / "rep2", "--chunk-size", "4K")
    (tmp_path / "d.img").write_bytes(os.urandom(3 * 4096))
    vml("save", "e1", "--from", tmp_path / "d.img")
    repo = Repository(Store(tmp_path / "rep1"))
    m = repo.entry("e1").manifest
    big = os.urandom(64 << 10)
    with repo.store.lock("test"):
        big_d, size, _ = repo.store.put(big)
        map_d, _, _ = repo.store.put(chunkmap.encode([(0, big_d, size)]))
        forged = replace(m, name="forged", disks=(replace(m.disks[0], map=map_d),))
        forged_d, _, _ = repo.store.put(forged.encode())
        repo.store.sync()
        repo.store.update_refs({"forged": forged_d})
    msg = vml.fails("checkout", "forged", tmp_path / "co", "--repo", "rep1", status=6)
    assert "entry 'forged', disk d, chunk 0" in msg and "more than the limit of 4096" in msg
    assert not (tmp_path / "co" / "d.img").exists()
    vml("export", "forged", "-o", tmp_path / "forged.vml", "--repo", "rep1")
    before = snapshot(tmp_path / "rep2")
    msg = vml.fails("import", tmp_path / "forged.vml", "--repo", "rep2")
    assert "chunk 0 has 65536 bytes, expected 4096" in msg and "forged.vml" in msg
    assert_untouched(vml, tmp_path / "rep2", before)


def test_invalid_entry_names_are_refused(vml, tmp_path, image_copy):
    vml("init", tmp_path / "rep1")
    disk = image_copy()
    for bad in ("a/b", "..", "../etc", "x..y", "a:b"):
        assert f"invalid entry name {bad!r}" in vml.fails("save", bad, "--from", disk, status=2)
    assert json.loads((tmp_path / "rep1/refs.json").read_text()) == {"entries": {}}


def test_missing_objects_are_named_on_checkout_and_verify(vml, tmp_path, image_copy):
    vml("init", tmp_path / "rep1")
    vml("save", "e1", "--from", image_copy())
    repo = Repository(Store(tmp_path / "rep1"))
    table = repo.resolve(repo.entry("e1").digest).disks["disk"]
    victim = next(iter(sorted(table.digest_set())))
    layout.object_path(repo.store.path, victim).unlink()
    msg = vml.fails("checkout", "e1", tmp_path / "co", status=7)
    assert "entry 'e1', disk disk, chunk" in msg and victim.hex() in msg
    assert not (tmp_path / "co").exists()  # the directory it made is gone again
    r = vml("verify", ok=False)
    assert r.returncode == 1 and f"object {victim.hex()} is missing" in r.stdout


@pytest.fixture
def small_tmpfs(tmp_path):
    need_root()
    need("mount", "umount")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_during_save_leaves_the_repository_as_it_was(vml, tmp_path, small_tmpfs):
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


def kill_at(vml, delay, *args):
    p = vml.popen(*args)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    return p.returncode


def test_kill_9_during_save_leaves_the_repository_valid(vml, tmp_path, image_copy):
    vml("init", tmp_path / "rep1", "--chunk-size", "64K")
    disk = image_copy()
    vml("save", "base", "--from", disk)
    with open(disk, "r+b") as f:  # lots of new data, so the save takes a while
        f.seek(8 << 20)
        f.write(os.urandom(48 << 20))
    t0 = time.monotonic()
    vml("save", "timing", "--from", disk, "--parent", "base")
    duration = time.monotonic() - t0
    vml("rm", "timing")
    vml("gc")
    outcomes = set()
    for i, frac in enumerate([0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.85, 0.92, 0.97, 1.05]):
        name = f"k{i}"
        code = kill_at(vml, duration * frac, "save", name, "--from", disk, "--parent", "base")
        refs = json.loads((tmp_path / "rep1/refs.json").read_text())["entries"]
        r = vml("verify")
        assert r.returncode == 0, r.stdout
        if name in refs:  # it finished before the kill: it must be complete
            out = tmp_path / f"co{i}"
            vml("checkout", name, out)
            assert (out / "disk.img").read_bytes() == disk.read_bytes()
            outcomes.add("complete")
        else:
            assert code == -signal.SIGKILL
            outcomes.add("absent")
    assert "absent" in outcomes  # at least one kill landed mid-save
    vml("save", "after", "--from", disk, "--parent", "base")  # the lock is free and tmp/ is cleared
    assert list((tmp_path / "rep1/tmp").iterdir()) == []


def test_kill_9_during_import_leaves_the_repository_valid(vml, tmp_path, image_copy):
    vml("init", tmp_path / "rep1", "--chunk-size", "64K")
    disk = image_copy()
    with open(disk, "r+b") as f:
        f.seek(8 << 20)
        f.write(os.urandom(48 << 20))
    vml("save", "big", "--from", disk)
    vml("export", "big", "-o", tmp_path / "big.vml")
    vml("init", tmp_path / "rep2")
    t0 = time.monotonic()
    vml("import", tmp_path / "big.vml", "--repo", "rep2")
    duration = time.monotonic() - t0
    killed_midway = False
    for i, frac in enumerate([0.1, 0.3, 0.5, 0.7, 0.9, 0.98]):
        target = tmp_path / f"rep-k{i}"
        vml("init", target)
        code = kill_at(vml, duration * frac, "import", tmp_path / "big.vml", "--repo", target)
        assert vml("verify", "--repo", target).returncode == 0
        refs = json.loads((target / "refs.json").read_text())["entries"]
        if refs:
            vml("checkout", "big", tmp_path / f"co{i}", "--repo", target)
            assert (tmp_path / f"co{i}/disk.img").read_bytes() == disk.read_bytes()
        else:
            killed_midway |= code == -signal.SIGKILL
            vml("import", tmp_path / "big.vml", "--repo", target)  # and a retry succeeds
    assert killed_midway


def test_damaged_manifest_and_refs_are_reported_by_name(vml, tmp_path, image_copy):
    vml("init", tmp_path / "rep1")
    vml("save", "e1", "--from", image_copy())
    repo = Repository(Store(tmp_path / "rep1"))
    d = repo.entry("e1").digest
    path = layout.object_path(repo.store.path, d)
    path.write_bytes(objects.compress(b'{"format": 1, "name": "e1"}'))
    msg = vml.fails("show", "e1", status=6)
    assert "entry 'e1'" in msg and "does not match its name" in msg
    (tmp_path / "rep1/refs.json").write_text("{not json")
    assert "refs.json: does not parse" in vml.fails("log")
