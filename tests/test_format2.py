"""Repository format 2 (packs), as far as it goes: saving into packs and reading back."""

import errno
import os
import random
import subprocess
import sys
from pathlib import Path

from vml.repo import packfiles, paths

from helpers import registered


def files_in(path):
    return sum(len(fs) for _, _, fs in os.walk(path))


def write_random(path, offset: int, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(rng.randbytes(size))


def test_a_save_stores_its_chunks_in_a_few_packs_and_reads_back_byte_exact(vml, home, tmp_path):
    repo_path = tmp_path / "rep2"
    registered(home, repo_path, chunk_size=256 << 10, format=2)
    img = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "1G", img], check=True)
    for i in range(8):  # 160 MB of incompressible data in 8 places
        write_random(img, i * (120 << 20), 20 << 20, seed=i)
    vml("save", "e1", "--from", img)
    # 640 chunks with data, in packs of about 8 MiB: far under the 300-file bound.
    n = files_in(repo_path)
    assert n <= 300, n
    packs = list(packfiles.PackFiles(repo_path, None).packs())
    assert 15 <= len(packs) <= 25, len(packs)
    assert not list((repo_path / "objects").rglob("*.*"))
    vml("checkout", "e1", tmp_path / "out")
    assert (tmp_path / "out" / "disk.img").read_bytes() == img.read_bytes()
    # An incremental save adds only a pack or two, and reads back through its parent's packs.
    write_random(img, 500 << 20, 1 << 20, seed=99)
    vml("save", "e2", "--from", img, "--parent", "e1")
    assert len(list(packfiles.PackFiles(repo_path, None).packs())) == len(packs) + 1
    vml("checkout", "e2", tmp_path / "out2")
    assert (tmp_path / "out2" / "disk.img").read_bytes() == img.read_bytes()
    assert vml("verify", "--repo", repo_path).returncode == 0


def test_a_bit_flipped_in_a_pack_fails_that_chunk_only_in_verify_and_the_mount(vml, home, tmp_path, mounted):
    cs = 64 << 10
    repo = registered(home, tmp_path / "rep2", chunk_size=cs, format=2)
    img = tmp_path / "d.img"
    subprocess.run(["truncate", "-s", "8M", img], check=True)
    write_random(img, 0, 4 << 20, seed=5)
    vml("save", "e", "--from", img)
    table = repo.resolve(repo.entry("e").digest).disks["d"]
    victim = 20
    loc = repo.store.packs.locate(table.digest(victim))
    pack = paths.pack_path(repo.store.path, loc.pack)
    data = bytearray(pack.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0x08
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(data))
    # verify names the pack, the offset and the entry.
    r = vml("verify", "--repo", repo.store.path, ok=False)
    assert r.returncode != 0
    assert f"pack {pack} at offset {loc.offset}" in r.stdout + r.stderr, r.stdout + r.stderr
    assert f"entry 'e', disk d, chunk {victim}" in r.stdout + r.stderr, r.stdout + r.stderr
    # Through the mount: EIO for that chunk, its pack neighbours read right.
    good = img.read_bytes()
    fd = os.open(mounted / "rep" / "e" / "d.img", os.O_RDONLY)
    try:
        for i in (victim - 1, victim + 1, 0, 63):
            assert os.pread(fd, cs, i * cs) == good[i * cs : (i + 1) * cs]
        try:
            os.pread(fd, cs, victim * cs)
            raise AssertionError("a damaged chunk was read")
        except OSError as e:
            assert e.errno == errno.EIO
    finally:
        os.close(fd)


def stored_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_gc_repacks_until_the_repository_is_about_a_fresh_save_of_what_is_left(vml, home, tmp_path):
    repo_path = tmp_path / "rep2"
    registered(home, repo_path, chunk_size=64 << 10, format=2)
    img = tmp_path / "d.img"
    subprocess.run(["truncate", "-s", "64M", img], check=True)
    write_random(img, 0, 24 << 20, seed=1)
    vml("save", "e1", "--from", img)
    for i in (2, 3, 4):  # each rewrites a third of the data
        write_random(img, (i - 2) * (8 << 20), 8 << 20, seed=10 + i)
        vml("save", f"e{i}", "--from", img, "--parent", f"e{i - 1}")
    for name in ("e1", "e2", "e3"):
        vml("rm", name, "--reparent")
    out = vml("gc", "--repo", repo_path).stdout
    assert "packs:" in out and "rewritten" in out, out
    vml("checkout", "e4", tmp_path / "out")
    assert (tmp_path / "out" / "d.img").read_bytes() == img.read_bytes()
    assert vml("verify", "--repo", repo_path).returncode == 0
    # A fresh repository holding only that disk, for comparison.
    registered(home, tmp_path / "fresh", name="fresh", chunk_size=64 << 10, format=2)
    vml("save", "only", "--from", img, "--repo", "fresh")
    ours, fresh = stored_bytes(repo_path / "packs"), stored_bytes(tmp_path / "fresh" / "packs")
    assert ours <= 1.1 * fresh, (ours, fresh)
    # Nothing more to do: a second gc rewrites nothing.
    assert "packs:" not in vml("gc", "--repo", repo_path).stdout


