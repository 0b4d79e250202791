"""Starting the mount in the background and stopping it.

`start()` forks; the child detaches (new session, cwd /, output to
$VML_HOME/log/vmlfs.log) and serves; the parent waits on a pipe until the
child reports that the mount works, or why it does not, so that `vml mount`
returns only with a usable mount or a clear error.
"""

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vml import control
from vml.errors import AlreadyExists, StorageError, VmlError
from vml.layout import log_path

from .mount import serve

STOP_TIMEOUT = 30.0


def _setup_logging(stream, debug: bool) -> None:
    logging.basicConfig(
        stream=stream,
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("pyfuse3").setLevel(logging.INFO)


def run_foreground(home: Path, mountpoint: Path, debug: bool = False) -> None:
    _setup_logging(sys.stderr, debug)
    serve(home, mountpoint)


def mount(home: Path, mountpoint: Path, foreground: bool = False, debug: bool = False) -> None:
    """Mount the logbook of ``home`` at ``mountpoint``: in the background, or serving here until unmounted."""
    state = control.mount_state(home)
    if state:
        raise AlreadyExists(f"{home} is already mounted at {state['mountpoint']} (pid {state['pid']})")
    mountpoint.mkdir(parents=True, exist_ok=True)
    if control.is_mounted(mountpoint):
        raise AlreadyExists(f"{mountpoint} is already a mount point; `vml umount {mountpoint}` first")
    if foreground:
        run_foreground(home, mountpoint, debug)
    else:
        start(home, mountpoint, debug)


def start(home: Path, mountpoint: Path, debug: bool = False) -> int:
    """Mount in a background process; return its pid once the mount works."""
    log_file = log_path(home)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: detach and serve
        os.close(r)
        code = 1
        try:
            os.setsid()
            os.chdir("/")
            fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            _setup_logging(sys.stderr, debug)
            serve(home, mountpoint, ready_fd=w)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            logging.getLogger(__name__).exception("vmlfs failed")
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as pipe:
        message = pipe.read().strip()
    if message != "ok":
        os.waitpid(pid, 0)
        reason = message or f"it stopped at start; see {log_file}"
        raise StorageError(f"cannot mount the logbook at {mountpoint}: {reason}")
    return pid


def stop(home: Path, mountpoint: Path) -> None:
    """Unmount, and wait for the serving process to release its areas."""
    state = control.mount_state(home)
    if not control.is_mounted(mountpoint):
        raise VmlError(f"{mountpoint} is not mounted")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", str(mountpoint)] if tool else ["umount", str(mountpoint)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        reason = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "unknown reason"
        raise VmlError(f"cannot unmount {mountpoint}: {reason} (is a file on it still open?)")
    if state and state.get("mountpoint") == str(mountpoint):
        deadline = time.monotonic() + STOP_TIMEOUT
        while control.mount_state(home) and time.monotonic() < deadline:
            time.sleep(0.05)
