"""A repository's pack files (vml/repo/packfiles.py): writing, finding, reading, pack sets."""

import gc
import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from vml.errors import CorruptObject, ObjectMissing
from vml.repo import objects, packfiles, paths, transport
from vml.repo.store import Store


@pytest.fixture
def store(tmp_path):
    return Store.create(tmp_path / "rep")


def chunks(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    # Half random (incompressible), half repetitive: frames of very different sizes.
    return [rng.randbytes(20000) if i % 2 else bytes([i % 251]) * 30000 + rng.randbytes(50) for i in range(n)]


def write(store: Store, data: list[bytes], target: int = 64 << 10) -> tuple[packfiles.PackFiles, list[bytes]]:
    files = packfiles.PackFiles(store.path, store.place)
    with store.lock("test"):
        w = files.writer(target)
        for c in data:
            w.add(objects.digest(c), objects.compress(c))
        w.flush()
    return files, w.created


def read(files: packfiles.PackFiles, content: bytes) -> bytes:
    d = objects.digest(content)
    loc = files.locate(d)
    assert loc is not None, "not found"
    return objects.decode(files.read(loc), d, 1 << 20, "test")


def test_objects_go_into_packs_of_about_the_target_size_in_order_and_read_back(store):
    data = chunks(40)
    files, created = write(store, data)
    sizes = [paths.pack_path(store.path, p).stat().st_size for p in created]
    assert len(created) > 3 and all(s >= 64 << 10 for s in sizes[:-1]) and all(s < 128 << 10 for s in sizes)
    assert sorted(files.packs()) == sorted(created)
    # Two files per pack, however many objects.
    assert len(list((store.path / paths.PACKS).glob("*/*"))) == 2 * len(created)
    # The order of adding is kept: the first pack holds the first objects.
    first = paths.pack_path(store.path, created[0]).read_bytes()
    assert first.startswith(objects.compress(data[0]) + objects.compress(data[1]))
    fresh = packfiles.PackFiles(store.path, store.place)  # another process: nothing loaded
    for c in data:
        assert read(fresh, c) == c


def test_a_reader_loads_only_the_indexes_of_the_pack_set(store):
    files, created = write(store, chunks(40))
    manifest = objects.digest(b"a manifest")
    with store.lock("test"):
        files.write_packset(manifest, created[:2])
    reader = packfiles.PackFiles(store.path, store.place)
    reader.load(reader.packset(manifest))
    wanted = chunks(40)[:4]  # these lie in the first two packs
    for c in wanted:
        assert reader._where.get(objects.digest(c)) is not None
    assert set(reader._sizes) == set(created[:2])
    assert reader.packset(objects.digest(b"no such entry")) is None


def test_a_writer_never_stores_an_object_twice(store):
    data = chunks(10)
    _, created = write(store, data)
    again = packfiles.PackFiles(store.path, store.place)
    with store.lock("test"):
        w = again.writer()
        assert not any(w.add(objects.digest(c), objects.compress(c)) for c in data)
        w.flush()
    assert w.created == [] and sorted(again.packs()) == sorted(created)


def test_a_roll_back_removes_the_packs_the_writer_stored(store):
    files, created = write(store, chunks(6, seed=2))
    with store.lock("test"):
        w = files.writer(1)  # one pack per object
        for c in chunks(5, seed=3):
            w.add(objects.digest(c), objects.compress(c))
        assert len(w.created) == 5
        w.rollback()
    assert sorted(files.packs()) == sorted(created)
    assert files.locate(objects.digest(chunks(5, seed=3)[0])) is None


def test_damaged_packs_and_pack_sets_are_errors_never_wrong_bytes(store):
    data = chunks(12)
    files, created = write(store, data, target=1 << 20)
    (pack,) = created
    path = paths.pack_path(store.path, pack)
    victim = data[5]
    loc = files.locate(objects.digest(victim))
    raw = bytearray(path.read_bytes())
    raw[loc.offset + 7] ^= 0x04
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptObject):
        read(files, victim)
    assert all(read(files, c) == c for c in data if c is not victim)  # neighbours intact
    os.truncate(path, loc.offset + 3)
    fresh = packfiles.PackFiles(store.path, store.place)
    with pytest.raises(CorruptObject, match="shorter than its index"):
        fresh.read(fresh.locate(objects.digest(data[-1])))
    path.unlink()
    fresh = packfiles.PackFiles(store.path, store.place)
    with pytest.raises(ObjectMissing, match="missing"):
        fresh.read(fresh.locate(objects.digest(data[0])))
    # Pack sets.
    manifest = objects.digest(b"m")
    with store.lock("test"):
        files.write_packset(manifest, [pack])
    ps = paths.packset_path(store.path, manifest)
    good = ps.read_bytes()
    for bad, why in [
        (good[:-1] + bytes([good[-1] ^ 1]), "checksum"),
        (b"VMLPSET2" + good[8:], "not a pack set"),
        (good[:20], "not a pack set"),
    ]:
        ps.write_bytes(bad)
        with pytest.raises(CorruptObject, match=why):
            files.packset(manifest)


def test_many_readers_across_more_packs_than_open_descriptors(store, monkeypatch):
    monkeypatch.setattr(transport, "OPEN_FILES", 3)
    fds_before = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    data = chunks(60, seed=4)
    _, created = write(store, data, target=1)  # one pack per object
    assert len(created) == 60
    reader = packfiles.PackFiles(store.path, store.place)
    order = [c for _ in range(5) for c in data]
    random.Random(5).shuffle(order)
    with ThreadPoolExecutor(8) as pool:
        assert all(got == want for got, want in zip(pool.map(lambda c: read(reader, c), order), order, strict=True))
    assert len(reader.transport._open) <= 3
    reader.close()
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) <= fds_before  # nothing leaked


def test_a_dropped_reader_closes_its_descriptors(store):
    data = chunks(10, seed=6)
    write(store, data, target=1)
    fds_before = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    reader = packfiles.PackFiles(store.path, store.place)
    assert all(read(reader, c) == c for c in data)
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) >= fds_before + 10
    del reader  # as a repository opened again after a config change drops the old one
    gc.collect()
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) <= fds_before
