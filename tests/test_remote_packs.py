"""The published layout of packs: what goes over HTTP, how much, and what is checked (real nginx, real mount)."""

import os
import shutil
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vml import keys
from vml.config import Config
from vml.errors import Corrupt
from vml.remotes import catalog as catalogs
from vml.repo.chunkmap import ChunkTable
from vml.repo.packreader import decode_packset
from vml.repo.packs import MAX_OBJECT, Index
from vml.repo.paths import index_path, packset_path

from conftest import Vml, add_remote, debugfs_write, need, need_fuse
from helpers import direct_read
from servers import Nginx, ShiftedRanges, Squid, StaticServer, documented_squid_settings


def pack_requests(origin, since: int) -> list[tuple[str, int]]:
    """(path, body bytes) of the pack requests (not indexes) served since request number ``since``."""
    return [(p, n) for _, p, st, n in origin.requests()[since:] if p.startswith("/packs/") and not p.endswith(".idx")]


def packs_of(pub, cat, name) -> dict[str, Index]:
    """The published packs of entry ``name``: URL path -> index."""
    manifest = cat.refs[name]
    out = {}
    for pack in decode_packset(packset_path(pub, manifest).read_bytes(), "test"):
        h = pack.hex()
        out[f"/packs/{h[:2]}/{h}"] = Index(index_path(pub, pack).read_bytes(), "test", pack)
    return out


def served_catalog(published) -> catalogs.Catalog:
    key = keys.load_private_key(published["key"]).public_key()
    return catalogs.verify((published["pub"] / "catalog.json").read_bytes(), key, "test")


def e2_through(home, mounted, published, remote: str) -> tuple[Path, dict[str, Index], ChunkTable]:
    """Entry e2 of a remote, through the mount: its disk, its published packs (URL path -> index), its table."""
    cat = served_catalog(published)
    (disk,) = [p for p in (mounted / remote / "e2").iterdir() if p.suffix == ".img"]
    (table,) = Config.load(home).open(remote).resolve(cat.refs["e2"]).disks.values()
    return disk, packs_of(published["pub"], cat, "e2"), table


def read_direct(disk: Path, offset: int) -> bytes:
    """4 KiB at ``offset`` with O_DIRECT: no kernel read-ahead asks the mount for more."""
    fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
    try:
        return direct_read(fd, offset, 4096)
    finally:
        os.close(fd)


