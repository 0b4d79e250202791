"""Working areas of several homes on one repository: leases keep what they read.

Found in review on main: home B opened an area on g2; home A ran
`rm g2; rm g1; gc` ("removed 21 objects"); B's `vml save --area` then failed
with "object ... is missing". Areas are now recorded in the repository
(leases), which every home's gc and rm respect.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from vml.vms.areas import Area

from conftest import Vml, need_root

CS = 4096


@pytest.fixture
def shared(tmp_path):
    """A repository shared by two homes, A and B: g1 <- g2 saved by A."""
    a, b = Vml(tmp_path / "homeA", tmp_path), Vml(tmp_path / "homeB", tmp_path)
    rep = tmp_path / "rep"
    a("init", rep, "--chunk-size", "4K")
    b("init", rep)  # registers the existing repository in B's home
    disk = tmp_path / "d.img"
    data = bytearray(os.urandom(32 * CS))
    disk.write_bytes(data)
    a("save", "g1", "--from", disk)
    data[3 * CS : 9 * CS] = os.urandom(6 * CS)
    disk.write_bytes(data)
    a("save", "g2", "--from", disk, "--parent", "g1")
    return a, b, rep, bytes(data)


def write_area(home: Path, area: str, offset: int, data: bytes) -> None:
    with Area(home, area) as opened:
        opened.write("d", offset, data)
        opened.sync()


def objects_in(rep: Path) -> int:
    return sum(1 for p in (rep / "objects").rglob("*") if p.is_file())


def test_another_homes_gc_keeps_what_an_open_area_reads(shared, tmp_path):
    a, b, rep, g2 = shared
    b("open", "g2", "--area", "w")
    listed = json.loads(a("leases", "--json").stdout)
    assert [(x["area"], x["entry"], x["home"], x["stale"]) for x in listed] == [
        ("w", "g2", str(tmp_path / "homeB"), False)
    ]
    msg = a.fails("rm", "g2", status=11)
    assert f"working area 'w' of {tmp_path / 'homeB'}" in msg and "builds on entry 'g2'" in msg and "--force" in msg
    assert "builds on entry 'g2'" in a.fails("rm", "g1", "--recursive", status=11)
    a("rm", "g2", "--force")
    a("rm", "g1")
    before = objects_in(rep)
    out = a("gc").stdout
    assert "removed 0 objects" in out and "(with what 1 working area build on)" in out
    assert objects_in(rep) == before
    write_area(tmp_path / "homeB", "w", 5 * CS, b"B was here" * 100)
    b("save", "g3", "--area", "w")
    b("checkout", "g3", tmp_path / "co")
    expected = bytearray(g2)
    expected[5 * CS : 5 * CS + 1000] = b"B was here" * 100
    assert (tmp_path / "co/d.img").read_bytes() == bytes(expected)
    # The lease followed the area to g3: g2 and g1 are now only g3's chain.
    assert [x["entry"] for x in json.loads(a("leases", "--json").stdout)] == ["g3"]
    assert a("verify").returncode == 0
    b("close", "w")
    assert json.loads(a("leases", "--json").stdout) == []
    a("rm", "g3")
    assert "removed 0 objects" not in a("gc").stdout
    assert objects_in(rep) == 0


def test_rm_reparent_refuses_to_rewrite_an_entry_an_area_builds_on(shared, tmp_path):
    a, b, _, g2 = shared
    b("open", "g2", "--area", "w")
    assert "builds on entry 'g2'" in a.fails("rm", "g1", "--reparent", status=11)
    a("rm", "g1", "--reparent", "--force")  # g2 gets a new manifest; the area keeps reading the old one
    a("gc")
    write_area(tmp_path / "homeB", "w", 0, b"x" * CS)
    b("save", "g3", "--area", "w")
    b("checkout", "g3", tmp_path / "co")
    assert (tmp_path / "co/d.img").read_bytes() == b"x" * CS + g2[CS:]


def test_stale_leases_are_listed_and_dropped(shared, tmp_path):
    a, b, _, _ = shared
    b("open", "g2", "--area", "w")
    b("open", "g1", "--area", "v")
    shutil.rmtree(tmp_path / "homeB" / "areas" / "w")  # a home cleaned up by hand
    listed = {x["area"]: x for x in json.loads(a("leases", "--json").stdout)}
    assert listed["w"]["stale"] is True and listed["v"]["stale"] is False
    table = a("leases").stdout
    assert "stale" in table and "open" in table and listed["w"]["id"][:12] in table
    out = a("leases", "drop", "--stale").stdout
    assert "dropped the lease of working area 'w'" in out and "'v'" not in out
    assert [x["area"] for x in json.loads(a("leases", "--json").stdout)] == ["v"]
    assert "no lease in repository rep with an id starting 'ffff'" in a.fails("leases", "drop", "ffff", status=3)
    a("leases", "drop", listed["v"]["id"][:8])
    assert json.loads(a("leases", "--json").stdout) == []


def test_a_damaged_lease_stops_gc_and_is_reported(shared, tmp_path):
    a, b, rep, _ = shared
    b("open", "g2", "--area", "w")
    (lease,) = (rep / "leases").iterdir()
    lease.write_text("{not json")
    a("rm", "g2", "--force")
    before = objects_in(rep)
    assert f"{lease}: invalid lease" in a.fails("gc", status=6)
    assert objects_in(rep) == before
    r = a("leases", ok=False)
    assert r.returncode == 6 and f"{lease}: invalid lease" in r.stderr


def test_an_entry_removed_while_the_area_is_opened_is_not_leased(shared, tmp_path):
    """gc and the lease check both run under the lock: one of them sees the other."""
    _, b, rep, _ = shared
    code = (
        "import sys\nfrom vml.repo.store import Store\ns = Store(sys.argv[1])\n"
        "with s.lock('vml rm g2'):\n    print('held', flush=True)\n    sys.stdin.readline()\n"
        "    s.update_refs(delete=('g2',))\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(rep)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    opener = b.popen("open", "g2", "--area", "w")  # finds g2, then waits for the lock to record its lease
    assert b"waiting up to 60 s for repository" in opener.stderr.readline()
    holder.communicate(b"go\n", timeout=10)
    _, err = opener.communicate(timeout=60)
    assert opener.returncode == 3
    assert b"entry 'g2' was removed from repository rep while the area was being opened" in err
    assert not (tmp_path / "homeB/areas/w").exists() and not list((rep / "leases").glob("*.json"))


def test_leases_are_never_exported_or_published(shared, tmp_path):
    a, b, rep, _ = shared
    b("open", "g2", "--area", "w")
    assert list((rep / "leases").glob("*.json"))
    a("export", "g2", "-o", tmp_path / "g2.vml", "--full")
    with tarfile.open(tmp_path / "g2.vml") as t:
        names = t.getnames()
    assert names[0] == "vml-bundle.json" and all(n.startswith("objects/") for n in names[1:])
    a("keygen", tmp_path / "key")
    a("publish", tmp_path / "pub", "--key", tmp_path / "key")
    published = {p.relative_to(tmp_path / "pub").parts[0] for p in (tmp_path / "pub").rglob("*")}
    assert "leases" not in published and "objects" in published


def test_a_user_who_cannot_write_the_repository_is_warned_at_open(shared):
    need_root()
    _, _, rep, _ = shared
    base = Path(tempfile.mkdtemp(prefix="vml-leases-"))  # outside pytest's 0700 tmp
    try:
        os.chmod(base, 0o755)
        shutil.copytree(rep, base / "rep")
        home = base / "home"
        home.mkdir()
        os.chown(home, 65534, 65534)
        env = dict(os.environ, VML_HOME=str(home))
        setpriv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "vml"]
        subprocess.run([*setpriv, "init", base / "rep"], env=env, check=True, capture_output=True, cwd=base)
        r = subprocess.run(
            [*setpriv, "open", "g2", "--area", "w"], env=env, capture_output=True, text=True, cwd=base, check=False
        )
        assert r.returncode == 0, r.stderr
        assert "vml: cannot record working area w in repository rep (Permission denied)" in r.stderr
        assert "`vml gc` run by someone who can write the repository may remove what the area needs" in r.stderr
        assert "opened working area w on g2" in r.stdout and not (base / "rep/leases").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_save_records_the_new_entry_with_the_lease_it_published_under(shared, tmp_path, monkeypatch):
    """Found in review: the lease moved to the new entry only after the save, outside its lock, so an
    area could build on an entry no lease named. Now the lease names the new entry (and the old one,
    until the area has moved on) in the same locked step that publishes the entry."""
    a, b, rep, g2 = shared
    b("open", "g2", "--area", "w")
    write_area(tmp_path / "homeB", "w", 0, b"x" * CS)

    def stop_before_moving_on(self, entry):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Area, "_rebase", stop_before_moving_on)
    with (
        pytest.raises(Exception, match="entry 'g3' was saved, but working area 'w' could not move on"),
        Area(tmp_path / "homeB", "w") as area,
    ):
        area.save_changes("g3")
    (lease,) = json.loads(a("leases", "--json").stdout)
    refs = json.loads((rep / "refs.json").read_text())["entries"]
    assert (lease["manifest"], lease["previous"]) == (refs["g3"], refs["g2"])
    assert "builds on entry 'g3'" in a.fails("rm", "g3", status=11)
    a("rm", "g3", "--force")
    a("rm", "g2", "--force")
    a("rm", "g1")
    a("gc")
    monkeypatch.undo()
    with Area(tmp_path / "homeB", "w") as area:  # still on g2, with its frozen layer: every byte readable
        assert area.read("d", 0, len(g2)) == b"x" * CS + g2[CS:] and area.record.entry == "g2"


def test_odd_files_among_the_leases_are_reported_never_opened_and_can_be_dropped(shared, tmp_path):
    a, b, rep, _ = shared
    b("open", "g2", "--area", "w")
    (rep / "leases" / "adir.json").mkdir()
    os.mkfifo(rep / "leases" / "afifo.json")
    a("rm", "g2", "--force")
    r = subprocess.run(
        [sys.executable, "-m", "vml", "gc"], env=a.env, capture_output=True, text=True, timeout=30, check=False
    )
    assert r.returncode == 6 and "invalid lease" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = a("leases", ok=False)
    assert r.returncode == 6 and "adir.json: invalid lease: not a regular file" in r.stderr
    assert "dropped the lease of damaged lease adir.json" in a("leases", "drop", "adir").stdout
    a("leases", "drop", "afifo")
    assert "removed 0 objects" in a("gc").stdout  # the area's lease still keeps g2
    assert sorted(p.name for p in (rep / "leases").iterdir()) == [
        f"{json.loads(a('leases', '--json').stdout)[0]['id']}.json"
    ]


def test_closing_an_area_leaves_a_lease_of_another_area_of_that_name_alone(shared, tmp_path):
    """Found in review: two `vml open --area w` at once, or a close racing an open, released the lease
    the other had taken. A lease is released only by the area that holds it (its manifests)."""
    a, b, _, _ = shared
    home_b = tmp_path / "homeB"
    from vml import config
    from vml.vms import areas as area_module

    cfg = config.Config.load(home_b)
    repo = cfg.open("rep")
    real_mkdtemp = area_module.tempfile.mkdtemp

    def other_opener_first(*args, **kwargs):
        area_module.tempfile.mkdtemp = real_mkdtemp
        area_module.create_area(home_b, "w", repo, repo.entry("g1"))  # wins the race, on g1
        return real_mkdtemp(*args, **kwargs)

    area_module.tempfile.mkdtemp = other_opener_first
    try:
        with pytest.raises(Exception, match="working area 'w' already exists"):
            area_module.create_area(home_b, "w", repo, repo.entry("g2"))
    finally:
        area_module.tempfile.mkdtemp = real_mkdtemp
    listed = json.loads(a("leases", "--json").stdout)
    assert [(x["area"], x["entry"]) for x in listed] == [("w", "g1")]
    from vml.repo import leases

    leases.release(repo, home_b, "w", {repo.entry("g2").digest})  # not its manifest: stays
    assert len(json.loads(a("leases", "--json").stdout)) == 1
    b("close", "w")
    assert json.loads(a("leases", "--json").stdout) == []


def test_leases_of_homes_this_user_cannot_look_into_are_neither_stale_nor_an_error(shared):
    need_root()
    _, b, rep, _ = shared
    b("open", "g2", "--area", "w")
    base = Path(tempfile.mkdtemp(prefix="vml-leases-"))
    try:
        os.chmod(base, 0o755)
        shutil.copytree(rep, base / "rep")
        os.chmod(Path(b.env["VML_HOME"]), 0o700)  # another user's home, as homes are
        home = base / "home"
        home.mkdir()
        os.chown(home, 65534, 65534)
        env = dict(os.environ, VML_HOME=str(home))
        setpriv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "vml"]
        r = subprocess.run(
            [*setpriv, "leases", "--repo", base / "rep", "--json"], env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        assert [x["stale"] for x in json.loads(r.stdout)] == [None]
    finally:
        shutil.rmtree(base, ignore_errors=True)
