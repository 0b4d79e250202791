"""Running the mount: start, serve, stop, and the control socket.

`serve()` mounts, reports readiness through a file descriptor (so that
`vml mount` returns only once the mount works), and runs until unmounted
(`vml umount`, `fusermount3 -u`) or sent SIGTERM/SIGINT. It unmounts only on
a clean exit: after a crash the mount point is left dead rather than empty,
since an empty-looking /vml invites mirroring tools to delete things.

While mounted, the process owns the working areas it has opened (it holds
their locks). Other `vml` processes ask it to save or close those areas
over a unix socket (see vml.control): one JSON request per
connection, one JSON reply.
"""

import contextlib
import ctypes
import json
import logging
import os
import signal
from pathlib import Path

import pyfuse3
import trio

from vml import control
from vml.config import Config
from vml.entries import copies
from vml.entries.reader import ChunkCache, chunk_cache_bytes
from vml.errors import VmlError
from vml.remotes import remote
from vml.view.logbook import AREAS, Logbook

from .fs import VmlFS
from .readahead import ReadAhead

log = logging.getLogger(__name__)

COPY_QUIET = 2.0  # seconds with nothing open in a copied directory before it becomes an entry
COPY_CHECK_INTERVAL = 0.5
# The kernel's readahead for the mount, in KiB. With its default, 128, a cold
# dd of a 1 GiB entry read at 245 MB/s, with 1024 at 510; 4096 gained nothing
# more (docs/mount.md, docs/benchmarks.md).
READAHEAD_KB = 1024
READY_TIMEOUT = 10.0  # seconds for a new mount to answer its first stat


def mount_options(fsname: str = "vmlfs") -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {f"fsname={fsname}", "subtype=vmlfs"}
    if os.geteuid() == 0:
        opts.add("allow_other")  # hypervisors run as their own users
    return opts


M_ARENA_MAX = -8  # glibc mallopt parameter (malloc.h)
TRIM_INTERVAL = 1.0


def _libc():
    with contextlib.suppress(OSError):
        return ctypes.CDLL(None)
    return None


LIBC = _libc()


def bound_malloc() -> None:
    """Keep glibc from holding on to the memory the mount frees.

    The mount makes and drops 256 KiB buffers (chunks, frames) and 8 MiB
    ones (packs) in many threads. glibc keeps freed memory in per-thread
    arenas: measured with bench/fs_read.py, the mount's resident memory
    reached 907 MiB with a 320 MiB chunk cache. Two arenas and a trim every
    second (``_trim_memory``) brought it to 622 MiB at the same speed, and
    with the chunk cache at the bound less 320 MiB to 415 MiB; a fixed mmap
    threshold held it too, but cost a fifth of the cold read rate.
    """
    with contextlib.suppress(AttributeError):
        LIBC.mallopt(M_ARENA_MAX, 2)


async def _trim_memory() -> None:
    """Give what was freed back to the kernel every second (malloc_trim also releases free pages inside arenas)."""
    if LIBC is None or not hasattr(LIBC, "malloc_trim"):
        return
    while True:
        await trio.sleep(TRIM_INTERVAL)
        await trio.to_thread.run_sync(LIBC.malloc_trim, 0)


def serve(home: Path, mountpoint: Path, ready_fd: int | None = None) -> None:
    """Mount the logbook of ``home`` at ``mountpoint`` and serve it until unmounted."""
    bound_malloc()
    try:
        memory = Config.load(home).mount_memory
    except VmlError as e:
        _report(ready_fd, str(e))
        raise SystemExit(1) from None
    logbook = Logbook(home, ChunkCache(chunk_cache_bytes(memory)))
    copies.recover(home)
    ops = VmlFS(logbook, readahead=ReadAhead())
    run_dir = control.run_dir(home)
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        lock_fd = control.hold_mount_lock(home)  # held until this process ends
        pyfuse3.init(ops, str(mountpoint), mount_options())
    except (RuntimeError, VmlError) as e:
        _report(ready_fd, str(e))
        raise SystemExit(1) from None
    clean = False
    try:
        control.write_state(home, {"pid": os.getpid(), "mountpoint": str(mountpoint)})
        trio.run(_main, ops, home, mountpoint, ready_fd)
        clean = True
    except BaseException:
        log.exception("vmlfs stopped on an error; the mount point is left for `vml umount`")
        raise
    finally:
        control.clear_state(home)
        logbook.close()
        pyfuse3.close(unmount=clean)
        os.close(lock_fd)


