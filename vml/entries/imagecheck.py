"""Disk image headers read in Python: the format, the virtual size and every file an image names.

qemu-img follows whatever an image's header names: a qcow2 backing file or
external data file, a VMDK extent or parent, a ``json:`` description that
makes it open a URL; and a backing file whose format is not declared is
opened as whatever its first bytes look like. Even `qemu-img info` opens
data files and ``json:`` targets. A hostile image can so make a save copy
host files into an entry (OpenStack's CVE-2024-32498). This module reads a
bounded number of bytes of one image, never running qemu and never
following a reference, and reports what the image is and what it names;
the caller decides which references to accept before qemu-img sees any of
them. Format detection follows qemu's own probes, so what is raw here is
raw for qemu; formats that qemu reads but this module does not parse are
refused rather than passed through.
"""

import contextlib
import os
import re
import stat
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadSource

FORMATS = ("raw", "qcow2", "qcow", "qed", "vmdk", "vdi", "vpc", "vhdx")
SECTOR = 512
HEAD = 64 << 10  # bytes read from the start of an image; qcow2 extensions past this are refused
PROBE = 2048  # what qemu looks at to guess a format
MAX_DESCRIPTOR = 64 << 10
MAX_NAME = 1023  # qemu's own limit for a qcow2 backing file name
MAX_EXTENTS = 2048

