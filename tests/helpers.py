"""Helpers the test modules share (no test module imports another)."""

import io
import json
import mmap
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import blake3

from vml import config
from vml.entries.envtree import Record
from vml.errors import ObjectMissing
from vml.remotes import catalog as catalogs
from vml.repo import chunkmap, objects, packfiles, packreader, paths
from vml.repo.packs import Index
from vml.repo.repository import Repository
from vml.repo.store import FORMAT, METADATA_LIMIT, Store

CS = 4096


def registered(home: Path, path: Path, name: str = "rep", chunk_size: int = CS, format: int = FORMAT) -> Repository:
    """A new repository at ``path``, registered in ``home`` as ``name``, opened as vml opens it."""
    Store.create(path, chunk_size=chunk_size, format=format)
    with config.editing(home) as cfg:
        cfg.register(name, path)
    return config.Config.load(home).open(name)


def stored_files(repo_path: Path) -> list[str]:
    """Every file that holds objects: loose objects, packs, their indexes and pack sets."""
    return sorted(
        str(p.relative_to(repo_path))
        for d in (paths.OBJECTS, paths.PACKS, paths.PACKSETS)
        for p in (repo_path / d).rglob("*")
        if p.is_file()
    )


def snapshot(repo_path):
    """Everything that defines a repository's state: refs and the set of stored files."""
    return (repo_path / "refs.json").read_text(), stored_files(repo_path)


def stored_place(repo_path: Path, digest: bytes) -> tuple[Path, int, int]:
    """Where an object's stored bytes lie: (file, offset, length), a loose file or a frame in a pack."""
    loose = paths.object_path(repo_path, digest)
    if loose.exists():
        return loose, 0, loose.stat().st_size
    files = packfiles.PackFiles(repo_path, None)
    loc = files.locate(digest)
    assert loc is not None, f"object {digest.hex()} is not stored in {repo_path}"
    return paths.pack_path(repo_path, loc.pack), loc.offset, loc.length


def flip_stored(repo_path: Path, digest: bytes, at: float = 0.5) -> Path:
    """Flip every bit of one byte of an object's stored bytes (at that fraction of them); the file changed."""
    path, offset, length = stored_place(repo_path, digest)
    with open(path, "r+b") as f:
        f.seek(offset + int(at * (length - 1)))
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    return path


def remove_stored(repo_path: Path, digest: bytes) -> Path:
    """Make an object missing: its loose file, or the pack it lies in (its index stays). The file removed."""
    path, _, _ = stored_place(repo_path, digest)
    path.unlink()
    return path


def assert_untouched(vml, repo_path, before):
    assert snapshot(repo_path) == before
    assert list((repo_path / "tmp").iterdir()) == []
    assert vml("verify", "--repo", repo_path).returncode == 0


def rewrite_bundle(src, dst, change):
    """Copy a bundle, passing each (name, data) through ``change`` (None drops it)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin:
            data = tin.extractfile(m).read()
            new = change(m.name, data)
            if new is None:
                continue
            info = tarfile.TarInfo(new[0])
            info.size = len(new[1])
            tout.addfile(info, io.BytesIO(new[1]))


def manifest(name="x", size=2 * CS, map_digest=None, files=(), **over) -> bytes:
    """A manifest made by hand, of one disk x (4 KiB chunks unless ``chunk_size`` says otherwise)."""
    doc = {
        "format": 1,
        "name": name,
        "kind": "full",
        "created": "2026-11-21T10:00:00Z",
        "message": "",
        "chunk_size": CS,
        "parent": None,
        "base": None,
        "disks": [{"name": "x", "size": size, "map": (map_digest or objects.digest(chunkmap.MAGIC)).hex()}],
        "files": list(files),
    }
    doc.update(over)
    return json.dumps(doc).encode()


def bundle(path, entries, blobs, objects_count=None):
    """A bundle made by hand: entries [(name, manifest bytes)], plus raw contents to store."""
    contents = {objects.digest(b): b for b in blobs}
    contents.update({objects.digest(m): m for _, m in entries})
    index = {
        "format": 1,
        "entries": [{"name": n, "manifest": objects.digest(m).hex()} for n, m in entries],
        "requires": [],
        "objects": len(contents) if objects_count is None else objects_count,
    }
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for name, data in [("vml-bundle.json", json.dumps(index).encode())] + [
            (f"objects/{d.hex()}", objects.compress(b)) for d, b in contents.items()
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def child_peak_rss(vml, *args) -> tuple[subprocess.CompletedProcess, int]:
    """Run `vml ARGS`; return its result and its peak resident memory in bytes."""
    code = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run([sys.executable, '-m', 'vml', *sys.argv[1:]], capture_output=True, text=True)\n"
        "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr)\n"
        "sys.exit(r.returncode)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], env=vml.env, capture_output=True, text=True, check=False
    )
    *err, peak = r.stderr.strip().splitlines()
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout, "\n".join(err)), int(peak)


def mtype(image: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mtype", "-i", str(image), f"::{name}"], capture_output=True, text=True, check=False)


def fill(fs: Path, leave: int = 0) -> Path:
    """Take all but about ``leave`` bytes of file system ``fs``; return the file that does."""
    filler = fs / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(fs)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    with open(filler, "wb") as f:
        if size:
            os.posix_fallocate(f.fileno(), 0, size)
    return filler


class PublishedObjects:
    """The loose objects of a published directory (manifests and chunk maps), read as Repository reads a Store."""

    def __init__(self, root: Path):
        self.path = root

    def object_path(self, digest: bytes) -> Path:
        h = digest.hex()
        return self.path / "objects" / h[:2] / h[2:]

    def prepare(self, manifest: bytes) -> None:
        pass

    def has(self, digest: bytes) -> bool:
        return self.object_path(digest).exists()

    def read_raw(self, digest: bytes) -> bytes:
        try:
            return self.object_path(digest).read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(f"{self.object_path(digest)}: missing") from None

    def read(self, digest: bytes, limit: int) -> bytes:
        return objects.decode(self.read_raw(digest), digest, limit, str(self.object_path(digest)))


def check_published(pub: Path, public) -> catalogs.Catalog:
    """The catalog ``pub`` serves, once checked: it verifies; every pack set and index is the one
    it names, and every pack is complete; every object its manifests need is there, loose or in a
    pack of the entry's pack set; and every object is the one its name says."""
    cat = catalogs.verify((pub / "catalog.json").read_bytes(), public, str(pub))
    assert cat.packsets.keys() == cat.manifests
    in_pack = {}
    for pack, digest in cat.indexes.items():
        data = paths.index_path(pub, pack).read_bytes()
        assert blake3.blake3(data).digest() == digest, f"index of {pack.hex()} is not the one the catalog names"
        body = paths.pack_path(pub, pack).read_bytes()
        assert blake3.blake3(body).digest() == pack, f"pack {pack.hex()} is not whole"
        for d, loc in Index(data, "test", pack):
            objects.decode(body[loc.offset : loc.offset + loc.length], d, METADATA_LIMIT, f"pack {pack.hex()}")
            in_pack[d] = pack
    repo = Repository(PublishedObjects(pub), cat.repository)
    for manifest, digest in cat.packsets.items():
        data = paths.packset_path(pub, manifest).read_bytes()
        assert blake3.blake3(data).digest() == digest
        packs = set(packreader.decode_packset(data, "test"))
        assert packs <= cat.indexes.keys()
        chunks = repo.needed_objects([manifest]) - set(m for m, _ in repo.data_chain(manifest))
        chunks -= {md for _, m in repo.data_chain(manifest) for md in m.map_digests()}
        assert {in_pack.get(d) for d in chunks} <= packs, f"a chunk of {manifest.hex()} is outside its pack set"
    needed = repo.needed_objects(cat.manifests)
    present = {p.parent.name + p.name: p for p in (pub / "objects").glob("*/*") if not p.name.startswith(".")}
    missing = {d.hex() for d in needed if d not in in_pack} - set(present)
    assert not missing, f"{pub}: the catalog names objects that are not there: {sorted(missing)[:3]}"
    for name, p in present.items():
        objects.decode(p.read_bytes(), bytes.fromhex(name), METADATA_LIMIT, str(p))
    return cat