def test_a_random_read_fetches_one_frame_and_a_sequential_read_whole_packs(vml, home, mounted, origin, published):
    add_remote(vml, origin, published)
    disk, packs, table = e2_through(home, mounted, published, "cern")
    # A chunk in the middle of a pack of e2, so that neither neighbour has been read.
    chunks = [i for i, d, _ in table.records()]
    i = chunks[len(chunks) // 2]

    before = len(origin.requests())
    got = read_direct(disk, i * table.chunk_size)
    assert got == published["image"].read_bytes()[i * table.chunk_size :][:4096]
    got = pack_requests(origin, before)
    assert len(got) == 1, got  # one Range request, of that chunk's frame
    path, size = got[0]
    assert size == packs[path].find(table.digest(i)).length <= MAX_OBJECT

    # A whole sequential read: whole packs, each at most once.
    before = len(origin.requests())
    assert disk.read_bytes() == published["image"].read_bytes()
    got = pack_requests(origin, before)
    whole = [p for p, n in got if n == packs[p].pack_size]
    assert len(got) - len(whole) <= 2, got  # the first read or two, before the run is seen, are frames
    assert len(set(whole)) == len(whole)
    assert sum(n for _, n in got) <= 1.1 * sum(ix.pack_size for ix in packs.values())


def test_preload_fetches_whole_packs_and_reads_offline(vml, home, origin, published, tmp_path):
    add_remote(vml, origin, published)
    cat = served_catalog(published)
    wanted = packs_of(published["pub"], cat, "e2")
    before = len(origin.requests())
    vml("cache", "preload", "cern:e2")
    got = pack_requests(origin, before)
    assert sorted(p for p, _ in got) == sorted(wanted)  # every pack of the entry, once
    assert all(n == wanted[p].pack_size for p, n in got)  # whole
    after = len(origin.requests())
    vml("checkout", "cern:e2", tmp_path / "co")
    assert {p for _, p, _, _ in origin.requests()[after:]} <= {"/catalog.json"}  # the cache serves it all
    (img,) = (tmp_path / "co").glob("*.img")
    assert img.read_bytes() == published["image"].read_bytes()


def test_publishing_a_new_entry_on_a_published_base_writes_only_new_packs(published, tmp_path):
    # Copies of the publisher's repository and published directory (the originals are shared).
    v = Vml(tmp_path / "home", tmp_path)
    shutil.copytree(published["dir"] / "rep1", tmp_path / "rep1")
    v("init", tmp_path / "rep1")
    pub = tmp_path / "pub"
    shutil.copytree(published["pub"], pub)
    before = {p: p.stat().st_mtime_ns for p in (pub / "packs").rglob("*") if p.is_file()}
    img = tmp_path / "e3.img"
    shutil.copy(published["image"], img)
    new_bytes = os.urandom(1 << 20)
    debugfs_write(img, {"e3.bin": new_bytes}, tmp_path / "w")
    v("save", "e3", "--from", img, "--parent", "e2")
    out = v("publish", pub, "--key", published["key"]).stdout
    after = {p: p.stat().st_mtime_ns for p in (pub / "packs").rglob("*") if p.is_file()}
    assert all(after[p] == t for p, t in before.items())  # no published pack or index changed
    new = [p for p in after if p not in before and p.suffix != ".idx"]
    assert len(new) == 1, out  # e3's chunks, in one pack of their own
    assert new[0].stat().st_size < 2 * len(new_bytes)
    cat = served_catalog(dict(published, pub=pub))
    assert set(cat.refs) == {"base", "e2", "e3"} and cat.packsets.keys() == cat.manifests


@pytest.mark.parametrize("victim", ["index", "packset"])
def test_an_index_or_pack_set_that_is_not_the_signed_one_is_refused(vml, home, published, tmp_path, victim):
    pub = tmp_path / "pub"
    shutil.copytree(published["pub"], pub)
    cat = served_catalog(published)
    if victim == "index":  # a valid index, of another pack: well formed, and not the one the catalog names
        a, b = sorted(cat.indexes)[:2]
        shutil.copy(index_path(pub, b), index_path(pub, a))
        path = f"packs/{a.hex()[:2]}/{a.hex()}.idx"
    else:
        a, b = sorted(cat.packsets)[:2]
        shutil.copy(packset_path(pub, b), packset_path(pub, a))
        path = f"packsets/{a.hex()}"
    server = Nginx(pub)
    try:
        add_remote(vml, server, published)
        repo = Config.load(home).open("cern")
        with pytest.raises(Corrupt, match=f"{path} does not match the catalog"):
            for name in cat.refs:
                repo.resolve(cat.refs[name])
    finally:
        server.stop()


def test_eight_clients_with_their_own_mounts_behind_one_squid_cost_the_origin_the_entry_once(
    origin, published, tmp_path
):
    """The fan-out case: 8 nodes boot the same entry at once through the site's Squid (docs/remote.md)."""
    need("squid")
    need_fuse()
    squid = Squid(documented_squid_settings())
    clients, mounts = [], []
    try:
        for i in range(8):
            v = Vml(tmp_path / f"home{i}", tmp_path)
            add_remote(v, origin, published, "--proxy", squid.url)
            mp = tmp_path / f"mnt{i}"
            mp.mkdir()
            v("mount", mp)
            clients.append(v)
            mounts.append(mp)
        cat = served_catalog(published)
        pub = published["pub"]
        packs = packs_of(pub, cat, "e2")
        chain = [cat.refs["e2"], cat.refs["base"]]
        stored = sum(ix.pack_size + index_path(pub, ix.pack).stat().st_size for ix in packs.values())
        stored += sum(packset_path(pub, m).stat().st_size for m in chain)
        stored += sum(p.stat().st_size for p in (pub / "objects").rglob("*") if p.is_file())
        before = len(origin.requests())

        want = published["image"].read_bytes()

        def read(mp) -> bool:
            (disk,) = [p for p in (mp / "cern" / "e2").iterdir() if p.suffix == ".img"]
            return disk.read_bytes() == want

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(read, mounts))
        served = [(p, n) for _, p, _, n in origin.requests()[before:] if p != "/catalog.json"]
        origin_bytes = sum(n for _, n in served)
        assert origin_bytes <= 1.1 * stored, (origin_bytes, stored, Counter(p for p, _ in served).most_common(3))
        assert origin_bytes >= 0.9 * sum(ix.pack_size for ix in packs.values())  # the packs did come from it
    finally:
        for mp in mounts:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)
        squid.stop()


def test_clients_behind_a_squid_share_its_copy_of_the_catalog_for_a_minute(origin, published, tmp_path):
    """As CernVM-FS's .cvmfspublished: the origin says 61 s, clients accept a copy 60 s old (catalog_max_age)."""
    need("squid")
    from conftest import set_remote

    squid = Squid(documented_squid_settings())

    def catalogs_served() -> int:
        return sum(1 for _, p, _, _ in origin.requests() if p == "/catalog.json")

    try:
        first = Vml(tmp_path / "a", tmp_path)
        add_remote(first, origin, published, "--proxy", squid.url)  # remote add asks the origin (no-cache)
        before = catalogs_served()
        for i in range(4):
            v = Vml(tmp_path / f"n{i}", tmp_path)
            add_remote(v, origin, published, "--proxy", squid.url, "--no-check")
            assert "base" in v("log", "cern").stdout
        assert catalogs_served() == before  # four nodes, no request to the origin: Squid's copy served
        set_remote(tmp_path / "n0", catalog_max_age=0)  # a client that wants the origin's own
        (tmp_path / "n0" / "cache" / "cern" / "catalog.json").unlink()
        Vml(tmp_path / "n0", tmp_path)("log", "cern")
        assert catalogs_served() == before + 1
    finally:
        squid.stop()


