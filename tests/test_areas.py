"""Working areas through the library, without a mount: saving while the guest writes.

A save freezes the area's overlays, lets writes go to fresh ones at once,
stores the frozen ones, then rebases (see vml.areas). These tests hold a
save in its store step and write meanwhile, kill a process there, and make
the store fail, and check that no write is lost or misplaced.
"""

import os
import subprocess
import sys
import threading
import time

import pytest

from vml import areas, config
from vml.areas import Area, AreaRecord
from vml.checkout import checkout
from vml.errors import StorageError
from vml.save import save
from vml.store import Store

CS = 4096
SIZE = 64 * CS


@pytest.fixture
def area(home, tmp_path):
    """Area "w" on entry e1 (random bytes) of repository "rep" in ``home``."""
    Store.create(tmp_path / "rep", chunk_size=CS)
    with config.editing(home) as cfg:
        cfg.register("rep", tmp_path / "rep")
    repo = config.Config.load(home).open("rep")
    base = os.urandom(SIZE)
    (tmp_path / "d.img").write_bytes(base)
    entry = save(repo, "e1", tmp_path / "d.img")
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
    real = areas.write_entry

    def slow_write_entry(*args, **kwargs):
        in_store.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(areas, "write_entry", slow_write_entry)
    return in_store, release


def test_writes_during_a_save_go_on_and_land_in_the_next_entry(area, tmp_path, held_in_store):
    home, repo, expected = area
    in_store, release = held_in_store
    with Area(home, "w") as a:
        a.write("d", 3 * CS + 100, b"A" * 5000)
        expected[3 * CS + 100 : 3 * CS + 5100] = b"A" * 5000
        saved_content = bytes(expected)
        saver = threading.Thread(target=a.save, args=("e2",))
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
        assert a.record.entry == "e2" and a.record.frozen == [] and a.changed_bytes() > 0
        a.save("e3")  # released: this one goes straight through
    assert disk_of(repo, "e2", tmp_path) == saved_content
    assert disk_of(repo, "e3", tmp_path) == bytes(expected)
    assert sorted(p.name for p in (home / "areas/w").glob("*.overlay")) == ["d.3.overlay"]


KILLED_IN_STORE = """
import os, signal, sys
from pathlib import Path
from vml import areas
from vml.areas import Area

def die(*args, **kwargs):
    area.write("d", 10 * 4096, b"after the freeze" * 1024)  # a guest write during the store step
    area.sync()
    os.kill(os.getpid(), signal.SIGKILL)

areas.write_entry = die
area = Area(Path(sys.argv[1]), "w")
area.write("d", 0, b"before the freeze" * 300)
area.sync()
area.save("e2")
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
    assert areas.changed_bytes(home, rec) > 0
    with Area(home, "w") as a:
        assert a.read("d", 0, SIZE) == bytes(expected)
        a.save("e2")
        assert a.read("d", 0, SIZE) == bytes(expected) and a.changed_bytes() == 0
    assert disk_of(repo, "e2", tmp_path) == bytes(expected)
    assert '"format": 1' in (home / "areas/w/area.json").read_text()
    assert sorted(p.name for p in (home / "areas/w").glob("*.overlay")) == ["d.3.overlay"]


def test_a_failed_save_keeps_every_write_and_the_next_one_stores_them(area, tmp_path, monkeypatch):
    home, repo, expected = area
    real = areas.write_entry

    def full(*args, **kwargs):
        raise StorageError("saving entry 'e2': no space left on device")

    with Area(home, "w") as a:
        a.write("d", 5 * CS, b"x" * CS)
        expected[5 * CS : 6 * CS] = b"x" * CS
        monkeypatch.setattr(areas, "write_entry", full)
        with pytest.raises(StorageError):
            a.save("e2")
        a.write("d", 6 * CS, b"y" * CS)
        expected[6 * CS : 7 * CS] = b"y" * CS
        with pytest.raises(StorageError):
            a.save("e2")
        assert a.record.frozen == [1, 2] and a.read("d", 0, SIZE) == bytes(expected)
        monkeypatch.setattr(areas, "write_entry", real)
        a.save("e2")
        assert a.record.frozen == [] and a.changed_bytes() == 0
    assert disk_of(repo, "e2", tmp_path) == bytes(expected)
    assert "e2" in repo.refs() and repo.entry("e2").manifest.parent.name == "e1"


def test_a_taken_name_is_refused_before_anything_is_frozen(area):
    home, _, _ = area
    with Area(home, "w") as a:
        a.write("d", 0, b"z" * CS)
        with pytest.raises(Exception, match="entry 'e1' already exists"):
            a.save("e1")
        assert a.record.frozen == [] and a.record.generation == 1


def test_closing_waits_for_a_save_under_way(area, tmp_path, held_in_store):
    """Close takes the save's lock before the area's mutex, as save does: no deadlock, nothing half done."""
    home, repo, expected = area
    in_store, release = held_in_store
    a = Area(home, "w")
    a.write("d", 0, b"q" * CS)
    saver = threading.Thread(target=a.save, args=("e2",))
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
