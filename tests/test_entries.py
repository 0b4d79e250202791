"""Entries through the library: chains of every kind, sizes, files, rm, gc, verify."""

import errno
import os
import random

import pytest

from vml import files as files_module
from vml.entries.checkout import checkout
from vml.entries.maintenance import gc, remove, verify
from vml.entries.save import save_source
from vml.errors import AlreadyExists, HasChildren, NotFound, ObjectMissing, StorageError, UsageError
from vml.files import write_all
from vml.repo import chunkmap, packfiles, paths
from vml.repo.objects import HOLE
from vml.repo.repository import Repository
from vml.repo.store import Store

from helpers import flip_stored, remove_stored, stored_files

CS = 4096


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def content(repo, name, tmp_path) -> dict[str, bytes]:
    out = tmp_path / f"co-{name}-{random.random()}"
    paths = checkout(repo, name, out)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in paths}


def own_records(repo, name, disk=0):
    m = repo.entry(name).manifest
    return repo.read_map(m, m.disks[disk])


def test_full_entry_round_trips_and_stays_sparse(repo, tmp_path):
    data = bytearray(1 << 20)
    data[5000:9000] = os.urandom(4000)
    data[-10:] = b"0123456789"
    src = write(tmp_path / "disk.img", bytes(data))
    save_source(repo, "e1", src)
    assert content(repo, "e1", tmp_path) == {"disk.img": bytes(data)}
    recs = own_records(repo, "e1")
    assert [i for i, _, _ in recs] == [1, 2, 255]  # only non-zero chunks are stored
    out = tmp_path / "out"
    checkout(repo, "e1", out)
    assert os.stat(out / "disk.img").st_blocks * 512 <= 4 * CS + 8192


def test_incremental_stores_only_changed_chunks(repo, tmp_path):
    base = os.urandom(64 * CS)
    save_source(repo, "e1", write(tmp_path / "a.img", base))
    changed = bytearray(base)
    changed[10 * CS + 7] ^= 0xFF
    changed[40 * CS : 42 * CS] = bytes(2 * CS)  # becomes zeros: a hole record
    save_source(repo, "e2", write(tmp_path / "b.img", bytes(changed)), parent="e1")
    e2 = repo.entry("e2").manifest
    assert e2.kind == "incremental" and e2.parent.name == "e1"
    assert e2.disks[0].name == "a"  # the parent's disk name, not the file's
    recs = own_records(repo, "e2")
    assert [(i, d == HOLE) for i, d, _ in recs] == [(10, False), (40, True), (41, True)]
    assert content(repo, "e2", tmp_path) == {"a.img": bytes(changed)}
    assert content(repo, "e1", tmp_path) == {"a.img": base}
    assert CS <= repo.stored_bytes(repo.entry("e2").digest) < 2 * CS + 2000


def test_differential_is_taken_against_the_base_not_the_parent(repo, tmp_path):
    v0 = os.urandom(32 * CS)
    v1 = bytearray(v0)
    v1[0:CS] = os.urandom(CS)
    v2 = bytearray(v1)
    v2[5 * CS : 6 * CS] = os.urandom(CS)
    save_source(repo, "base", write(tmp_path / "d.img", v0))
    save_source(repo, "inc", write(tmp_path / "d.img", bytes(v1)), parent="base")
    save_source(repo, "diff", write(tmp_path / "d.img", bytes(v2)), parent="inc", kind="differential")
    m = repo.entry("diff").manifest
    assert (m.kind, m.parent.name, m.base.name) == ("differential", "inc", "base")
    assert [i for i, _, _ in own_records(repo, "diff")] == [0, 5]
    assert [cm.name for _, cm in repo.data_chain(repo.entry("diff").digest)] == ["diff", "base"]
    assert content(repo, "diff", tmp_path)["d.img"] == bytes(v2)


@pytest.mark.parametrize("sizes", [(10 * CS, 3 * CS + 17, 12 * CS + 5), (5 * CS + 1, 5 * CS + 3000, 2 * CS)])
def test_disks_that_grow_and_shrink_along_a_chain(repo, tmp_path, sizes):
    rng = random.Random(sum(sizes))
    prev = None
    expected = {}
    for n, size in enumerate(sizes):
        data = bytearray(rng.randbytes(size))
        data[CS : 2 * CS] = bytes(CS)
        name = f"e{n}"
        save_source(repo, name, write(tmp_path / "disk.img", bytes(data)), parent=prev)
        expected[name] = bytes(data)
        prev = name
    for name, data in expected.items():
        assert content(repo, name, tmp_path) == {"disk.img": data}