def direct_read(fd: int, offset: int, size: int) -> bytes:
    """pread on an O_DIRECT descriptor, into a page-aligned buffer as O_DIRECT needs."""
    buf = mmap.mmap(-1, size)
    try:
        n = os.preadv(fd, [buf], offset)
        return buf[:n]
    finally:
        buf.close()


ENV_UID = 1000  # alice's number in the guest a crafted backup comes from
OLD_NS = 1_600_000_000 * 10**9  # a time long past, for files in crafted backups


def crafted_backup(vml_home: Path, name: str, files: list[tuple[Record, bytes]], *, repo="rep", **meta) -> None:
    """An environment entry in ``repo`` written by the library's own writer: well-formed, saying what it is told.

    ``files`` are records and the contents of the regular ones; ``meta``
    replaces keys of a plain description of alice's home.
    """
    from vml import config
    from vml.entries import envtree
    from vml.entries.save import write_entry
    from vml.repo.manifest import Stream

    cs = envtree.CHUNK_SIZE
    files = sorted(files, key=lambda f: f[0].path)
    slot = 0
    for r, content in files:
        if r.type == "f":
            r.size, r.slot = len(content), slot
            slot += r.slots(cs)
    records = [r for r, _ in files]
    desc = {
        "format": 1,
        "user": "alice",
        "home": "/home/alice",
        "os": {"id": "cernvm", "version_id": "4.1"},
        "from": {"entry": "crafted"},
        "patterns": {"include": [], "exclude": [], "add": []},
        "environment": {"variables": {}, "skipped": [], "files": []},
        "source": "login files (parsed, not executed)",
        "files": len(records),
        "bytes": sum(r.size for r in records),
        "owners": {"users": {}, "groups": {}},
        **meta,
    }

    def data():
        for r, content in files:
            for i in range(r.slots(cs) if r.type == "f" else 0):
                yield r.slot + i, content[i * cs : (i + 1) * cs].ljust(cs, b"\0")

    def build(writer, plan):
        pages = envtree.pages(records, cs)
        index = writer.store_chunks(((i, p.ljust(cs, b"\0")) for i, p in enumerate(pages)), len(pages) * cs, None)
        stored = writer.store_chunks(data(), slot * cs, None)
        return [Stream(envtree.INDEX, len(pages) * cs, index), Stream(envtree.DATA, slot * cs, stored)], []

    write_entry(config.Config.load(vml_home).open(repo), name, build, chunk_size=cs, extra={envtree.KEY: desc})


def d(path: str, uid: int = ENV_UID) -> tuple[Record, bytes]:
    return Record(path, "d", 0o755, uid, uid, OLD_NS), b""


def f(path: str, content: bytes, mode: int = 0o644, uid: int = ENV_UID, **extra) -> tuple[Record, bytes]:
    return Record(path, "f", mode, uid, uid, OLD_NS, **extra), content


def set_web_password(vml, password: str) -> subprocess.CompletedProcess:
    """`vml web --set-password`, given ``password`` as a script gives it (one line on standard input)."""
    return subprocess.run(
        [sys.executable, "-m", "vml", "web", "--set-password"],
        input=password + "\n",
        env=vml.env,
        capture_output=True,
        text=True,
        check=True,
    )
