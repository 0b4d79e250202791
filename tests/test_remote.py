"""Remotes against real parts: nginx as the origin, Squid as the proxy, and
the tests' own fault-injecting TCP proxy (tests/servers.py).
"""

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import Vml, add_remote, debugfs_write, need, set_remote
from servers import FaultProxy, Nginx, free_port, self_signed


@pytest.fixture
def own_origin(vml, home, published, tmp_path):
    """A copy of the published files that the test may damage, served by its own nginx.

    Remote cern is added on it, and its catalog is fetched again at every command.
    """
    pub = tmp_path / "pub"
    shutil.copytree(published["pub"], pub)
    server = Nginx(pub)
    try:
        add_remote(vml, server, published)
        set_remote(home, catalog_ttl=0.001)
        yield pub, server
    finally:
        server.stop()


def objects_of(pub: Path) -> set[str]:
    return {f"/objects/{p.parent.name}/{p.name}" for p in (pub / "objects").glob("*/*") if not p.name.startswith(".")}


def checkout_equal(vml, spec: str, image: Path, out: Path) -> None:
    vml("checkout", spec, out)
    (disk,) = out.glob("*.img")
    assert disk.read_bytes() == image.read_bytes()


def test_a_remote_entry_reads_byte_identical_through_the_mount(vml, home, mounted, origin, published, tmp_path):
    add_remote(vml, origin, published)
    log = vml("log", "cern").stdout
    assert "base(" in log and "e2(" in log
    assert "repository cern" in vml("show", "cern:e2").stdout
    before = len(origin.requests())
    assert sorted(os.listdir(mounted / "cern")) == ["base", "e2"]
    (disk,) = [p for p in (mounted / "cern" / "e2").iterdir() if p.suffix == ".img"]
    listed = [p for _, p, _, _ in origin.requests()[before:] if p.startswith("/objects/")]
    assert len(listed) <= 6  # listing fetched manifests and chunk maps, no chunk data
    assert disk.read_bytes() == published["image"].read_bytes()
    time.sleep(1)  # the mount writes its counters twice a second
    status = json.loads(vml("cache", "status", "--json").stdout)[0]
    assert status["remote"] == "cern" and status["misses"] > 0 and status["fetched_bytes"] > 1 << 20
    # Cached now: reading again fetches nothing.
    vml("umount")
    vml("mount", mounted)
    before = len(origin.requests())
    assert disk.read_bytes() == published["image"].read_bytes()
    assert [p for _, p, _, _ in origin.requests()[before:] if p.startswith("/objects/")] == []


def test_publishing_again_adds_only_new_objects(published, tmp_path):
    vml = published["vml"]
    cat1 = json.loads(json.loads((published["pub"] / "catalog.json").read_text())["payload"])
    out = vml("publish", published["pub"], "--key", published["key"]).stdout
    assert "0 new objects" in out
    cat2 = json.loads(json.loads((published["pub"] / "catalog.json").read_text())["payload"])
    assert cat2["revision"] == cat1["revision"] + 1 and cat2["refs"] == cat1["refs"]
    other = tmp_path / "otherkey"
    vml("keygen", other)
    msg = vml.fails("publish", published["pub"], "--key", other)
    assert "signed with another key" in msg


def test_a_dead_and_a_too_slow_proxy_are_failed_over(vml, home, origin, published, tmp_path):
    slow = FaultProxy(int(origin.url.rsplit(":", 1)[1]), mode="slow", rate=2000)
    dead = f"http://127.0.0.1:{free_port()}"
    try:
        add_remote(vml, origin, published, "--proxy", f"{dead}|{slow.url};DIRECT")
        set_remote(home, low_speed_limit=32768, low_speed_time=1.0, timeout=60.0)
        r = vml("cache", "preload", "cern:e2", "--debug")
        assert f"proxy {dead} failed" in r.stderr, r.stderr
        assert f"proxy {slow.url} failed" in r.stderr and "stalled" in r.stderr, r.stderr
        checkout_equal(vml, "cern:e2", published["image"], tmp_path / "co")
    finally:
        slow.stop()


