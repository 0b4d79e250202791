"""VMDK headers and descriptors, read as qemu reads them: the size, the extents and the parent.

qemu opens what a descriptor names line by line with sscanf, and finds
fields such as createType and parentFileNameHint anywhere in the text;
this module reads them the same way, so that what it reports is what qemu
would open.
"""

import os
import re
import struct
from pathlib import Path

from .imagebase import MAX_DESCRIPTOR, MAX_EXTENTS, SECTOR, Image, ImageInfo, Reference, c_string, file_name, opened

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


def looks_like_descriptor(buf: bytes) -> bool:
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


def check_extent(path: Path | str, kind: str) -> None:
    """Refuse a sparse VMDK extent that qemu would not read as plain grains.

    A sparse extent whose header has capacity 0 carries a descriptor of its
    own, and qemu would open the extents that one names too.
    """
    if kind not in SPARSE_EXTENTS:
        return
    with opened(Path(path)) as img:
        if img.head[:4] == b"COWD":
            return
        if img.head[:4] != b"KDMV" or len(img.head) < 44:
            raise img.bad(f"not a sparse VMDK extent, as its descriptor says ({kind})")
        capacity, desc_offset = struct.unpack_from("<Q8xQ", img.head, 12)
        if capacity == 0 and desc_offset:
            raise img.bad("a sparse VMDK extent with a descriptor of its own is not supported")


def vmdk(img: Image) -> ImageInfo:
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


def _descriptor(img: Image, offset: int) -> bytes:
    text = c_string(img.read(offset, MAX_DESCRIPTOR + 1))
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


def _vmdk_parent(img: Image, text: bytes) -> tuple[Reference, ...]:
    text = c_string(text)
    if b"parentFileNameHint" not in text:
        return ()
    hint = _vmdk_field(text, b"parentFileNameHint")
    if hint is None:
        raise img.bad("invalid parentFileNameHint in the VMDK descriptor")
    name = file_name(img, hint, "parent")
    return (Reference("backing file", name, "vmdk"),) if name else ()


def _vmdk_extents(img: Image, text: bytes) -> tuple[int, tuple[Reference, ...]]:
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
        extents.append(Reference("extent", file_name(img, fields[3], "extent"), kind.decode()))
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
