"""The fault suite: what VML promises when processes die, disks fill up and inputs lie.

Each loop repeats one fault many times (50 in CI, 1000 with --faults-long or
VML_FAULTS_LONG=1) and checks the promise after every try; the session ends
with a table of tries and how many held (docs/reliability.md has the figures
of a long run and what each loop promises). Commands run as real processes,
forked from a server that has imported vml already (tests/forker.py), so a
try costs milliseconds, and are killed with SIGKILL at a random moment of
their work.
"""

import errno
import math
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from vml import config, keys
from vml.config import Config
from vml.entries import bundle
from vml.entries.maintenance import gc, remove, verify
from vml.entries.reader import FETCH_AHEAD
from vml.entries.save import save_source
from vml.errors import Corrupt
from vml.remotes import catalog
from vml.repo import leases, paths
from vml.repo.chunkmap import ChunkTable
from vml.repo.objects import decode
from vml.repo.repository import Repository
from vml.repo.store import METADATA_LIMIT, Store
from vml.vms import areas
from vml.vms.areas import Area

from conftest import add_remote, need_fuse, set_remote
from forker import Forker
from helpers import check_published, direct_read, fill, registered, stored_files, stored_place
from servers import FaultProxy

CS = 4096


@pytest.fixture
def forker(tmp_path):
    f = Forker(tmp_path)
    yield f
    f.close()


@pytest.fixture
def rep(home, tmp_path):
    """Repository "rep" (4 KiB chunks) registered in ``home``, and a way to open it afresh."""
    registered(home, tmp_path / "rep")
    return tmp_path / "rep"


def open_repo(path: Path) -> Repository:
    """The repository as a new reader sees it (no cached manifests)."""
    return Repository(Store(path), "rep")