@pytest.mark.parametrize("mode", ["corrupt", "truncate", "reset"])
def test_damaged_replies_are_refused_and_fetched_elsewhere(vml, home, origin, published, tmp_path, mode):
    bad = FaultProxy(int(origin.url.rsplit(":", 1)[1]), mode=mode)
    try:
        add_remote(vml, origin, published)  # the catalog comes directly, so the objects meet the faults
        set_remote(home, proxy=f"{bad.url};DIRECT")
        r = vml("cache", "preload", "cern:e2", "--debug")
        assert f"proxy {bad.url} failed" in r.stderr
        if mode == "corrupt":
            assert "does not match" in r.stderr, r.stderr
        checkout_equal(vml, "cern:e2", published["image"], tmp_path / "co")
    finally:
        bad.stop()


def test_the_preferred_group_comes_back_after_a_while():
    from vml.remotes.fetch import ProxyChain

    chain = ProxyChain("http://a:1|http://b:1;http://c:1", reset_after=0.5)
    assert set(chain.order()[:2]) == {"http://a:1", "http://b:1"}
    chain.failed("http://a:1", "test")
    assert chain.order()[0] == "http://b:1"  # the group's other member first
    chain.failed("http://b:1", "test")
    assert chain.order()[0] == "http://c:1"  # the whole group failed: the next group
    time.sleep(0.6)
    assert set(chain.order()[:2]) == {"http://a:1", "http://b:1"}


