"""`vml deploy --slurm`: run an entry as a Slurm job array, one VM per task, and follow what the tasks did.

Submission checks everything that can be checked before a node is given:
the entry exists (its manifest digest is pinned, so every task runs the
same content), the policy in force accepts it, and the names the results
will take are free. It then writes the batch script. Sites commonly submit
with ``--export=NONE``, so the script carries all a task needs, as JSON on
its standard input: the VML configuration of the task's private home (the
repository path, the remotes with their keys and proxies, the trusted keys
and policy) and what to run. Nothing is read from the submitting user's
environment or home on the node.

Each task records its own progress in ``RECORDS/JOBID/task-N.json``
(vml.sites.task): a small site has no accounting database, and squeue
forgets a job minutes after it ends, so `vml deploy status` reads these
records first and asks squeue only about tasks that have not started.
RECORDS (default ``$VML_HOME/deploys``) must be on a file system the nodes
reach, as the repository for results must be.
"""

import contextlib
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import config
from ..errors import AlreadyExists, CorruptManifest, NotFound, UsageError, VmlError
from ..files import read_regular
from ..names import check_name
from ..repo.repository import Entry, Repository
from ..times import now_iso
from . import slurm
from .records import Records, open_records

SPEC_VERSION = 1
QEMU_OVERHEAD_MIB = 512  # what QEMU, the mount and vml need on the node besides the guest's memory
STOP_MARGIN = 120  # seconds before the time limit when Slurm asks the task to stop its VM and save
MIN_STOP_MARGIN = 15  # for short jobs: a quarter of --time, but at least this
DEFAULT_LOCK_WAIT = 86400.0  # a task waits this long for the results repository's lock, unless --time says less


@dataclass(frozen=True)
class DeployOptions:
    count: int = 1
    partition: str | None = None
    time: str | None = None
    memory_mib: int | None = None
    vcpus: int | None = None
    save_as: str | None = None
    repo: str | None = None
    sbatch_args: tuple[str, ...] = ()
    accel: str | None = None  # kvm, tcg or auto (decided on the node)
    records: Path | None = None


@dataclass(frozen=True)
class Submitted:
    job: str
    entry: str
    count: int
    results: list[str]
    records: Path


def records_dir(cfg: config.Config, how: DeployOptions) -> Path:
    return (how.records or cfg.home / "deploys").absolute()


def result_names(prefix: str, count: int) -> list[str]:
    return [check_name(f"{prefix}-{i}") for i in range(1, count + 1)]


def _check(how: DeployOptions) -> None:
    if not 1 <= how.count <= 10000:
        raise UsageError(f"--count {how.count}: give 1 to 10000 tasks")
    if how.vcpus is not None and not 1 <= how.vcpus <= 1024:
        raise UsageError(f"--vcpus {how.vcpus}: give 1 to 1024")
    if how.time:
        slurm.check_time(how.time)
    if how.partition:
        check_name(how.partition, "partition")
    if how.accel not in (None, "auto", "kvm", "tcg"):
        raise UsageError(f"--accel {how.accel!r}: use auto, kvm or tcg")


def _results(cfg: config.Config, repo: Repository, entry: Entry, how: DeployOptions) -> Repository | None:
    """The repository results are saved into, with the names checked free; None without --save-as."""
    if not how.save_as:
        return None
    target = cfg.open(how.repo) if repo.read_only else repo
    if target.read_only:
        raise UsageError(f"--save-as: {target.name} is a remote; name a local repository with --repo PATH")
    if not repo.read_only and how.repo and cfg.open(how.repo).store.path != repo.store.path:
        raise UsageError(
            f"entry {entry.name} is in {repo.name}, so its results are saved there; to save elsewhere, "
            f"publish it and deploy REMOTE:{entry.name}"
        )
    names = result_names(how.save_as, how.count)
    taken = sorted(set(names) & set(target.refs()))
    if taken:
        shown = ", ".join(taken[:3]) + (" ..." if len(taken) > 3 else "")
        raise AlreadyExists(f"--save-as {how.save_as}: {shown} already in {target.name}; choose another prefix")
    return target


