"""What bundles carry, checked on import: truncated, tampered and forged bundles, names taken meanwhile,
and sizes a manifest only declares. Each refusal is one line, and the repository stays as it was."""

import json
import os
import re
import tarfile
import time
from pathlib import Path

import pytest

from vml.repo import chunkmap, objects

from conftest import hold_lock, mount_pid
from helpers import CS, assert_untouched, bundle, child_peak_rss, manifest, rewrite_bundle, snapshot


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


@pytest.fixture
def rep(vml, tmp_path):
    vml("init", tmp_path / "rep", "--chunk-size", "4K")
    return tmp_path / "rep"


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