def test_a_disk_dropped_then_added_again_starts_fresh(repo, tmp_path):
    vm = tmp_path / "vm"
    vm.mkdir()
    write(vm / "a.img", os.urandom(4 * CS))
    write(vm / "b.img", os.urandom(4 * CS))
    save_source(repo, "e1", vm)
    (vm / "b.img").unlink()
    save_source(repo, "e2", vm, parent="e1")
    new_b = bytes(2 * CS) + os.urandom(CS)
    write(vm / "b.img", new_b)
    save_source(repo, "e3", vm, parent="e2")
    assert set(content(repo, "e2", tmp_path)) == {"a.img"}
    assert content(repo, "e3", tmp_path)["b.img"] == new_b


def test_vm_directory_keeps_files_with_their_modes(repo, tmp_path):
    vm = tmp_path / "vm"
    (vm / "nvram").mkdir(parents=True)
    write(vm / "disk.img", os.urandom(3 * CS))
    write(vm / "vm.vmx", b'memsize = "512"\n')
    write(vm / "nvram" / "vars.fd", os.urandom(10000))
    os.chmod(vm / "vm.vmx", 0o600)
    (vm / "vm.vmx.lck").mkdir()  # VMware lock directories are not part of the state
    save_source(repo, "e1", vm)
    m = repo.entry("e1").manifest
    assert [s.name for s in m.disks] == ["disk"]
    assert {s.name: s.mode for s in m.files} == {"vm.vmx": 0o600, "nvram/vars.fd": 0o644}
    got = content(repo, "e1", tmp_path)
    assert got["vm.vmx"] == b'memsize = "512"\n' and got["nvram/vars.fd"] == (vm / "nvram/vars.fd").read_bytes()
    out = tmp_path / "out"
    checkout(repo, "e1", out)
    assert os.stat(out / "vm.vmx").st_mode & 0o777 == 0o600


def test_save_refuses_bad_requests_and_writes_nothing(repo, tmp_path):
    src = write(tmp_path / "d.img", os.urandom(2 * CS))
    save_source(repo, "e1", src)
    before = sorted(p for p in (repo.store.path / paths.OBJECTS).rglob("*") if p.is_file())
    for name in ("a/b", "..", "../x", "x..y", "-x", ".hidden", "a:b", ""):
        with pytest.raises(UsageError, match="invalid entry name"):
            save_source(repo, name, src)
    with pytest.raises(AlreadyExists, match="'e1' already exists"):
        save_source(repo, "e1", src)
    with pytest.raises(NotFound, match="no entry 'nope'"):
        save_source(repo, "e2", src, parent="nope")
    with pytest.raises(UsageError, match="needs --parent"):
        save_source(repo, "e2", src, kind="incremental")
    assert sorted(p for p in (repo.store.path / paths.OBJECTS).rglob("*") if p.is_file()) == before
    assert list(repo.refs()) == ["e1"]


def test_a_failing_save_removes_what_it_wrote(repo, tmp_path, monkeypatch):
    save_source(repo, "e1", write(tmp_path / "d.img", os.urandom(8 * CS)))
    before = stored_files(repo.store.path)
    calls = []

    def failing_write(fd, data):
        calls.append(len(data))
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_all(fd, data)

    monkeypatch.setattr(files_module, "write_all", failing_write)  # every object, pack and index written
    # A pack (and its index) every 16 chunks
    monkeypatch.setattr(packfiles.PackFiles, "writer", lambda self: packfiles.PackWriter(self, 16 * CS))
    with pytest.raises(StorageError, match=r"saving entry 'e2'.*no space left on device"):
        save_source(repo, "e2", write(tmp_path / "d2.img", os.urandom(64 * CS)), parent="e1")
    assert len(calls) > 4  # the first packs were written, then undone
    assert stored_files(repo.store.path) == before
    assert list(repo.refs()) == ["e1"] and verify(repo) == []


def _tree(repo, tmp_path):
    """base(full) -> i1(incr) -> i2(incr) -> d3(diff) ; i1 -> f4(full) -> i5(incr)."""
    rng = random.Random(7)
    data = bytearray(rng.randbytes(24 * CS))
    versions = {}

    def step(name, parent=None, kind=None, chunk=None):
        if chunk is not None:
            data[chunk * CS : (chunk + 1) * CS] = rng.randbytes(CS)
        save_source(repo, name, write(tmp_path / "disk.img", bytes(data)), parent=parent, kind=kind)
        versions[name] = bytes(data)

    step("base")
    step("i1", "base", chunk=1)
    step("i2", "i1", chunk=2)
    step("d3", "i2", "differential", chunk=3)
    step("f4", "i1", "full", chunk=4)
    step("i5", "f4", chunk=5)
    return versions


