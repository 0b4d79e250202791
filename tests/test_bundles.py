"""The tar framing of bundles: headers forged, odd or truncated, and special files.

Bundles here are written block by block, so that each test says exactly
which header is wrong. Every refused bundle must end in one line naming it,
exit status 6 (never 70, an internal error), within 1 GiB of address space,
and leave the repository as it was.
"""

import json
import os
import resource
import subprocess
import sys
import tarfile

import pytest

from vml.repo import chunkmap, objects

from conftest import need
from helpers import assert_untouched, snapshot

CS = 4096
INDEX = "vml-bundle.json"
USTAR = b"ustar\x0000"
GNU = b"ustar  \x00"
END = bytes(1024)
CHUNK = os.urandom(CS)


def header(name, size, kind=b"0", *, size_field=None, magic=USTAR, signed=False) -> bytes:
    """One 512-byte tar header with a correct checksum (over signed bytes if ``signed``)."""
    h = bytearray(512)
    h[: len(name)] = name.encode()
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size if size_field is None else size_field
    h[136:148] = b"00000000000\0"
    h[156:157] = kind
    h[257:265] = magic
    h[265:268] = "vmé".encode("latin-1")  # uname: a byte past 127, where signed and unsigned sums differ
    h[148:156] = b" " * 8
    total = sum(b - 256 if signed and b > 127 else b for b in h)
    h[148:156] = b"%06o\0 " % total
    return bytes(h)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def member(name, data, kind=b"0", **kw) -> bytes:
    return header(name, len(data), kind, **kw) + padded(data)


def pax_records(records: dict) -> bytes:
    out = b""
    for key, value in records.items():
        body = b" %s=%s\n" % (key.encode(), str(value).encode())
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n += 1
        out += str(n).encode() + body
    return out


def pax(records: dict, kind=b"x", **kw) -> bytes:
    return member("././@PaxHeader", pax_records(records), kind, **kw)


def manifest(map_digest: bytes) -> bytes:
    """Entry x: one 2-chunk disk whose second chunk is CHUNK."""
    disk = {"name": "x", "size": 2 * CS, "map": map_digest.hex()}
    doc = {"format": 1, "name": "x", "kind": "full", "created": "2026-11-21T10:00:00Z", "message": ""}
    return json.dumps(doc | {"chunk_size": CS, "parent": None, "base": None, "disks": [disk], "files": []}).encode()


def contents(count=None):
    """A valid index (of ``count`` objects, by default the truth) and [(member name, stored object)]."""
    table = chunkmap.encode([(1, objects.digest(CHUNK), 0)])
    m = manifest(map_digest=objects.digest(table))
    objs = [(f"objects/{objects.digest(b).hex()}", objects.compress(b)) for b in (CHUNK, table, m)]
    index = {
        "format": 1,
        "entries": [{"name": "x", "manifest": objects.digest(m).hex()}],
        "requires": [],
        "objects": len(objs) if count is None else count,
    }
    return json.dumps(index).encode(), objs


def members(objs, **kw) -> bytes:
    return b"".join(member(n, d, **kw) for n, d in objs)


def plain(index, objs, **kw) -> bytes:
    """The index and the objects, with no end-of-archive marker."""
    return member(INDEX, index, **kw) + members(objs, **kw)


def bounded(limit=1 << 30):
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def import_in_bounds(vml, path, rep) -> subprocess.CompletedProcess:
    """`vml import` in 1 GiB of address space and 10 s: a forged size must not make it allocate or block."""
    return subprocess.run(
        [sys.executable, "-m", "vml", "import", str(path), "--repo", str(rep)],
        env=vml.env,
        capture_output=True,
        text=True,
        timeout=10,
        preexec_fn=bounded,
        check=False,
    )


def assert_refused(vml, rep, path, message, before):
    r = import_in_bounds(vml, path, rep)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 6 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"vml: error: {path}: ") and message in lines[0], lines[0]
    assert_untouched(vml, rep, before)


def pax_size_disagrees(index, objs):
    # The pax `size` record gives the index's true size; the ustar field says
    # 1 TiB. The old `_check_headers` walked by ustar sizes: it seeked 1 TiB
    # past the index header, hit the end of the file and passed the bundle.
    # tarfile went by the pax size, read the index, and then read the next
    # pax header, which the old check never saw, whole: file.read(2**62)
    # raised MemoryError, "internal error" with exit 70, from a 3 KB file.
    # Now the pax size is the only size: the index reads as it should and the
    # header of 2**62 bytes is refused before anything is read.
    return (
        pax({"size": len(index)})
        + header(INDEX, 0, size_field=b"\x80" + (1 << 40).to_bytes(11, "big"))
        + padded(index)
        + header("././@PaxHeader", 0, b"x", size_field=b"\x80" + (1 << 62).to_bytes(11, "big"))
    )


