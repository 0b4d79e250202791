"""Talking to a running mount, both ends: where it is, the requests it takes, and how it answers them.

The mount writes $VML_HOME/run/vmlfs.json ({"pid", "mountpoint"}), holds
$VML_HOME/run/vmlfs.lock, and listens on an abstract unix socket named
after the home (a path could exceed the 108 bytes a socket path may have;
the mount checks that a peer runs as the same user, or root). A request is
one line of JSON, the reply one line of JSON: {"ok": true, ...} or
{"ok": false, "error": MESSAGE, "status": EXIT_STATUS}.

The requests are Status, Save and Close (of an area the mount serves).
The command side builds them with ask_save and ask_close; the mount side
reads them with decode, which checks every field, and runs them with
answer, on its Logbook. Only this module knows the socket, the state files
and the shape of a request; the rest of the library reaches the mount
through it, and the mount (vmlfs) only moves the bytes.
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import AlreadyExists, UsageError, VmlError
from .files import write_atomic
from .layout import MEMORY_FILE, memory_state, run_dir
from .names import check_name
from .repo.hardware import Hardware

log = logging.getLogger(__name__)

REQUEST_LIMIT = 64 << 10  # a request line is small; more is refused

TIMEOUT = 600.0  # a save of many changes can take a while


class MountError(VmlError):
    """An error the mount reported, with the exit status it gave."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.exit_status = status


def socket_address(home: Path) -> str:
    """The abstract socket name of the mount of ``home``."""
    return "\0vmlfs-" + hashlib.sha256(str(home.absolute()).encode()).hexdigest()[:32]


def peer_allowed(sock: socket.socket) -> bool:
    """Whether the process at the other end runs as our user or as root."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


def hold_mount_lock(home: Path) -> int:
    """Take the lock that tells other processes a mount is serving ``home``.

    The lock, not the pid, is the test: a killed mount releases it at once,
    even while its process lingers as a zombie or its pid is reused.
    """
    fd = os.open(run_dir(home) / "vmlfs.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyExists(f"{home} is already mounted by another process") from None
    return fd


def write_state(home: Path, state: dict) -> None:
    write_atomic(run_dir(home) / "vmlfs.json", json.dumps(state).encode())


def clear_state(home: Path) -> None:
    (run_dir(home) / "vmlfs.json").unlink(missing_ok=True)


def default_mountpoint() -> Path:
    """Where the logbook is mounted when no place is given: /vml for root, ~/vml for anyone else."""
    return Path("/vml") if os.geteuid() == 0 else Path.home() / "vml"


def mount_state(home: Path) -> dict | None:
    """{"pid", "mountpoint"} of the running mount of ``home``, or None."""
    try:
        fd = os.open(run_dir(home) / "vmlfs.lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it: no mount is serving
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    try:
        state = json.loads((run_dir(home) / "vmlfs.json").read_bytes())
        return state if isinstance(state, dict) and "mountpoint" in state else None
    except (OSError, ValueError):
        return None


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point, even a dead FUSE one (which stat() fails on)."""
    target = str(Path(path).absolute())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == target:
                return True
    return False


def request(home: Path, req) -> dict:
    """Send a request (Status, Save, Close) to the mount; raise MountError if it refuses."""
    return exchange(home, encode(req))


def exchange(home: Path, line: bytes) -> dict:
    """Send one request line to the mount of ``home`` and read its reply; MountError if it refuses."""
    path = home
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as s:
        s.settimeout(TIMEOUT)
        try:
            s.connect(socket_address(home))
            s.sendall(line)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as e:
            raise MountError(f"cannot reach the mount of {path} ({e.strerror or e})") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise MountError(f"the mount of {path} gave no answer") from None
    if not reply.get("ok"):
        raise MountError(reply.get("error", "the mount refused"), int(reply.get("status", 1)))
    return reply


# -- requests ----------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """Is a mount serving, and which areas has it open?"""


