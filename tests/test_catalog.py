"""Catalogs of remotes: the repository a remote stands for, expiry and
re-signing, the payload format, bounded settings, and publishing under kill -9.

Most tests serve a published directory with Python's http.server on
127.0.0.1; the end-to-end expiry test uses the real nginx of tests/servers.py.
"""

import base64
import dataclasses
import functools
import http.server
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from vml import config, keys
from vml.errors import BadSignature, CorruptManifest
from vml.remotes import catalog as catalogs
from vml.remotes import publish
from vml.remotes.remote import RemoteConfig, RemoteStore
from vml.repo.packs import Index
from vml.repo.paths import index_path, pack_path

from conftest import Vml, need
from helpers import check_published
from servers import Nginx

PAST = "2001-01-01T00:00:00Z"


class Origin:
    """``root`` served over HTTP by http.server on a free loopback port; notes each path asked for."""

    def __init__(self, root: Path):
        paths = self.paths = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                paths.append(self.path)

        handler = functools.partial(Handler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def copy_published(src: Path, dest: Path) -> Path:
    """Copy a published directory with hard links (a publish never changes a file in place)."""
    shutil.copytree(src, dest, copy_function=os.link, ignore=shutil.ignore_patterns(".publish.lock"))
    return dest


def replace(path: Path, data: bytes) -> None:
    """Replace a file of a copy made by copy_published, leaving the original alone."""
    path.unlink()
    path.write_bytes(data)


@pytest.fixture(scope="module")
def publisher(tmp_path_factory):
    """rep1 with entry base (1 MiB, 4 KiB chunks), a key, and rep1 published into pub/."""
    d = tmp_path_factory.mktemp("publisher")
    vml = Vml(d / "home", d)
    vml("init", d / "rep1", "--chunk-size", "4K")
    (d / "base.img").write_bytes(os.urandom(1 << 20))
    vml("save", "base", "--from", d / "base.img")
    vml("keygen", d / "key")
    vml("publish", d / "pub", "--key", d / "key")
    return {"dir": d, "vml": vml, "key": d / "key", "pubkey": d / "key.pub", "pub": d / "pub"}


@pytest.fixture
def served(publisher, tmp_path):
    """A copy of the published directory that the test may change, served by its own origin."""
    pub = copy_published(publisher["pub"], tmp_path / "pub")
    origin = Origin(pub)
    yield pub, origin
    origin.stop()


def private_key(publisher):
    return keys.load_private_key(publisher["key"])


def served_catalog(pub: Path, publisher) -> catalogs.Catalog:
    return catalogs.verify((pub / "catalog.json").read_bytes(), private_key(publisher).public_key(), "test")


def write_catalog(pub: Path, publisher, cat: catalogs.Catalog) -> None:
    replace(pub / "catalog.json", catalogs.sign(cat, private_key(publisher)))


def write_payload(pub: Path, publisher, doc: dict) -> None:
    """A catalog of exactly this payload, signed with the publisher's key."""
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    signature = base64.b64encode(private_key(publisher).sign(payload)).decode()
    replace(pub / "catalog.json", json.dumps({"payload": payload.decode(), "signature": signature}).encode())


def configure(home: Path, name: str = "cern", url: str | None = None, **settings) -> None:
    """Fetch remote ``name``'s catalog at every command (a TTL of a millisecond), with these settings."""
    with config.editing(home) as cfg:
        rc = cfg.remotes[name]
        cfg.remotes[name] = dataclasses.replace(
            rc, url=url or rc.url, catalog_ttl=0.001, settings=dataclasses.replace(rc.settings, **settings)
        )


def objects_in(pub: Path) -> list[str]:
    """Every published file but the catalog: objects, packs, indexes and pack sets."""
    return sorted(str(p.relative_to(pub)) for d in ("objects", "packs", "packsets") for p in (pub / d).rglob("*"))


# -- the repository a remote stands for ----------------------------------------


def test_a_no_check_remote_records_its_repository_and_refuses_another(vml, home, publisher, served):
    """Before the identity file, a --no-check remote never learnt its repository:
    the catalog of rep2 below was accepted (`vml log` listed no entries), and its
    revision 99 then refused the real catalog (revision 1) as a replay, for good."""
    pub, origin = served
    real = (pub / "catalog.json").read_bytes()
    vml("remote", "add", "cern", origin.url, "--key", publisher["pubkey"], "--no-check")
    configure(home)
    assert not (home / "cache" / "cern" / "identity.json").exists()
    assert "base(" in vml("log", "cern").stdout  # first contact
    assert json.loads((home / "cache" / "cern" / "identity.json").read_text())["repository"] == "rep1"

    cat = served_catalog(pub, publisher)
    write_catalog(pub, publisher, catalogs.Catalog("rep2", 99, cat.published, {}, frozenset()))
    msg = vml.fails("log", "cern", status=6)
    assert "of repository 'rep2', not 'rep1'" in msg
    assert (home / "cache" / "cern" / "catalog.json").read_bytes() == real  # never replaced

    replace(pub / "catalog.json", real)
    assert "base(" in vml("log", "cern").stdout


def test_a_cache_an_older_vml_left_keeps_its_repository(home, publisher, served):
    """An older vml recorded no identity, only the verified catalog it cached: that catalog says which
    repository the remote stands for, so a catalog of another one served next is refused, loudly;
    `vml remote rm` and adding the remote again starts over."""
    pub, origin = served
    cat = served_catalog(pub, publisher)
    rc = RemoteConfig("cern", origin.url, keys.read_public_key(publisher["pubkey"]))
    store = RemoteStore(home, rc)
    cached = catalogs.sign(catalogs.Catalog("rep2", 99, cat.published, {}, frozenset()), private_key(publisher))
    store.path.mkdir(parents=True, exist_ok=True)
    store.refs_path.write_bytes(cached)
    with pytest.raises(BadSignature, match=r"of repository 'rep1', not 'rep2'.*vml remote rm cern"):
        store.catalog(refresh=True)
    assert store.identity() == "rep2" and store.refs_path.read_bytes() == cached
    shutil.rmtree(store.path)  # what `vml remote rm` does to the cache
    again = RemoteStore(home, rc)
    assert (again.catalog(refresh=True).repository, again.identity()) == ("rep1", "rep1")


def test_config_repository_wins_and_nothing_is_recorded_beside_it(home, publisher, served):
    _, origin = served
    rc = RemoteConfig("cern", origin.url, keys.read_public_key(publisher["pubkey"]), repository="rep9")
    store = RemoteStore(home, rc)
    with pytest.raises(BadSignature, match="of repository 'rep1', not 'rep9'"):
        store.catalog(refresh=True)
    assert not (store.path / "identity.json").exists() and not store.refs_path.exists()


# -- the payload format ---------------------------------------------------------


def payload_of(cat: catalogs.Catalog) -> dict:
    return json.loads(cat.payload())


def test_payload_formats_and_unknown_keys(publisher, served):
    pub, _ = served
    public = private_key(publisher).public_key()
    cat = served_catalog(pub, publisher)
    assert payload_of(cat)["format"] == 3 and cat.expires is not None and not cat.expired()
    assert cat.packsets.keys() == cat.manifests and cat.indexes  # chunks are published in packs
    doc = payload_of(cat)
    # Format 2, as vml published loose objects before packs: read, with no packs.
    loose = {k: v for k, v in doc.items() if k not in ("packsets", "indexes")} | {"format": 2}
    write_payload(pub, publisher, loose)
    got = catalogs.verify((pub / "catalog.json").read_bytes(), public, "test")
    assert got.refs == cat.refs and got.packsets == {} and got.indexes == {}
    assert payload_of(dataclasses.replace(cat, packsets={}, indexes={}))["format"] == 2

    # Format 1, exactly as vml wrote it before expiry: read, and it never expires.
    old = {k: v for k, v in doc.items() if k != "expires"} | {"format": 1}
    write_payload(pub, publisher, old)
    got = catalogs.verify((pub / "catalog.json").read_bytes(), public, "test")
    assert got.expires is None and not got.expired() and got.refs == cat.refs
    no_expiry = dataclasses.replace(cat, expires=None, packsets={}, indexes={})
    assert payload_of(no_expiry)["format"] == 1  # what has no expiry is format 1

    # Keys a reader does not know are ignored, in every format.
    for base in (doc, loose, old):
        write_payload(pub, publisher, base | {"endorsements": [{"key": "ed25519:x"}], "pack_sizes": {"p1": [1, 2]}})
        assert catalogs.verify((pub / "catalog.json").read_bytes(), public, "test").refs == cat.refs

    # A newer format is refused whole; format 2 must say when it expires, format 3 where its packs are.
    some = next(iter(doc["indexes"]))
    for bad, why in (
        (doc | {"format": 4}, "newer than this vml reads"),
        ({k: v for k, v in doc.items() if k != "expires"}, "expires"),
        (doc | {"expires": "next week"}, "does not match format"),
        (doc | {"format": "2"}, "invalid format"),
        ({k: v for k, v in doc.items() if k != "indexes"}, "indexes"),
        (doc | {"indexes": {some: "zz"}}, "bad digest"),
        (doc | {"indexes": [some]}, "expected an object"),
        (doc | {"packsets": {"ab" * 32: "cd" * 32}}, "not listed"),
    ):
        write_payload(pub, publisher, bad)
        with pytest.raises(CorruptManifest, match=why):
            catalogs.verify((pub / "catalog.json").read_bytes(), public, "test")


def test_a_format_1_catalog_is_still_served_to_clients(vml, home, publisher, served):
    pub, origin = served
    doc = payload_of(served_catalog(pub, publisher))
    write_payload(pub, publisher, {k: v for k, v in doc.items() if k != "expires"} | {"format": 1})
    vml("remote", "add", "cern", origin.url, "--key", publisher["pubkey"])
    r = vml("log", "cern")
    assert "base(" in r.stdout and r.stderr == ""


# -- expiry and re-signing ----------------------------------------------------------


def test_an_expired_catalog_from_the_network_is_refused_and_the_cached_one_kept(vml, home, publisher, served, tmp_path):
    pub, origin = served
    vml("remote", "add", "cern", origin.url, "--key", publisher["pubkey"])
    configure(home)
    kept = (home / "cache" / "cern" / "catalog.json").read_bytes()
    cat = served_catalog(pub, publisher)
    write_catalog(pub, publisher, dataclasses.replace(cat, revision=cat.revision + 1, expires=PAST))

    r = vml("log", "cern")  # the valid cached catalog serves, with a warning
    assert "base(" in r.stdout
    assert f"expired on {PAST}" in r.stderr and "using the cached catalog, revision 1" in r.stderr
    assert (home / "cache" / "cern" / "catalog.json").read_bytes() == kept

    fresh = Vml(tmp_path / "fresh", tmp_path)
    msg = fresh.fails("remote", "add", "cern", origin.url, "--key", publisher["pubkey"], status=6)
    assert f"remote cern ({origin.url}): the catalog expired on {PAST}" in msg and "vml publish --resign" in msg
    assert "cern" not in fresh("remote", "list").stdout

    out = publisher["vml"]("publish", pub, "--key", publisher["key"], "--resign").stdout
    assert "revision 3" in out
    r = vml("log", "cern")  # the failed refresh set a back-off: the cached catalog serves until it ends
    assert "base(" in r.stdout and "a refresh failed recently" in r.stderr
    assert served_catalog(home / "cache" / "cern", publisher).revision == 1
    (home / "cache" / "cern" / "catalog.retry").unlink()  # as if the back-off had passed
    r = vml("log", "cern")
    assert "base(" in r.stdout and r.stderr == ""
    assert served_catalog(home / "cache" / "cern", publisher).revision == 3


def test_expired_catalogs_end_to_end_through_nginx(vml, home, publisher, tmp_path):
    """Expired on the origin and in the cache: refused; offline: the cached one (itself expired)
    serves with a warning; --resign: valid again, no object written."""
    need("nginx")
    pub = copy_published(publisher["pub"], tmp_path / "pub")
    server = Nginx(pub)
    try:
        vml("remote", "add", "cern", server.url, "--key", publisher["pubkey"])
        configure(home, timeout=2.0, connect_timeout=1.0)
        # Valid for 5 s, cut to whole seconds: from more than 4 s after t0 to at most 5 s after t1.
        t0 = time.time()
        publisher["vml"]("publish", pub, "--key", publisher["key"], "--expires-in", str(5 / 86400))
        t1 = time.time()
        r = vml("log", "cern")
        assert time.time() < t0 + 4, "too slow for a catalog valid for 5 s"
        assert "base(" in r.stdout and r.stderr == "", r.stderr
        assert (home / "cache" / "cern" / "catalog.json").read_bytes() == (pub / "catalog.json").read_bytes()
        time.sleep(max(0.0, t1 + 5.5 - time.time()))

        # The origin answers, but only with an expired catalog, and the cached one has expired too:
        # a frozen server is not served from for longer than the catalog's validity.
        msg = vml.fails("log", "cern", status=6)
        assert "the catalog expired on" in msg and "`vml publish --resign`" in msg
        msg = Vml(tmp_path / "fresh", tmp_path).fails("remote", "add", "cern", server.url, "--key", publisher["pubkey"])
        assert "the catalog expired on" in msg and "`vml publish --resign`" in msg
    finally:
        server.stop()

    r = vml("log", "cern")  # offline
    assert "base(" in r.stdout
    assert "using the cached catalog, revision 2 (it expired on" in r.stderr and "cannot fetch" in r.stderr

    before = objects_in(pub)
    out = publisher["vml"]("publish", pub, "--key", publisher["key"], "--resign").stdout
    assert "re-signed the catalog of rep1" in out and "revision 3" in out
    assert objects_in(pub) == before
    cat = served_catalog(pub, publisher)
    assert cat.revision == 3 and not cat.expired() and cat.refs == served_catalog(publisher["pub"], publisher).refs
    server = Nginx(pub)
    try:
        configure(home, url=server.url)
        r = vml("log", "cern")
        assert "base(" in r.stdout and r.stderr == "", r.stderr
        fresh = Vml(tmp_path / "fresh", tmp_path)
        out = fresh("remote", "add", "cern", server.url, "--key", publisher["pubkey"]).stdout
        assert "catalog revision 3 of rep1" in out
    finally:
        server.stop()


def test_a_long_running_process_fetches_the_catalog_again_after_its_ttl(home, publisher, served):
    pub, origin = served
    rc = RemoteConfig("cern", origin.url, keys.read_public_key(publisher["pubkey"]), catalog_ttl=1.0)
    store = RemoteStore(home, rc)
    first = store.catalog()
    publish.resign(pub, publisher["key"])
    asked = len(origin.paths)
    assert store.catalog().revision == first.revision and len(origin.paths) == asked  # within the TTL
    time.sleep(1.1)
    assert store.catalog().revision == first.revision + 1
    assert len(origin.paths) == asked + 1


def test_publish_options_are_checked(publisher, tmp_path):
    vml = publisher["vml"]
    for days in ("0", "-1", "inf", "nan", "1e309", "4000"):
        msg = vml.fails("publish", tmp_path / "p", "--key", publisher["key"], "--expires-in", days, status=2)
        assert "--expires-in" in msg
    assert not (tmp_path / "p").exists()
    assert "no catalog to re-sign" in vml.fails("publish", tmp_path / "p", "--key", publisher["key"], "--resign")
    assert "give no entries" in vml.fails("publish", publisher["pub"], "--key", publisher["key"], "--resign", "base")


# -- settings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "line,key",
    [
        ("timeout = 1e309", "timeout"),
        ("timeout = nan", "timeout"),
        ("timeout = inf", "timeout"),
        ("timeout = 86401", "timeout"),
        ("catalog_ttl = 1e309", "catalog_ttl"),
        ("backoff = nan", "backoff"),
        ("parallel = 100000", "parallel"),
        ("parallel = 2.5", "parallel"),
    ],
)
def test_unbounded_settings_are_one_line_config_errors(vml, home, publisher, line, key):
    home.mkdir()
    pubkey = publisher["pubkey"].read_text().strip()
    (home / "config.toml").write_text(f'[remotes.cern]\nurl = "http://127.0.0.1:1"\nkey = "{pubkey}"\n{line}\n')
    msg = vml.fails("remote", "list", status=6)
    assert str(home / "config.toml") in msg and f"[remotes.cern]: {key} = " in msg


