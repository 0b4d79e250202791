"""Real `vml` processes in milliseconds, for fault loops that kill hundreds of them.

Starting `python -m vml` costs a quarter of a second of imports; a loop of a
thousand kill -9 tries would spend most of its time there. A Forker starts
one small server process that imports vml (and the mount's modules) once and,
on request, forks a child that runs `vml.cli.main(ARGS)` with its own
environment and working directory, exactly as the command would. The child
is an ordinary process of its own: the test kills it with SIGKILL wherever
it is, and the server reaps it and reports how it ended. The server itself
runs no threads, so forking it is safe.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SERVER = r"""
import json, os, sys
# imported once, before any fork
import vml.cli, vml.entries.maintenance, vml.entries.bundle, vml.remotes.publish, vml.vms.areas
import vmlfs.daemon, vmlfs.mount

for line in sys.stdin:
    req = json.loads(line)
    if "wait" in req:
        _, status = os.waitpid(req["wait"], 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        try:
            os.environ.clear()
            os.environ.update(req["env"])
            os.chdir(req["cwd"])
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.setsid()  # its own process group: a mount it starts is killed with it
            code = vml.cli.main(req["args"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 70
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
"""


class Child:
    """One forked `vml` process."""

    def __init__(self, forker: "Forker", pid: int, log: Path):
        self.forker, self.pid, self.log = forker, pid, log
        self.returncode: int | None = None

    def kill(self) -> None:
        """SIGKILL the child, and what it started in its process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)  # killed before it made its group

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = self.forker._ask({"wait": self.pid})["status"]
        return self.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Forker:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._n = 0

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the forker died")
        return json.loads(line)

    def start(self, home: Path, *args, cwd: Path | None = None) -> Child:
        """Fork `vml ARGS` with VML_HOME=home; it runs until it ends or is killed."""
        self._n += 1
        log = self.workdir / f"child-{self._n}.log"
        env = dict(os.environ, VML_HOME=str(home))
        req = {"args": [str(a) for a in args], "env": env, "cwd": str(cwd or self.workdir), "log": str(log)}
        return Child(self, self._ask(req)["pid"], log)

    def run(self, home: Path, *args, cwd: Path | None = None) -> tuple[int, str]:
        """Run `vml ARGS` to its end: (exit status, output)."""
        child = self.start(home, *args, cwd=cwd)
        return child.wait(), child.output()

    def timed(self, home: Path, *args) -> float:
        """How long `vml ARGS` takes; it must succeed."""
        t0 = time.monotonic()
        code, out = self.run(home, *args)
        assert code == 0, out
        return time.monotonic() - t0

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)