@dataclass(frozen=True)
class Save:
    """Save an area the mount serves; ``memory`` adds the area's own memory state file (see save_request)."""

    area: str
    entry: str
    message: str = ""
    memory: bool = False
    drop: tuple[str, ...] = ()
    hardware: dict | None = None


@dataclass(frozen=True)
class Close:
    area: str
    discard: bool = False


REQUESTS = {"status": Status, "save": Save, "close": Close}


def encode(req) -> bytes:
    op = next(name for name, kind in REQUESTS.items() if isinstance(req, kind))
    doc = {"op": op, **asdict(req)}
    return (json.dumps(doc) + "\n").encode()


def decode(data: bytes):
    """The request in one line of JSON, every field checked; ValueError if it is not one."""
    if len(data) > REQUEST_LIMIT:
        raise ValueError("request too long")
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("op") not in REQUESTS:
        raise ValueError(f"unknown request {doc.get('op') if isinstance(doc, dict) else doc!r}")
    kind = REQUESTS[doc.pop("op")]
    fields = kind.__dataclass_fields__
    if set(doc) - set(fields):
        raise ValueError(f"unknown fields {sorted(set(doc) - set(fields))}")
    for name in ("area", "entry", "message"):
        if name in doc and not isinstance(doc[name], str):
            raise ValueError(f"{name!r} must be a string")
    for name in ("memory", "discard"):
        if name in doc and not isinstance(doc[name], bool):
            raise ValueError(f"{name!r} must be true or false")
    if "drop" in doc:
        if not isinstance(doc["drop"], list) or not all(isinstance(x, str) for x in doc["drop"]):
            raise ValueError("'drop' must be a list of file names")
        doc["drop"] = tuple(doc["drop"])
    if doc.get("hardware") is not None:
        Hardware.from_json(doc["hardware"])  # ValueError if it is no description
    if "area" in doc:
        check_name(doc["area"], "area")
    return kind(**doc)


def save_request(home: Path, area: str, entry: str, message: str, files, drop, hardware: Hardware | None) -> Save:
    """A Save for the mount. The mount adds no file but the area's own memory state, never a path asked for."""
    files = files or {}
    if set(files) - {MEMORY_FILE} or any(p != memory_state(home, area) for p in files.values()):
        raise UsageError(f"the mount saves only {MEMORY_FILE} of the area's directory with its disks")
    return Save(area, entry, message, bool(files), tuple(drop), hardware.to_json() if hardware else None)


# -- the command's side ------------------------------------------------------


def ask_save(home: Path, area: str, entry: str, message="", files=None, drop=(), hardware=None) -> dict:
    return request(home, save_request(home, area, entry, message, files, drop, hardware))


def ask_close(home: Path, area: str, discard: bool = False) -> dict:
    return request(home, Close(area, discard))


# -- the mount's side --------------------------------------------------------


def answer(logbook, data: bytes) -> tuple[dict, str | None]:
    """Run one request on the mount's Logbook (in a worker thread: a save takes a while).

    Returns the reply, and the name of an area the mount no longer serves
    (the kernel's cached name must go).
    """
    try:
        req = decode(data)
    except (ValueError, KeyError, TypeError, RecursionError, VmlError) as e:
        return {"ok": False, "error": f"bad request ({e})", "status": 2}, None
    try:
        if isinstance(req, Status):
            return {"ok": True, "pid": os.getpid(), "areas": sorted(logbook.open_areas())}, None
        if isinstance(req, Save):
            files = {MEMORY_FILE: memory_state(logbook.home, req.area)} if req.memory else {}
            hardware = Hardware.from_json(req.hardware) if req.hardware is not None else None
            entry = logbook.save_served_area(
                req.area, req.entry, req.message, files=files, drop=req.drop, hardware=hardware
            )
            return {"ok": True, "entry": entry.name, "manifest": entry.digest.hex()}, None
        logbook.close_area(req.area, req.discard)
        return {"ok": True}, req.area
    except VmlError as e:
        return {"ok": False, "error": str(e), "status": e.exit_status}, None
    except Exception as e:
        log.exception("control request failed")
        return {"ok": False, "error": f"internal error in the mount: {e}", "status": 70}, None
