"""Writing an entry out as plain files: disks as sparse raw images.

Files are built in a hidden staging directory inside the destination and
linked into place once complete, so an interrupted checkout never leaves a
partial image under a real name. Holes are not written, so the images stay
sparse; worker threads fetch, check and decompress chunks in parallel while
at most ``4 * workers`` chunks are held in memory.

An entry may come from anyone (a bundle, a remote), and the destination may
already hold things: every file and directory is created relative to a
directory descriptor with O_NOFOLLOW, so a symbolic link already in the
destination is refused, never written through, and files lose their setuid,
setgid and sticky bits unless the caller asks to keep them.
"""

import contextlib
import errno
import os
import secrets
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from ..errors import AlreadyExists, StorageError, UsageError
from ..files import storage_error
from ..progress import SILENT, Progress
from ..repo.chunkmap import ChunkTable
from ..repo.repository import Repository

PLAIN_MODE_BITS = 0o777
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def checkout(
    repo: Repository,
    name: str,
    dest: Path | str,
    *,
    keep_special_bits: bool = False,
    progress: Progress = SILENT,
    workers: int | None = None,
) -> list[Path]:
    """Write entry ``name`` into directory ``dest``; return the paths written.

    ``keep_special_bits`` keeps the setuid, setgid and sticky bits files had
    when saved; otherwise only the permission bits are kept.
    """
    entry = repo.entry(name)
    if entry.manifest.is_environment:
        raise UsageError(
            f"entry {name!r} is an environment backup: its files are in the mount (REPO/{name}/), "
            f"and `vml env restore {name} --area AREA` writes them into a VM's disk"
        )
    resolved = repo.resolve(entry.digest)
    dest = Path(dest)
    mask = 0o7777 if keep_special_bits else PLAIN_MODE_BITS
    jobs = [(f"{n}.img", t, 0o644, f"entry {name!r}, disk {n}") for n, t in resolved.disks.items()]
    jobs += [(n, t, mode & mask, f"entry {name!r}, file {n}") for n, (t, mode) in resolved.files.items()]
    created = not os.path.lexists(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise storage_error(e, f"checking out entry {name!r} into {dest}") from None
    try:
        for rel, *_ in jobs:
            _check_free(root, dest, rel)
        progress.start(sum(t.size for _, t, _, _ in jobs))
        _write_all(repo, root, dest, name, jobs, progress, workers or os.cpu_count() or 2)
    finally:
        os.close(root)
        if created:
            with contextlib.suppress(OSError):
                dest.rmdir()  # only if empty: a failed checkout into a new directory leaves no trace
    return [dest / rel for rel, *_ in jobs]


def _write_all(repo, root: int, dest: Path, name: str, jobs, progress, workers: int) -> None:
    staging = f".vml-checkout.{secrets.token_hex(8)}"
    placed: list[tuple[int, str]] = []  # (directory fd, name) of files linked into place
    made: list[tuple[int, str]] = []  # directories this checkout created, innermost last
    dir_fds: dict[tuple, int] = {(): root}
    try:
        os.mkdir(staging, 0o700, dir_fd=root)
        staged = os.open(staging, DIR_FLAGS, dir_fd=root)
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="vml-checkout") as pool:
                for i, (_, table, mode, where) in enumerate(jobs):
                    fd = os.open(
                        str(i),
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o600,
                        dir_fd=staged,
                    )
                    try:
                        _write_table(repo, table, fd, where, pool, 4 * workers, progress)
                        os.fchmod(fd, mode)
                    finally:
                        os.close(fd)
            for i, (rel, *_) in enumerate(jobs):
                *parts, leaf = rel.split("/")
                parent = _open_dirs(dir_fds, tuple(parts), dest, made)
                try:
                    os.link(str(i), leaf, src_dir_fd=staged, dst_dir_fd=parent, follow_symlinks=False)
                except FileExistsError:
                    raise AlreadyExists(
                        f"{dest / rel} already exists; check out into an empty or new directory"
                    ) from None
                placed.append((parent, leaf))
        except BaseException:
            for parent, leaf in placed:
                with contextlib.suppress(OSError):
                    os.unlink(leaf, dir_fd=parent)
            for parent, sub in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(sub, dir_fd=parent)
            raise
        finally:
            for i in range(len(jobs)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(str(i), dir_fd=staged)
            os.close(staged)
            os.rmdir(staging, dir_fd=root)
    except OSError as e:
        raise storage_error(e, f"checking out entry {name!r} into {dest}") from None
    finally:
        for key, fd in dir_fds.items():
            if key:
                os.close(fd)


def _open_dirs(dir_fds: dict, parts: tuple, dest: Path, made: list) -> int:
    """A descriptor of directory ``parts`` under the destination, made where missing, never through a link."""
    if parts in dir_fds:
        return dir_fds[parts]
    parent = _open_dirs(dir_fds, parts[:-1], dest, made)
    try:
        os.mkdir(parts[-1], 0o755, dir_fd=parent)
        made.append((parent, parts[-1]))
    except FileExistsError:
        pass
    try:
        fd = os.open(parts[-1], DIR_FLAGS, dir_fd=parent)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _not_a_directory(dest.joinpath(*parts)) from None
        raise
    dir_fds[parts] = fd
    return fd


def _check_free(root: int, dest: Path, rel: str) -> None:
    """Refuse early if ``rel`` exists, or a directory on its way is a link or a file."""
    *parts, leaf = rel.split("/")
    fd = root
    try:
        for i, part in enumerate(parts):
            try:
                nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _not_a_directory(dest.joinpath(*parts[: i + 1])) from None
                raise
            if fd != root:
                os.close(fd)
            fd = nxt
        with contextlib.suppress(FileNotFoundError):
            os.lstat(leaf, dir_fd=fd)
            raise AlreadyExists(f"{dest / rel} already exists; check out into an empty or new directory")
    finally:
        if fd != root:
            os.close(fd)


def _not_a_directory(path: Path) -> UsageError:
    return UsageError(f"{path}: not a directory (a link or a file); refusing to write there")


def _write_table(repo, table: ChunkTable, fd: int, where: str, pool, inflight: int, progress) -> None:
    """Write the chunks with data at their offsets; holes stay holes."""
    pending: deque = deque()
    try:
        os.ftruncate(fd, table.size)
        progress.advance(table.size - table.allocated())
        for index, _, _ in table.records():
            pending.append(pool.submit(_write_chunk, repo, table, index, fd, where))
            while pending and (len(pending) > inflight or pending[0].done()):
                progress.advance(pending.popleft().result())
        while pending:
            progress.advance(pending.popleft().result())
        os.fsync(fd)
    except BaseException:
        wait(list(pending))
        raise


def _write_chunk(repo: Repository, table: ChunkTable, index: int, fd: int, where: str) -> int:
    data = repo.read_chunk(table, index, where)
    if os.pwrite(fd, data, index * table.chunk_size) != len(data):
        raise StorageError(f"{where}: short write")
    return len(data)


def write_stream(repo: Repository, table: ChunkTable, path: Path, where: str, workers: int | None = None) -> None:
    """Write one disk or file of an entry to ``path``, which must not exist yet."""
    workers = workers or os.cpu_count() or 2
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="vml-checkout") as pool:
            _write_table(repo, table, fd, where, pool, 4 * workers, SILENT)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
