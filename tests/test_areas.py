"""Working areas through the library, without a mount: saving while the guest writes.

A save freezes the area's overlays, lets writes go to fresh ones at once,
stores the frozen ones, then rebases (see vml.vms.areas). These tests hold a
save in its store step and write meanwhile, kill a process there, and make
the store fail, and check that no write is lost or misplaced.
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vml.entries.checkout import checkout
from vml.entries.save import save_source
from vml.errors import StorageError
from vml.vms import area as area_module
from vml.vms import areas
from vml.vms.areas import Area, AreaRecord

from conftest import Vml
from helpers import fill, registered

CS = 4096
SIZE = 64 * CS


@pytest.fixture
def area(home, tmp_path):
    """Area "w" on entry e1 (random bytes) of repository "rep" in ``home``."""
    repo = registered(home, tmp_path / "rep")
    base = os.urandom(SIZE)
    (tmp_path / "d.img").write_bytes(base)
    entry = save_source(repo, "e1", tmp_path / "d.img")
    areas.create_area(home, "w", repo, entry)
    return home, repo, bytearray(base)


def disk_of(repo, name, tmp_path) -> bytes:
    out = tmp_path / f"co-{name}"
    checkout(repo, name, out)
    return (out / "d.img").read_bytes()


@pytest.fixture
def held_in_store(monkeypatch):
    """Saves wait in their store step: (set once a save is there, set to let it go on)."""
    in_store, release = threading.Event(), threading.Event()
    real = area_module.write_entry

    def slow_write_entry(*args, **kwargs):
        in_store.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(area_module, "write_entry", slow_write_entry)
    return in_store, release


def test_writes_during_a_save_go_on_and_land_in_the_next_entry(area, tmp_path, held_in_store):
    home, repo, expected = area
    in_store, release = held_in_store
    with Area(home, "w") as a:
        a.write("d", 3 * CS + 100, b"A" * 5000)
        expected[3 * CS + 100 : 3 * CS + 5100] = b"A" * 5000
        saved_content = bytes(expected)
        saver = threading.Thread(target=a.save_changes, args=("e2",))
        saver.start()
        assert in_store.wait(30)
        started = time.monotonic()
        a.write("d", 3 * CS + 4000, b"B" * 3000)  # overlaps A's blocks: completed from the frozen layer
        a.write("d", 40 * CS, b"C" * CS)
        a.sync()
        assert time.monotonic() - started < 1, "writes waited for the save"
        expected[3 * CS + 4000 : 3 * CS + 7000] = b"B" * 3000
        expected[40 * CS : 41 * CS] = b"C" * CS
        assert a.read("d", 0, SIZE) == bytes(expected)
        release.set()
        saver.join(30)
        assert a.read("d", 0, SIZE) == bytes(expected)
        assert a.record.entry == "e2" and a.record.frozen == [] and a.unsaved_bytes() > 0
        a.save_changes("e3")  # released: this one goes straight through
    assert disk_of(repo, "e2", tmp_path) == saved_content
    assert disk_of(repo, "e3", tmp_path) == bytes(expected)
    assert sorted(p.name for p in (home / "areas/w").glob("*.overlay")) == ["d.3.overlay"]


KILLED_IN_STORE = """
import os, signal, sys
from pathlib import Path
from vml.vms import area as area_module
from vml.vms.areas import Area

def die(*args, **kwargs):
    area.write("d", 10 * 4096, b"after the freeze" * 1024)  # a guest write during the store step
    area.sync()
    os.kill(os.getpid(), signal.SIGKILL)

