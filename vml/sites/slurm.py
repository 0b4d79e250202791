"""Talking to Slurm through its commands: sbatch, squeue, scancel.

The commands, not a Python binding: pyslurm must be built against the
exact libslurm of the site (its API changes with every Slurm release, and
PyPI has no wheels), while sbatch, squeue and scancel keep their options
and ``--parsable``/``--format`` output across releases, are what a site's
own scripts use, and read the site's slurm.conf (or ``SLURM_CONF``) as
every user's jobs do. Each is run without a shell, with a deadline, and its
error is turned into one line.
"""

import re
import shutil
import subprocess

from ..errors import UsageError, VmlError

TIMEOUT = 60.0
_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}")  # Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_JOB = re.compile(r"\d+")


class SlurmError(VmlError):
    """Slurm refused or did not answer."""

    exit_status = 17


def check_time(text: str) -> str:
    if not _TIME.fullmatch(text):
        raise UsageError(f"--time {text!r}: use Slurm's forms, e.g. 30, 2:00:00 or 1-12:00:00")
    return text


def time_seconds(text: str) -> int:
    """Seconds in a --time value (minutes alone, as Slurm reads a bare number)."""
    days, _, rest = check_time(text).rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        hms = [*parts, 0, 0][:3]
        return int(days) * 86400 + hms[0] * 3600 + hms[1] * 60 + hms[2]
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def check_job(job: str) -> str:
    if not _JOB.fullmatch(job):
        raise UsageError(f"invalid Slurm job id {job!r}: a number, as `vml deploy` printed it")
    return job


def _run(args: list[str], stdin: str | None = None) -> str:
    if shutil.which(args[0]) is None:
        raise SlurmError(f"{args[0]} not found: install Slurm's client commands (Debian: slurm-client)")
    try:
        r = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{args[0]} did not answer in {TIMEOUT:.0f} s (is slurmctld up?)") from None
    if r.returncode != 0:
        why = " ".join(r.stderr.split()) or f"exit status {r.returncode}"
        raise SlurmError(f"{args[0]} failed: {why}")
    return r.stdout


def submit(script: str, options: list[str]) -> str:
    """Submit batch ``script`` (given on stdin) with sbatch ``options``; returns the job id."""
    out = _run(["sbatch", "--parsable", *options], stdin=script).strip()
    job = out.split(";")[0]  # --parsable: "JOBID" or "JOBID;CLUSTER"
    if not _JOB.fullmatch(job):
        raise SlurmError(f"sbatch answered {out!r}, not a job id")
    return job


def queued(job: str) -> dict[int, str]:
    """Array task -> Slurm state of the tasks squeue still knows (pending ones as one line per range)."""
    out = _run(["squeue", "-h", "-r", "-j", check_job(job), "-o", "%K|%T"])
    states = {}
    for line in out.splitlines():
        task, _, state = line.partition("|")
        if task.isdigit():
            states[int(task)] = state.strip().lower()
    return states


def cancel(job: str) -> None:
    _run(["scancel", check_job(job)])