def test_each_object_is_fetched_once_under_concurrent_reads(home, origin, published):
    from vml.config import Config

    Vml(home, home.parent)("remote", "add", "cern", origin.url, "--key", published["pubkey"])
    repo = Config.load(home).open("cern")
    digest = repo.entry("base").digest
    obj = sorted(repo.needed_objects([digest]) - {digest})[-1]
    before = len(origin.requests())
    results = []
    threads = [threading.Thread(target=lambda: results.append(repo.read_raw(obj))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 and len(set(results)) == 1
    # One request for the object (a Range of its pack); the rest found where it lies, each once.
    paths = [p for _, p, _, _ in origin.requests()[before:]]
    assert len(paths) == len(set(paths))
    assert len([p for p in paths if not p.startswith("/packsets/") and not p.endswith(".idx")]) == 1, paths


def test_quota_evicts_least_recently_used_and_never_pinned(vml, home, tmp_path):
    need("nginx")
    v = Vml(tmp_path / "pubhome", tmp_path)
    v("init", tmp_path / "small")
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.img").write_bytes(os.urandom(2 << 20))
        v("save", name, "--from", tmp_path / f"{name}.img")
    v("keygen", tmp_path / "k")
    v("publish", tmp_path / "pub", "--key", tmp_path / "k")
    server = Nginx(tmp_path / "pub")
    try:
        vml("remote", "add", "small", server.url, "--key", tmp_path / "k.pub", "--cache-quota", "5M")
        vml("cache", "pin", "small:a")
        vml("cache", "preload", "small:b")
        time.sleep(0.05)
        vml("cache", "preload", "small:c")
        status = json.loads(vml("cache", "status", "--json").stdout)[0]
        assert status["pinned"] == ["a"] and status["size"] <= 5 << 20 and status["evicted"] > 0

        from vml.config import Config

        cfg = Config.load(home)
        repo = cfg.open("small")

        def cached(name):  # in the cache as objects, or in the packs kept whole there
            repo.store.prepare(repo.refs()[name])
            objs = repo.needed_objects([repo.refs()[name]])
            return sum(repo.store.has(d) for d in objs), len(objs)

        have, total = cached("a")
        assert have == total  # pinned: all kept
        assert cached("b")[0] < cached("b")[1] // 2  # least recently used: evicted first
        vml("cache", "unpin", "small:a")
        vml("cache", "clear")
        status = json.loads(vml("cache", "status", "--json").stdout)[0]
        assert status["objects"] == status["packs"] == 0
        checkout_equal(vml, "small:a", tmp_path / "a.img", tmp_path / "co")  # fetched again
    finally:
        server.stop()


def test_offline_after_preload_and_bounded_eio_for_what_is_not_cached(vml, home, mounted, published, tmp_path):
    server = Nginx(published["pub"])
    try:
        add_remote(vml, server, published)
        set_remote(home, timeout=3.0, connect_timeout=1.0)
        vml("cache", "preload", "cern:base")
        (disk2,) = [p for p in (mounted / "cern" / "e2").iterdir() if p.suffix == ".img"]  # e2's maps come now
    finally:
        server.stop()  # the network is gone
    assert "e2(" in vml("log", "cern").stdout  # the cached catalog
    checkout_equal(vml, "cern:base", published["base_image"], tmp_path / "co")
    (disk,) = [p for p in (mounted / "cern" / "base").iterdir() if p.suffix == ".img"]
    base_bytes = disk.read_bytes()
    assert base_bytes == published["base_image"].read_bytes()  # everything cached reads offline
    new = published["image"].read_bytes()
    cs = 256 << 10
    changed = next(i for i in range(0, len(new), cs) if new[i : i + cs] != base_bytes[i : i + cs])
    start = time.monotonic()
    with open(disk2, "rb", buffering=0) as f, pytest.raises(OSError) as e:
        os.pread(f.fileno(), 4096, changed)
    assert e.value.errno == 5 and time.monotonic() - start < 15
    logtext = (home / "log" / "vmlfs.log").read_text()
    assert "cannot fetch" in logtext and "remote cern" in logtext


def test_a_hanging_catalog_is_tried_again_only_after_a_back_off(vml, home, origin, published, tmp_path):
    """Once a refresh of the catalog has failed, lookups serve the cached one at once, in every process,
    until a back-off has passed; then one request tries again."""
    relay = FaultProxy(origin.port)
    try:
        vml("remote", "add", "cern", relay.url, "--key", published["pubkey"])
        set_remote(home, catalog_ttl=1.0, timeout=3.0)
        vml("cache", "preload", "cern:base")  # the reads below need no network
        relay.mode = "stall"  # the server takes the request and never answers
        time.sleep(1.1)  # past the TTL
        asked = len(relay.asked)
        r = vml("log", "cern")
        assert "base(" in r.stdout and "using the cached catalog" in r.stderr, r.stderr
        assert relay.asked[asked:] == ["/catalog.json"]  # one try, which cost the timeout
        asked = len(relay.asked)
        time.sleep(1.1)  # past the TTL again: without a back-off, each of these would wait 3 s
        start = time.monotonic()
        for _ in range(3):
            assert "base(" in vml("log", "cern").stdout
        checkout_equal(vml, "cern:base", published["base_image"], tmp_path / "co")
        assert relay.asked[asked:] == []
        assert time.monotonic() - start < 4 * 3.0  # (each command alone would have cost more than 3 s)
        relay.mode = "pass"
        retry = home / "cache" / "cern" / "catalog.retry"
        doc = json.loads(retry.read_text())
        retry.write_text(json.dumps(dict(doc, next=time.time() - 1)))  # as if the back-off had passed
        vml("log", "cern")
        assert relay.asked[asked:] == ["/catalog.json"] and not retry.exists()  # tried, and it worked
    finally:
        relay.stop()


def test_a_tampered_or_replayed_catalog_is_refused(vml, home, published, own_origin, tmp_path):
    pub, server = own_origin
    good = (pub / "catalog.json").read_bytes()
    doc = json.loads(good)
    payload = json.loads(doc["payload"])
    payload["refs"]["base"] = payload["refs"]["e2"]
    doc["payload"] = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    (pub / "catalog.json").write_text(json.dumps(doc))
    msg = vml.fails("log", "cern", status=6)
    assert "signature does not verify" in msg and "refused" in msg
    other = tmp_path / "v2"
    msg = Vml(other, tmp_path).fails("remote", "add", "cern", server.url, "--key", published["pubkey"], status=6)
    assert "signature does not verify" in msg
    assert not (other / "config.toml").exists() or "cern" not in (other / "config.toml").read_text()
    # An old catalog served again (a replay, or a proxy's copy from before the last publish) after a
    # newer one was seen: never used; the newer one stays, quietly, as a proxy's minute-old copy is normal.
    (pub / "catalog.json").write_bytes(good)
    published["vml"]("publish", pub, "--key", published["key"])
    vml("log", "cern")
    newer = (pub / "catalog.json").read_bytes()
    (pub / "catalog.json").write_bytes(good)
    r = vml("log", "cern")
    assert r.stderr == "" and (home / "cache" / "cern" / "catalog.json").read_bytes() == newer


def test_hostile_objects_are_refused(vml, home, published, own_origin, tmp_path):
    """An object that does not match its name, one larger than allowed, one that is no manifest."""
    pub, _ = own_origin
    set_remote(home, timeout=3.0)
    from vml import keys
    from vml.remotes import catalog as catalogs
    from vml.repo.objects import compress, digest

    junk = b"not a manifest at all" * 10
    d = digest(junk)
    path = pub / "objects" / d.hex()[:2] / d.hex()[2:]
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(compress(junk))
    cat = catalogs.verify((pub / "catalog.json").read_bytes(), keys.load_private_key(published["key"]).public_key(), "")
    forged = catalogs.Catalog(
        cat.repository, cat.revision + 1, cat.published, {**cat.refs, "junk": d}, cat.manifests | {d}
    )
    (pub / "catalog.json").write_bytes(catalogs.sign(forged, keys.load_private_key(published["key"])))
    msg = vml.fails("show", "cern:junk", status=6)
    assert "junk" in msg and "manifest" in msg
    # Damage e2's manifest on the server: its digest no longer matches.
    e2 = cat.refs["e2"].hex()
    p = pub / "objects" / e2[:2] / e2[2:]
    p.write_bytes(compress(b'{"forged": true}'))
    msg = vml.fails("show", "cern:e2")
    assert "does not match" in msg or "cannot fetch" in msg
    # An object far larger than any object may be.
    with open(p, "wb") as f:
        f.truncate(200 << 20)
    start = time.monotonic()
    msg = vml.fails("show", "cern:e2")
    assert "more than" in msg or "longer than" in msg, msg
    assert time.monotonic() - start < 30


def image_on_remote_parent(vml, origin, published, tmp_path, files: dict[str, bytes]) -> Path:
    """With remote cern and a local repository mine: a copy of cern:e2's image with ``files`` written into it."""
    add_remote(vml, origin, published)
    vml("init", tmp_path / "mine")
    img = tmp_path / "work.img"
    shutil.copy(published["image"], img)
    debugfs_write(img, files, tmp_path / "w")
    return img


def test_a_local_entry_on_a_remote_parent_travels_as_a_small_bundle(vml, home, origin, published, tmp_path):
    img = image_on_remote_parent(vml, origin, published, tmp_path, {"mine.txt": b"my analysis\n" * 1000})
    out = vml("save", "analysis", "--from", img, "--parent", "cern:e2").stdout
    assert "incremental" in out
    assert "[on cern:e2]" in vml("log", "mine").stdout
    assert vml("verify").returncode == 0
    r = vml("export", "analysis", "-o", tmp_path / "a.vml").stdout
    assert "the receiver needs e2" in r
    assert (tmp_path / "a.vml").stat().st_size < 1 << 20

    other = Vml(tmp_path / "home2", tmp_path)
    add_remote(other, origin, published)
    other("init", tmp_path / "theirs")
    before = len(origin.requests())
    other("import", tmp_path / "a.vml")
    assert [p for _, p, _, _ in origin.requests()[before:] if p.startswith("/objects/")] == []
    checkout_equal(other, "analysis", img, tmp_path / "co")
    # A remote is read-only.
    assert "read-only" in vml.fails("save", "x", "--from", img, "--repo", "cern")


def test_gc_keeps_a_local_entry_whose_parent_is_remote(vml, home, origin, published, tmp_path):
    img = image_on_remote_parent(vml, origin, published, tmp_path, {"x.txt": b"x" * 100000})
    vml("save", "x", "--from", img, "--parent", "cern:e2")
    out = vml("gc").stdout
    assert "removed 0 objects" in out
    checkout_equal(vml, "x", img, tmp_path / "co")


def test_bad_remote_settings_are_one_line_errors(vml, home, published, tmp_path):
    assert "use http:// or https://" in vml.fails("remote", "add", "r", "ftp://x", "--key", published["pubkey"])
    assert "not a VML public key" in vml.fails("remote", "add", "r", "http://127.0.0.1:1", "--key", published["key"])
    assert "invalid proxy" in vml.fails(
        "remote", "add", "r", "http://127.0.0.1:1", "--key", published["pubkey"], "--proxy", "ftp://p:1"
    )
    msg = vml.fails(
        "remote", "add", "r", f"http://127.0.0.1:{free_port()}", "--key", published["pubkey"], "--timeout", "2"
    )
    assert "no catalog" in msg
    assert "no remote named" in vml.fails("remote", "rm", "r")


def test_a_peer_trickling_header_lines_cannot_outlast_the_deadline():
    """A socket timeout bounds each recv, not the request: the watchdog bounds the request."""
    import socket

    from vml.errors import FetchError
    from vml.remotes.fetch import Fetcher, Settings

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.is_set():
                try:
                    conn.sendall(b"X-Slow: y\r\n")
                except OSError:
                    break
                time.sleep(0.3)
            conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    try:
        fetcher = Fetcher(f"http://127.0.0.1:{server.getsockname()[1]}", Settings(timeout=2, read_timeout=1), "test")
        start = time.monotonic()
        with pytest.raises(FetchError):
            fetcher.get("catalog.json", 1000)
        assert time.monotonic() - start < 5
    finally:
        stop.set()
        server.close()


def test_gc_refuses_when_a_local_ancestor_is_missing(published, tmp_path):
    """A damaged local chain is never taken for one that continues on a remote."""
    repo = tmp_path / "rep1"
    shutil.copytree(published["dir"] / "rep1", repo)
    v = Vml(tmp_path / "home", tmp_path)
    v("init", repo)
    refs = json.loads((repo / "refs.json").read_text())["entries"]
    base = refs["base"]
    (repo / "objects" / base[:2] / base[2:]).unlink()
    before = sorted(p.name for p in (repo / "objects").glob("*/*"))
    v.fails("gc", status=7)
    assert sorted(p.name for p in (repo / "objects").glob("*/*")) == before


def test_a_catalog_of_another_repository_signed_with_the_same_key_is_refused(vml, published, own_origin, tmp_path):
    pub, _ = own_origin
    other = Vml(tmp_path / "other", tmp_path)
    other("init", tmp_path / "rep2")
    (tmp_path / "x.img").write_bytes(os.urandom(1 << 20))
    other("save", "other", "--from", tmp_path / "x.img")
    # Entries given after --key, as the README writes it.
    other("publish", tmp_path / "pub2", "--key", published["key"], "other")
    shutil.copy(tmp_path / "pub2" / "catalog.json", pub / "catalog.json")
    msg = vml.fails("log", "cern", status=6)
    assert "of repository 'rep2', not 'rep1'" in msg


def test_tls_is_verified_against_certifi_or_the_given_ca_bundle(vml, home, published, tmp_path):
    good = self_signed(tmp_path)  # for 127.0.0.1
    server = Nginx(published["pub"], tls=good)
    try:
        vml("remote", "add", "cern", server.url, "--key", published["pubkey"], "--no-check")
        set_remote(home, timeout=3)  # a refused certificate is retried, like any failure, until then
        # certifi's authorities never signed this certificate.
        assert "certificate" in vml.fails("log", "cern").lower()
        set_remote(home, verify_tls=str(good[0]))
        assert "base(" in vml("log", "cern").stdout
        set_remote(home, verify_tls=False)
        assert "e2(" in vml("log", "cern").stdout
    finally:
        server.stop()
    # A certificate the bundle trusts, but for another host name, is refused.
    other = self_signed(tmp_path, dns="elsewhere.example")
    server = Nginx(published["pub"], tls=other)
    try:
        vml("remote", "rm", "cern")
        vml("remote", "add", "cern", server.url, "--key", published["pubkey"], "--no-check")
        set_remote(home, verify_tls=str(other[0]), timeout=3)
        err = vml.fails("log", "cern").lower()
        assert "127.0.0.1" in err or "certificate" in err, err
    finally:
        server.stop()
