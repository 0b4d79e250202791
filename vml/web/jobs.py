"""Long operations of the release manager: each runs in its own thread and reports how far it is.

A page posts an action and gets a job card at once; the card asks for the
job's state every second until it ends, so a preload, a save or an import
never holds the page. A job's outcome is the line the CLI would print: its
result, or the library's one-line error.

Concurrency: the registry's lock guards only the dict of jobs; a job's own
fields are written by its thread and read by request handlers, each an
attribute assignment of a whole value (atomic under the GIL). What two jobs
may not do at once (boot and close one area, edit config.toml) the library
refuses or serialises with its own locks, as for two `vml` commands.
"""

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import VmlError
from ..progress import Progress

log = logging.getLogger(__name__)

KEEP = 50  # finished jobs shown; older ones are forgotten


@dataclass
class Job(Progress):
    id: int
    title: str
    state: str = "running"  # running, done, failed
    total: int | None = None
    done: int = 0
    result: str = ""  # the outcome line, or the error
    link: tuple[str, str] | None = None  # (label, URL) of what the job made, e.g. a bundle to download
    started: float = field(default_factory=time.time)
    ended: float | None = None
    files: list = field(default_factory=list)  # what it made that goes when the job is forgotten

    def start(self, total: int | None) -> None:
        self.total, self.done = total, 0

    def advance(self, n: int) -> None:
        self.done += n

    @property
    def percent(self) -> int | None:
        if not self.total:
            return 100 if self.state != "running" else None
        return min(100, self.done * 100 // self.total)


class Jobs:
    def __init__(self):
        self._jobs: dict[int, Job] = {}
        self._threads: list[threading.Thread] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def run(self, title: str, work: Callable[[Job], str]) -> Job:
        """Start ``work(job)`` in a thread; what it returns is the job's result line."""
        with self._lock:
            job = Job(next(self._ids), title)
            self._jobs[job.id] = job
            finished = [j.id for j in self._jobs.values() if j.state != "running"]
            for old in finished[:-KEEP]:
                for path in self._jobs.pop(old).files:
                    path.unlink(missing_ok=True)
            t = threading.Thread(target=self._work, args=(job, work), name=f"vml-web-job-{job.id}", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()
        return job

    def _work(self, job: Job, work: Callable[[Job], str]) -> None:
        try:
            job.result = work(job)
            job.state = "done"
        except VmlError as e:
            job.result, job.state = str(e), "failed"
        except Exception as e:  # a bug: one line here, the traceback in the server's log
            log.exception("job %s (%s) failed", job.id, job.title)
            job.result, job.state = f"internal error: {type(e).__name__}: {e}", "failed"
        finally:
            job.ended = time.time()

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def recent(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: -j.id)

    def wait(self, timeout: float) -> list[str]:
        """Let running jobs end, for at most ``timeout`` seconds in all; the titles of those still running."""
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        return [j.title for j in self._jobs.values() if j.state == "running"]