def test_a_remotes_key_that_is_no_table_is_a_config_error(vml, home):
    home.mkdir()
    (home / "config.toml").write_text("remotes = 5\n")
    msg = vml.fails("remote", "list", status=6)  # was an internal error, exit 70
    assert str(home / "config.toml") in msg and "remotes must be a table" in msg


def test_remote_add_checks_its_numbers(vml, publisher):
    for flag, value in (("--timeout", "inf"), ("--timeout", "nan"), ("--timeout", "0"), ("--cache-quota", "0")):
        msg = vml.fails("remote", "add", "r", "http://127.0.0.1:1", "--key", publisher["pubkey"], flag, value, status=2)
        assert f"{flag} " in msg


# -- publish under kill -9 ---------------------------------------------------------


def test_publish_writes_again_an_object_or_a_pack_cut_short(publisher, tmp_path):
    """As a crash of the machine can leave one that a killed publish renamed into place unflushed."""
    pub = copy_published(publisher["pub"], tmp_path / "pub")
    victim = sorted((pub / "objects").glob("*/*"))[1]
    replace(victim, b"")
    out = publisher["vml"]("publish", pub, "--key", publisher["key"]).stdout
    assert "1 new objects" in out
    cat = check_published(pub, private_key(publisher).public_key())
    pack = sorted(cat.indexes)[0]
    held = Index(index_path(pub, pack).read_bytes(), "test", pack).count
    replace(pack_path(pub, pack), pack_path(pub, pack).read_bytes()[:1000])
    out = publisher["vml"]("publish", pub, "--key", publisher["key"]).stdout
    assert f"{held} new objects" in out
    after = check_published(pub, private_key(publisher).public_key())
    assert after.refs == cat.refs and pack_path(pub, pack).stat().st_size > 1000