def node_config(cfg: config.Config, repo: Repository, results: Repository | None, how: DeployOptions) -> str:
    """The config.toml of a task's private home: only what the task needs, nothing of this home's state."""
    repos = {}
    if not repo.read_only:
        repos[repo.name] = repo.store.path
    if results is not None:
        repos.setdefault(results.name, results.store.path)
    lock_wait = DEFAULT_LOCK_WAIT if not how.time else max(60.0, slurm.time_seconds(how.time))
    node = config.Config(
        Path("config.toml"),
        repositories={n: Path(p).absolute() for n, p in repos.items()},
        remotes=dict(cfg.remotes),
        max_disk_size=cfg.max_disk_size,
        mount_memory=cfg.mount_memory,
        trust=dict(cfg.trust),
        policy=cfg.policy,
        lock_wait=min(lock_wait, config.NUMBER_LIMITS["lock_wait"]),
    )
    return node.to_toml()


def batch_script(spec: dict) -> str:
    """The script sbatch runs on each node: a fixed PATH, then the task with its spec on stdin.

    No value of the spec makes a line of its own, nor part of a comment (a newline in a name would
    start a command): the Python is quoted, everything else is in the JSON, one line in a quoted
    here-document.
    """
    python = shlex.quote(spec["python"])
    return (
        "#!/bin/bash\n"
        "# Written by `vml deploy`. It runs with --export=NONE: what it runs and everything the task needs\n"
        "# is the JSON below, given to the task on its standard input.\n"
        'export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"\n'
        f"exec {python} -m vml deploy task <<'VML_DEPLOY_TASK'\n"
        f"{json.dumps(spec, separators=(',', ':'))}\n"
        "VML_DEPLOY_TASK\n"
    )


