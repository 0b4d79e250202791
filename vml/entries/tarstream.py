"""Reading a bundle's tar framing one member at a time, with a hard limit on every header.

This is the only parser of a bundle's tar headers, so no second parser can
disagree with it about where a member starts or how long it is. It reads
regular files as `vml export` writes them (plain ustar headers) and as GNU
tar does in its ustar, gnu and posix formats, and refuses every other kind
of member: links, directories, devices, GNU long names, sparse files,
global pax headers. Every header's checksum is checked; a pax extended
header is at most PAX_LIMIT bytes, parsed strictly, and only its ``path``
and ``size`` records count: a ``size`` record then is the member's size.
The archive must end with its end-of-archive marker (two zero blocks).
Nothing is read into memory that the caller did not bound first.
"""

import struct
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import BadBundle

BLOCK = 512
PAX_LIMIT = 64 << 10
# No file can be larger (off_t); a size beyond it is a forgery.
SIZE_LIMIT = (1 << 63) - 1
ZERO_BLOCK = bytes(BLOCK)
MAGICS = (b"ustar\x0000", b"ustar  \x00")  # POSIX ustar; GNU's old format (no name prefix)

_REGULAR = (b"0", b"\x00")
_PAX = b"x"
_REFUSED = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a directory",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"g": "a global pax header",
    b"K": "a GNU long link name",
    b"L": "a GNU long name",
    b"S": "a GNU sparse file",
}


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    offset: int  # of its (first) header


def shown(name: str) -> str:
    """A member name fit for a one-line message, however long or odd it is."""
    return repr(name if len(name) <= 100 else name[:100] + "...")


