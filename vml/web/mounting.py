"""Mounting the logbook from the web server, whose many threads must not fork a FUSE daemon.

vmlfs forks its serving process. Forked from a process with running
threads (uvicorn's, the jobs'), the child could inherit a lock some other
thread held, and hang. So the mount is started from a fresh interpreter
(multiprocessing's spawn), which calls the same library function as `vml
mount` and sends back its outcome.
"""

import multiprocessing
import threading
from pathlib import Path

from .. import control
from ..errors import VmlError

START_TIMEOUT = 120.0


def _mount_child(home: str, mountpoint: str, conn) -> None:
    from vmlfs import daemon

    try:
        daemon.mount(Path(home), Path(mountpoint))
        conn.send(("ok", ""))
    except VmlError as e:
        conn.send(("error", str(e)))
    except Exception as e:
        conn.send(("error", f"cannot mount the logbook at {mountpoint}: {type(e).__name__}: {e}"))


def mount(home: Path, mountpoint: Path | None = None) -> Path:
    """Mount the logbook of ``home`` (at the default place unless given); returns where it is mounted."""
    mountpoint = (mountpoint or control.default_mountpoint()).absolute()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_mount_child, args=(str(home), str(mountpoint), child), daemon=False)
    proc.start()
    child.close()
    try:
        if not parent.poll(START_TIMEOUT):
            proc.kill()
            raise VmlError(f"cannot mount the logbook at {mountpoint}: it did not start in {START_TIMEOUT:.0f} s")
        state, message = parent.recv()
    except EOFError:
        state, message = "error", f"cannot mount the logbook at {mountpoint}: the mounting process died"
    finally:
        proc.join(10)
        parent.close()
    if state != "ok":
        raise VmlError(message)
    return mountpoint


_mounting = threading.Lock()  # two Starts at once mount once


def ensure_mounted(home: Path, mountpoint: Path | None = None) -> Path:
    """The mount point of ``home``'s logbook, mounting it first (at ``mountpoint``) if it is not mounted."""
    with _mounting:
        state = control.mount_state(home)
        return Path(state["mountpoint"]) if state else mount(home, mountpoint)


def unmount(home: Path) -> Path:
    from vmlfs import daemon

    state = control.mount_state(home)
    if state is None:
        raise VmlError("the logbook is not mounted")
    mountpoint = Path(state["mountpoint"])
    daemon.stop(home, mountpoint)
    return mountpoint
