"""Object encoding and the store: digests, limits, refs, the lock, crash-safe files."""

import json
import multiprocessing
import time

import pytest
import zstandard

from vml.errors import AlreadyExists, CorruptManifest, CorruptObject, Locked, NotFound, ObjectMissing, UsageError
from vml.repo import objects, paths
from vml.repo.store import Store


def test_objects_round_trip_and_are_named_by_content(tmp_path):
    store = Store.create(tmp_path / "r")
    with store.lock("test"):
        d, size, created = store.put(b"hello" * 1000)
        assert created and d == objects.digest(b"hello" * 1000)
        assert size == store.object_size(d) < 5000
        assert store.put(b"hello" * 1000)[2] is False  # already there
    assert store.read(d, 10_000) == b"hello" * 1000


def test_a_frame_declaring_more_than_the_limit_is_refused_before_decompressing():
    data = bytes(10 << 20)
    blob = zstandard.ZstdCompressor().compress(data)
    assert len(blob) < 2000
    with pytest.raises(CorruptObject, match="more than the limit"):
        objects.decode(blob, objects.digest(data), 1 << 20, "obj")


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b[:-4], "truncated|damaged"),
        (lambda b: b + b"trailing", "truncated or padded"),
        (lambda b: b"\x00" * 8 + b, "not a zstd frame"),
        (lambda b: zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 5000), "does not declare"),
        (lambda b: zstandard.ZstdCompressor().compress(b"y" * 5000), "does not match its name"),
    ],
)
def test_damaged_objects_are_refused(mangle, message):
    data = b"x" * 5000
    blob = mangle(zstandard.ZstdCompressor().compress(data))
    with pytest.raises(CorruptObject, match=message):
        objects.decode(blob, objects.digest(data), 1 << 20, "obj")


def test_store_reports_a_tampered_object_and_a_missing_one(tmp_path):
    store = Store.create(tmp_path / "r")
    with store.lock("test"):
        d, _, _ = store.put(b"a" * 4096)
    path = paths.object_path(store.path, d)
    path.write_bytes(zstandard.ZstdCompressor().compress(b"b" * 4096))
    with pytest.raises(CorruptObject, match=str(path)):
        store.read(d, 8192)
    path.unlink()
    with pytest.raises(ObjectMissing, match=d.hex()):
        store.read(d, 8192)


def test_create_refuses_existing_and_non_empty_directories(tmp_path):
    Store.create(tmp_path / "r")
    with pytest.raises(AlreadyExists):
        Store.create(tmp_path / "r")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(AlreadyExists):
        Store.create(tmp_path / "full")
    with pytest.raises(UsageError, match="chunk size"):
        Store.create(tmp_path / "odd", chunk_size=3000)
    with pytest.raises(NotFound):
        Store(tmp_path / "full")


def test_refs_change_atomically_and_only_under_the_lock(tmp_path):
    store = Store.create(tmp_path / "r")
    a, b = objects.digest(b"a"), objects.digest(b"b")
    with pytest.raises(RuntimeError):
        store.update_refs({"e1": a})
    with store.lock("test"):
        store.update_refs({"e1": a, "e2": b})
        store.update_refs({"e3": a}, delete=("e1",))
    assert store.refs() == {"e2": b, "e3": a}
    leftovers = [p.name for p in store.path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_damaged_refs_file_is_reported_by_name(tmp_path):
    store = Store.create(tmp_path / "r")
    store.refs_path.write_text('{"entries": {"../x": "00"}}')
    with pytest.raises(CorruptManifest, match=r"refs\.json"):
        store.refs()


def _hold_lock(path, ready, release):
    store = Store(path)
    with store.lock("vml save holder"):
        ready.set()
        release.wait(30)


def test_a_second_writer_waits_then_names_the_holder(tmp_path):
    store = Store.create(tmp_path / "r")
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    p = multiprocessing.Process(target=_hold_lock, args=(store.path, ready, release))
    p.start()
    try:
        assert ready.wait(30)
        t0 = time.monotonic()
        with pytest.raises(Locked, match=rf"pid {p.pid} \(vml save holder\)"), store.lock("second", timeout=0.5):
            pass
        assert time.monotonic() - t0 >= 0.5
    finally:
        release.set()
        p.join(30)
    with store.lock("third", timeout=5):
        pass


def test_the_next_writer_clears_what_a_dead_writer_left_in_tmp(tmp_path):
    store = Store.create(tmp_path / "r")
    (store.tmp_dir / "obj.leftover").write_bytes(b"partial")
    (store.tmp_dir / "save.dir").mkdir()
    with store.lock("test"):
        assert list(store.tmp_dir.iterdir()) == []


def test_create_is_all_or_nothing(tmp_path):
    store = Store.create(tmp_path / "r", chunk_size=64 << 10)
    meta = json.loads((store.path / "vml-repository.json").read_text())
    assert meta == {"format": 2, "chunk_size": 65536, "digest": "blake3", "compression": "zstd"}
    assert len(list((store.path / "objects").iterdir())) == 256
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no staging directory left


def test_a_repository_with_a_feature_this_vml_does_not_know_is_refused_whole(tmp_path):
    """A later vml may add to format 2 (e.g. sub-chunk frames); it names the addition, and this one refuses."""
    store = Store.create(tmp_path / "r", chunk_size=64 << 10)
    meta_path = store.path / "vml-repository.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"features": []}))
    assert Store(store.path).format == 2  # none is none
    meta_path.write_text(json.dumps(meta | {"features": ["subframes"]}))
    with pytest.raises(CorruptManifest, match="uses subframes, which this vml does not know; upgrade vml"):
        Store(store.path)
    meta_path.write_text(json.dumps(meta | {"features": "subframes"}))
    with pytest.raises(CorruptManifest, match="features must be a list"):
        Store(store.path)