async def _ready(mountpoint: Path, ready_fd: int | None) -> None:
    """Once the mount answers, set the kernel's readahead for it, then say it is ready.

    The kernel sets its own readahead when it processes FUSE INIT, and a
    file takes the mount's at open: so after the first answer, and before
    `vml mount` returns. Only root may write /sys/class/bdi; others keep
    the kernel's default.
    """
    st = None
    with trio.move_on_after(READY_TIMEOUT):
        st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    if st is None:
        _report(ready_fd, f"the mount did not answer within {READY_TIMEOUT:g} s")
        pyfuse3.terminate()
        return
    path = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    try:
        path.write_text(f"{READAHEAD_KB}\n")
    except OSError as e:
        log.info("kernel readahead of %s left at its default (%s: %s)", mountpoint, path, e.strerror)
    _report(ready_fd, "ok")


async def _main(ops: VmlFS, home: Path, mountpoint: Path, ready_fd: int | None) -> None:
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(control.socket_address(home))
    listener.listen(8)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, nursery)
        nursery.start_soon(_serve_control, trio.SocketListener(listener), ops)
        nursery.start_soon(_finalize_copies, ops)
        nursery.start_soon(_flush_cache_counters)
        nursery.start_soon(_trim_memory)
        nursery.start_soon(ops.readahead.run)
        nursery.start_soon(_ready, mountpoint, ready_fd)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    listener.close()


async def _watch_signals(nursery) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info("signal %s: unmounting", sig)
            pyfuse3.terminate()
            return


async def _serve_control(listener: trio.SocketListener, ops: VmlFS) -> None:
    """Take one request a connection, run it in a worker thread (a save takes a while), reply."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            if not control.peer_allowed(stream.socket):
                log.warning("refused a control request from another user")
                return
            data = b""
            while not data.endswith(b"\n") and len(data) <= control.REQUEST_LIMIT:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
            reply, closed = await trio.to_thread.run_sync(control.answer, ops.logbook, data, limiter=ops.limiter)
            if closed is not None:
                _forget_entry(ops, (AREAS,), closed)
            await stream.send_all((json.dumps(reply) + "\n").encode())

    await trio.serve_listeners(handle, [listener])


async def _flush_cache_counters() -> None:
    """Keep `vml cache status` current while the mount reads from remotes."""
    while True:
        await trio.sleep(COPY_CHECK_INTERVAL)
        await trio.to_thread.run_sync(remote.flush_counters)


async def _finalize_copies(ops: VmlFS) -> None:
    """Turn entries copied into repository directories into entries, once idle."""
    while True:
        await trio.sleep(COPY_CHECK_INTERVAL)
        try:
            ready = await trio.to_thread.run_sync(ops.logbook.ready_copies, COPY_QUIET)
        except Exception:
            log.exception("cannot list copies in progress")
            continue
        for repo, name in ready:
            try:
                entry = await trio.to_thread.run_sync(ops.logbook.finalize_copy, repo, name, limiter=ops.limiter)
                log.info("copied entry %s into %s (manifest %s)", name, repo, entry.digest.hex()[:16])
            except copies.NotTaken as e:
                log.warning("the copy %s/%s stays as it is, not an entry: %s", repo, name, e)
                continue
            except Exception as e:
                log.error("cannot make an entry of the copy %s/%s: %s", repo, name, e)
                continue
            _forget_entry(ops, (repo,), name)


def _forget_entry(ops: VmlFS, parent: tuple, name: str) -> None:
    """Drop the kernel's cached name, so a closed area disappears at once."""
    parent_ino = ops.inode_of(parent)
    if parent_ino is not None:
        pyfuse3.invalidate_entry_async(parent_ino, os.fsencode(name), ignore_enoent=True)


def _report(fd: int | None, message: str) -> None:
    if fd is not None:
        try:
            os.write(fd, message.encode() + b"\n")
            os.close(fd)
        except OSError:
            pass