def raw(block_bytes):
    """Case builder for bytes that need no valid contents."""
    return lambda index, objs: block_bytes


def after_index(tail):
    """Case builder: a valid index, then ``tail(objs)``."""
    return lambda index, objs: member(INDEX, index) + tail(objs)


def with_count(count, build):
    return lambda index, objs: build(contents(count)[0], objs)


def flip_checksum_of_second_header(index, objs):
    data = bytearray(plain(index, objs) + END)
    second = len(member(INDEX, index))
    data[second + 1] ^= 1  # the name, under an unchanged checksum
    return bytes(data)


CASES = {
    "pax_size_disagrees": (pax_size_disagrees, "a tar header of 4611686018427387904 bytes"),
    "pax_4gib_object": (
        after_index(lambda objs: pax({"size": 4 << 30}) + header(objs[0][0], 0) + objs[0][1]),
        "is larger than any object may be",
    ),
    "pax_4gib_index": (
        lambda index, objs: pax({"size": 4 << 30}) + header(INDEX, 0) + index,
        "damaged bundle index (4294967296 bytes, more than 1048576)",
    ),
    "gnu_long_name": (
        after_index(lambda objs: member("././@LongLink", objs[0][0].encode() + b"\0", b"L") + members(objs)),
        "member '././@LongLink' is a GNU long name",
    ),
    "gnu_long_link": (after_index(lambda objs: member("././@LongLink", b"x\0", b"K")), "is a GNU long link name"),
    "pax_global": (
        after_index(lambda objs: pax({"comment": "hi"}, kind=b"g") + members(objs)),
        "is a global pax header",
    ),
    "symlink": (after_index(lambda objs: member(objs[0][0], b"", b"2")), "is a symbolic link"),
    "directory": (after_index(lambda objs: member("objects/", b"", b"5")), "member 'objects/' is a directory"),
    "hard_link": (after_index(lambda objs: member(objs[0][0], b"", b"1")), "is a hard link"),
    "fifo_member": (after_index(lambda objs: member("objects/x", b"", b"6")), "is a FIFO"),
    "device": (after_index(lambda objs: member("objects/x", b"", b"3")), "is a character device"),
    "sparse": (after_index(lambda objs: member(objs[0][0], b"", b"S")), "is a GNU sparse file"),
    "contiguous": (after_index(lambda objs: member(objs[0][0], b"", b"7")), "is a contiguous file"),
    "unknown_type": (after_index(lambda objs: member(objs[0][0], b"", b"Z")), "is of unknown type b'Z'"),
    "dotdot": (after_index(lambda objs: member("../x", objs[0][1])), "unexpected member '../x'"),
    "objects_dotdot": (
        after_index(lambda objs: member("objects/../../x", objs[0][1])),
        "unexpected member 'objects/../../x'",
    ),
    "pax_path_dotdot": (
        after_index(lambda objs: pax({"path": "objects/../../x"}) + member(objs[0][0], objs[0][1])),
        "unexpected member 'objects/../../x'",
    ),
    "uppercase_hex": (
        after_index(lambda objs: member(objs[0][0].upper().replace("OBJECTS", "objects"), objs[0][1])),
        "unexpected member 'objects/",
    ),
    "second_index": (after_index(lambda objs: member(INDEX, b"{}")), f"unexpected member '{INDEX}'"),
    "index_not_first": (lambda index, objs: members(objs) + END, f"no {INDEX} at its start"),
    "duplicate_objects": (
        with_count(4, lambda index, objs: plain(index, objs + objs[:1]) + END),
        "appears twice",
    ),
    "more_objects_than_the_index_says": (
        with_count(2, lambda index, objs: plain(index, objs) + END),
        "more objects than the 2 its index lists",
    ),
    "fewer_objects_than_the_index_says": (
        with_count(4, lambda index, objs: plain(index, objs) + END),
        "truncated: 3 of 4 objects present",
    ),
    "bad_checksum": (flip_checksum_of_second_header, "damaged tar header at byte"),
    "bad_checksum_first": (
        lambda index, objs: bytes([plain(index, objs)[0] ^ 1]) + plain(index, objs)[1:] + END,
        "not a VML bundle (not a tar archive: bad checksum)",
    ),
    "no_magic": (
        lambda index, objs: member(INDEX, index, magic=bytes(8)) + END,
        "not a VML bundle (not a tar archive: not a ustar header)",
    ),
    "base256_negative": (
        after_index(lambda objs: header(objs[0][0], 0, size_field=b"\xff" * 12)),
        "has a bad size field",
    ),
    "base256_absurd": (
        after_index(lambda objs: header(objs[0][0], 0, size_field=b"\x80" + (1 << 80).to_bytes(11, "big"))),
        "has a bad size field",
    ),
    "octal_garbage": (after_index(lambda objs: header(objs[0][0], 0, size_field=b"0000001x234\0")), "bad size field"),
    "pax_size_not_decimal": (
        after_index(lambda objs: pax({"size": "-5"}) + member(objs[0][0], objs[0][1])),
        "bad size b'-5'",
    ),
    "pax_record_length_wrong": (
        after_index(lambda objs: member("././@PaxHeader", b"99 size=5\n", b"x")),
        "bad record at offset 0",
    ),
    "pax_repeated_size": (
        after_index(lambda objs: member("././@PaxHeader", pax_records({"size": 5}) * 2, b"x")),
        "repeated key 'size'",
    ),
    "two_pax_headers": (after_index(lambda objs: pax({"size": 5}) + pax({"size": 6})), "two pax headers in a row"),
    "pax_then_end": (after_index(lambda objs: pax({"size": 5}) + END), "describes no member"),
    "truncated_header": (
        lambda index, objs: member(INDEX, index) + member(*objs[0])[:300],
        "in a tar header",
    ),
    "truncated_data": (
        lambda index, objs: member(INDEX, index) + member(*objs[0])[: 512 + 100],
        "truncated in member 'objects/",
    ),
    "truncated_padding": (
        lambda index, objs: member(INDEX, index) + member(*objs[0])[: 512 + len(objs[0][1]) + 1],
        "truncated in member 'objects/",
    ),
    "no_end_of_archive": (plain, "where a header or the end-of-archive marker was due"),
    "half_end_of_archive": (lambda index, objs: plain(index, objs) + END[:512], "half an end-of-archive marker"),
    "lone_zero_block": (
        lambda index, objs: plain(index, objs) + END[:512] + header("x", 0) + END,
        "a lone zero block",
    ),
    "short_file": (raw(b"hello" * 100), "not a VML bundle (not a tar archive: 500 bytes long)"),
}