def test_upgrade_moves_a_format_1_repository_into_packs_keeping_every_entry(vml, home, tmp_path):
    repo_path = tmp_path / "rep1"
    vml("init", repo_path, "--format", "1")
    img = tmp_path / "d.img"
    subprocess.run(["truncate", "-s", "32M", img], check=True)
    write_random(img, 0, 12 << 20, seed=3)
    vml("save", "e1", "--from", img)
    write_random(img, 4 << 20, 2 << 20, seed=4)
    vml("save", "e2", "--from", img, "--parent", "e1")
    before = {}
    for name in ("e1", "e2"):
        vml("checkout", name, tmp_path / f"before-{name}")
        before[name] = (tmp_path / f"before-{name}" / "d.img").read_bytes()
    refs = (repo_path / "refs.json").read_text()
    loose = files_in(repo_path / "objects")
    out = vml("upgrade", "--repo", repo_path).stdout
    assert "format 2" in out and "chunks moved into packs" in out, out
    assert '"format": 2' in (repo_path / "vml-repository.json").read_text()
    assert (repo_path / "refs.json").read_text() == refs  # every entry keeps its manifest digest
    assert files_in(repo_path / "objects") <= 4 < loose  # two manifests and their maps stay loose
    for name in ("e1", "e2"):
        vml("checkout", name, tmp_path / f"after-{name}")
        assert (tmp_path / f"after-{name}" / "d.img").read_bytes() == before[name]
    assert vml("verify", "--repo", repo_path).returncode == 0
    assert "already format 2" in vml("upgrade", "--repo", repo_path).stdout


def test_a_format_2_repository_imports_a_format_1_bundle_into_packs(vml, home, tmp_path):
    vml("init", tmp_path / "rep1", "--format", "1")
    img = tmp_path / "d.img"
    subprocess.run(["truncate", "-s", "16M", img], check=True)
    write_random(img, 0, 6 << 20, seed=6)
    vml("save", "e1", "--from", img, "--repo", "rep1")
    vml("export", "e1", "-o", tmp_path / "e1.vml", "--repo", "rep1")
    registered(home, tmp_path / "rep2", name="rep2", chunk_size=256 << 10, format=2)
    vml("import", tmp_path / "e1.vml", "--repo", "rep2")
    assert files_in(tmp_path / "rep2" / "objects") == 2  # the manifest and its map; the chunks are packed
    assert len(list(packfiles.PackFiles(tmp_path / "rep2", None).packs())) == 1
    vml("checkout", "e1", tmp_path / "out", "--repo", "rep2")
    assert (tmp_path / "out" / "d.img").read_bytes() == img.read_bytes()
    assert vml("verify", "--repo", "rep2").returncode == 0


# The last commit whose `vml init` created format 1: the release before format 2.
FORMAT_1_RELEASE = "91b173d6855731ccc164ac4e7f368c5f1f87c319"