def stop_margin(how: DeployOptions) -> int:
    """Seconds before the time limit when the task is told to stop: room to shut down and save."""
    if not how.time:
        return STOP_MARGIN
    return max(MIN_STOP_MARGIN, min(STOP_MARGIN, slurm.time_seconds(how.time) // 4))


def sbatch_options(entry: Entry, records: Path, how: DeployOptions) -> list[str]:
    opts = [
        "--export=NONE",
        f"--array=1-{how.count}",
        f"--job-name=vml-{entry.name}",
        f"--output={records}/slurm-%A_%a.out",
        f"--signal=B:USR1@{stop_margin(how)}",
    ]
    if how.vcpus:
        opts.append(f"--cpus-per-task={how.vcpus}")
    if how.memory_mib:
        opts.append(f"--mem={how.memory_mib + QEMU_OVERHEAD_MIB}M")
    if how.time:
        opts.append(f"--time={how.time}")
    if how.partition:
        opts.append(f"--partition={how.partition}")
    return [*opts, *how.sbatch_args]


def submit(cfg: config.Config, spec_text: str, how: DeployOptions) -> Submitted:
    """Check and submit ``spec_text`` (ENTRY or REPO:ENTRY) as a job array of ``how.count`` VMs."""
    _check(how)
    repo, entry = cfg.find_entry(spec_text, None if repo_is_results(spec_text) else how.repo)
    if entry.manifest.is_environment:
        raise UsageError(f"entry {entry.name!r} is an environment backup, not a VM")
    cfg.check_certified(repo, entry)
    results = _results(cfg, repo, entry, how)
    with open_records(records_dir(cfg, how)) as rec:
        spec = task_spec(cfg, repo, entry, results, rec.path, how)
        script = batch_script(spec)
        options = sbatch_options(entry, rec.path, how)
        job = slurm.submit(script, options)
        _job_records(rec, job)
        names = result_names(how.save_as, how.count) if how.save_as else []
        info = {k: spec[k] for k in ("submitted", "entry", "repository", "manifest", "count", "results", "save_as")}
        doc = {"job": job, **info, "names": names, "sbatch": options}
        rec.write(f"{job}.json", (json.dumps(doc, indent=1) + "\n").encode())  # 0600, as the script: URLs, proxies
        rec.write(f"{job}.sh", script.encode())
    return Submitted(job, entry.name, how.count, names, rec.path)


def task_spec(
    cfg: config.Config, repo: Repository, entry: Entry, results: Repository | None, records: Path, how: DeployOptions
) -> dict:
    """What each task runs, and the config of its private home: the JSON the batch script gives it."""
    return {
        "version": SPEC_VERSION,
        "submitted": now_iso(),
        "python": sys.executable,
        "entry": entry.name,
        "repository": repo.name,
        "manifest": entry.digest.hex(),
        "count": how.count,
        "results": results.name if results else None,
        "save_as": how.save_as,
        "memory_mib": how.memory_mib,
        "vcpus": how.vcpus,
        "accel": how.accel or "auto",
        "stop_timeout": stop_margin(how) // 3,  # the guest's shut down; then the save has the rest
        "records": str(records),
        "config": node_config(cfg, repo, results, how),
    }


def _job_records(rec: Records, job: str) -> None:
    """Make RECORDS/JOB before the tasks start, if they have not; a job whose directory is unsafe is cancelled."""
    try:
        rec.job(job).close()
    except VmlError as e:
        with contextlib.suppress(slurm.SlurmError):
            slurm.cancel(job)
        raise type(e)(f"{e}; job {job} cancelled") from None


def repo_is_results(spec_text: str) -> bool:
    """REPO:ENTRY names its own repository; then --repo only says where results go."""
    return ":" in spec_text


# -- following a job -----------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(read_regular(path, 1 << 20, "deploy record", error=CorruptManifest))
    except NotFound:
        return None
    except ValueError as e:
        raise CorruptManifest(f"{path}: cannot read the record ({e})") from None
    if not isinstance(doc, dict):
        raise CorruptManifest(f"{path}: not a deploy record")
    return doc


def job_status(records: Path, job: str) -> dict:
    """The job as submitted, with one item per task: node, state, result entry, error."""
    slurm.check_job(job)
    info = _read_json(records / f"{job}.json")
    if info is None:
        raise NotFound(f"no deployment {job} in {records} (see `vml deploy status`)")
    count = info.get("count")
    if not isinstance(count, int) or count < 1:
        raise CorruptManifest(f"{records / f'{job}.json'}: no task count")
    try:
        queued = slurm.queued(job)
    except slurm.SlurmError:
        queued = {}  # squeue forgets finished jobs; the records say what happened
    tasks = []
    for i in range(1, count + 1):
        rec = _read_json(records / job / f"task-{i}.json") or {}
        # Before its first record, a task's state is Slurm's: "running" there means starting here.
        state = rec.get("state") or {"running": "starting"}.get(queued.get(i, ""), queued.get(i)) or "unknown"
        if state not in FINAL and not queued and rec:
            state = "lost"  # Slurm no longer runs it and it never said it ended (killed with -9, node down)
        tasks.append(
            {"task": i, "node": rec.get("node"), "state": state, "entry": rec.get("entry"), "error": rec.get("error")}
        )
    return {**info, "tasks": tasks}


FINAL = ("done", "failed", "cancelled")


def all_jobs(records: Path) -> list[str]:
    if not records.is_dir():
        return []
    jobs = [p.stem for p in records.glob("*.json") if p.stem.isdigit()]
    return sorted(jobs, key=int, reverse=True)


def cancel(records: Path, job: str) -> None:
    if _read_json(records / f"{slurm.check_job(job)}.json") is None:
        raise NotFound(f"no deployment {job} in {records} (see `vml deploy status`)")
    slurm.cancel(job)
