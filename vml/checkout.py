"""Writing an entry out as plain files: disks as sparse raw images.

Files are built in a hidden staging directory inside the destination and
renamed into place once complete, so an interrupted checkout never leaves a
partial image under a real name. Holes are not written, so the images stay
sparse; worker threads fetch, check and decompress chunks in parallel while
at most ``4 * workers`` chunks are held in memory.
"""

import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from .chunkmap import ChunkTable
from .errors import AlreadyExists, StorageError
from .objects import HOLE
from .progress import SILENT, Progress
from .repository import Repository
from .store import storage_error


def checkout(
    repo: Repository, name: str, dest: Path | str, *, progress: Progress = SILENT, workers: int | None = None
) -> list[Path]:
    """Write entry ``name`` into directory ``dest``; return the paths written."""
    entry = repo.entry(name)
    resolved = repo.resolve(entry.digest)
    dest = Path(dest)
    jobs = [(dest / f"{n}.img", t, 0o644, f"entry {name!r}, disk {n}") for n, t in resolved.disks.items()]
    jobs += [(dest / n, t, mode, f"entry {name!r}, file {n}") for n, (t, mode) in resolved.files.items()]
    for target, *_ in jobs:
        if os.path.lexists(target):
            raise AlreadyExists(f"{target} already exists; check out into an empty or new directory")
    created = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest, prefix=".vml-checkout."))
    except OSError as e:
        raise storage_error(e, f"checking out entry {name!r} into {dest}") from None
    progress.start(sum(t.size for _, t, _, _ in jobs))
    workers = workers or os.cpu_count() or 2
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="vml-checkout") as pool:
            for i, (_, table, mode, where) in enumerate(jobs):
                _write_table(repo, table, staging / str(i), mode, where, pool, 4 * workers, progress)
        for i, (target, *_) in enumerate(jobs):
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging / str(i), target)
    except OSError as e:
        raise storage_error(e, f"checking out entry {name!r} into {dest}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(dest.iterdir()):
            dest.rmdir()  # a failed checkout leaves no trace
    return [target for target, *_ in jobs]


def _write_table(repo, table: ChunkTable, path: Path, mode: int, where: str, pool, inflight: int, progress) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    pending: deque = deque()
    try:
        os.ftruncate(fd, table.size)
        for index in range(table.count):
            if table.digest(index) == HOLE:
                progress.advance(table.chunk_length(index))
                continue
            pending.append(pool.submit(_write_chunk, repo, table, index, fd, where))
            while pending and (len(pending) > inflight or pending[0].done()):
                progress.advance(pending.popleft().result())
        while pending:
            progress.advance(pending.popleft().result())
        os.fsync(fd)
        os.fchmod(fd, mode)
    except BaseException:
        wait(list(pending))
        raise
    finally:
        os.close(fd)


def _write_chunk(repo: Repository, table: ChunkTable, index: int, fd: int, where: str) -> int:
    data = repo.read_chunk(table, index, where)
    if os.pwrite(fd, data, index * table.chunk_size) != len(data):
        raise StorageError(f"{where}: short write")
    return len(data)


def write_stream(repo: Repository, table: ChunkTable, path: Path, where: str, workers: int | None = None) -> None:
    """Write one disk or file of an entry to ``path``, which must not exist yet."""
    workers = workers or os.cpu_count() or 2
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="vml-checkout") as pool:
            _write_table(repo, table, path, 0o600, where, pool, 4 * workers, SILENT)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