def test_rm_refuses_an_entry_others_build_on(repo, tmp_path):
    _tree(repo, tmp_path)
    with pytest.raises(HasChildren, match="'i1' has entries built on it"):
        remove(repo, "i1")
    remove(repo, "i2", recursive=True)
    assert sorted(repo.refs()) == ["base", "f4", "i1", "i5"]
    assert remove(repo, "i5") == {"removed": ["i5"], "rewritten": []}


@pytest.mark.parametrize("victim", ["base", "i1", "i2", "f4"])
def test_rm_reparent_keeps_every_other_entry_byte_identical(repo, tmp_path, victim):
    versions = _tree(repo, tmp_path)
    result = remove(repo, victim, reparent=True)
    assert result["removed"] == [victim]
    del versions[victim]
    for name, data in versions.items():
        assert content(repo, name, tmp_path) == {"disk.img": data}, name
    assert verify(repo) == []
    entries = {e.name: e.manifest for e in repo.entries()}
    for m in entries.values():  # every link points at a live entry
        if m.parent:
            assert m.parent.name in entries and repo.entry(m.parent.name).digest == m.parent.manifest
    if victim == "base":
        assert entries["i1"].kind == "full"  # nothing below it to be a delta of
    if victim == "i1":
        assert entries["i2"].parent.name == "base" and entries["i2"].kind == "incremental"
        assert [i for i, _, _ in own_records(repo, "i2")] == [1, 2]  # i1's change folded in


def test_gc_frees_only_what_nothing_needs(repo, tmp_path):
    versions = _tree(repo, tmp_path)
    assert gc(repo).removed == 0
    remove(repo, "i5")
    s = gc(repo)
    # i5's manifest and its map (loose). Its one chunk stays, for now, in the pack the first gc
    # merged the small ones into: 4 KiB dead of 100 KiB, and packs are rewritten under 80 % live.
    assert s.removed == 2 and s.packs.rewritten == 0 and 0 < s.freed < CS
    del versions["i5"]
    for name, data in versions.items():
        assert content(repo, name, tmp_path)["disk.img"] == data
    assert verify(repo) == []


def test_verify_names_damaged_and_missing_objects(repo, tmp_path):
    _tree(repo, tmp_path)
    assert verify(repo) == []
    table = repo.resolve(repo.entry("i2").digest).disks["disk"]
    damaged, missing = table.digest(2), table.digest(0)
    pack = flip_stored(repo.store.path, damaged)
    gone = remove_stored(repo.store.path, missing)  # base's pack: every chunk of base is missing
    repo = Repository(Store(repo.store.path), "repo")  # as a new command sees it (an open pack reads on)
    problems = verify(repo)
    assert any(f"pack {pack} at offset 0: content does not match its name" in p for p in problems), problems
    assert any(f"entry 'i2', disk disk, chunk 2: object {damaged.hex()}" in p for p in problems)
    assert any(f"object {missing.hex()} is missing: pack {gone} is missing" in p for p in problems), problems
    assert any(f"entry 'base', disk disk, chunk 0: object {missing.hex()} is missing" in p for p in problems)
    assert not any(damaged.hex() in p and "entry 'i1'" in p for p in problems)  # i1 does not use it
    one = verify(repo, "i1")
    assert one and all("'i2'" not in p for p in one)
    with pytest.raises(ObjectMissing, match="entry 'base', disk disk, chunk 0"):
        checkout(repo, "base", tmp_path / "out")
    assert not (tmp_path / "out" / "disk.img").exists()


def test_verify_catches_a_chunk_of_the_wrong_length(repo, tmp_path):
    save_source(repo, "e1", write(tmp_path / "d.img", os.urandom(3 * CS)))
    m = repo.entry("e1").manifest
    recs = repo.read_map(m, m.disks[0])
    with repo.store.lock("test"):
        short, _, _ = repo.store.put(b"short chunk")
        bad_map, _, _ = repo.store.put(chunkmap.encode([(0, short, 20), *recs[1:]]))
        from dataclasses import replace

        bad = replace(m, name="bad", disks=(replace(m.disks[0], map=bad_map),))
        d, _, _ = repo.store.put(bad.encode())
        repo.store.sync()
        repo.store.update_refs({"bad": d})
    assert any("entry 'bad', disk d, chunk 0" in p and "has 11 bytes, expected 4096" in p for p in verify(repo))
