"""One task of `vml deploy --slurm` on its node: a private home, a mount, one VM, then nothing left behind.

The batch script (vml.sites.deploy) starts ``vml deploy task`` with the
task's spec on stdin. The task:

1. makes a private VML home in node-local scratch (``$SLURM_TMPDIR``,
   ``$TMPDIR`` or /tmp) holding only the config.toml the spec carries, so
   base images come through the site's remote and proxies into a cache on
   this node, and mounts that home's logbook inside it;
2. opens the pinned entry in a working area and boots it with plain QEMU,
   under the policy the spec and the machine (/etc/vml/policy.toml) set;
3. waits until the guest powers off, or until Slurm signals (USR1, sent
   deploy.stop_margin() seconds before the time limit) that time is nearly
   up, then stops it in order (ACPI, forced after a third of that margin);
4. with a results prefix, saves the area as PREFIX-N; the repository's
   writer lock is waited for as long as the job may run
   (``[limits] lock_wait``), so many tasks ending together all save;
5. always, success or not: stops the VM, closes the area, unmounts and
   removes the private home. On SIGTERM (`vml deploy cancel`, scancel, or
   the time limit's end) it skips the save and goes straight to this step,
   which fits in Slurm's KillWait (30 s by default).

Its progress goes to ``RECORDS/JOBID/task-N.json`` at every step, which is
what `vml deploy status` reads, and the guest's serial console to
``RECORDS/JOBID/task-N.console.log`` at the end, all through
vml.sites.records: a JOBID directory that is not the user's own, or that
others may write in, stops the task before it starts anything.
"""

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from .. import config, control
from ..errors import UsageError, VmlError
from ..files import open_regular
from ..remotes.remote import flush_counters
from ..times import now_iso
from ..vms import areas, boot
from . import deploy
from .records import Records, open_records

log = logging.getLogger(__name__)

POLL = 1.0
STOP_TIMEOUT = 60.0


class Cancelled(Exception):
    """SIGTERM: Slurm cancelled the task or its time ran out."""


class Task:
    def __init__(self, spec: dict, env=os.environ):
        if spec.get("version") != deploy.SPEC_VERSION:
            raise UsageError(f"deploy spec version {spec.get('version')!r}: this vml reads {deploy.SPEC_VERSION}")
        self.spec = spec
        self.job = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID") or "local"
        self.index = int(env.get("SLURM_ARRAY_TASK_ID") or 1)
        self.node = socket.gethostname()
        self.records: Records | None = None  # RECORDS/JOBID, opened by the first note
        self.record = {"task": self.index, "job": self.job, "node": self.node, "pid": os.getpid()}
        self.scratch = Path(env.get("SLURM_TMPDIR") or env.get("TMPDIR") or "/tmp")
        self.stop_asked = False
        self.home: Path | None = None
        self.area = f"task-{self.index}"

    def note(self, state: str, **more) -> None:
        self.record.update(state=state, updated=now_iso(), **more)
        if self.records is None:
            with open_records(Path(self.spec["records"])) as top:
                self.records = top.job(self.job)
        try:
            self.records.write(f"task-{self.index}.json", (json.dumps(self.record, indent=1) + "\n").encode())
        except OSError as e:  # the VM matters more than its record
            log.warning("cannot write the record of task %s in %s: %s", self.index, self.records.path, e)

    def run(self, mounter) -> int:
        """Run the task to its end; returns the exit status for Slurm.

        Records that are not safe to write (vml.sites.records) raise before anything has started.
        """
        self.note("starting", started=now_iso())
        signal.signal(signal.SIGUSR1, self._time_nearly_up)
        signal.signal(signal.SIGTERM, self._cancelled)
        mountpoint = None
        try:
            self.home = Path(tempfile.mkdtemp(prefix=f"vml-task-{self.job}-{self.index}.", dir=self.scratch))
            os.environ["VML_HOME"] = str(self.home)  # anything that asks for the home finds this one
            (self.home / "config.toml").write_text(self.spec["config"])
            cfg = config.Config.load(self.home)
            mountpoint = self.home / "mnt"
            mounter.mount(self.home, mountpoint)
            self._boot(cfg)
            self._wait()
            if self.spec.get("save_as"):
                name = f"{self.spec['save_as']}-{self.index}"
                self.note("saving", entry=name)
                message = f"vml deploy: job {self.job} task {self.index} on {self.node}"
                areas.save_area(self.home, self.area, name, message)
            self.note("closing")
            self._clean(mounter, mountpoint)
            self.note("done", ended=now_iso())
            return 0
        except Cancelled:
            self._clean(mounter, mountpoint)
            self.note("cancelled", ended=now_iso())
            return 143
        except (VmlError, OSError) as e:
            self._clean(mounter, mountpoint)
            self.note("failed", ended=now_iso(), error=str(e))
            log.error("%s", e)
            return 1
        finally:
            self.records.close()
            self.records = None

    def _boot(self, cfg: config.Config) -> None:
        self.note("booting")
        ref = f"{self.spec['repository']}:{self.spec['entry']}"
        rec = areas.open_area(self.home, cfg, ref, self.spec.get("results"), self.area)
        if rec.manifest != self.spec["manifest"]:
            raise VmlError(
                f"entry {self.spec['entry']} of {self.spec['repository']} changed since it was submitted "
                f"(manifest {rec.manifest[:16]}, submitted {self.spec['manifest'][:16]}); not run"
            )
        options = {"accel": self.spec.get("accel") or "auto"}
        vm = boot.boot(self.home, self.area, "qemu", options, self.spec.get("memory_mib"), self.spec.get("vcpus"))
        self.note("running", vm=vm.vm)

    def _wait(self) -> None:
        options = {"accel": self.spec.get("accel") or "auto"}
        while True:
            rec = boot.load_record(self.home, self.area)
            if rec is None or boot.vm_state(self.home, rec, options) == "stopped":
                return
            if self.stop_asked:
                self.note("stopping", stopped="the job's time limit was near")
                boot.stop(self.home, self.area, timeout=float(self.spec.get("stop_timeout") or STOP_TIMEOUT))
                return
            time.sleep(POLL)

    def _time_nearly_up(self, signum, frame) -> None:
        self.stop_asked = True

    def _cancelled(self, signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one cleanup, even if Slurm signals again
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        raise Cancelled()

    def _clean(self, mounter, mountpoint: Path | None) -> None:
        """Leave nothing: no VM, no area (nor its lease), no mount, no private home."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.home is None:
            return
        with contextlib.suppress(VmlError, OSError):
            if boot.load_record(self.home, self.area) is not None:
                boot.stop(self.home, self.area, force=True, timeout=5)
        console = areas.areas_dir(self.home) / self.area / "console.log"
        # What the guest printed, for `vml deploy status` readers; never written through what lies at the name.
        with contextlib.suppress(OSError, VmlError), open_regular(console, "console log") as f:
            self.records.write(f"task-{self.index}.console.log", f)
        if (areas.areas_dir(self.home) / self.area).exists():
            try:
                boot.close(self.home, self.area, discard=True)
            except (VmlError, OSError) as e:
                log.error("task %s: cannot close area %s: %s", self.index, self.area, e)
        if mountpoint is not None and control.is_mounted(mountpoint):
            try:
                mounter.stop(self.home, mountpoint)
            except (VmlError, OSError) as e:
                log.error("task %s: cannot unmount %s: %s", self.index, mountpoint, e)
        flush_counters()
        if mountpoint is None or not control.is_mounted(mountpoint):  # never delete through a mount
            shutil.rmtree(self.home, ignore_errors=True)
