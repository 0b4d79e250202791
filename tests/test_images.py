"""Disk images that name other files: the header inspector and the save policy built on it.

A hostile image must never make `vml save` read a host file, a device or a
URL (OpenStack's CVE-2024-32498): each such save ends in one line naming the
image, exit status 9, and a repository left as it was. Images are made with
the real qemu-img wherever it can make them.
"""

import json
import os
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from vml.entries import imagecheck, sources
from vml.errors import BadSource

from conftest import need, need_root

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _qemu_img():
    need("qemu-img", "qemu-io")


@pytest.fixture
def rep(vml, tmp_path):
    vml("init", tmp_path / "rep", "--chunk-size", "4K")
    return tmp_path / "rep"


def qemu_img(*args) -> str:
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"qemu-img {' '.join(map(str, args))}: {r.stderr}"
    return r.stdout


def qemu_write(fmt: str, image: Path, pattern: int, offset: int, length: int) -> None:
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"write -P {pattern} {offset} {length}", str(image)],
        capture_output=True,
        check=True,
    )


def virtual_size(image: Path, fmt: str) -> int:
    return json.loads(qemu_img("info", "--output=json", "-f", fmt, image))["virtual-size"]


def secret(path: Path) -> Path:
    """A file that must never end up in an entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"SECRET-" * 150_000)  # 1 MiB and a bit
    return path


def object_files(repo: Path) -> int:
    return sum(1 for p in (repo / "objects").rglob("*") if p.is_file())


def refused(vml, repo: Path, *args, naming=()) -> str:
    """`vml save e ARGS` fails with one line naming ``naming``, exit 9, and changes nothing."""
    before = object_files(repo)
    line = vml.fails("save", "e", *args, status=9)
    for word in naming:
        assert str(word) in line, line
    assert object_files(repo) == before
    assert vml("log").stdout.strip() == f"(repository {repo.name} has no entries)"
    assert list((repo / "tmp").iterdir()) == []
    return line


def checkout(vml, entry: str, dest: Path) -> dict[str, bytes]:
    vml("checkout", entry, dest)
    return {p.name: p.read_bytes() for p in dest.iterdir()}


# -- the inspector, on images made by qemu-img --------------------------------


@pytest.mark.parametrize(
    "fmt, options, extents",
    [
        ("raw", [], []),
        ("qcow2", [], []),
        ("qcow2", ["-o", "compat=0.10"], []),
        ("qcow", [], []),
        ("qed", [], []),
        ("vmdk", ["-o", "subformat=monolithicSparse"], []),
        ("vmdk", ["-o", "subformat=monolithicFlat"], ["img-flat.vmdk"]),
        ("vmdk", ["-o", "subformat=twoGbMaxExtentFlat"], ["img-f001.vmdk"]),
        ("vmdk", ["-o", "subformat=streamOptimized"], []),
        ("vdi", [], []),
        ("vpc", [], []),
        ("vhdx", [], []),
    ],
)
def test_the_inspector_reads_what_qemu_img_creates(tmp_path, fmt, options, extents):
    image = tmp_path / "img.vmdk" if fmt == "vmdk" else tmp_path / f"img.{fmt}"
    qemu_img("create", "-q", "-f", fmt, *options, image, "5M")
    info = imagecheck.inspect(image)
    assert info.format == fmt
    assert info.size == virtual_size(image, fmt)
    assert [(r.role, r.name, r.format) for r in info.references] == [("extent", e, "FLAT") for e in extents]


def test_a_fixed_vhd_looks_raw_as_it_does_to_qemu_and_reads_as_vpc_when_told(tmp_path):
    image = tmp_path / "fixed.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", image, "3M")
    assert json.loads(qemu_img("info", "--output=json", image))["format"] == "raw"  # qemu's own probe
    assert imagecheck.inspect(image).format == "raw"
    assert imagecheck.inspect(image, "vpc").size == virtual_size(image, "vpc")
    with pytest.raises(BadSource, match="not a qcow2 image"):
        imagecheck.inspect(image, "qcow2")
    with pytest.raises(BadSource, match="format bochs is not supported"):
        imagecheck.inspect(image, "bochs")


def test_the_inspector_reports_backing_files_data_files_and_declared_formats(tmp_path):
    base = tmp_path / "base.raw"
    qemu_img("create", "-q", "-f", "raw", base, "1M")
    cases = {
        "q2.qcow2": (["-f", "qcow2", "-b", "base.raw", "-F", "raw"], "raw"),
        "q1.qcow": (["-f", "qcow", "-b", "base.raw", "-F", "raw"], None),  # qcow v1 cannot declare it
        "raw.qed": (["-f", "qed", "-b", "base.raw", "-F", "raw"], "raw"),  # QED's no-probe flag
        "q2.qed": (["-f", "qed", "-b", "q2.qcow2", "-F", "qcow2"], None),  # QED only declares raw
    }
    for name, (args, declared) in cases.items():
        qemu_img("create", "-q", *args, tmp_path / name, "1M")
        backing = "q2.qcow2" if name == "q2.qed" else "base.raw"
        assert imagecheck.inspect(tmp_path / name).references == (
            imagecheck.Reference("backing file", backing, declared),
        )
    qemu_img("create", "-q", "-f", "vmdk", tmp_path / "parent.vmdk", "1M")
    qemu_img("create", "-q", "-f", "vmdk", "-b", "parent.vmdk", "-F", "vmdk", tmp_path / "delta.vmdk")
    assert imagecheck.inspect(tmp_path / "delta.vmdk").references == (
        imagecheck.Reference("backing file", "parent.vmdk", "vmdk"),
    )
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.bin'}", tmp_path / "ext.qcow2", "1M")
    info = imagecheck.inspect(tmp_path / "ext.qcow2")
    assert info.references == (imagecheck.Reference("data file", str(tmp_path / "data.bin")),)


def qcow2_naming(backing: str, workdir: Path) -> bytes:
    """A real qcow2 image whose backing file is ``backing``: bytes a guest can write to the start of its disk."""
    image = workdir / "made-by-qemu.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", image, "64M")
    data = image.read_bytes()
    image.unlink()
    return data


def test_a_raw_disk_that_looks_like_qcow2_is_raw_only_when_told(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(qcow2_naming("/etc/passwd", tmp_path) + os.urandom(4096))
    assert imagecheck.inspect(disk).references == (imagecheck.Reference("backing file", "/etc/passwd", "raw"),)
    assert imagecheck.inspect(disk, "raw") == imagecheck.ImageInfo("raw", disk.stat().st_size)


def make_luks(path: Path) -> None:
    # A short key-derivation time: the default 2 s benchmark of PBKDF iterations fails on a loaded machine.
    # Even so, qemu-img's benchmark may say "Unable to get accurate CPU usage" there: try again.
    args = ["create", "-q", "--object", "secret,id=s,data=x", "-f", "luks", "-o", "key-secret=s,iter-time=100"]
    for _ in range(4):
        r = subprocess.run(["qemu-img", *args, str(path), "1M"], capture_output=True, text=True, check=False)
        if r.returncode == 0 or "accurate CPU usage" not in r.stderr:
            break
        time.sleep(1)
    assert r.returncode == 0, f"qemu-img {' '.join(args)}: {r.stderr}"


UNSUPPORTED = {
    "luks": make_luks,
    "parallels": lambda p: qemu_img("create", "-q", "-f", "parallels", p, "1M"),
    "bochs": lambda p: p.write_bytes(b"Bochs Virtual HD Image\0".ljust(4096, b"\0")),
    "cloop": lambda p: p.write_bytes(b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r\n"),
    "dmg": lambda p: p.write_bytes(bytes(8192) + b"koly".ljust(512, b"\0")),
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_formats_qemu_would_probe_but_we_do_not_parse_are_refused(tmp_path, name):
    image = tmp_path / "disk.img"
    UNSUPPORTED[name](image)
    with pytest.raises(BadSource, match=f"format {name} is not supported"):
        imagecheck.inspect(image)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_differencing_vhd_vdi_and_vhdx_are_refused_as_qemu_cannot_read_them(tmp_path):
    vhd, vdi, vhdx = tmp_path / "d.vhd", tmp_path / "d.vdi", tmp_path / "d.vhdx"
    for fmt, image in (("vpc", vhd), ("vdi", vdi), ("vhdx", vhdx)):
        qemu_img("create", "-q", "-f", fmt, image, "4M")
        imagecheck.inspect(image)  # fine as made
    patch(vhd, 60, struct.pack(">I", 4))  # disk type: differencing
    patch(vdi, 440, uuid.uuid4().bytes)  # a parent UUID
    data = vhdx.read_bytes()
    meta = data.index(b"metadata", 0x40000)
    entry = data.index(uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le, meta)
    params = meta + struct.unpack_from("<I", data, entry + 16)[0]
    patch(vhdx, params + 4, struct.pack("<I", struct.unpack_from("<I", data, params + 4)[0] | 2))  # has a parent
    for image, what in ((vhd, "VHD"), (vdi, "VDI"), (vhdx, "VHDX")):
        with pytest.raises(BadSource, match=f"a differencing {what} .* is not supported"):
            imagecheck.inspect(image)
    r = subprocess.run(["qemu-img", "info", "-f", "vhdx", str(vhdx)], capture_output=True, check=False)
    assert r.returncode != 0  # qemu refuses the same VHDX


def descriptor(*extent_lines: str, kind: str = "monolithicFlat", extra: str = "") -> str:
    return (
        f'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="{kind}"\n{extra}\n'
        "# Extent description\n" + "".join(f"{line}\n" for line in extent_lines) + '\n#DDB\nddb.adapterType = "ide"\n'
    )


def test_vmdk_extent_lines_are_read_as_qemu_reads_them(tmp_path):
    image = tmp_path / "d.vmdk"
    image.write_text(
        descriptor(
            '# RW 2048 FLAT "/etc/passwd" 0',  # a comment: qemu ignores it
            'RDONLY 2048 FLAT "ro.bin" 0',  # qemu opens RW extents only
            "RW 2048 ZERO",  # no file
            'RW 2048 FLAT "a.bin" 0',
            '  RW   1024   FLAT   "b c.bin"   512',
        )
    )
    for name in ("a.bin", "b c.bin"):
        (tmp_path / name).write_bytes(bytes(MIB))
    info = imagecheck.inspect(image)
    assert info == imagecheck.ImageInfo(
        "vmdk",
        3072 * 512,
        (imagecheck.Reference("extent", "a.bin", "FLAT"), imagecheck.Reference("extent", "b c.bin", "FLAT")),
    )
    assert info.size == virtual_size(image, "vmdk")
    image.write_text(descriptor('RW 2048 FLAT "a.bin"'))  # FLAT needs an offset
    with pytest.raises(BadSource, match="invalid VMDK extent line"):
        imagecheck.inspect(image)
    image.write_text(descriptor('RW 2048 FLAT "a.bin" 0', kind="monolithicSparse"))
    with pytest.raises(BadSource, match="createType 'monolithicSparse' is not supported"):
        imagecheck.inspect(image)


def test_sparse_vmdk_files_with_a_descriptor_of_their_own_are_followed_or_refused(vml, rep, tmp_path):
    """A sparse header with capacity 0 makes qemu read its embedded descriptor and open the extents it names."""
    vm = tmp_path / "vm"
    vm.mkdir()
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", vm / "split.vmdk", "3M")
    assert [r.name for r in imagecheck.inspect(vm / "split.vmdk").references] == ["split-s001.vmdk"]
    chain = sources.check_chain(vm / "split.vmdk", root=Path(os.path.realpath(vm)))
    assert {p.name for p in chain.parts} == {"split-s001.vmdk"}
    patch(vm / "split-s001.vmdk", 12, struct.pack("<Q", 0))  # capacity 0: the extent's own descriptor counts
    with pytest.raises(BadSource, match=r"split-s001\.vmdk: a sparse VMDK extent with a descriptor of its own"):
        sources.check_chain(vm / "split.vmdk", root=Path(os.path.realpath(vm)))
    hostile = vm / "hostile.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", hostile, "1M")
    patch(hostile, 12, struct.pack("<Q", 0))
    patch(hostile, 512, descriptor('RW 2048 FLAT "/etc/passwd" 0').encode() + b"\0")
    extents = json.loads(qemu_img("info", "--output=json", "-f", "vmdk", hostile))["format-specific"]["data"]["extents"]
    assert [e["filename"] for e in extents] == ["/etc/passwd"]  # qemu would read it
    assert imagecheck.inspect(hostile).references == (imagecheck.Reference("extent", "/etc/passwd", "FLAT"),)
    refused(vml, rep, "--from", hostile, naming=[hostile, "extent", "/etc/passwd"])


def test_everything_the_inspector_reads_is_bounded(tmp_path):
    image = tmp_path / "big.vmdk"
    image.write_text(descriptor(*['RW 1 FLAT "f" 0'] * 2049))
    with pytest.raises(BadSource, match="more than 2048 VMDK extents"):
        imagecheck.inspect(image)
    image.write_text(descriptor('RW 1 FLAT "f" 0', extra="#" + "x" * (64 << 10)))
    with pytest.raises(BadSource, match="VMDK descriptor larger than 64 KiB"):
        imagecheck.inspect(image)
    long_name = tmp_path / "long.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "base", "-F", "raw", long_name, "1M")
    patch(long_name, 16, struct.pack(">I", 2000))  # backing_file_size
    with pytest.raises(BadSource, match="backing file name too long"):
        imagecheck.inspect(long_name)
    previous = tmp_path / "l0.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", previous, "1M")
    for i in range(1, 17):
        layer = tmp_path / f"l{i}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", previous.name, "-F", "qcow2", layer, "1M")
        previous = layer
    assert len(sources.check_chain(tmp_path / "l15.qcow2", root=tmp_path).layers) == 16
    with pytest.raises(BadSource, match="backing chain longer than 16 images"):
        sources.check_chain(previous, root=tmp_path)


def test_qemu_gets_every_layer_pinned_to_the_checked_file_and_format(tmp_path):
    tmp_path = Path(os.path.realpath(tmp_path))
    qemu_img("create", "-q", "-f", "raw", tmp_path / "base.raw", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", tmp_path / "mid.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "alone.qcow2", "1M")
    chain = sources.check_chain(tmp_path / "top.qcow2", root=tmp_path)
    assert [(layer.path.name, layer.format) for layer in chain.layers] == [
        ("top.qcow2", "qcow2"),
        ("mid.qcow2", "qcow2"),
        ("base.raw", "raw"),
    ]
    assert chain.parts == {tmp_path / "mid.qcow2", tmp_path / "base.raw"}
    spec = json.loads(sources.qemu_spec(chain.layers).removeprefix("json:"))
    assert spec["backing"]["backing"] == {
        "driver": "raw",
        "file": {"driver": "file", "filename": str(tmp_path / "base.raw")},
    }
    alone = sources.check_chain(tmp_path / "alone.qcow2", root=tmp_path)
    assert json.loads(sources.qemu_spec(alone.layers).removeprefix("json:"))["backing"] is None


# -- hostile images, saved with the real command ------------------------------


def test_a_backing_file_outside_the_directory_is_refused(vml, rep, tmp_path):
    evil = tmp_path / "vm" / "evil.qcow2"
    evil.parent.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", evil, "1M")
    line = refused(vml, rep, "--from", evil, naming=[evil, "/etc/passwd", "--allow-backing-outside"])
    assert "backing file" in line and "outside" in line


def test_an_external_data_file_outside_the_directory_is_refused(vml, rep, tmp_path):
    data = tmp_path / "elsewhere" / "data.bin"
    data.parent.mkdir()
    image = tmp_path / "vm" / "ext.qcow2"
    image.parent.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", image, "1M")
    secret(data)
    refused(vml, rep, "--from", image, naming=[image, "data file", data])
    refused(vml, rep, "--from", image.parent, naming=[image, "data file", data])


def test_a_vmdk_extent_outside_the_directory_is_refused_alone_and_in_a_vm_directory(vml, rep, tmp_path):
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "disk.vmdk").write_text(descriptor('RW 2048 FLAT "/etc/passwd" 0'))
    refused(vml, rep, "--from", vm / "disk.vmdk", naming=[vm / "disk.vmdk", "extent", "/etc/passwd"])
    refused(vml, rep, "--from", vm, naming=[vm / "disk.vmdk", "/etc/passwd"])
    secret(tmp_path / "other" / "secret.bin")
    (vm / "disk.vmdk").write_text(descriptor('RW 2048 FLAT "../other/secret.bin" 0'))
    (vm / "vm.vmx").write_text('scsi0:0.fileName = "disk.vmdk"\n')
    refused(vml, rep, "--from", vm, naming=[vm / "disk.vmdk", "../other/secret.bin", tmp_path / "other/secret.bin"])


def test_a_device_or_a_url_is_refused_even_when_outside_files_are_accepted(vml, rep, tmp_path):
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "disk.vmdk").write_text(descriptor('RW 2048 FLAT "/dev/zero" 0'))
    for extra in ((), ("--allow-backing-outside",)):
        refused(vml, rep, "--from", vm / "disk.vmdk", *extra, naming=["/dev/zero", "device"])
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "/dev/zero", "-F", "raw", vm / "dev.qcow2", "1M")
    refused(vml, rep, "--from", vm / "dev.qcow2", "--allow-backing-outside", naming=[vm / "dev.qcow2", "device"])
    for url in ("nbd://127.0.0.1:9/x", "file:/etc/passwd", "ssh://host/x", "rel:name"):
        image = vm / "url.qcow2"
        image.unlink(missing_ok=True)
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", url, "-F", "raw", image, "1M")
        refused(vml, rep, "--from", image, "--allow-backing-outside", naming=[image, url, "URL"])


def test_a_json_backing_name_never_reaches_qemu(vml, rep, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    name = f'json:{{"file":{{"driver":"http","url":"http://127.0.0.1:{port}/x"}}}}'
    image = tmp_path / "http.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", image, "1M")
    listener.listen()
    listener.settimeout(0)
    try:
        for extra in ((), ("--allow-backing-outside",)):
            refused(vml, rep, "--from", image, *extra, naming=[image, "json:"])
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
        # What the listener would have seen from the old `qemu-img info --backing-chain`:
        probe = subprocess.Popen(["qemu-img", "info", "--backing-chain", str(image)], stderr=subprocess.DEVNULL)
        listener.settimeout(30)
        listener.accept()[0].close()
        probe.wait(30)
    finally:
        listener.close()


def test_a_backing_file_that_is_a_link_to_outside_is_refused(vml, rep, tmp_path):
    vm = tmp_path / "vm"
    vm.mkdir()
    target = secret(tmp_path / "other" / "secret.raw")
    os.symlink(target, vm / "base.raw")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", vm / "top.qcow2", "1M")
    refused(vml, rep, "--from", vm / "top.qcow2", naming=[vm / "top.qcow2", "'base.raw'", target])


def test_a_backing_loop_is_refused(vml, rep, tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", b, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", b.name, "-F", "qcow2", a)
    qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-b", a.name, "-F", "qcow2", b)
    refused(vml, rep, "--from", a, naming=["loop", a])


def test_a_raw_disk_with_a_qcow2_header_is_refused_unless_saved_as_raw(vml, rep, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(qcow2_naming("/etc/passwd", tmp_path) + os.urandom(MIB))
    refused(vml, rep, "--from", disk, naming=[disk, "/etc/passwd"])
    vml("save", "e", "--from", disk, "--format", "raw")
    assert checkout(vml, "e", tmp_path / "co") == {"disk.img": disk.read_bytes()}


def test_a_declared_raw_base_is_read_as_raw_however_it_looks(vml, rep, tmp_path):
    """The chain is pinned: qemu does not probe the base and follow the header a guest wrote into it."""
    vm = tmp_path / "vm"
    vm.mkdir()
    base = vm / "base.raw"
    hostile = qcow2_naming("/etc/passwd", tmp_path)
    base.write_bytes(hostile + os.urandom(MIB - len(hostile)))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", vm / "top.qcow2", "1M")
    vml("save", "e", "--from", vm / "top.qcow2")
    assert checkout(vml, "e", tmp_path / "co") == {"top.img": base.read_bytes()}
    # QED declares only raw bases; without that flag the base is detected, and refused here.
    qemu_img("create", "-q", "-f", "qed", "-u", "-b", "base.raw", "-F", "qcow2", vm / "probe.qed", "1M")
    refused_line = vml.fails("save", "e2", "--from", vm / "probe.qed", status=9)
    assert str(base) in refused_line and "/etc/passwd" in refused_line


def test_outside_backing_files_are_accepted_when_asked_and_saved_as_qemu_reads_them(vml, rep, tmp_path):
    base = tmp_path / "pool" / "base.qcow2"
    base.parent.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_write("qcow2", base, 0x41, 0, 3 * MIB)
    overlay = tmp_path / "vm" / "overlay.qcow2"
    overlay.parent.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "-b", "../pool/base.qcow2", "-F", "qcow2", overlay)
    qemu_write("qcow2", overlay, 0x42, MIB, MIB)
    refused(vml, rep, "--from", overlay, naming=[overlay, "../pool/base.qcow2", "--allow-backing-outside"])
    vml("save", "e", "--from", overlay, "--allow-backing-outside")
    qemu_img("convert", "-O", "raw", overlay, tmp_path / "expected.raw")
    assert checkout(vml, "e", tmp_path / "co") == {"overlay.img": (tmp_path / "expected.raw").read_bytes()}
    assert list((rep / "tmp").iterdir()) == []


@pytest.mark.parametrize("fmt, base_fmt", [("qcow2", "raw"), ("qcow", "raw"), ("qed", "qcow2"), ("vmdk", "vmdk")])
def test_an_overlay_on_a_base_in_its_directory_is_one_disk_read_through_the_pinned_chain(
    vml, rep, tmp_path, fmt, base_fmt
):
    vm = tmp_path / "vm"
    vm.mkdir()
    base = vm / f"base.{base_fmt}"
    qemu_img("create", "-q", "-f", base_fmt, base, "2M")
    qemu_write(base_fmt, base, 0x41, 0, 2 * MIB)
    overlay = vm / f"disk.{fmt}"
    qemu_img("create", "-q", "-f", fmt, "-b", base.name, "-F", base_fmt, overlay)
    qemu_write(fmt, overlay, 0x42, 512 << 10, 64 << 10)
    vml("save", "e", "--from", vm)
    assert [d["name"] for d in json.loads(vml("show", "e", "--json").stdout)["disks"]] == ["disk"]
    qemu_img("convert", "-O", "raw", overlay, tmp_path / "expected.raw")
    assert checkout(vml, "e", tmp_path / "co") == {"disk.img": (tmp_path / "expected.raw").read_bytes()}


def test_a_missing_backing_file_is_one_line(vml, rep, tmp_path):
    image = tmp_path / "orphan.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.raw", "-F", "raw", image, "1M")
    refused(vml, rep, "--from", image, naming=[image, "'gone.raw' does not exist"])


def test_a_copy_of_a_checkout_without_its_flat_extent_keeps_one_disk(vml, rep, tmp_path):
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "d.img").write_bytes(os.urandom(3 * 4096 + 100))  # not whole sectors, as a checkout may be
    (vm / "d.vmdk").write_text(descriptor(f'RW {-(-(3 * 4096 + 100) // 512)} FLAT "d-flat.vmdk" 0'))
    vml("save", "e", "--from", vm)
    info = json.loads(vml("show", "e", "--json").stdout)
    assert [d["name"] for d in info["disks"]] == ["d"] and info["files"] == []
    assert checkout(vml, "e", tmp_path / "co") == {"d.img": (vm / "d.img").read_bytes()}


def test_a_block_device_has_no_directory_of_its_own(vml, tmp_path):
    """Found in review: a device's directory was taken to be /dev, and /dev/shm holds anyone's files."""
    need_root()
    need("losetup")
    vml("init", tmp_path / "rep", "--chunk-size", "4K")
    secret = Path(f"/dev/shm/vml-test-{os.getpid()}")
    secret.write_bytes(b"TOP SECRET host data\n" * 100)
    (tmp_path / "base.raw").write_bytes(b"base" * 4096)
    devices = []
    try:
        for backing in (f"shm/{secret.name}", str(tmp_path / "base.raw")):
            image = tmp_path / f"guest{len(devices)}.qcow2"
            qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", backing, "-F", "raw", image, "64K")
            loop = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True)
            devices.append(loop.stdout.strip())
        before = sorted(p.name for p in (tmp_path / "rep/objects").rglob("*"))
        for flags in ((), ("--allow-backing-outside",)):
            msg = vml.fails("save", "e1", "--from", devices[0], *flags, status=9)
            assert f"{devices[0]}: backing file" in msg and "is in a system directory; refused" in msg
        msg = vml.fails("save", "e1", "--from", devices[1], status=9)
        assert f"{devices[1]}: backing file" in msg and "is named by a device; refused" in msg
        assert sorted(p.name for p in (tmp_path / "rep/objects").rglob("*")) == before
    finally:
        for device in devices:
            subprocess.run(["losetup", "-d", device], check=False)
        secret.unlink()