def image(rng: random.Random, chunks: int, density: float = 0.7) -> bytes:
    """A disk of ``chunks`` chunks: random data, repeated text and holes."""
    out = bytearray()
    for _ in range(chunks):
        r = rng.random()
        if r < density / 2:
            out += rng.randbytes(CS)
        elif r < density:
            out += (b"analysis %d " % rng.randrange(1000)) * (CS // 12) + bytes(CS % 12)
        else:
            out += bytes(CS)
    return bytes(out)


def content(repo: Repository, name: str) -> bytes:
    """Every byte of the entry's one disk, read chunk by chunk and checked."""
    entry = repo.entry(name)
    (table,) = repo.resolve(entry.digest).disks.values()
    return b"".join(repo.read_chunk(table, i, name) for i in range(table.count))


def write_disk(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class Killer:
    """Starts commands and SIGKILLs them at a random moment of their work.

    The moment is drawn from a window that adapts, shrinking after a
    command that finished first and growing after one that was killed, so
    that about half the kills land inside the work, spread over all of it.
    """

    def __init__(self, forker: Forker, home: Path, window: float):
        self.forker, self.home, self.window = forker, home, window

    def __call__(self, *args) -> int:
        """Run `vml ARGS` and kill it somewhere; its exit status (0 if it finished first, -9 if killed)."""
        child = self.forker.start(self.home, *args)
        time.sleep(random.uniform(0, self.window))
        child.kill()
        code = child.wait()
        assert code in (0, -9), child.output()
        self.window *= 0.85 if code == 0 else 1.15
        return code


def assert_valid(path: Path, expected: dict[str, bytes]) -> Repository:
    """`vml verify` is clean, and every entry in ``expected`` reads exactly so."""
    repo = open_repo(path)
    assert verify(repo) == []
    for name, data in expected.items():
        assert content(repo, name) == data, name
    return repo


# -- kill -9 at random points ------------------------------------------------------


def test_kill_9_during_save(faults, forker, home, rep, tmp_path):
    rng = random.Random(1)
    base = image(rng, 256)
    save_source(open_repo(rep), "base", write_disk(tmp_path / "d.img", base))

    def changed() -> bytes:  # new chunks each time, so every save has work to do
        new = bytearray(base)
        new[40 * CS : 200 * CS] = image(rng, 160, 0.9)
        return bytes(new)

    disk = write_disk(tmp_path / "d.img", changed())
    kill = Killer(forker, home, forker.timed(home, "save", "timing", "--from", disk, "--parent", "base"))
    loop = faults("kill -9 during vml save")
    for attempt in loop:
        with attempt:
            name = f"k{attempt.index}"
            new = changed()
            write_disk(disk, new)
            code = kill("save", name, "--from", disk, "--parent", "base")
            repo = assert_valid(rep, {"base": base})
            if name in repo.refs():
                assert content(repo, name) == new
                loop.outcome("finished")
            else:
                assert code == -9
                loop.outcome("killed mid-way")
            if attempt.index % 20 == 19:  # keep the repository small, so each verify costs the same
                for old in [n for n in repo.refs() if n != "base"]:
                    remove(repo, old)
                gc(repo)
    code, out = forker.run(home, "save", "after", "--from", disk, "--parent", "base")
    assert code == 0 and not list((rep / "tmp").iterdir()), out


def test_kill_9_during_import(faults, forker, home, rep, tmp_path):
    rng = random.Random(2)
    data = image(rng, 384, 0.9)
    save_source(open_repo(rep), "big", write_disk(tmp_path / "d.img", data))
    b = bundle.export(open_repo(rep), "big", tmp_path / "big.vml", full=True)
    assert b.objects > 300
    target = tmp_path / "target"
    Store.create(target, chunk_size=CS)
    kill = Killer(forker, home, forker.timed(home, "import", tmp_path / "big.vml", "--repo", target))
    loop = faults("kill -9 during vml import")
    for attempt in loop:
        with attempt:
            store = Store(target)
            with store.lock("test: start over"):
                store.update_refs(delete=("big",))
            gc(open_repo(target))
            code = kill("import", tmp_path / "big.vml", "--repo", target)
            repo = assert_valid(target, {})
            if "big" in repo.refs():
                assert content(repo, "big") == data
                loop.outcome("finished")
            else:
                assert code == -9
                loop.outcome("killed mid-way")


def test_kill_9_during_gc(faults, forker, home, rep, tmp_path):
    rng = random.Random(3)
    kept = image(rng, 128)
    repo = open_repo(rep)
    save_source(repo, "kept", write_disk(tmp_path / "d.img", kept))
    # An area on an entry that is then removed: gc must keep what it reads, killed or not.
    leased = image(rng, 64)
    areas.create_area(home, "w", repo, save_source(repo, "leased", write_disk(tmp_path / "d.img", leased)))
    remove(repo, "leased", force=True)

    def make_garbage(n: int) -> None:
        r = open_repo(rep)
        save_source(r, f"g{n}", write_disk(tmp_path / "g.img", image(rng, 128, 0.9)))
        remove(r, f"g{n}")

    make_garbage(-1)
    kill = Killer(forker, home, forker.timed(home, "gc"))
    loop = faults("kill -9 during vml gc")
    for attempt in loop:
        with attempt:
            make_garbage(attempt.index)
            code = kill("gc")
            assert_valid(rep, {"kept": kept})
            with Area(home, "w") as a:
                assert a.read("d", 0, len(leased)) == leased
            loop.outcome("finished" if code == 0 else "killed mid-way")
    assert gc(open_repo(rep)).removed >= 0


def test_kill_9_during_gc_repacking_format_2(faults, forker, home, tmp_path):
    rng = random.Random(31)
    path = tmp_path / "rep2"
    registered(home, path, name="rep2", format=2)
    kept = image(rng, 96, 0.9)
    save_source(open_repo(path), "kept", write_disk(tmp_path / "d.img", kept))

    def make_sparse_packs(n: int) -> dict[str, bytes]:
        """g{n} then h{n} rewriting half of it; g{n} removed: its packs stay half live."""
        r = open_repo(path)
        g = image(rng, 96, 0.9)
        save_source(r, f"g{n}", write_disk(tmp_path / "g.img", g))
        h = g[: 48 * CS] + image(rng, 48, 0.9)
        save_source(r, f"h{n}", write_disk(tmp_path / "g.img", h), parent=f"g{n}")
        remove(r, f"g{n}", reparent=True)
        return {f"h{n}": h}

    expected = {"kept": kept, **make_sparse_packs(-1)}
    kill = Killer(forker, home, forker.timed(home, "gc", "--repo", "rep2"))
    loop = faults("kill -9 during vml gc repacking (format 2)", tries=20, long_tries=400)
    for attempt in loop:
        with attempt:
            expected |= make_sparse_packs(attempt.index)
            code = kill("gc", "--repo", "rep2")
            assert_valid(path, expected)
            loop.outcome("finished" if code == 0 else "killed mid-way")
    code, out = forker.run(home, "gc", "--repo", "rep2")
    assert code == 0, out
    assert_valid(path, expected)


def test_kill_9_during_upgrade(faults, forker, home, tmp_path):
    rng = random.Random(32)
    template = tmp_path / "format1"
    registered(home, template, name="template", format=1)
    data = {"e0": image(rng, 128, 0.9)}
    save_source(open_repo(template), "e0", write_disk(tmp_path / "d.img", data["e0"]))
    for i in (1, 2):
        data[f"e{i}"] = data[f"e{i - 1}"][: 64 * CS] + image(rng, 64, 0.9)
        save_source(open_repo(template), f"e{i}", write_disk(tmp_path / "d.img", data[f"e{i}"]), parent=f"e{i - 1}")
    path = tmp_path / "rep"
    with config.editing(home) as cfg:
        cfg.register("rep", path)

    def fresh() -> None:
        subprocess.run(["rm", "-rf", str(path)], check=True)
        subprocess.run(["cp", "-a", str(template), str(path)], check=True)

    fresh()
    kill = Killer(forker, home, forker.timed(home, "upgrade", "--repo", "rep"))
    loop = faults("kill -9 during vml upgrade", tries=20, long_tries=400)
    for attempt in loop:
        with attempt:
            fresh()
            code = kill("upgrade", "--repo", "rep")
            assert_valid(path, data)
            how = "finished" if code == 0 else f"killed mid-way, format {Store(path).format}"
            code, out = forker.run(home, "upgrade", "--repo", "rep")  # run again: it finishes
            assert code == 0, out
            repo = assert_valid(path, data)
            assert repo.store.format == 2
            loose = [d for d, _, _ in repo.store.iter_objects()]
            assert len(loose) == 3 * 2  # a manifest and a map per entry; every chunk is packed
            loop.outcome(how)


def test_kill_9_during_rm_reparent(faults, forker, home, rep, tmp_path):
    rng = random.Random(4)
    repo = open_repo(rep)
    a = image(rng, 128)
    save_source(repo, "a", write_disk(tmp_path / "d.img", a))
    loop = faults("kill -9 during vml rm --reparent")
    kill = None
    for attempt in loop:
        with attempt:
            i = attempt.index
            versions = {}
            data = bytearray(a)
            for name, parent, kind in ((f"b{i}", "a", "incremental"), (f"c{i}", f"b{i}", "differential")):
                start = rng.randrange(100)
                data[start * CS : (start + 20) * CS] = image(rng, 20, 0.9)
                save_source(open_repo(rep), name, write_disk(tmp_path / "d.img", bytes(data)), parent=parent, kind=kind)
                versions[name] = bytes(data)
            save_source(open_repo(rep), f"d{i}", write_disk(tmp_path / "d.img", image(rng, 128)), parent=f"c{i}")
            versions[f"d{i}"] = (tmp_path / "d.img").read_bytes()
            if kill is None:
                kill = Killer(forker, home, forker.timed(home, "rm", f"b{i}", "--reparent"))
                code = 0
            else:
                code = kill("rm", f"b{i}", "--reparent")
            repo = open_repo(rep)
            gone = f"b{i}" not in repo.refs()
            assert_valid(rep, {"a": a, **{n: d for n, d in versions.items() if not (gone and n == f"b{i}")}})
            loop.outcome("finished" if gone else "killed mid-way")
            assert gone or code == -9


def test_kill_9_during_publish(faults, forker, home, rep, tmp_path):
    rng = random.Random(5)
    keys.keygen(tmp_path / "key")
    public = keys.parse_public_key((tmp_path / "key.pub").read_text(), "key")
    out = tmp_path / "pub"
    save_source(open_repo(rep), "e", write_disk(tmp_path / "d.img", image(rng, 256)))
    kill = Killer(forker, home, forker.timed(home, "publish", out, "--key", tmp_path / "key"))
    loop = faults("kill -9 during vml publish")
    for attempt in loop:
        with attempt:
            before = catalog.verify((out / "catalog.json").read_bytes(), public, "catalog").revision
            save_source(open_repo(rep), f"e{attempt.index}", write_disk(tmp_path / "d.img", image(rng, 256, 0.9)))
            started = time.time()
            code = kill("publish", out, "--key", tmp_path / "key")
            served = catalog.verify((out / "catalog.json").read_bytes(), public, "catalog")
            assert served.revision in (before, before + 1)
            assert check_published(out, public) == served  # every file it names there, whole
            if served.revision > before:
                loop.outcome("finished")
            else:
                assert code == -9
                written = any(p.stat().st_mtime > started for p in stored_files_of(out))
                loop.outcome("killed after writing files" if written else "killed before writing files")
    code, text = forker.run(home, "publish", out, "--key", tmp_path / "key")  # completes over what was left
    assert code == 0, text
    for leftover in ("objects/*/.*", "packs/*/.*", "packsets/.*", ".catalog.json.*"):
        assert not list(out.glob(leftover))
    check_published(out, public)


def stored_files_of(out: Path) -> list[Path]:
    return [p for d in ("objects", "packs", "packsets") for p in (out / d).rglob("*") if p.is_file()]


def test_kill_9_during_area_save(faults, forker, home, rep, tmp_path):
    rng = random.Random(6)
    repo = open_repo(rep)
    base = image(rng, 256)
    areas.create_area(home, "w", repo, save_source(repo, "base", write_disk(tmp_path / "d.img", base)))
    expected = bytearray(base)

    def scribble() -> None:
        with Area(home, "w") as a:
            for _ in range(rng.randrange(1, 40)):
                off, data = rng.randrange(len(expected) - 3 * CS), image(rng, 2, 0.9)[: rng.randrange(1, 2 * CS)]
                a.write("d", off, data)
                expected[off : off + len(data)] = data
            a.sync()

    scribble()
    kill = Killer(forker, home, forker.timed(home, "save", "timing", "--area", "w"))
    loop = faults("kill -9 during vml save --area")
    for attempt in loop:
        with attempt:
            scribble()
            name = f"s{attempt.index}"
            code = kill("save", name, "--area", "w")
            with Area(home, "w") as a:  # every write is there, whatever step the save reached
                assert a.read("d", 0, len(expected)) == bytes(expected)
                saved = a.record.entry == name
            repo = assert_valid(rep, {"base": base})
            if name in repo.refs():
                assert content(repo, name) == bytes(expected)
                assert saved or code == -9  # killed after its ref landed, before the area moved on
                loop.outcome("finished" if saved else "entry saved, area not yet moved")
            else:
                assert code == -9 and not saved
                loop.outcome("killed mid-way")


# -- the mount killed while a guest writes --------------------------------------------


def mounted_area(forker: Forker, home: Path, mp: Path, area: str, disk: str):
    """Start `vml mount --foreground` in a child; return it once the area's disk shows."""
    child = forker.start(home, "mount", mp, "--foreground")
    path = mp / "areas" / area / f"{disk}.img"
    deadline = time.monotonic() + 20
    while not (os.path.ismount(mp) and path.exists()):
        assert child.returncode is None and time.monotonic() < deadline, child.output()
        time.sleep(0.01)
    return child, path


def guest(disk: Path, size: int, rng: random.Random, stop, acked: list, inflight: list) -> None:
    """Write and fsync at random until told to stop or the mount dies; note what was acknowledged."""
    try:
        fd = os.open(disk, os.O_RDWR)
        while not stop.is_set():
            off = rng.randrange(size - 3 * CS)
            data = rng.randbytes(rng.randrange(1, 3 * CS))
            inflight[:] = [(off, data)]
            os.pwrite(fd, data, off)
            os.fsync(fd)
            acked.append((off, data))
            inflight.clear()
    except OSError:
        pass  # the mount is gone: ENOTCONN; the descriptor dies with it


def test_the_mount_killed_during_fsynced_writes_loses_no_acknowledged_write(faults, forker, home, rep, tmp_path):
    need_fuse()
    rng = random.Random(7)
    repo = open_repo(rep)
    base = image(rng, 256)
    areas.create_area(home, "w", repo, save_source(repo, "base", write_disk(tmp_path / "d.img", base)))
    expected = bytearray(base)
    mp = tmp_path / "mnt"
    mp.mkdir()
    loop = faults("the mount killed during fsync'd area writes")
    for attempt in loop:
        with attempt:
            child, disk = mounted_area(forker, home, mp, "w", "d")
            acked, inflight, stop = [], [], threading.Event()
            writer = threading.Thread(target=guest, args=(disk, len(expected), rng, stop, acked, inflight))
            writer.start()
            time.sleep(random.uniform(0.02, 0.4))
            child.kill()
            child.wait()
            stop.set()
            writer.join(30)
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)
            assert not writer.is_alive()
            for off, data in acked:
                expected[off : off + len(data)] = data
            with Area(home, "w") as a:
                actual = a.read("d", 0, len(expected))
            for off, data in inflight:  # not acknowledged: each byte may be old or new
                old = expected[off : off + len(data)]
                got = actual[off : off + len(data)]
                assert all(g in (o, n) for g, o, n in zip(got, old, data, strict=True))
                expected[off : off + len(data)] = got
            assert actual == bytes(expected), f"{len(acked)} acknowledged writes"
            loop.outcome("writes acknowledged" if acked else "killed before any write")


# -- damaged objects ----------------------------------------------------------------


def flip_a_bit(path: Path, rng: random.Random, offset: int = 0, length: int | None = None):
    """Flip one random bit of the file's bytes [offset, offset + length) (all of it by default).

    Returns a function that puts the byte back.
    """
    if length is None:
        length = path.stat().st_size - offset
    pos = offset + rng.randrange(length)
    with open(path, "r+b") as f:
        f.seek(pos)
        old = f.read(1)
        f.seek(pos)
        f.write(bytes([old[0] ^ (1 << rng.randrange(8))]))

    def restore() -> None:
        with open(path, "r+b") as f:
            f.seek(pos)
            f.write(old)

    return restore


def flip_a_bit_of(repo_path: Path, digest: bytes, rng: random.Random):
    """Flip one random bit of an object's stored bytes, loose or in its pack; (the file, a function to undo it)."""
    path, offset, length = stored_place(repo_path, digest)
    return path, flip_a_bit(path, rng, offset, length)


def test_bit_flips_in_stored_objects_give_errors_never_wrong_bytes(faults, home, rep, tmp_path):
    rng = random.Random(8)
    loop = faults("a bit flipped in a stored object, read by the library")
    data = image(rng, max(256, loop.tries // 2), 0.95)
    repo = open_repo(rep)
    save_source(repo, "e", write_disk(tmp_path / "d.img", data))
    (table,) = repo.resolve(repo.entry("e").digest).disks.values()
    chunks = [i for i, _, _ in table.records()]
    for attempt in loop:
        with attempt:
            victim = rng.choice(chunks)
            path, restore = flip_a_bit_of(repo.store.path, table.digest(victim), rng)
            try:
                fresh = open_repo(rep)
                for i in sorted({victim, *rng.sample(chunks, 8)}):
                    want = data[i * CS : (i + 1) * CS]
                    try:
                        assert fresh.read_chunk(table, i, "e") == want
                    except Corrupt as e:
                        assert table.digest(i) == table.digest(victim), f"chunk {i} failed: {e}"
                        assert table.digest(victim).hex() in str(e) or str(path) in str(e)
                problems = verify(fresh, "e")
                assert problems and any(f"chunk {victim}" in p or str(path) in p for p in problems), problems
                loop.outcome("detected")
            finally:
                restore()


def test_bit_flips_read_through_the_mount_are_eio_for_that_chunk_only(faults, forker, home, rep, tmp_path):
    need_fuse()
    rng = random.Random(9)
    loop = faults("a bit flipped in a stored object, read through the mount")
    data = image(rng, max(256, 4 * loop.tries), 1.0)
    repo = open_repo(rep)
    save_source(repo, "e", write_disk(tmp_path / "d.img", data))
    (table,) = repo.resolve(repo.entry("e").digest).disks.values()
    mp = tmp_path / "mnt"
    mp.mkdir()
    child = forker.start(home, "mount", mp, "--foreground")
    try:
        deadline = time.monotonic() + 20
        while not (mp / "rep/e/d.img").exists():
            assert time.monotonic() < deadline, child.output()
            time.sleep(0.05)
        unread = [i for i, _, _ in table.records() if 0 < i < table.count - 1 and i % 4 == 1]
        rng.shuffle(unread)
        # O_DIRECT: no kernel readahead brings a victim into the page cache early.
        fd = os.open(mp / "rep/e/d.img", os.O_RDONLY | os.O_DIRECT)
        for attempt in loop:
            with attempt:
                victim = unread.pop()  # never read before: neither the kernel nor the mount has it cached
                _, restore = flip_a_bit_of(repo.store.path, table.digest(victim), rng)
                try:
                    started = time.monotonic()
                    try:
                        direct_read(fd, victim * CS, CS)
                        raise AssertionError(f"chunk {victim} read without an error")
                    except OSError as e:
                        assert e.errno == errno.EIO and time.monotonic() - started < 10, e
                    for i in (victim - 1, victim + 1):
                        assert direct_read(fd, i * CS, CS) == data[i * CS : (i + 1) * CS]
                finally:
                    restore()
                assert direct_read(fd, victim * CS, CS) == data[victim * CS : (victim + 1) * CS]  # errors not kept
                loop.outcome("EIO, neighbours intact")
        os.close(fd)
    finally:
        child.kill()
        child.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)


# -- a full disk ---------------------------------------------------------------------


def one_line_enospc(code: int, out: str, *names: str) -> None:
    """The output of a command refused for a full disk: one line, exit 10, naming what it was doing."""
    lines = out.strip().splitlines()
    assert code == 10 and len(lines) == 1 and lines[0].startswith("vml: error: "), out
    assert "no space left on device" in lines[0] and all(n in lines[0] for n in names), out


def test_a_full_disk_fails_every_operation_cleanly(faults, forker, home, tmp_path, tmpfs):
    """save, import, publish, area save and gc on a disk with too little room, and area writes on a full one."""
    small_fs = tmpfs("16m")
    rng = random.Random(10)
    full = small_fs / "rep"
    Store.create(full, chunk_size=CS)
    with config.editing(home) as cfg:
        cfg.register("full", full)
    Store.create(tmp_path / "roomy", chunk_size=CS)
    roomy = Repository(Store(tmp_path / "roomy"), "roomy")
    base = image(rng, 64)
    save_source(open_repo(full), "base", write_disk(tmp_path / "d.img", base))
    expected = {"base": base}
    areas.create_area(home, "w", open_repo(full), open_repo(full).entry("base"))
    in_area = bytearray(base)
    keys.keygen(tmp_path / "key")
    public = keys.parse_public_key((tmp_path / "key.pub").read_text(), "key")
    save_source(roomy, "pub0", write_disk(tmp_path / "p.img", image(rng, 64)))
    publish_dir = small_fs / "pub"
    assert forker.run(home, "publish", publish_dir, "--key", tmp_path / "key", "--repo", tmp_path / "roomy")[0] == 0
    # A home whose areas live on the small disk, for writes that meet a full disk.
    small_home = small_fs / "home"
    with config.editing(small_home) as cfg:
        cfg.register("roomy", tmp_path / "roomy")
    areas.create_area(small_home, "v", roomy, roomy.entry("pub0"))
    in_v = bytearray(content(roomy, "pub0"))

    ops = ["save", "import", "publish", "area save", "gc", "area write"]
    loop = faults("a full disk during save, import, publish, area save, gc and area writes", tries=60)
    for attempt in loop:
        with attempt:
            i, op = attempt.index, ops[attempt.index % len(ops)]
            data = image(rng, 256, 0.9)
            filler = fill(small_fs, rng.randrange(0, 3 << 20) if op not in ("gc", "area write") else 0)
            try:
                if op == "save":
                    code, out = forker.run(home, "save", f"s{i}", "--from", write_disk(tmp_path / "d.img", data))
                    if code == 0:
                        expected[f"s{i}"] = data
                    else:
                        one_line_enospc(code, out, f"'s{i}'")
                elif op == "import":
                    save_source(roomy, f"b{i}", write_disk(tmp_path / "b.img", data))
                    bundle.export(roomy, f"b{i}", tmp_path / "b.vml", full=True)
                    code, out = forker.run(home, "import", tmp_path / "b.vml", "--repo", "full")
                    if code == 0:
                        expected[f"b{i}"] = data
                    else:
                        one_line_enospc(code, out, "b.vml")
                elif op == "publish":
                    before = catalog.verify((publish_dir / "catalog.json").read_bytes(), public, "catalog")
                    save_source(roomy, f"p{i}", write_disk(tmp_path / "p.img", data))
                    args = ("publish", publish_dir, "--key", tmp_path / "key", "--repo", tmp_path / "roomy", f"p{i}")
                    code, out = forker.run(home, *args)
                    served = catalog.verify((publish_dir / "catalog.json").read_bytes(), public, "catalog")
                    assert served.revision == before.revision + (code == 0)
                    assert check_published(publish_dir, public) == served  # the old or the new, whole
                    if code:
                        one_line_enospc(code, out, "publishing into")
                elif op == "area save":
                    with Area(home, "w") as a:
                        off = rng.randrange(len(in_area) - 40 * CS)
                        a.write("d", off, data[: 40 * CS])
                        in_area[off : off + 40 * CS] = data[: 40 * CS]
                    code, out = forker.run(home, "save", f"a{i}", "--area", "w")
                    with Area(home, "w") as a:  # saved or not, the area holds every write
                        assert a.read("d", 0, len(in_area)) == bytes(in_area)
                    if code == 0:
                        expected[f"a{i}"] = bytes(in_area)
                    else:
                        one_line_enospc(code, out, f"'a{i}'")
                elif op == "gc":
                    code, out = forker.run(home, "gc", "--repo", "full")  # it frees space: a full disk is no excuse
                    assert code == 0, out
                else:
                    assert_area_writes_meet_enospc(small_home, "v", in_v, rng)
                loop.outcome(f"{op}: {'done' if op in ('gc', 'area write') or code == 0 else 'refused'}")
            finally:
                filler.unlink()
            assert_valid(full, expected)
            assert not list((full / "tmp").iterdir())


def assert_area_writes_meet_enospc(home: Path, area: str, expected: bytearray, rng: random.Random) -> None:
    """Write until the disk is full: the refused write says ENOSPC, and every acknowledged one stays."""
    with Area(home, area) as a:
        while True:
            off = rng.randrange(len(expected) - 8 * CS)
            data = rng.randbytes(rng.randrange(1, 8 * CS))
            try:
                a.write("p", off, data)
                a.sync("p")
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
            expected[off : off + len(data)] = data
        now = a.read("p", 0, len(expected))
    with Area(home, area) as a:  # reopened, as after a restart
        after = a.read("p", 0, len(expected))
    assert after == now
    # The refused write may have landed in part (whole blocks only); what landed is now the content.
    diff = [i for i in range(len(expected)) if expected[i] != now[i]]
    assert not diff or diff[-1] - diff[0] < 8 * CS, "a refused write touched more than its own range"
    expected[:] = now


# -- hostile input, at random ------------------------------------------------------


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random damage: flipped bits, a cut, a repeated or an overwritten stretch."""
    b = bytearray(data)
    how = rng.choice(["flip", "flips", "truncate", "repeat", "zero", "garbage"])
    pos = rng.randrange(len(b))
    if how == "flip":
        b[pos] ^= 1 << rng.randrange(8)
    elif how == "flips":
        for _ in range(rng.randrange(2, 20)):
            b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
    elif how == "truncate":
        del b[pos:]
    elif how == "repeat":
        n = rng.randrange(1, 2048)
        b[pos:pos] = b[pos : pos + n]
    elif how == "zero":
        b[pos : pos + rng.randrange(1, 2048)] = bytes(min(2048, len(b) - pos))[: len(b[pos : pos + 2048])]
    else:
        n = rng.randrange(1, 600)
        b[pos : pos + n] = rng.randbytes(n)
    return bytes(b), how


def test_damaged_bundles_are_refused_or_imported_whole(faults, forker, home, rep, tmp_path):
    rng = random.Random(11)
    source = Store.create(tmp_path / "source", chunk_size=CS)
    src = Repository(source, "source")
    base = image(rng, 48)
    save_source(src, "base", write_disk(tmp_path / "d.img", base))
    save_source(open_repo(rep), "base", tmp_path / "d.img")  # the receiver holds the base
    top = bytearray(base)
    top[8 * CS : 24 * CS] = image(rng, 16, 1.0)
    save_source(src, "top", write_disk(tmp_path / "d.img", bytes(top)), parent="base")
    good = bundle.export(src, "top", tmp_path / "top.vml")
    assert good.requires == ["base"]
    intact = (tmp_path / "top.vml").read_bytes()
    loop = faults("a damaged bundle imported")
    for attempt in loop:
        with attempt:
            damaged, how = mutate(intact, rng)
            (tmp_path / "bad.vml").write_bytes(damaged)
            before = stored_files(rep)
            code, out = forker.run(home, "import", tmp_path / "bad.vml")
            repo = assert_valid(rep, {"base": base})
            if code == 0:  # the damage missed everything that counts (padding, or the index's spacing)
                assert "top" in repo.refs() and content(repo, "top") == bytes(top), out
                with Store(rep).lock("test") as s:
                    s.update_refs(delete=("top",))
                gc(open_repo(rep))
                loop.outcome(f"{how}: imported whole")
            else:
                lines = out.strip().splitlines()
                assert code in (4, 6, 8) and len(lines) == 1 and "bad.vml" in lines[0], out
                assert stored_files(rep) == before
                loop.outcome(f"{how}: refused")


def test_damaged_image_headers_never_reach_outside_or_crash(faults, forker, home, rep, tmp_path):
    """Random damage to qcow2 and VMDK headers: refused in one line, or saved as qemu-img reads them."""
    rng = random.Random(12)
    work = tmp_path / "imgs"
    work.mkdir()
    raw = write_disk(work / "raw.img", image(rng, 64))
    sources = {}
    for fmt, opts in (("qcow2", []), ("vmdk", ["-o", "subformat=monolithicSparse"])):
        out = work / f"good.{fmt}"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *opts, str(raw), str(out)], check=True)
        sources[fmt] = out.read_bytes()
    loop = faults("a damaged qcow2 or VMDK header saved")
    for attempt in loop:
        with attempt:
            fmt = rng.choice(sorted(sources))
            # The parts that name sizes, offsets and files: qcow2's header and extensions,
            # the sparse VMDK's header and its embedded descriptor.
            start, end = (0, 512) if fmt == "qcow2" else rng.choice([(0, 512), (512, 1536)])
            data = sources[fmt]
            damaged, how = mutate(data[start:end], rng)
            path = write_disk(work / f"bad{attempt.index}.{fmt}", data[:start] + damaged + data[end:])
            code, out = forker.run(home, "save", f"i{attempt.index}", "--from", path)
            lines = out.strip().splitlines()
            assert code in (0, 9) and "internal error" not in out and "Traceback" not in out, out
            if code == 0:
                loop.outcome(f"{how}: saved")
            else:
                assert len(lines) == 1 and str(path) in lines[0], out
                loop.outcome(f"{how}: refused")
            path.unlink()
    assert verify(open_repo(rep)) == []


# -- two homes writing one repository ------------------------------------------------


def test_two_homes_writing_one_repository_lose_nothing(faults, forker, tmp_path, rep, home):
    """Home A saves, removes and collects; home B opens areas, writes, saves and closes them, at once."""
    rng = random.Random(13)
    home_b = tmp_path / "homeB"
    with config.editing(home_b) as cfg:
        cfg.register("rep", rep)
    (tmp_path / "b").mkdir()
    forker_b = Forker(tmp_path / "b")  # one per thread: a forker serves one caller at a time
    base = image(rng, 64)
    save_source(open_repo(rep), "base", write_disk(tmp_path / "d.img", base))
    expected = {"base": base}
    lock = threading.Lock()

    def as_a(i: int) -> None:
        data = image(random.Random(i), 64, 0.9)
        code, out = forker.run(home, "save", f"a{i}", "--from", write_disk(tmp_path / f"a{i}.img", data))
        assert code == 0, out
        with lock:
            expected[f"a{i}"] = data
            victims = sorted(n for n in expected if n.startswith("a") and n != f"a{i}")
        if victims:
            victim = random.Random(i).choice(victims)
            code, out = forker.run(home, "rm", victim)
            assert code == 0, out
            with lock:
                del expected[victim]
        code, out = forker.run(home, "gc")
        assert code == 0, out

    def as_b(i: int) -> None:
        with lock:
            on = random.Random(i).choice(sorted(n for n in expected if not n.startswith("a")))
            data = bytearray(expected[on])
        code, out = forker_b.run(home_b, "open", on, "--area", f"w{i}")
        assert code == 0, out
        with Area(home_b, f"w{i}") as a:
            off = random.Random(i).randrange(len(data) - 4 * CS)
            a.write("d", off, b"B" * 3 * CS)
            data[off : off + 3 * CS] = b"B" * 3 * CS
        code, out = forker_b.run(home_b, "save", f"b{i}", "--area", f"w{i}")
        assert code == 0, out
        with lock:
            expected[f"b{i}"] = bytes(data)
        code, out = forker_b.run(home_b, "close", f"w{i}")
        assert code == 0, out

    loop = faults("two homes saving, removing, collecting and saving areas at once", tries=25, long_tries=500)
    try:
        for attempt in loop:
            with attempt:
                errors = []

                def run(job, i, errors=errors):
                    try:
                        job(i)
                    except BaseException as e:
                        errors.append(e)

                threads = [threading.Thread(target=run, args=(job, attempt.index)) for job in (as_a, as_b)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
                assert not errors, errors
                assert_valid(rep, expected)
                assert leases.read_all(open_repo(rep)) == ([], [])
                loop.outcome("both homes done")
    finally:
        forker_b.close()


# -- remotes: damaged caches and replies, and remotes that hang ------------------------


def origin_blob(published: dict, digest: bytes) -> bytes:
    """An object exactly as the publisher wrote it (and the origin serves it), loose or in its pack."""
    path, offset, length = stored_place(published["pub"], digest)
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def url_of(published: dict, digest: bytes) -> str:
    """The path the origin serves an object at: its own, or its pack's (fetched by a Range request)."""
    path, _, _ = stored_place(published["pub"], digest)
    return "/" + str(path.relative_to(published["pub"]))


def remote_tables(repo: Repository) -> dict[str, ChunkTable]:
    """The one disk of each entry of the published rep1."""
    out = {}
    for name in ("base", "e2"):
        (out[name],) = repo.resolve(repo.entry(name).digest).disks.values()
    return out


def remote_chunks(tables: dict[str, ChunkTable]) -> dict[bytes, tuple[str, int]]:
    """Each chunk object of the entries, and one place where it is used: digest -> (entry, index)."""
    return {d: (name, i) for name, table in tables.items() for i, d, _ in table.records()}


def chunk_bytes(published: dict, name: str, table: ChunkTable, index: int) -> bytes:
    """The bytes chunk ``index`` of entry ``name`` must read as, from the image it was saved from."""
    image = published["image" if name == "e2" else "base_image"]
    with open(image, "rb") as f:
        return os.pread(f.fileno(), table.chunk_length(index), index * table.chunk_size)


def fetches_of(origin, since: int) -> list[str]:
    """Objects and packs (whole or a range of them) served by the origin after its request number ``since``."""
    return [
        p
        for _, p, st, _ in origin.requests()[since:]
        if p.startswith(("/objects/", "/packs/")) and not p.endswith(".idx") and st in (200, 206)
    ]


def cached_place(home: Path, published: dict, digest: bytes) -> tuple[Path, int, int]:
    """Where a preloaded object lies in the cache: its own file, or its frame in a pack kept whole there."""
    path, offset, length = stored_place(published["pub"], digest)
    if path.parent.parent.name == "packs":
        return home / "cache" / "cern" / "packs" / path.parent.name / path.name, offset, length
    return paths.object_path(home / "cache" / "cern", digest), 0, length


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def test_a_bit_flipped_in_a_cached_object_is_dropped_and_fetched_again(faults, vml, home, origin, published, caplog):
    """Manifests and chunk maps are cached as their own files, chunks in the packs a preload keeps whole."""
    rng = random.Random(21)
    add_remote(vml, origin, published)
    vml("cache", "preload", "cern:e2")
    repo = Config.load(home).open("cern")
    tables = remote_tables(repo)
    chunks = remote_chunks(tables)
    metadata = [d for d, _, _ in paths.objects_in(home / "cache" / "cern") if d is not None and d not in chunks]
    assert len(metadata) >= 4  # two manifests and their chunk maps
    assert all(cached_place(home, published, d)[0].parent.parent.name == "packs" for d in chunks)
    loop = faults("a bit flipped in a cached object")
    for attempt in loop:
        with attempt:
            # Any object; the few manifests and chunk maps get every fourth try, or chunks would take them all.
            d = rng.choice(metadata if attempt.index % 4 == 3 else sorted(chunks))
            path, offset, length = cached_place(home, published, d)
            good = origin_blob(published, d)
            assert read_at(path, offset, length) == good  # the tries before left the cache clean
            restore = flip_a_bit(path, rng, offset, length)
            try:
                decode(read_at(path, offset, length), d, METADATA_LIMIT, "flipped")
                harmless = True  # a bit zstd ignores (the frame header's unused bit): same content
            except Corrupt:
                harmless = False
            since = len(origin.requests())
            caplog.clear()
            fresh = Config.load(home).open("cern")  # a new reader: nothing of the entries in memory
            now = remote_tables(fresh)  # reads every manifest and chunk map from the cache
            assert {n: list(t.records()) for n, t in now.items()} == {n: list(t.records()) for n, t in tables.items()}
            if d in chunks:
                name, i = chunks[d]
                assert fresh.read_chunk(now[name], i, name) == chunk_bytes(published, name, tables[name], i)
            warned = [r.getMessage() for r in caplog.records if d.hex() in r.getMessage()]
            if harmless:
                assert fetches_of(origin, since) == [] and not warned
                restore()
                loop.outcome("flip harmless: same content, kept")
                continue
            assert fetches_of(origin, since) == [url_of(published, d)]  # that object only (a Range of its pack)
            assert len(warned) == 1 and "fetching it again" in warned[0] and "cache" in warned[0], warned
            if d in chunks:  # the damaged pack went; the chunk came alone, and a preload brings the pack again
                assert not path.exists()
                loose = paths.object_path(home / "cache" / "cern", d)
                assert loose.read_bytes() == good
                vml("cache", "preload", "cern:e2")
                assert read_at(path, offset, length) == good
                loose.unlink()  # as the preload left the cache: chunks only in their packs
            else:
                assert path.read_bytes() == good  # fetched again and cached again, as published
            loop.outcome(f"{'chunk' if d in chunks else 'metadata'}: detected, refetched")


def refusal(message: str) -> str:
    """What a refused reply's log line says was wrong with it, in short."""
    for why in (
        "does not match its name",
        "damaged zstd data",
        "truncated or padded",
        "not a zstd frame",
        "does not declare its size",
        "more than the limit",
    ):
        if why in message:
            return why
    return message.rsplit(": ", 1)[-1]


def test_a_bit_flipped_in_a_proxy_reply_is_refused_and_fetched_elsewhere(faults, vml, home, origin, published, caplog):
    rng = random.Random(22)
    bad = FaultProxy(origin.port, mode="corrupt", rng=random.Random(23))  # one random bit of each reply
    good = FaultProxy(origin.port)
    try:
        add_remote(vml, origin, published)
        # A proxy that failed is set aside for proxy_reset_after seconds: without a short one, every
        # try after the first would go to the clean proxy straight away and test nothing.
        set_remote(home, proxy=f"{bad.url};{good.url}", proxy_reset_after=0.001)
        repo = Config.load(home).open("cern")
        tables = remote_tables(repo)
        chunks = sorted(remote_chunks(tables).items())
        cache = repo.store.cache
        caplog.set_level("INFO", logger="vml.remotes.fetch")
        loop = faults("a bit flipped in a proxy's reply")
        for attempt in loop:
            with attempt:
                d, (name, i) = rng.choice(chunks)
                h = d.hex()
                path = paths.object_path(cache.path, d)
                path.unlink(missing_ok=True)  # not cached: this read must come through the proxies
                time.sleep(0.01)  # past proxy_reset_after, so this read starts with the first group again
                flips = bad.corrupted
                caplog.clear()
                assert repo.read_chunk(tables[name], i, name) == chunk_bytes(published, name, tables[name], i)
                assert bad.corrupted == flips + 1, "the corrupting proxy did not serve the object"
                refused = [
                    r.getMessage()
                    for r in caplog.records
                    if f"proxy {bad.url} failed: {url_of(published, d)[1:]}" in r.getMessage()
                ]
                if not refused:  # a bit zstd ignores: the reply was as good as the original
                    assert decode(path.read_bytes(), d, tables[name].chunk_size, h) == chunk_bytes(
                        published, name, tables[name], i
                    )
                    loop.outcome("flip harmless: same content")
                    continue
                assert len(refused) == 1, refused
                assert path.read_bytes() == origin_blob(published, d)  # what was cached came from the clean proxy
                loop.outcome(f"refused: {refusal(refused[0])}")
    finally:
        bad.stop()
        good.stop()


REMOTE_TIMEOUT = 2.0  # the remote's whole-fetch deadline: each try waits it out once
REMOTE_EIO_WITHIN = REMOTE_TIMEOUT + 5


def read_within(fd: int, offset: int, size: int, seconds: float) -> bytes:
    """direct_read, failing the try if it has not returned within ``seconds``.

    A read that hangs is left blocked in its thread (killing the mount in
    teardown ends it), so that one hang fails a try instead of the session.
    """
    done: dict = {}

    def read() -> None:
        try:
            done["data"] = direct_read(fd, offset, size)
        except OSError as e:
            done["error"] = e

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(seconds)
    if reader.is_alive():
        raise AssertionError(f"a read at offset {offset} still hangs after {seconds:g} s")
    if "error" in done:
        raise done["error"]
    return done["data"]


def test_a_remote_that_hangs_trickles_or_truncates_gives_eio_through_the_mount(
    faults, vml, home, origin, published, tmp_path
):
    """A read that cannot be served fails with EIO in bounded time, never with wrong bytes, and the mount stays up.

    Each try costs the remote's timeout (2 s, so that 50 tries take under two minutes): a stalled
    or trickling reply is only given up at the deadline, and a truncated one is retried until it.
    """
    need_fuse()
    rng = random.Random(24)
    mp = tmp_path / "mnt"
    mp.mkdir()
    proxy = FaultProxy(origin.port, rate=1000)
    forker = Forker(tmp_path)
    child = fd = None
    try:
        add_remote(vml, origin, published)
        # catalog_ttl: the catalog is not fetched again during the loop, so each try fetches one object.
        set_remote(home, proxy=proxy.url, timeout=REMOTE_TIMEOUT, connect_timeout=1.0, catalog_ttl=3600.0)
        child = forker.start(home, "mount", mp, "--foreground")
        deadline = time.monotonic() + 20
        while not (mp / "cern" / "e2").is_dir():
            assert time.monotonic() < deadline, child.output()
            time.sleep(0.05)
        (disk,) = [p for p in (mp / "cern" / "e2").iterdir() if p.suffix == ".img"]  # e2's maps come now
        repo = Config.load(home).open("cern")
        table = remote_tables(repo)["e2"]
        records = {i: (d, csize) for i, d, csize in table.records()}
        # O_DIRECT: no kernel readahead or page cache between the reads and the mount.
        fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
        kept = max(i for i in records if i % 2 == 0)  # the last: no read-ahead past it
        want_kept = chunk_bytes(published, "e2", table, kept)
        assert direct_read(fd, kept * table.chunk_size, table.chunk_size) == want_kept  # now in the mount's memory
        # Victims: never read, so neither the mount nor the cache has them; odd indexes, so no two
        # reads are of neighbours and the mount never takes them for a sequential reader to fetch
        # ahead for; past what the mount may already be fetching ahead of the kept chunk (FUSE can
        # split its read in two, which looks sequential); and large enough that a 1000 B/s trickle
        # cannot bring one within the timeout.
        # A pack fetched whole for that read-ahead holds more than those chunks: its others are out too.
        ahead = range(kept, kept + 2 + FETCH_AHEAD)
        seen, victims = {records[kept][0]} | {records[i][0] for i in ahead if i in records}, []
        fetched_whole = {url_of(published, d) for d in seen}
        for i, (d, csize) in sorted(records.items()):
            if i % 2 and i not in ahead and csize > 16 << 10 and d not in seen and not repo.store.has(d):
                if url_of(published, d) in fetched_whole:
                    continue
                seen.add(d)
                victims.append(i)
        rng.shuffle(victims)
        assert len(victims) >= 10, victims
        modes = ("stall", "slow", "truncate")
        loop = faults("a remote that hangs, trickles or truncates, read through the mount")
        for attempt in loop:
            with attempt:
                mode = modes[attempt.index % len(modes)]
                i = victims[attempt.index % len(victims)]
                assert not repo.store.has(records[i][0])  # failed reads keep nothing
                proxy.mode = mode
                logged = len(child.output())
                started = time.monotonic()
                try:
                    got = read_within(fd, i * table.chunk_size, 4096, REMOTE_EIO_WITHIN)
                except OSError as e:
                    took = time.monotonic() - started
                    assert e.errno == errno.EIO, e
                else:
                    right = got == chunk_bytes(published, "e2", table, i)[:4096]
                    raise AssertionError(f"chunk {i} read {'the right' if right else 'WRONG'} bytes through {mode}")
                why = child.output()[logged:]
                assert url_of(published, records[i][0])[1:] in why and "cannot fetch" in why, why
                # The mount is up and serves what it has, with the remote still broken.
                assert read_within(fd, kept * table.chunk_size, table.chunk_size, 5) == want_kept
                loop.outcome(f"{mode}: EIO within {math.ceil(took)} s")
        proxy.mode = "pass"
        for i in sorted(victims[: loop.tries]):  # the remote is back: no error and no damaged reply was kept
            assert direct_read(fd, i * table.chunk_size, 4096) == chunk_bytes(published, "e2", table, i)[:4096]
        assert os.path.ismount(mp)
    finally:
        if fd is not None:
            os.close(fd)
        if child is not None:
            child.kill()
            child.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)
        forker.close()
        proxy.stop()
