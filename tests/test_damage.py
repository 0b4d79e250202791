"""Damaged repositories: every problem is named, none hides the rest, and nothing reads wrong bytes."""

import json
import os
from dataclasses import replace

import pytest

from vml import layout
from vml.repo import chunkmap, objects
from vml.repo.repository import Repository
from vml.repo.store import Store

from helpers import CS, assert_untouched, remove_stored, snapshot


@pytest.fixture
def rep(vml, tmp_path):
    vml("init", tmp_path / "rep", "--chunk-size", "4K")
    return tmp_path / "rep"


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


def test_missing_objects_are_named_on_checkout_and_verify(vml, tmp_path, image_copy):
    vml("init", tmp_path / "rep1")
    vml("save", "e1", "--from", image_copy())
    repo = Repository(Store(tmp_path / "rep1"))
    table = repo.resolve(repo.entry("e1").digest).disks["disk"]
    victim = next(iter(sorted(table.digest_set())))
    gone = remove_stored(repo.store.path, victim)  # the pack it lies in, with the chunks beside it
    msg = vml.fails("checkout", "e1", tmp_path / "co", status=7)
    assert "entry 'e1', disk disk, chunk" in msg and f"pack {gone} is missing" in msg
    assert not (tmp_path / "co").exists()  # the directory it made is gone again
    r = vml("verify", ok=False)
    assert r.returncode == 1 and f"object {victim.hex()} is missing" in r.stdout


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
