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

import struct
import uuid
from pathlib import Path

from ..errors import BadSource
from .imagebase import HEAD, MAX_NAME, SECTOR, Image, ImageInfo, Reference, c_string, file_name, opened
from .vmdkcheck import check_extent, looks_like_descriptor, vmdk

__all__ = ["FORMATS", "ImageInfo", "Reference", "check_extent", "inspect"]

FORMATS = ("raw", "qcow2", "qcow", "qed", "vmdk", "vdi", "vpc", "vhdx")
PROBE = 2048  # what qemu looks at to guess a format

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


def inspect(path: Path | str, fmt: str | None = None) -> ImageInfo:
    """What ``path`` is and names; ``fmt`` reads it as that format instead of detecting one."""
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise BadSource(f"{path}: format {fmt} is not supported (supported: {', '.join(FORMATS)})")
    with opened(path) as img:
        return _PARSERS[fmt or _detect(img)](img)


def _detect(img: Image) -> str:
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
    if head[:4] in (b"KDMV", b"COWD") or looks_like_descriptor(head):
        return "vmdk"
    if img.size >= SECTOR and img.read(img.size - SECTOR, 4) == b"koly":
        raise img.bad("format dmg is not supported")
    return "raw"


# -- qcow2, qcow, QED ---------------------------------------------------------


def _qcow2(img: Image) -> ImageInfo:
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
        name = file_name(img, img.read(bf_offset, bf_size), "backing file")
        if name:
            refs.append(Reference("backing file", name, backing_format))
    if incompatible & _QCOW2_INCOMPAT_DATA_FILE:
        if not data_file:
            raise img.bad("needs an external data file but does not name it")
        refs.append(Reference("data file", data_file))
    return ImageInfo("qcow2", size, tuple(refs))


def _qcow2_extensions(img: Image, offset: int, end: int) -> tuple[str | None, str | None]:
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
            backing_format = c_string(data).decode("ascii", "replace") or None
        elif kind == _QCOW2_DATA_FILE:
            data_file = file_name(img, data, "data file")
        offset += (length + 7) & ~7
    return backing_format, data_file


def _qcow(img: Image) -> ImageInfo:
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
        name = file_name(img, img.read(bf_offset, bf_size), "backing file")
        refs = (Reference("backing file", name),) if name else ()
    return ImageInfo("qcow", size, refs)


def _qed(img: Image) -> ImageInfo:
    h = img.head
    if len(h) < 64 or not h.startswith(b"QED\0"):
        raise img.bad("not a QED image")
    cluster, _, header_clusters, features = struct.unpack_from("<IIIQ", h, 4)
    size, bf_offset, bf_size = struct.unpack_from("<QII", h, 48)
    refs = ()
    if features & _QED_BACKING_FILE:
        if bf_offset + bf_size > cluster * header_clusters or bf_size > MAX_NAME:
            raise img.bad("invalid backing file name")
        name = file_name(img, img.read(bf_offset, bf_size), "backing file")
        fmt = "raw" if features & _QED_BACKING_RAW else None
        refs = (Reference("backing file", name, fmt),) if name else ()
    return ImageInfo("qed", size, refs)


# -- VDI, VHD, VHDX, raw ------------------------------------------------------


def _vdi(img: Image) -> ImageInfo:
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


def _vpc(img: Image) -> ImageInfo:
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


def _vhdx(img: Image) -> ImageInfo:
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


def _raw(img: Image) -> ImageInfo:
    return ImageInfo("raw", img.size)


_PARSERS = {
    "raw": _raw,
    "qcow2": _qcow2,
    "qcow": _qcow,
    "qed": _qed,
    "vmdk": vmdk,
    "vdi": _vdi,
    "vpc": _vpc,
    "vhdx": _vhdx,
}