@pytest.fixture
def rep(vml, tmp_path):
    vml("init", tmp_path / "rep", "--chunk-size", "4K")
    return tmp_path / "rep"


@pytest.mark.parametrize("case", CASES)
def test_forged_and_damaged_tar_framing_is_refused(vml, rep, tmp_path, case):
    build, message = CASES[case]
    path = tmp_path / f"{case}.vml"
    path.write_bytes(build(*contents()))
    assert_refused(vml, rep, path, message, snapshot(rep))


def test_a_huge_sparse_member_is_refused_without_reading_it(vml, rep, tmp_path):
    """An object member that truly is 8 GiB long (sparse) is refused from its header."""
    index, objs = contents()
    path = tmp_path / "huge.vml"
    with open(path, "wb") as f:
        f.write(member(INDEX, index) + header(objs[0][0], 1 << 33))
        f.truncate(f.tell() + (1 << 33) + 1024)
    assert_refused(vml, rep, path, "is larger than any object may be", snapshot(rep))


@pytest.mark.parametrize("kind", ["fifo", "directory", "dev_null"])
def test_special_files_are_refused_at_once(vml, rep, tmp_path, kind):
    path = {"fifo": tmp_path / "fifo.vml", "directory": tmp_path / "dir.vml", "dev_null": "/dev/null"}[kind]
    if kind == "fifo":
        os.mkfifo(path)  # with no writer: opening it to read would block
    elif kind == "directory":
        os.mkdir(path)
    assert_refused(vml, rep, path, "not a regular file", snapshot(rep))


def test_a_missing_file_is_refused(vml, rep, tmp_path):
    assert_refused(vml, rep, tmp_path / "nope.vml", "no such file", snapshot(rep))


