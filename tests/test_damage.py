"""Damaged repositories: every problem is named, none hides the rest, and nothing reads wrong bytes."""

import errno
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from vml.repo import chunkmap, objects, paths
from vml.repo.repository import Repository
from vml.repo.store import Store

from conftest import need
from helpers import CS, assert_untouched, direct_read, flip_stored, remove_stored, snapshot, stored_place
from servers import Nginx


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
    path = paths.object_path(repo.store.path, d)
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


def saved_base(vml, tmp_path, fmt: str) -> tuple[Path, bytes, int]:
    """rep (format ``fmt``, 4 KiB chunks) with entry base saved from d.img: (the image, a chunk's digest, its index)."""
    vml("init", tmp_path / "rep", "--chunk-size", "4K", "--format", fmt)
    image = tmp_path / "d.img"
    image.write_bytes(os.urandom(16 * CS))
    vml("save", "base", "--from", image)
    repo = Repository(Store(tmp_path / "rep"))
    (table,) = repo.resolve(repo.entry("base").digest).disks.values()
    index, digest, _ = list(table.records())[5]
    return image, digest, index


@pytest.mark.parametrize("fmt", ["1", "2"])
def test_a_save_stores_anew_a_chunk_whose_stored_copy_a_read_found_damaged(vml, tmp_path, fmt):
    image, digest, index = saved_base(vml, tmp_path, fmt)
    flip_stored(tmp_path / "rep", digest)
    msg = vml.fails("checkout", "base", tmp_path / "co1", status=6)  # the read finds, and records, the damage
    assert f"chunk {index}" in msg
    changed = bytearray(image.read_bytes())
    changed[0] ^= 1  # another chunk changes; the damaged one does not
    (tmp_path / "d2.img").write_bytes(changed)
    vml("save", "next", "--from", tmp_path / "d2.img", "--parent", "base")
    vml("checkout", "next", tmp_path / "co2")
    assert (tmp_path / "co2" / "d.img").read_bytes() == bytes(changed)  # the new entry reads whole
    vml("checkout", "base", tmp_path / "co3")  # and so does the old one: the same chunk, stored again
    assert (tmp_path / "co3" / "d.img").read_bytes() == image.read_bytes()
    r = vml("verify")
    assert "repository rep: ok" in r.stdout
    if fmt == "2":  # the damaged frame stays in its pack until gc rewrites it
        assert "a damaged copy of an object stored again since found" in r.stdout
        vml("gc")
        r = vml("verify")
        assert "stored again since found" not in r.stdout and not list((tmp_path / "rep" / "damaged").iterdir())


def test_verify_records_damage_so_that_even_a_full_save_of_the_same_bytes_repairs_it(vml, tmp_path):
    image, digest, _ = saved_base(vml, tmp_path, "2")
    flip_stored(tmp_path / "rep", digest)
    r = vml("verify", ok=False)
    assert r.returncode == 1 and digest.hex() in r.stdout and "--repair" in r.stderr
    vml("save", "again", "--from", image)  # a full entry: every chunk is stored already... but one
    for name in ("again", "base"):
        vml("checkout", name, tmp_path / name)
        assert (tmp_path / name / "d.img").read_bytes() == image.read_bytes()


@pytest.mark.parametrize("source", ["image", "bundle", "remote"])
def test_verify_repair_takes_damaged_chunks_from_a_source_that_holds_them(vml, tmp_path, source):
    image, digest, index = saved_base(vml, tmp_path, "2")
    server = None
    if source == "bundle":
        vml("export", "base", "-o", tmp_path / "base.vml")
        where = tmp_path / "base.vml"
    elif source == "remote":
        need("nginx")
        vml("keygen", tmp_path / "key")
        vml("publish", tmp_path / "pub", "--key", tmp_path / "key")
        server = Nginx(tmp_path / "pub")
        vml("remote", "add", "cern", server.url, "--key", tmp_path / "key.pub")
        where = "cern"
    else:
        where = image
    try:
        flip_stored(tmp_path / "rep", digest)
        r = vml("verify", ok=False)
        assert r.returncode == 1 and f"chunk {index}" in r.stdout
        r = vml("verify", "--repair", "--from", where)
        assert "repaired 1 of 1 damaged objects from" in r.stdout and "repository rep: ok" in r.stdout
        vml("checkout", "base", tmp_path / "co")
        assert (tmp_path / "co" / "d.img").read_bytes() == image.read_bytes()
        vml("gc")
        assert "stored again since found" not in vml("verify").stdout
    finally:
        if server:
            server.stop()


def test_verify_repair_says_what_it_could_not_repair(vml, tmp_path):
    _, digest, _ = saved_base(vml, tmp_path, "2")
    flip_stored(tmp_path / "rep", digest)
    other = tmp_path / "other.img"
    other.write_bytes(os.urandom(16 * CS))
    assert "--from" in vml.fails("verify", "--repair", status=2)  # no remote, and no source named
    r = vml("verify", "--repair", "--from", other, ok=False)
    assert r.returncode == 1 and "repaired 0 of 1 damaged objects" in r.stdout and digest.hex() in r.stdout