def test_a_plain_static_server_that_ignores_range_serves_every_read(vml, home, mounted, published):
    """Python's http.server answers a Range request with 200 and the whole file: the pack is used whole."""
    from conftest import set_remote

    server = StaticServer(published["pub"])
    try:
        out = vml("remote", "add", "plain", server.url, "--key", published["pubkey"]).stdout
        assert "the server ignores Range requests" in out, out
        set_remote(home, "plain", timeout=10.0)  # a refused reply would otherwise cost the default 30 s
        disk, packs, table = e2_through(home, mounted, published, "plain")
        chunks = [i for i, d, _ in table.records()]
        want = published["image"].read_bytes()
        cs = table.chunk_size

        def pack_of(i: int) -> str:
            return next(p for p, ix in packs.items() if ix.find(table.digest(i)) is not None)

        # A random read (O_DIRECT: no read-ahead) of a chunk in the middle of a pack, then of the chunk before
        # it (backwards: not taken for a sequential run), which lies in the same pack.
        i = next(i for i in chunks[len(chunks) // 2 :] if i - 1 in chunks and pack_of(i - 1) == pack_of(i))
        before = len(server.requests())
        for j in (i, i - 1):
            assert read_direct(disk, j * cs) == want[j * cs :][:4096]
        got = [p for p, st in server.requests()[before:] if p.startswith("/packs/") and not p.endswith(".idx")]
        assert len(got) == 1 and got[0] in packs, got  # the whole pack once, and its neighbour from the cache

        # Every byte, each pack fetched at most once.
        before = len(server.requests())
        assert disk.read_bytes() == want
        got = [p for p, st in server.requests()[before:] if p.startswith("/packs/") and not p.endswith(".idx")]
        assert len(got) == len(set(got)) and set(got) <= set(packs), got
    finally:
        server.stop()


def test_a_range_reply_that_says_another_range_is_refused(vml, home, published):
    """A 206 of the right length but of another part of the pack is refused as that member's failure, with a
    line that names the range, and never read as the chunk."""
    from vml.errors import FetchError

    from conftest import set_remote

    server = ShiftedRanges(published["pub"])
    try:
        add_remote(vml, server, published)
        set_remote(home, timeout=3.0)
        repo = Config.load(home).open("cern")
        (table,) = repo.resolve(repo.entry("e2").digest).disks.values()
        chunks = [i for i, _, _ in table.records()]
        i = chunks[len(chunks) // 2]
        with pytest.raises(FetchError, match=r"Content-Range 'bytes \d+-\d+/\d+' to a Range request of bytes"):
            repo.read_chunk(table, i, "disk")
        assert not repo.store.has(table.digest(i))  # nothing of it was kept
    finally:
        server.stop()


def test_preload_from_a_static_server_without_ranges_then_offline(vml, home, published, tmp_path):
    server = StaticServer(published["pub"])
    try:
        vml("remote", "add", "plain", server.url, "--key", published["pubkey"])
        before = len(server.requests())
        vml("cache", "preload", "plain:e2")
        got = [p for p, st in server.requests()[before:] if p.startswith("/packs/") and not p.endswith(".idx")]
        wanted = packs_of(published["pub"], served_catalog(published), "e2")
        assert sorted(got) == sorted(wanted), got  # every pack of the entry, whole, once
    finally:
        server.stop()
    vml("checkout", "plain:e2", tmp_path / "co")  # the server is gone: the cache serves it all
    (img,) = (tmp_path / "co").glob("*.img")
    assert img.read_bytes() == published["image"].read_bytes()


def test_a_cache_with_indexes_where_an_older_vml_kept_them_still_reads_offline(vml, home, published, tmp_path):
    """Earlier versions kept a remote's indexes in cache/NAME/indexes/: the first use moves them beside their
    packs, so an entry preloaded then opens with the server gone."""
    server = Nginx(published["pub"])
    try:
        vml("remote", "add", "cern", server.url, "--key", published["pubkey"])
        vml("cache", "preload", "cern:e2")
    finally:
        server.stop()
    cache = home / "cache" / "cern"
    old = cache / "indexes"
    old.mkdir()
    moved = [idx.rename(old / idx.name) for idx in (cache / "packs").glob("*/*.idx")]
    assert moved
    vml("checkout", "cern:e2", tmp_path / "co")
    (img,) = (tmp_path / "co").glob("*.img")
    assert img.read_bytes() == published["image"].read_bytes()
    assert not old.exists() and len(list((cache / "packs").glob("*/*.idx"))) == len(moved)