class TarReader:
    """Members of the tar archive in ``f``, read in order.

    ``where`` (the file's path) starts every error message. Call ``next``
    for each member's header, then ``read`` for its data; ``next`` returns
    None at the end-of-archive marker, and raises BadBundle "truncated" if
    the file ends before it.
    """

    def __init__(self, f: BinaryIO, where: str):
        self.f, self.where = f, where
        self.offset = 0  # of the next block to read
        self._current: Member | None = None  # returned by next, its data not read yet

    def next(self) -> Member | None:
        """The next regular file's header; None at the end of the archive."""
        assert self._current is None, "read each member before the next"
        start = self.offset
        pax: tuple[str | None, int | None] | None = None  # path and size from a pax header
        while True:
            offset = self.offset
            block = self._block()
            if block == ZERO_BLOCK:
                if pax is not None:
                    raise self._error(f"a pax header at byte {start} describes no member")
                self._end(offset)
                return None
            kind, name, size = self._header(block, offset)
            if kind == _PAX:
                if pax is not None:
                    raise self._error(f"two pax headers in a row at byte {offset}")
                if size > PAX_LIMIT:
                    raise self._error(f"damaged bundle (a tar header of {size} bytes, more than {PAX_LIMIT})")
                pax = self._pax(self._data(size, name), name, offset)
                continue
            path, pax_size = pax or (None, None)
            name = name if path is None else path
            size = size if pax_size is None else pax_size
            if kind not in _REGULAR:
                what = _REFUSED.get(kind, f"of unknown type {kind!r}")
                raise self._error(f"member {shown(name)} is {what}; a bundle holds regular files only")
            self._current = Member(name, size, start)
            return self._current

    def read(self, member: Member) -> bytes:
        """All of ``member``'s data; the caller bounds ``member.size`` first."""
        assert member is self._current, "read the member next returned, once"
        self._current = None
        return self._data(member.size, member.name)

    def _end(self, offset: int) -> None:
        """Check the second zero block of the end-of-archive marker that starts at ``offset``."""
        second = self._read(BLOCK)
        if len(second) < BLOCK:
            raise self._error(f"truncated: half an end-of-archive marker at byte {offset}")
        if second != ZERO_BLOCK:
            raise self._error(f"damaged bundle (a lone zero block at byte {offset})")
        self.offset += BLOCK

    def _pax(self, data: bytes, name: str, offset: int) -> tuple[str | None, int | None]:
        """The path and size a pax extended header sets (None where it sets none)."""
        try:
            records = _pax_records(data)
            path = records.get(b"path")
            size = records.get(b"size")
            if size is not None and (not size.isdigit() or int(size) > SIZE_LIMIT):
                raise ValueError(f"bad size {size[:30]!r}")
            return (None if path is None else path.decode()), (None if size is None else int(size))
        except ValueError as e:  # UnicodeDecodeError too
            raise self._error(f"pax header {shown(name)} at byte {offset}: {e}") from None

    def _header(self, block: bytes, offset: int) -> tuple[bytes, str, int]:
        """Type, name and size of the header ``block``, once it proves to be one."""
        problem = _header_problem(block)
        if problem:
            if offset == 0:
                raise self._error(f"not a VML bundle (not a tar archive: {problem})")
            raise self._error(f"damaged tar header at byte {offset} ({problem})")
        name = block[:100].split(b"\0", 1)[0]
        if block[257:265] == MAGICS[0] and block[345] != 0:
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        name = name.decode("utf-8", "replace")
        size = _number(block[124:136])
        if size is None:
            raise self._error(f"member {shown(name)} has a bad size field {bytes(block[124:136])!r}")
        return block[156:157], name, size

    def _block(self) -> bytes:
        block = self._read(BLOCK)
        if len(block) < BLOCK:
            if self.offset == 0:
                raise self._error(f"not a VML bundle (not a tar archive: {len(block)} bytes long)")
            if block:
                raise self._error(f"truncated at byte {self.offset + len(block)}, in a tar header")
            raise self._error(f"truncated at byte {self.offset}, where a header or the end-of-archive marker was due")
        self.offset += BLOCK
        return block

    def _data(self, size: int, name: str) -> bytes:
        data = self._read(size)
        padding = -size % BLOCK
        if len(data) < size or len(self._read(padding)) < padding:
            raise self._error(f"truncated in member {shown(name)}")
        self.offset += size + padding
        return data

    def _read(self, n: int) -> bytes:
        try:
            return self.f.read(n)
        except OSError as e:
            raise self._error(f"cannot read it ({e.strerror})") from None

    def _error(self, problem: str) -> BadBundle:
        return BadBundle(f"{self.where}: {problem}")


def _header_problem(block: bytes) -> str | None:
    """Why ``block`` is not a ustar header, or None if it is one."""
    stored = _octal(block[148:156])
    if stored is None:
        return "no checksum"
    blanked = block[:148] + b" " * 8 + block[156:]
    # tar allows either sum: some old tars summed signed chars.
    if stored not in (sum(blanked), sum(struct.unpack("512b", blanked))):
        return "bad checksum"
    if block[257:265] not in MAGICS:
        return "not a ustar header"
    return None


def _number(field: bytes) -> int | None:
    """A size field: octal digits, or base-256 with its top bit set (never negative)."""
    if field[0] == 0x80:
        n = int.from_bytes(field[1:], "big")
    elif field[0] & 0x80:  # 0xff starts a negative number
        return None
    else:
        n = _octal(field)
    return n if n is not None and n <= SIZE_LIMIT else None


def _octal(field: bytes) -> int | None:
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    if not digits or digits.strip(b"01234567"):
        return None
    return int(digits, 8)


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """The records of a pax extended header: each ``LEN KEY=VALUE\\n``, LEN counting all of it."""
    records = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        length = data[pos:space]
        if space < 0 or not length.isdigit() or length.startswith(b"0"):
            raise ValueError(f"bad record at offset {pos}")
        end = pos + int(length)
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if end > len(data) or data[end - 1 : end] != b"\n" or not eq or not key:
            raise ValueError(f"bad record at offset {pos}")
        if key in records:
            raise ValueError(f"repeated key {key[:30].decode('ascii', 'replace')!r}")
        records[key] = value
        pos = end
    return records
