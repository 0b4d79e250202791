"""Repository files that are not what they should be: links out of the repository, FIFOs, devices and
forged sizes. Walks never follow a link, reads are bounded by what the format allows, and each bad file
is named in one line (issue 22, items 14 and 20)."""

import os
import shutil
import struct

import pytest

from vml.repo import packs
from vml.repo.paths import index_path, pack_path, packset_path
from vml.repo.repository import Repository
from vml.repo.store import Store

from helpers import stored_place


@pytest.fixture
def two(vml, tmp_path):
    """Repositories a (entry ea) and b (entry eb) of different random data, each with its own packs."""
    for name in ("a", "b"):
        vml("init", tmp_path / name, "--chunk-size", "4K", "--name", name)
        (tmp_path / f"{name}.img").write_bytes(os.urandom(64 << 10))
        vml("save", f"e{name}", "--from", tmp_path / f"{name}.img", "--repo", name)
    return tmp_path / "a", tmp_path / "b"


def pack_dirs(repo) -> set[str]:
    return {p.name for p in (repo / "packs").iterdir()}


def pack_files(repo) -> set:
    return {p for p in (repo / "packs").rglob("*") if p.is_file() and not p.is_symlink()}


def test_gc_and_verify_never_follow_a_link_out_of_the_repository(vml, two, tmp_path):
    a, b = two
    i = 0
    while not pack_dirs(b) - pack_dirs(a):  # a fan-out directory of b's that a does not have
        (tmp_path / "more.img").write_bytes(os.urandom(8 << 10))
        vml("save", f"more{i}", "--from", tmp_path / "more.img", "--repo", "b")
        i += 1
    sub = sorted(pack_dirs(b) - pack_dirs(a))[0]
    os.symlink(b / "packs" / sub, a / "packs" / sub)  # its packs look like a's own, unused ones
    shutil.rmtree(a / "objects" / "ef")
    os.symlink("/etc", a / "objects" / "ef")
    theirs = pack_files(b)

    r = vml("verify", "--repo", "a", ok=False)
    assert r.returncode == 1
    assert f"{a}/packs/{sub}: a symbolic link, not followed" in r.stdout
    assert f"{a}/objects/ef: a symbolic link, not followed" in r.stdout
    assert "passwd" not in r.stdout  # nothing under /etc was looked at

    vml("gc", "--repo", "a")
    assert pack_files(b) == theirs  # b's packs are all there
    assert vml("verify", "--repo", "b").returncode == 0
    vml("checkout", "eb", tmp_path / "co", "--repo", "b")
    assert (tmp_path / "co" / "b.img").read_bytes() == (tmp_path / "b.img").read_bytes()


@pytest.mark.parametrize("where", ["tmp", "packsets", "packs", "objects", "leases"])
def test_a_writer_refuses_a_link_in_place_of_a_repository_directory(vml, two, tmp_path, where):
    a, _ = two
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me\n")
    (victim / ("ab" * 32)).write_text("keep me too\n")
    shutil.rmtree(a / where, ignore_errors=True)
    os.symlink(victim, a / where)
    for command in (("gc",), ("save", "again", "--from", tmp_path / "a.img")):
        msg = vml.fails(*command, "--repo", "a", status=6)
        assert f"{a}/{where}: a symbolic link where a directory belongs" in msg and "refusing to write" in msg
    assert sorted(p.name for p in victim.iterdir()) == sorted(["precious", "ab" * 32])
    r = vml("verify", "--repo", "a", ok=False)
    assert r.returncode == 1 and f"{a}/{where}: a symbolic link where a directory belongs" in r.stdout


def forged_index(repo, pack: bytes, offset: int, size: int) -> None:
    """Replace the index of ``pack`` by a well-formed one (checksum right) whose records say ``offset``."""
    path = index_path(repo, pack)
    good = path.read_bytes()
    head = len(packs.MAGIC)
    _, _, count = struct.unpack_from("<32sQI", good, head)
    records = [struct.unpack_from("<32sQI", good, head + 44 + i * 44) for i in range(count)]
    body = packs.MAGIC + struct.pack("<32sQI", pack, size, count)
    body += b"".join(struct.pack("<32sQI", d, offset + i, n) for i, (d, _, n) in enumerate(records))
    os.chmod(path, 0o644)
    path.write_bytes(body + packs.pack_digest(body))


def an_entry_chunk(repo_path, entry="ea"):
    repo = Repository(Store(repo_path))
    (table,) = repo.resolve(repo.entry(entry).digest).disks.values()
    return repo, next(d for _, d, _ in table.records())


def test_an_index_offset_past_any_pack_is_named_not_a_crash(vml, two, tmp_path):
    a, _ = two
    _, chunk = an_entry_chunk(a)
    path, _, _ = stored_place(a, chunk)
    forged_index(a, bytes.fromhex(path.name), 2**63 + 5, 2**64 - 1)
    r = vml("verify", "--repo", "a", ok=False)
    assert r.returncode == 1 and "declares a pack of 18446744073709551615 bytes" in r.stdout, r.stdout + r.stderr
    msg = vml.fails("checkout", "ea", tmp_path / "co", "--repo", "a", status=6)
    assert str(index_path(a, bytes.fromhex(path.name))) in msg


def fifo(path) -> None:
    os.chmod(path, 0o644)
    path.unlink()
    os.mkfifo(path)


def to_dev_zero(path) -> None:
    os.chmod(path, 0o644)
    path.unlink()
    os.symlink("/dev/zero", path)


@pytest.mark.parametrize("victim", ["pack", "index", "settings"])
def test_a_fifo_in_place_of_a_repository_file_is_refused_at_once(vml, two, tmp_path, victim):
    a, _ = two
    _, chunk = an_entry_chunk(a)
    pack = bytes.fromhex(stored_place(a, chunk)[0].name)
    path = {"pack": pack_path(a, pack), "index": index_path(a, pack), "settings": a / "vml-repository.json"}[victim]
    fifo(path)
    for command in (("verify", "--repo", "a"), ("checkout", "ea", tmp_path / "co", "--repo", "a")):
        r = vml(*command, ok=False, timeout=60)  # a read of the FIFO would wait here for ever
        assert r.returncode in (1, 6, 7), r.stderr
        assert str(path) in r.stdout + r.stderr and "not a regular file" in r.stdout + r.stderr


@pytest.mark.parametrize("victim", ["index", "packset", "refs", "manifest"])
def test_a_link_to_dev_zero_costs_no_memory(vml, two, tmp_path, victim):
    a, _ = two
    repo, chunk = an_entry_chunk(a)
    pack = bytes.fromhex(stored_place(a, chunk)[0].name)
    manifest = repo.entry("ea").digest
    path = {
        "index": index_path(a, pack),
        "packset": packset_path(a, manifest),
        "refs": a / "refs.json",
        "manifest": a / "objects" / manifest.hex()[:2] / manifest.hex()[2:],
    }[victim]
    to_dev_zero(path)
    command = ["checkout", "ea", tmp_path / "co", "--repo", "a"] if victim != "refs" else ["log", "a"]
    r = vml(*command, ok=False, timeout=120)
    assert r.returncode == 6, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(path) in r.stderr, r.stderr  # one line naming it