area_module.write_entry = die
area = Area(Path(sys.argv[1]), "w")
area.write("d", 0, b"before the freeze" * 300)
area.sync()
area.save_changes("e2")
"""


def test_a_save_killed_after_the_freeze_loses_no_write(area, tmp_path):
    home, repo, expected = area
    r = subprocess.run([sys.executable, "-c", KILLED_IN_STORE, str(home)], capture_output=True, check=False)
    assert r.returncode == -9, r.stderr
    expected[0:5100] = b"before the freeze" * 300
    expected[10 * CS : 14 * CS] = b"after the freeze" * 1024
    rec = AreaRecord.load(home / "areas/w/area.json")
    assert (rec.entry, rec.frozen, rec.generation) == ("e1", [1], 2)
    assert '"format": 2' in (home / "areas/w/area.json").read_text()  # older versions refuse, not drop
    assert areas.overlay_bytes(home, rec) > 0
    with Area(home, "w") as a:
        assert a.read("d", 0, SIZE) == bytes(expected)
        a.save_changes("e2")
        assert a.read("d", 0, SIZE) == bytes(expected) and a.unsaved_bytes() == 0
    assert disk_of(repo, "e2", tmp_path) == bytes(expected)
    assert '"format": 1' in (home / "areas/w/area.json").read_text()
    assert sorted(p.name for p in (home / "areas/w").glob("*.overlay")) == ["d.3.overlay"]


def test_a_failed_save_keeps_every_write_and_the_next_one_stores_them(area, tmp_path, monkeypatch):
    home, repo, expected = area
    real = area_module.write_entry

    def full(*args, **kwargs):
        raise StorageError("saving entry 'e2': no space left on device")

    with Area(home, "w") as a:
        a.write("d", 5 * CS, b"x" * CS)
        expected[5 * CS : 6 * CS] = b"x" * CS
        monkeypatch.setattr(area_module, "write_entry", full)
        with pytest.raises(StorageError):
            a.save_changes("e2")
        a.write("d", 6 * CS, b"y" * CS)
        expected[6 * CS : 7 * CS] = b"y" * CS
        with pytest.raises(StorageError):
            a.save_changes("e2")
        assert a.record.frozen == [1, 2] and a.read("d", 0, SIZE) == bytes(expected)
        monkeypatch.setattr(area_module, "write_entry", real)
        a.save_changes("e2")
        assert a.record.frozen == [] and a.unsaved_bytes() == 0
    assert disk_of(repo, "e2", tmp_path) == bytes(expected)
    assert "e2" in repo.refs() and repo.entry("e2").manifest.parent.name == "e1"


def test_a_taken_name_is_refused_before_anything_is_frozen(area):
    home, _, _ = area
    with Area(home, "w") as a:
        a.write("d", 0, b"z" * CS)
        with pytest.raises(Exception, match="entry 'e1' already exists"):
            a.save_changes("e1")
        assert a.record.frozen == [] and a.record.generation == 1


def test_closing_waits_for_a_save_under_way(area, tmp_path, held_in_store):
    """Close takes the save's lock before the area's mutex, as save does: no deadlock, nothing half done."""
    home, repo, expected = area
    in_store, release = held_in_store
    a = Area(home, "w")
    a.write("d", 0, b"q" * CS)
    saver = threading.Thread(target=a.save_changes, args=("e2",))
    saver.start()
    assert in_store.wait(30)
    closer = threading.Thread(target=a.destroy, kwargs={"discard": True})
    closer.start()
    time.sleep(0.2)
    assert closer.is_alive() and (home / "areas/w").exists()  # waits for the save
    release.set()
    saver.join(30)
    closer.join(30)
    assert not saver.is_alive() and not closer.is_alive()
    assert not (home / "areas/w").exists() and "e2" in repo.refs()
    expected[:CS] = b"q" * CS
    assert disk_of(repo, "e2", tmp_path) == bytes(expected)


# -- found in review -----------------------------------------------------------------


def test_fsync_flushes_the_frozen_layers_too(area, tmp_path, monkeypatch):
    """A write acknowledged before a freeze lies in a frozen overlay: fsync must flush it there."""
    home, _, _ = area
    with Area(home, "w") as a:
        a.write("d", 0, b"w" * CS)
        monkeypatch.setattr(area_module, "write_entry", lambda *a, **k: (_ for _ in ()).throw(StorageError("full")))
        with pytest.raises(StorageError):
            a.save_changes("e2")
        synced = []
        real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
        a.sync("d")
    assert sorted(Path(p).name for p in synced) == ["d.1.overlay", "d.2.overlay"]


def test_an_area_on_a_disk_declared_huge_costs_memory_by_what_is_written(home, tmp_path):
    """Found in review: an area kept one byte per block of the declared disk (552 MiB to open one of 1 TiB)."""
    registered(home, tmp_path / "rep", chunk_size=256 << 10)
    img = tmp_path / "big.img"
    with open(img, "wb") as f:
        f.truncate(1 << 40)
        f.write(b"boot" * 1024)
    code = """
import resource, sys
from pathlib import Path
from vml import config
from vml.vms import areas
from vml.vms.areas import Area
from vml.entries.save import save_source
home = Path(sys.argv[1])
repo = config.Config.load(home).open("rep")
areas.create_area(home, "w", repo, save_source(repo, "e1", sys.argv[2]))
with Area(home, "w") as a:
    a.write("big", (1 << 40) - 4096, b"end!" * 1024)
    a.save_changes("e2")
    assert a.read("big", (1 << 40) - 4096, 4096) == b"end!" * 1024
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    r = subprocess.run([sys.executable, "-c", code, str(home), str(img)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) < 150 << 10, f"peak {int(r.stdout) >> 10} MiB"


def test_a_full_home_refuses_an_area_save_in_one_line(tmp_path, tmpfs):
    small = tmpfs("2m")
    vml = Vml(small / "home", tmp_path)
    vml("init", tmp_path / "rep", "--chunk-size", "4K")
    (tmp_path / "d.img").write_bytes(os.urandom(64 * CS))
    vml("save", "e1", "--from", tmp_path / "d.img")
    vml("open", "e1", "--area", "w")
    with Area(small / "home", "w") as a:
        a.write("d", 0, b"z" * CS)
    filler = fill(small)
    msg = vml.fails("save", "e2", "--area", "w", status=10)
    assert "saving working area 'w'" in msg and "no space left" in msg
    filler.unlink()
    vml("save", "e2", "--area", "w")
    vml("checkout", "e2", tmp_path / "co")
    assert (tmp_path / "co/d.img").read_bytes()[:CS] == b"z" * CS