def test_a_copy_repaired_by_hand_is_no_longer_counted_damaged(vml, tmp_path):
    _, digest, _ = saved_base(vml, tmp_path, "2")
    flip_stored(tmp_path / "rep", digest)
    vml.fails("checkout", "base", tmp_path / "co1", status=6)
    assert len(list((tmp_path / "rep" / "damaged").iterdir())) == 1
    flip_stored(tmp_path / "rep", digest)  # the same byte flipped back: the copy is right again
    assert "repository rep: ok" in vml("verify").stdout
    assert not list((tmp_path / "rep" / "damaged").iterdir())  # so a save need not store it again


def test_a_pack_cut_short_counts_as_damage_that_a_save_or_repair_stores_anew(vml, tmp_path):
    image, digest, _ = saved_base(vml, tmp_path, "2")
    pack, offset, length = stored_place(tmp_path / "rep", digest)
    os.truncate(pack, offset + length // 2)  # the chunk's frame and everything after it, cut
    r = vml("verify", ok=False)
    assert r.returncode == 1 and "shorter than its index says" in r.stdout
    r = vml("verify", "--repair", "--from", image)
    assert "repaired" in r.stdout and "repository rep: ok" in r.stdout, r.stdout
    vml("checkout", "base", tmp_path / "co")
    assert (tmp_path / "co" / "d.img").read_bytes() == image.read_bytes()


def test_a_mount_reads_a_chunk_again_once_a_repair_stored_it(vml, tmp_path, mounted):
    image, digest, index = saved_base(vml, tmp_path, "2")
    flip_stored(tmp_path / "rep", digest)
    disk = mounted / "rep" / "base" / "d.img"
    fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)  # no page cache: every read reaches the mount
    try:
        with pytest.raises(OSError) as e:
            direct_read(fd, index * CS, CS)
        assert e.value.errno == errno.EIO
        r = vml("verify", "--repair", "--from", image)  # another process stores a good copy
        assert "repaired 1 of 1" in r.stdout, r.stdout
        assert direct_read(fd, index * CS, CS) == image.read_bytes()[index * CS : (index + 1) * CS]  # found
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["objects", "packs", "certificates"])
def test_a_writer_never_creates_or_removes_files_through_a_linked_subdirectory(vml, tmp_path, where):
    saved_base(vml, tmp_path, "2")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me\n")
    more = tmp_path / "more.img"
    more.write_bytes(os.urandom(4 * CS))
    vml("save", "probe", "--from", more)  # to learn where the next save writes
    repo = Repository(Store(tmp_path / "rep"))
    probe = repo.entry("probe")
    if where == "certificates":
        vml("keygen", tmp_path / "key")
        target = tmp_path / "rep" / "certificates" / probe.digest.hex()
        target.parent.mkdir(exist_ok=True)
        os.symlink(victim, target)
        command = ("certify", "probe", "--key", tmp_path / "key")
    else:
        (table,) = repo.resolve(probe.digest).disks.values()
        first = next(d for _, d, _ in table.records())
        place = stored_place(tmp_path / "rep", first)[0].parent if where == "packs" else None
        vml("rm", "probe")
        vml("gc")  # its objects go, and the next save writes them again: into the linked directory
        chunk_map = probe.manifest.disks[0].map.hex()  # the same chunks make the same map (a manifest has a time)
        target = place if where == "packs" else tmp_path / "rep" / "objects" / chunk_map[:2]
        shutil.rmtree(target, ignore_errors=True)
        os.symlink(victim, target)
        command = ("save", "probe", "--from", more)
    msg = vml.fails(*command, status=6)
    assert f"{target}: a symbolic link where a directory belongs" in msg and "refusing to write" in msg
    assert [p.name for p in victim.iterdir()] == ["precious"]


def test_a_damaged_manifest_a_remote_also_lists_is_read_from_the_remote_and_gc_keeps_its_chunks(vml, tmp_path):
    """A damaged copy here is still a copy here: gc keeps what its entry needs, and a read takes the remote's
    copy of the object (checked by its digest), even offline once the remote's cache has it."""
    need("nginx")
    image, _, _ = saved_base(vml, tmp_path, "2")
    changed = bytearray(image.read_bytes())
    changed[0] ^= 1
    (tmp_path / "d2.img").write_bytes(changed)
    vml("save", "child", "--from", tmp_path / "d2.img", "--parent", "base")
    repo = Repository(Store(tmp_path / "rep"))
    base = repo.entry("base").digest
    chunks = set().union(
        *(t.digest_set() for e in ("base", "child") for t in repo.resolve(repo.entry(e).digest).tables())
    )
    vml("keygen", tmp_path / "key")
    vml("publish", tmp_path / "pub", "--key", tmp_path / "key")
    server = Nginx(tmp_path / "pub")
    try:
        vml("remote", "add", "cern", server.url, "--key", tmp_path / "key.pub")
        flip_stored(tmp_path / "rep", base)  # base's manifest, a loose object
        vml("log", ok=False)  # a read finds the damage, and records it
        vml("gc", ok=False)
    finally:
        server.stop()
    store = Store(tmp_path / "rep")
    assert all(store.has(d) for d in chunks)  # every chunk base and child need is still here
    vml("checkout", "child", tmp_path / "co")  # and reads, base's manifest from the remote's cache
    assert (tmp_path / "co" / "d.img").read_bytes() == bytes(changed)
