"""Writing an ext2/3/4 file system with e2fsprogs' debugfs, one checked command at a time.

debugfs runs every line of a command file whatever the line before did: a
failed ``cd`` leaves the next ``write`` in the previous directory. So one
``debugfs -w -f -`` process reads its commands from a pipe, one at a time.
Each is followed by a comment line, which debugfs echoes as it is (its
output is unbuffered in this mode, stderr joined to stdout here): what it
printed between its echo of the command and the comment is the command's
answer. Anything there but what the command prints when it works is an
error, and no further command is sent. Paths are absolute and checked by
the caller (the restore's plan); every name is quoted by ``quote``.
"""

import contextlib
import re
import shutil
import subprocess
from pathlib import Path

from ..errors import NotFound, StorageError
from ..files import storage_error

MAX_ARG = 3900  # bytes of one quoted argument: two fit in the 8191 bytes debugfs reads as one line
MAX_NAME = 255  # bytes of one name in an ext2/3/4 directory
_MARK = "#vml-done"
_ALLOCATED = re.compile(r"Allocated inode: [0-9]+")


class Unsafe(ValueError):
    """A name debugfs could not take safely (a line break, a NUL, too long): that record is skipped."""


def quote(s: str) -> str:
    """One debugfs argument: in double quotes, a quote doubled (the ss parser's rule).

    A line break or NUL would end the command and start another (debugfs
    runs a line starting with "!" in a shell), and an argument over
    MAX_ARG bytes could push a line past what debugfs reads at once: both
    are Unsafe.
    """
    try:
        size = len(s.encode(errors="surrogateescape"))
    except UnicodeEncodeError:
        raise Unsafe(f"unencodable name {s[:60]!r}") from None
    if any(c in s for c in "\n\r\0") or size > MAX_ARG:
        raise Unsafe(f"unsafe name {s[:60]!r}")
    return '"' + s.replace('"', '""') + '"'


def check_names(path: str) -> None:
    """Unsafe unless every name of ``path`` fits an ext directory entry and the path fits a command."""
    quote(path)
    if any(len(n.encode(errors="surrogateescape")) > MAX_NAME for n in path.split("/")):
        raise Unsafe(f"a name of {path[:60]!r} is longer than {MAX_NAME} bytes")


def find(tool: str) -> str:
    exe = shutil.which(tool) or f"/usr/sbin/{tool}"
    if not Path(exe).exists():
        raise NotFound(f"{tool} (e2fsprogs) is not installed: `apt-get install e2fsprogs`")
    return exe


class Debugfs:
    """One ``debugfs -w`` session on the file system at byte ``offset`` of ``disk``."""

    def __init__(self, disk: Path, offset: int, where: str, staging: Path, large_inodes: bool = True):
        self.disk, self.where, self.staging, self.large_inodes = disk, where, staging, large_inodes
        self.count = 0
        target = f"{disk}?offset={offset}" if offset else str(disk)
        self.proc = subprocess.Popen(
            [find("debugfs"), "-w", "-f", "-", target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        said = self._answer("")
        if any(not line.startswith("debugfs ") for line in said):  # only its banner: the file system is open
            self._fail("opening it", said)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """End the session: debugfs writes its bitmaps and closes the file system."""
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):  # it ended already: nothing left to tell it
                self.proc.stdin.close()
            self.proc.wait()
        self.proc.stdout.close()

    def run(self, *words: str) -> None:
        """Run one command (its arguments quoted by the caller); StorageError if debugfs says anything of it."""
        line = " ".join(words)
        said = self._answer(line)
        expected = [f"debugfs: {line}"]
        if said[:1] == expected and all(self._fine(words[0], out) for out in said[1:]):
            return
        self._fail(f"`{line[:200]}`", said[1:] if said[:1] == expected else said)

    @staticmethod
    def _fine(command: str, out: str) -> bool:
        """What debugfs prints when a command works: a new inode's number, or an empty line (rm)."""
        return not out or (command in ("write", "mknod") and _ALLOCATED.fullmatch(out) is not None)

    def _answer(self, line: str) -> list[str]:
        """What debugfs printed for ``line`` (and its echo), up to the marker sent after it."""
        self.count += 1
        mark = f"{_MARK} {self.count}"
        try:
            self.proc.stdin.write(((line + "\n") if line else "").encode(errors="surrogateescape"))
            self.proc.stdin.write(f"{mark}\n".encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._fail(f"`{line[:200]}`", ["debugfs ended"])
        said = []
        while True:
            out = self.proc.stdout.readline()
            if not out:
                self._fail(f"`{line[:200]}`", [*said, "debugfs ended"])
            text = out.decode(errors="surrogateescape").rstrip("\n")
            if text == mark:
                return said
            said.append(text)

    def _fail(self, what: str, said: list[str]):
        self.close()
        detail = next((s.strip() for s in said if s.strip()), "no answer")
        raise StorageError(f"{self.where}: writing {self.disk} stopped at {what}: {detail}")

    def write_file(self, path: str, chunks) -> None:
        """Create regular file ``path`` (absent, its parent checked) with the bytes ``chunks`` yields.

        The bytes go through one staged file at a time, so a restore holds
        one chunk of a file in memory, never the file.
        """
        staged = self.staging / "file"
        try:
            with open(staged, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
        except OSError as e:
            raise storage_error(e, f"{self.where}: staging {path} for debugfs") from None
        parent, name = path.rsplit("/", 1)
        self.run("cd", quote(parent or "/"))
        self.run("write", quote(str(staged)), quote(name))

    def mknod_fifo(self, path: str) -> None:
        parent, name = path.rsplit("/", 1)
        self.run("cd", quote(parent or "/"))
        self.run("mknod", quote(name), "p")

    def set_xattr(self, path: str, key: str, value: bytes) -> None:
        staged = self.staging / "xattr"
        try:
            staged.write_bytes(value)
        except OSError as e:
            raise storage_error(e, f"{self.where}: staging an attribute of {path} for debugfs") from None
        # -r: the value as stored on disk (ACLs included), not converted again.
        self.run("ea_set", "-r", "-f", quote(str(staged)), quote(path), quote(key))

    def set_attrs(self, path: str, mode: int, uid: int, gid: int, mtime_ns: int, atime_ns: int) -> int:
        """Owner, mode and times (0: not given) of ``path``; how many times its inode cannot hold.

        Inodes of 128 bytes keep seconds as a signed 32-bit number (1901 to
        2038); larger ones add two epoch bits and nanoseconds (to 2446).
        """
        q = quote(path)
        self.run("sif", q, "uid", str(uid))
        self.run("sif", q, "gid", str(gid))
        self.run("sif", q, "mode", f"0{mode:o}")
        dropped = 0
        for field, ns in (("mtime", mtime_ns), ("atime", atime_ns)):
            sec, nsec = divmod(ns, 1_000_000_000)
            if not ns or (not self.large_inodes and not -(1 << 31) <= sec < 1 << 31):
                dropped += bool(ns)
                continue
            self.run("sif", q, field, f"@{sec}")  # debugfs sets the epoch bits from it too
            if self.large_inodes:
                low = sec & 0xFFFFFFFF
                epoch = ((sec - (low - (1 << 32) if low >= 1 << 31 else low)) >> 32) & 3
                self.run("sif", q, f"{field}_extra", str((nsec << 2) | epoch))
        return dropped