def test_upgrade_converts_a_repository_made_by_the_previous_release(vml, home, tmp_path):
    """The previous release's own code makes the repository (git archive of its commit), this one upgrades it."""
    source = Path(__file__).parent.parent
    old = tmp_path / "previous-release"
    old.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(source), "archive", FORMAT_1_RELEASE, "vml"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    env = dict(vml.env, PYTHONPATH=str(old))  # that release's vml package, nothing of this one

    def previous(*args):
        r = subprocess.run(
            [sys.executable, "-m", "vml", *map(str, args)], env=env, cwd=old, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    repo_path = tmp_path / "old"
    previous("init", repo_path, "--name", "old")
    img = tmp_path / "d.img"
    subprocess.run(["truncate", "-s", "24M", img], check=True)
    images = {}
    write_random(img, 0, 6 << 20, seed=11)
    previous("save", "base", "--from", img, "--repo", "old")
    images["base"] = img.read_bytes()
    write_random(img, 3 << 20, 1 << 20, seed=12)
    previous("save", "incr", "--from", img, "--repo", "old", "--parent", "base")
    images["incr"] = img.read_bytes()
    write_random(img, 20 << 20, 1 << 20, seed=13)
    previous("save", "diff", "--from", img, "--repo", "old", "--parent", "incr", "--kind", "differential")
    images["diff"] = img.read_bytes()
    previous("export", "incr", "--full", "-o", tmp_path / "incr.vml", "--repo", "old")
    assert '"format": 1' in (repo_path / "vml-repository.json").read_text()
    refs = (repo_path / "refs.json").read_text()

    # This release reads the old repository as it is, then upgrades it in place.
    vml("checkout", "diff", tmp_path / "before", "--repo", "old")
    assert (tmp_path / "before" / "d.img").read_bytes() == images["diff"]
    out = vml("upgrade", "--repo", "old").stdout
    assert "format 2" in out and "chunks moved into packs" in out, out
    assert '"format": 2' in (repo_path / "vml-repository.json").read_text()
    assert (repo_path / "refs.json").read_text() == refs  # every entry keeps its manifest digest
    assert list(packfiles.PackFiles(repo_path, None).packs())
    for name, data in images.items():
        vml("checkout", name, tmp_path / f"after-{name}", "--repo", "old")
        assert (tmp_path / f"after-{name}" / "d.img").read_bytes() == data, name
    assert vml("verify", "--repo", "old").returncode == 0
    # A bundle the previous release exported imports into a new format-2 repository.
    vml("init", tmp_path / "new")
    vml("import", tmp_path / "incr.vml", "--repo", "new")
    vml("checkout", "incr", tmp_path / "imported", "--repo", "new")
    assert (tmp_path / "imported" / "d.img").read_bytes() == images["incr"]


def test_a_reader_reads_on_across_a_gc_that_moves_its_chunks(vml, home, tmp_path):
    """Readers hold no lock: a gc in another process may move an entry's chunks into a new pack and
    remove the old one after the reader loaded its indexes. The reader looks again and reads on."""
    from vml.config import Config

    registered(home, tmp_path / "rep2", name="rep2", chunk_size=64 << 10, format=2)
    img = tmp_path / "d.img"
    subprocess.run(["truncate", "-s", "8M", img], check=True)
    write_random(img, 0, 1 << 20, seed=21)
    vml("save", "e1", "--from", img, "--repo", "rep2")
    want = img.read_bytes()
    write_random(img, 4 << 20, 1 << 20, seed=22)
    vml("save", "e2", "--from", img, "--repo", "rep2")  # a second small pack: gc merges the two
    before = set(packfiles.PackFiles(tmp_path / "rep2", None).packs())
    reader = Config.load(home).open("rep2")
    (table,) = reader.resolve(reader.entry("e1").digest).disks.values()  # e1's indexes loaded now
    assert "rewritten" in vml("gc", "--repo", "rep2").stdout
    assert not before & set(packfiles.PackFiles(tmp_path / "rep2", None).packs())  # every old pack went
    got = b"".join(reader.read_chunk(table, i, "e1") for i in range(table.count))
    assert got == want


def test_a_writer_that_read_before_a_gc_names_only_packs_that_are_there(vml, home, tmp_path):
    """A writer may load indexes before it takes the lock (it opened the entry it builds on); a gc in
    another home then moves those chunks and removes their packs. Once the writer holds the lock it
    must not trust what it loaded: a pack set naming a removed pack makes the new entry unreadable."""
    from vml.config import Config
    from vml.entries.save import save_source

    registered(home, tmp_path / "rep2", name="rep2", chunk_size=64 << 10, format=2)
    img = tmp_path / "d.img"
    subprocess.run(["truncate", "-s", "8M", img], check=True)
    write_random(img, 0, 1 << 20, seed=31)
    vml("save", "e1", "--from", img, "--repo", "rep2")
    write_random(img, 4 << 20, 1 << 20, seed=32)
    vml("save", "e2", "--from", img, "--repo", "rep2")
    writer = Config.load(home).open("rep2")
    (table,) = writer.resolve(writer.entry("e1").digest).disks.values()
    writer.read_chunk(table, 0, "e1")  # e1's chunks are located in packs that the gc removes
    assert "rewritten" in vml("gc", "--repo", "rep2").stdout
    save_source(writer, "e3", img)  # the same chunks as e2: all deduplicated
    assert vml("verify", "--repo", "rep2").returncode == 0
    vml("checkout", "e3", tmp_path / "out", "--repo", "rep2")
    assert (tmp_path / "out" / "d.img").read_bytes() == img.read_bytes()