def assert_imported(vml, rep, path, tmp_path):
    r = import_in_bounds(vml, path, rep)
    assert r.returncode == 0 and "imported x" in r.stdout, r.stderr
    co = tmp_path / f"co-{path.stem}"
    vml("checkout", "x", co, "--repo", rep)
    assert (co / "x.img").read_bytes() == bytes(CS) + CHUNK
    assert list((rep / "tmp").iterdir()) == []


def sized_by_pax(index, objs):
    """Every member's ustar size is 0 and its pax record the truth: the pax size is the size."""
    return b"".join(pax({"size": len(d)}) + header(n, 0) + padded(d) for n, d in [(INDEX, index), *objs]) + END


def named_by_pax(index, objs):
    return member(INDEX, index) + b"".join(pax({"path": n, "mtime": "1.5"}) + member("bogus", d) for n, d in objs) + END


ACCEPTED = {
    "plain_ustar": lambda index, objs: plain(index, objs) + END,
    "gnu_magic": lambda index, objs: plain(index, objs, magic=GNU) + END,
    "signed_checksums": lambda index, objs: plain(index, objs, signed=True) + END,
    "base256_sizes": lambda index, objs: (
        b"".join(
            header(n, 0, size_field=b"\x80" + len(d).to_bytes(11, "big")) + padded(d)
            for n, d in [(INDEX, index), *objs]
        )
        + END
    ),
    "sized_by_pax": sized_by_pax,
    "named_by_pax": named_by_pax,
    "record_padding": lambda index, objs: plain(index, objs) + bytes(10240),
}


@pytest.mark.parametrize("case", ACCEPTED)
def test_what_tar_allows_for_regular_files_imports(vml, rep, tmp_path, case):
    path = tmp_path / f"{case}.vml"
    path.write_bytes(ACCEPTED[case](*contents()))
    assert_imported(vml, rep, path, tmp_path)


def test_an_exported_bundle_imports_and_has_plain_ustar_headers(vml, rep, tmp_path):
    path = tmp_path / "hand.vml"
    path.write_bytes(plain(*contents()) + END)
    vml("import", path, "--repo", rep)
    vml("export", "x", "-o", tmp_path / "out.vml", "--repo", rep, "--full")
    with tarfile.open(tmp_path / "out.vml") as t:
        assert {m.type for m in t} == {tarfile.REGTYPE}
    assert b"PaxHeader" not in (tmp_path / "out.vml").read_bytes()
    vml("init", tmp_path / "rep2", "--chunk-size", "4K")
    assert_imported(vml, tmp_path / "rep2", tmp_path / "out.vml", tmp_path)


def bundle_tree(tmp_path):
    """A bundle's members as files in a directory, for GNU tar: (directory, [(name, data)])."""
    need("tar")
    index, objs = contents()
    src = tmp_path / "src"
    (src / "objects").mkdir(parents=True)
    (src / INDEX).write_bytes(index)
    for name, data in objs:
        (src / name).write_bytes(data)
    return src, objs


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "posix"])
def test_a_bundle_made_by_gnu_tar_imports(vml, rep, tmp_path, fmt):
    """Given the files one by one (a directory member is refused), GNU tar writes a bundle."""
    src, objs = bundle_tree(tmp_path)
    path = tmp_path / f"{fmt}.vml"
    subprocess.run(["tar", f"--format={fmt}", "-cf", path, "-C", src, INDEX, *(n for n, _ in objs)], check=True)
    assert_imported(vml, rep, path, tmp_path)


def test_gnu_tar_of_the_objects_directory_is_refused(vml, rep, tmp_path):
    src, _ = bundle_tree(tmp_path)
    path = tmp_path / "dir.vml"
    subprocess.run(["tar", "--format=ustar", "-cf", path, "-C", src, INDEX, "objects"], check=True)
    assert_refused(vml, rep, path, "member 'objects/' is a directory", snapshot(rep))


def test_a_forged_tar_header_size_is_refused_without_reading_it(vml, rep, tmp_path):
    path = tmp_path / "pax.vml"
    header = bytearray(tarfile.TarInfo("vml-bundle.json").tobuf(format=tarfile.USTAR_FORMAT))
    header[156:157] = b"x"  # a pax header...
    header[124:136] = b"\x80" + (1 << 33).to_bytes(11, "big")  # ...claiming 8 GiB (base-256 size)
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(512 + (1 << 33))  # sparse: costs nothing on disk
    r = subprocess.run(
        ["bash", "-c", f"ulimit -v 1000000; exec {sys.executable} -m vml import {path}"],
        env=vml.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 6 and "a tar header of 8589934592 bytes" in r.stderr, r.stderr
