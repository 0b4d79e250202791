"""Checking out entries that may come from anyone: no special bits, nothing written through a link."""

import os
import stat

import pytest

from vml.repo import chunkmap, objects

from helpers import bundle, manifest


@pytest.fixture
def rep(vml, tmp_path):
    vml("init", tmp_path / "rep", "--chunk-size", "4K")
    return tmp_path / "rep"


def test_checkout_drops_setuid_setgid_and_sticky_bits_unless_asked(vml, rep, tmp_path):
    chunk = os.urandom(100)
    m = chunkmap.encode([(0, objects.digest(chunk), 0)])
    run_sh = {"name": "run.sh", "size": 100, "map": objects.digest(m).hex(), "mode": 0o6777}
    empty = chunkmap.encode([])
    b = bundle(
        tmp_path / "suid.vml", [("x", manifest(map_digest=objects.digest(empty), files=[run_sh]))], [m, chunk, empty]
    )
    vml("import", b)
    vml("checkout", "x", tmp_path / "co")
    assert (tmp_path / "co/run.sh").read_bytes() == chunk
    assert stat.S_IMODE(os.stat(tmp_path / "co/run.sh").st_mode) == 0o777
    vml("checkout", "x", tmp_path / "co2", "--keep-special-bits")
    assert stat.S_IMODE(os.stat(tmp_path / "co2/run.sh").st_mode) == 0o6777


def test_checkout_never_writes_through_links_in_the_destination(vml, rep, tmp_path):
    chunk = os.urandom(100)
    m = chunkmap.encode([(0, objects.digest(chunk), 0)])
    empty = chunkmap.encode([])
    conf = {"name": "conf/x.txt", "size": 100, "map": objects.digest(m).hex(), "mode": 0o644}
    b = bundle(tmp_path / "b.vml", [("x", manifest(map_digest=objects.digest(empty), files=[conf]))], [m, chunk, empty])
    vml("import", b)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "conf").symlink_to(elsewhere)
    msg = vml.fails("checkout", "x", dest)
    assert f"{dest / 'conf'}: not a directory" in msg
    assert list(elsewhere.iterdir()) == [] and sorted(os.listdir(dest)) == ["conf"]
    (dest / "conf").unlink()
    (dest / "x.img").symlink_to(elsewhere / "victim.img")
    assert "x.img already exists" in vml.fails("checkout", "x", dest, status=4)
    assert list(elsewhere.iterdir()) == [] and sorted(os.listdir(dest)) == ["x.img"]
    (dest / "x.img").unlink()
    vml("checkout", "x", dest)  # once the way is clear, it works
    assert (dest / "conf/x.txt").read_bytes() == chunk and sorted(os.listdir(dest)) == ["conf", "x.img"]