# Formats qemu would detect that we do not parse: refused, not trusted.
_UNSUPPORTED = [
    (b"LUKS\xba\xbe", "luks"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
    (b"Bochs Virtual HD Image", "bochs"),
    (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
]
_QCOW_MAGIC = b"QFI\xfb"
_QCOW2_BACKING_FORMAT = 0xE2792ACA
_QCOW2_DATA_FILE = 0x44415441
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_QED_BACKING_FILE = 1 << 0
_QED_BACKING_RAW = 1 << 2  # QED_F_BACKING_FORMAT_NO_PROBE
_VDI_SIGNATURE = 0xBEDA107F
_VDI_DIFFERENCING = 4
_VHD_DIFFERENCING = 4
_VHD_MAX_GEOMETRY = 65535 * 16 * 255
_VHD_SIZE_FROM_FOOTER = {b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"}  # else qemu 7.2 uses the CHS geometry
_VHDX_METADATA = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
_VHDX_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
_VHDX_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
_VHDX_PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C").bytes_le
_VHDX_HAS_PARENT = 1 << 1
_VMDK_GD_AT_END = 0xFFFFFFFFFFFFFFFF
_VMDK_DESC_SIZE = 20 * SECTOR  # how much of a descriptor qemu searches for parentFileNameHint
_VMDK_CREATE_TYPES = {
    b"monolithicFlat",
    b"vmfs",
    b"vmfsSparse",
    b"seSparse",
    b"twoGbMaxExtentSparse",
    b"twoGbMaxExtentFlat",
}
_VMDK_EXTENT_TYPES = {b"FLAT", b"SPARSE", b"VMFS", b"VMFSSPARSE", b"SESPARSE"}
SPARSE_EXTENTS = {"SPARSE", "VMFSSPARSE"}
_INT = re.compile(rb"[+-]?[0-9]+")
_WORD = re.compile(rb"[^ \t\n\v\f\r]{1,10}")
_QUOTED = re.compile(rb'[^\n\r"]{1,511}')
_SPACE = re.compile(rb"[ \t\n\v\f\r]*")


@dataclass(frozen=True)
class Reference:
    """A file an image names, as the image spells it."""

    role: str  # "backing file", "data file" or "extent"
    name: str
    format: str | None = None  # a backing file's declared format, or an extent's type (FLAT, SPARSE, ...)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    size: int  # virtual size in bytes, as the header declares it
    references: tuple[Reference, ...] = ()


class _Image:
    """An open image: its size, its first bytes, and bounded reads at any offset."""

    def __init__(self, path: Path):
        self.path = path
        try:
            # O_NONBLOCK: a FIFO must not hang the save; it is refused below.
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            raise BadSource(f"{path}: {e.strerror}") from None
        try:
            st = os.fstat(self.fd)
            if stat.S_ISREG(st.st_mode):
                self.size = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                self.size = os.lseek(self.fd, 0, os.SEEK_END)
            else:
                raise BadSource(f"{path}: not a regular file or block device")
            self.head = self.read(0, HEAD)
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset``; fewer at the end of the file."""
        if offset < 0 or offset >= self.size:
            return b""
        n = min(n, self.size - offset)
        chunks = []
        try:
            while n > 0:
                data = os.pread(self.fd, n, offset)
                if not data:
                    break
                chunks.append(data)
                offset += len(data)
                n -= len(data)
        except OSError as e:
            raise BadSource(f"{self.path}: {e.strerror}") from None
        return b"".join(chunks)

    def bad(self, why: str) -> BadSource:
        return BadSource(f"{self.path}: {why}")


@contextlib.contextmanager
def _opened(path: Path):
    img = _Image(path)
    try:
        yield img
    finally:
        os.close(img.fd)


def inspect(path: Path | str, fmt: str | None = None) -> ImageInfo:
    """What ``path`` is and names; ``fmt`` reads it as that format instead of detecting one."""
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise BadSource(f"{path}: format {fmt} is not supported (supported: {', '.join(FORMATS)})")
    with _opened(path) as img:
        return _PARSERS[fmt or _detect(img)](img)


def check_extent(path: Path | str, kind: str) -> None:
    """Refuse a sparse VMDK extent that qemu would not read as plain grains.

    A sparse extent whose header has capacity 0 carries a descriptor of its
    own, and qemu would open the extents that one names too.
    """
    if kind not in SPARSE_EXTENTS:
        return
    with _opened(Path(path)) as img:
        if img.head[:4] == b"COWD":
            return
        if img.head[:4] != b"KDMV" or len(img.head) < 44:
            raise img.bad(f"not a sparse VMDK extent, as its descriptor says ({kind})")
        capacity, desc_offset = struct.unpack_from("<Q8xQ", img.head, 12)
        if capacity == 0 and desc_offset:
            raise img.bad("a sparse VMDK extent with a descriptor of its own is not supported")


def _detect(img: _Image) -> str:
    """The format qemu would probe for, or BadSource for one we do not read."""
    head = img.head[:PROBE]
    for magic, name in _UNSUPPORTED:
        if head.startswith(magic):
            raise img.bad(f"format {name} is not supported")
    if head.startswith(_QCOW_MAGIC) and len(head) >= 8:
        version = struct.unpack_from(">I", head, 4)[0]
        if version == 1:
            return "qcow"
        if version >= 2:
            return "qcow2"
    if head.startswith(b"QED\0"):
        return "qed"
    if head.startswith(b"conectix"):
        return "vpc"
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    if len(head) >= SECTOR and struct.unpack_from("<I", head, 64)[0] == _VDI_SIGNATURE:
        return "vdi"
    if head[:4] in (b"KDMV", b"COWD") or _looks_like_descriptor(head):
        return "vmdk"
    if img.size >= SECTOR and img.read(img.size - SECTOR, 4) == b"koly":
        raise img.bad("format dmg is not supported")
    return "raw"


def _looks_like_descriptor(buf: bytes) -> bool:
    """qemu's test for a VMDK text descriptor: comments and blank lines, then version=1, 2 or 3."""
    p = 0
    while p < len(buf):
        if buf[p] == ord("#"):
            end = buf.find(b"\n", p)
            p = len(buf) if end < 0 else end + 1
        elif buf[p] == ord(" "):
            while p < len(buf) and buf[p] == ord(" "):
                p += 1
            if p < len(buf) and buf[p] == ord("\r"):
                p += 1
            if p == len(buf) or buf[p] != ord("\n"):
                return False
            p += 1
        else:
            return re.match(rb"version=[123]\r?\n", buf[p : p + 11]) is not None
    return False


def _c_string(data: bytes) -> bytes:
    """What C code sees of ``data``: everything up to the first NUL."""
    end = data.find(b"\0")
    return data if end < 0 else data[:end]


def _name(img: _Image, raw: bytes, what: str) -> str:
    raw = _c_string(raw)
    if len(raw) > MAX_NAME:
        raise img.bad(f"{what} name longer than {MAX_NAME} bytes")
    return os.fsdecode(raw)


# -- qcow2, qcow, QED ---------------------------------------------------------


def _qcow2(img: _Image) -> ImageInfo:
    h = img.head
    if len(h) < 72 or not h.startswith(_QCOW_MAGIC):
        raise img.bad("not a qcow2 image")
    version, bf_offset, bf_size, cluster_bits, size, crypt = struct.unpack_from(">IQIIQI", h, 4)
    if version not in (2, 3):
        raise img.bad(f"qcow2 version {version} is not supported")
    if not 9 <= cluster_bits <= 21:
        raise img.bad("invalid qcow2 cluster size")
    if crypt:
        raise img.bad("encrypted images are not supported")
    cluster = 1 << cluster_bits
    incompatible, header_length = 0, 72
    if version == 3:
        if len(h) < 104:
            raise img.bad("truncated qcow2 header")
        incompatible = struct.unpack_from(">Q", h, 72)[0]
        header_length = struct.unpack_from(">I", h, 100)[0]
        if not 104 <= header_length <= cluster:
            raise img.bad("invalid qcow2 header length")
    # qemu reads extensions up to the backing file name, or to the end of the first cluster.
    backing_format, data_file = _qcow2_extensions(img, header_length, bf_offset or cluster)
    refs = []
    if bf_offset:
        limit = MAX_NAME if bf_offset > cluster else min(MAX_NAME, cluster - bf_offset)
        if bf_size > limit:
            raise img.bad("backing file name too long")
        name = _name(img, img.read(bf_offset, bf_size), "backing file")
        if name:
            refs.append(Reference("backing file", name, backing_format))
    if incompatible & _QCOW2_INCOMPAT_DATA_FILE:
        if not data_file:
            raise img.bad("needs an external data file but does not name it")
        refs.append(Reference("data file", data_file))
    return ImageInfo("qcow2", size, tuple(refs))


def _qcow2_extensions(img: _Image, offset: int, end: int) -> tuple[str | None, str | None]:
    """The declared backing format and external data file name among the header extensions."""
    backing_format = data_file = None
    h = img.head
    while offset < end:
        if offset + 8 > len(h):
            raise img.bad(f"qcow2 header extensions run past the first {HEAD >> 10} KiB")
        kind, length = struct.unpack_from(">II", h, offset)
        offset += 8
        if kind == 0:
            break
        if length > end - offset or offset + length > len(h):
            raise img.bad("invalid qcow2 header extension")
        data = h[offset : offset + length]
        if kind == _QCOW2_BACKING_FORMAT:
            if length >= 16:
                raise img.bad("invalid qcow2 backing format extension")
            backing_format = _c_string(data).decode("ascii", "replace") or None
        elif kind == _QCOW2_DATA_FILE:
            data_file = _name(img, data, "data file")
        offset += (length + 7) & ~7
    return backing_format, data_file


def _qcow(img: _Image) -> ImageInfo:
    h = img.head
    if len(h) < 48 or not h.startswith(_QCOW_MAGIC) or struct.unpack_from(">I", h, 4)[0] != 1:
        raise img.bad("not a qcow image")
    bf_offset, bf_size, size = struct.unpack_from(">QI4xQ", h, 8)
    if struct.unpack_from(">I", h, 36)[0]:
        raise img.bad("encrypted images are not supported")
    refs = ()
    if bf_offset:
        if bf_size > MAX_NAME:
            raise img.bad("backing file name too long")
        name = _name(img, img.read(bf_offset, bf_size), "backing file")
        refs = (Reference("backing file", name),) if name else ()
    return ImageInfo("qcow", size, refs)


def _qed(img: _Image) -> ImageInfo:
    h = img.head
    if len(h) < 64 or not h.startswith(b"QED\0"):
        raise img.bad("not a QED image")
    cluster, _, header_clusters, features = struct.unpack_from("<IIIQ", h, 4)
    size, bf_offset, bf_size = struct.unpack_from("<QII", h, 48)
    refs = ()
    if features & _QED_BACKING_FILE:
        if bf_offset + bf_size > cluster * header_clusters or bf_size > MAX_NAME:
            raise img.bad("invalid backing file name")
        name = _name(img, img.read(bf_offset, bf_size), "backing file")
        fmt = "raw" if features & _QED_BACKING_RAW else None
        refs = (Reference("backing file", name, fmt),) if name else ()
    return ImageInfo("qed", size, refs)


# -- VMDK ---------------------------------------------------------------------


def _vmdk(img: _Image) -> ImageInfo:
    h = img.head
    if h[:4] == b"COWD" and len(h) >= 16:
        size = struct.unpack_from("<I", h, 12)[0] * SECTOR
        return ImageInfo("vmdk", size, _vmdk_parent(img, img.read(0x200, _VMDK_DESC_SIZE)))
    if h[:4] != b"KDMV":
        text = _descriptor(img, 0)
        size, extents = _vmdk_extents(img, text)
        return ImageInfo("vmdk", size, extents + _vmdk_parent(img, text[:_VMDK_DESC_SIZE]))
    if len(h) < 77:
        raise img.bad("truncated VMDK header")
    capacity, desc_offset = struct.unpack_from("<Q8xQ", h, 12)
    gd_offset = struct.unpack_from("<Q", h, 56)[0]
    extents = ()
    if capacity == 0 and desc_offset:
        # qemu reads such a file as a descriptor and opens the extents it names.
        size, extents = _vmdk_extents(img, _descriptor(img, desc_offset * SECTOR))
    elif gd_offset == _VMDK_GD_AT_END:
        # streamOptimized: the header that counts is in the footer, 1024 bytes before the end.
        footer = img.read(-(-img.size // SECTOR) * SECTOR - 1024, SECTOR)
        if footer[:4] != b"KDMV" or len(footer) < 20:
            raise img.bad("invalid streamOptimized VMDK footer")
        size = struct.unpack_from("<Q", footer, 12)[0] * SECTOR
    else:
        size = capacity * SECTOR
    # qemu looks for a parent in the embedded descriptor at sector 1, whatever the header says.
    return ImageInfo("vmdk", size, extents + _vmdk_parent(img, img.read(0x200, _VMDK_DESC_SIZE)))


def _descriptor(img: _Image, offset: int) -> bytes:
    text = _c_string(img.read(offset, MAX_DESCRIPTOR + 1))
    if len(text) > MAX_DESCRIPTOR:
        raise img.bad(f"VMDK descriptor larger than {MAX_DESCRIPTOR >> 10} KiB")
    return text


def _vmdk_field(text: bytes, name: bytes) -> bytes | None:
    """A ``name="value"`` field found the way qemu finds it: the first occurrence anywhere."""
    at = text.find(name)
    if at < 0:
        return None
    start = at + len(name) + 2  # qemu skips '="' without looking at it
    end = text.find(b'"', start)
    return None if start > len(text) or end < 0 else text[start:end]


def _vmdk_parent(img: _Image, text: bytes) -> tuple[Reference, ...]:
    text = _c_string(text)
    if b"parentFileNameHint" not in text:
        return ()
    hint = _vmdk_field(text, b"parentFileNameHint")
    if hint is None:
        raise img.bad("invalid parentFileNameHint in the VMDK descriptor")
    name = _name(img, hint, "parent")
    return (Reference("backing file", name, "vmdk"),) if name else ()


def _vmdk_extents(img: _Image, text: bytes) -> tuple[int, tuple[Reference, ...]]:
    """The size and extents a descriptor declares, read line by line as qemu reads them."""
    kind = _vmdk_field(text, b"createType")
    if kind is None:
        raise img.bad("not a VMDK image: no createType in its descriptor")
    if kind not in _VMDK_CREATE_TYPES:
        raise img.bad(f"VMDK createType {os.fsdecode(kind)!r} is not supported")
    sectors, extents = 0, []
    for start in [0, *(m.end() for m in re.finditer(rb"\n", text))]:
        fields = _scan_extent(text, start)
        if len(fields) < 4 or fields[0] != b"RW":
            continue
        count, kind = fields[1], fields[2]
        if kind == b"FLAT" and (len(fields) != 5 or fields[4] < 0):
            raise img.bad("invalid VMDK extent line: a FLAT extent needs an offset")
        if kind != b"FLAT" and len(fields) != 4:
            raise img.bad(f"invalid VMDK extent line for a {os.fsdecode(kind)} extent")
        if count <= 0 or kind not in _VMDK_EXTENT_TYPES:
            continue  # qemu skips these lines and opens nothing for them
        if len(extents) == MAX_EXTENTS:
            raise img.bad(f"more than {MAX_EXTENTS} VMDK extents")
        extents.append(Reference("extent", _name(img, fields[3], "extent"), kind.decode()))
        sectors += count
    return sectors * SECTOR, tuple(extents)


def _scan_extent(text: bytes, p: int) -> list:
    """What qemu's ``sscanf("%10s %ld %10s \\"%511[^\\n\\r\\"]\\" %ld")`` reads from ``text[p:]``.

    sscanf reads across line ends, so this does too; qemu uses the line
    only when at least the four first fields are read.
    """
    fields: list = []
    for pattern in (_WORD, _INT, _WORD, None, _INT):
        p = _SPACE.match(text, p).end()
        if pattern is None:  # the quoted file name
            if not text.startswith(b'"', p):
                break
            m = _QUOTED.match(text, p + 1)
            if m is None:
                break
            fields.append(m.group())
            if not text.startswith(b'"', m.end()):
                break
            p = m.end() + 1
            continue
        m = pattern.match(text, p)
        if m is None:
            break
        fields.append(int(m.group()) if pattern is _INT else m.group())
        p = m.end()
    return fields


# -- VDI, VHD, VHDX, raw ------------------------------------------------------


def _vdi(img: _Image) -> ImageInfo:
    h = img.head
    if len(h) < SECTOR or struct.unpack_from("<I", h, 64)[0] != _VDI_SIGNATURE:
        raise img.bad("not a VDI image")
    kind = struct.unpack_from("<I", h, 76)[0]
    link, parent = h[424:440], h[440:456]
    if kind == _VDI_DIFFERENCING or any(link) or any(parent):
        # qemu refuses these too: it cannot find the parent.
        raise img.bad("a differencing VDI (one with a parent) is not supported")
    size = struct.unpack_from("<Q", h, 368)[0]
    return ImageInfo("vdi", -(-size // SECTOR) * SECTOR)


def _vpc(img: _Image) -> ImageInfo:
    footer = img.head[:SECTOR]
    if not footer.startswith(b"conectix"):
        footer = img.read(img.size - SECTOR, SECTOR) if img.size >= SECTOR else b""  # a fixed VHD
    if not footer.startswith(b"conectix") or len(footer) < 64:
        raise img.bad("not a VHD image")
    creator = footer[28:32]
    current_size, cylinders, heads, per_track, kind = struct.unpack_from(">QHBBI", footer, 48)
    if kind == _VHD_DIFFERENCING:
        # qemu would read it as a dynamic VHD and silently leave out what the parent holds.
        raise img.bad("a differencing VHD (one with a parent) is not supported")
    sectors = cylinders * heads * per_track
    if creator in _VHD_SIZE_FROM_FOOTER or sectors == _VHD_MAX_GEOMETRY:
        sectors = current_size // SECTOR
    return ImageInfo("vpc", sectors * SECTOR)


def _vhdx(img: _Image) -> ImageInfo:
    if not img.head.startswith(b"vhdxfile"):
        raise img.bad("not a VHDX image")
    regions = img.read(0x30000, 64 << 10)
    if not regions.startswith(b"regi") or len(regions) < 16:
        raise img.bad("invalid VHDX region table")
    count = struct.unpack_from("<I", regions, 8)[0]
    if count > 2047 or 16 + 32 * count > len(regions):
        raise img.bad("invalid VHDX region table")
    starts = [struct.unpack_from("<Q", regions, 16 + 32 * i + 16)[0] for i in range(count)]
    meta = [s for i, s in enumerate(starts) if regions[16 + 32 * i : 32 + 32 * i] == _VHDX_METADATA]
    if not meta:
        raise img.bad("VHDX without a metadata region")
    table = img.read(meta[0], 64 << 10)
    if not table.startswith(b"metadata") or len(table) < 32:
        raise img.bad("invalid VHDX metadata table")
    count = struct.unpack_from("<H", table, 10)[0]
    if count > 2047 or 32 + 32 * count > len(table):
        raise img.bad("invalid VHDX metadata table")
    items = {table[32 + 32 * i : 48 + 32 * i]: struct.unpack_from("<I", table, 48 + 32 * i)[0] for i in range(count)}
    if _VHDX_FILE_PARAMETERS not in items or _VHDX_DISK_SIZE not in items:
        raise img.bad("incomplete VHDX metadata")
    params = img.read(meta[0] + items[_VHDX_FILE_PARAMETERS], 8)
    size = img.read(meta[0] + items[_VHDX_DISK_SIZE], 8)
    if len(params) < 8 or len(size) < 8:
        raise img.bad("truncated VHDX metadata")
    if _VHDX_PARENT_LOCATOR in items or struct.unpack_from("<I", params, 4)[0] & _VHDX_HAS_PARENT:
        # qemu refuses differencing VHDX files as well.
        raise img.bad("a differencing VHDX (one with a parent) is not supported")
    return ImageInfo("vhdx", struct.unpack("<Q", size)[0])


def _raw(img: _Image) -> ImageInfo:
    return ImageInfo("raw", img.size)


_PARSERS = {
    "raw": _raw,
    "qcow2": _qcow2,
    "qcow": _qcow,
    "qed": _qed,
    "vmdk": _vmdk,
    "vdi": _vdi,
    "vpc": _vpc,
    "vhdx": _vhdx,
}
