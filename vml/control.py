"""Talking to a running mount: where it is, and asking it to act on its areas.

The mount writes $VML_HOME/run/vmlfs.json ({"pid", "mountpoint"}), holds
$VML_HOME/run/vmlfs.lock, and listens on an abstract unix socket named
after the home (a path could exceed the 108 bytes a socket path may have;
the mount checks that a peer runs as the same user, or root). A request is
one line of JSON, the reply one line of JSON: {"ok": true, ...} or
{"ok": false, "error": MESSAGE, "status": EXIT_STATUS}.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import struct
from pathlib import Path

from .errors import AlreadyExists, VmlError
from .files import write_atomic
from .layout import run_dir

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


def request(home: Path, op: str, **args) -> dict:
    """Send a request to the mount; raise MountError if it refuses."""
    path = home
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as s:
        s.settimeout(TIMEOUT)
        try:
            s.connect(socket_address(home))
            s.sendall((json.dumps({"op": op, **args}) + "\n").encode())
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
