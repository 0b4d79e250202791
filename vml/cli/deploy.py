"""vml deploy: run an entry as a Slurm job array (one VM per task), follow it, cancel it; and the task itself."""

import json
import sys
from pathlib import Path

from .. import config
from ..errors import UsageError
from ..sites import deploy
from ..sites.task import Task
from .areas import _memory
from .output import table

SPEC_LIMIT = 1 << 20


def cmd_deploy(args) -> int:
    verb, *rest = args.words
    if verb == "status":
        return _status(args, rest)
    if verb == "cancel":
        return _cancel(args, rest)
    if verb == "task":
        return _task(rest)
    if rest:
        raise UsageError(f"unexpected {' '.join(rest)!r}: vml deploy ENTRY --slurm [options]")
    if not args.slurm:
        raise UsageError("say where to run it: --slurm (the only batch system vml submits to)")
    how = deploy.DeployOptions(
        count=args.count,
        partition=args.partition,
        time=args.time,
        memory_mib=_memory(args.memory),
        vcpus=args.vcpus,
        save_as=args.save_as,
        repo=args.repo,
        sbatch_args=tuple(args.sbatch_arg or ()),
        accel=args.accel,
        records=Path(args.records) if args.records else None,
    )
    done = deploy.submit(config.Config.load(), verb, how)
    saves = f"; results will be {done.results[0]} … {done.results[-1]}" if done.results else ""
    print(f"submitted job {done.job}: {done.count} task(s) of {done.entry}{saves}")
    print(f"follow it with `vml deploy status {done.job}`; records in {done.records}")
    return 0


def _records(args) -> Path:
    return deploy.records_dir(config.Config.load(), deploy.DeployOptions(records=args.records and Path(args.records)))


def _status(args, rest) -> int:
    if len(rest) > 1:
        raise UsageError("vml deploy status [JOBID]")
    records = _records(args)
    jobs = rest or deploy.all_jobs(records)
    found = [deploy.job_status(records, j) for j in jobs]
    if args.json:
        print(json.dumps(found if not rest else found[0], indent=2))
        return 0
    if not found:
        print(f"(no deployments in {records})")
    for job in found:
        print(f"job {job['job']}: {job['entry']} of {job['repository']}, {job['count']} task(s), {job['submitted']}")
        rows = [[t["task"], t["node"] or "-", t["state"], t["entry"] or "-", t["error"] or ""] for t in job["tasks"]]
        print("\n".join("  " + line for line in table(rows, ["task", "node", "state", "entry", ""])))
    return 0


def _cancel(args, rest) -> int:
    if len(rest) != 1:
        raise UsageError("vml deploy cancel JOBID")
    deploy.cancel(_records(args), rest[0])
    print(f"cancelled job {rest[0]}; its tasks stop their VMs and clean up")
    return 0


def _task(rest) -> int:
    """On a node, under Slurm: the spec comes on stdin from the batch script."""
    from vmlfs import daemon  # the task mounts its private logbook

    if rest:
        raise UsageError("vml deploy task reads its spec on stdin")
    text = sys.stdin.read(SPEC_LIMIT + 1)
    try:
        spec = json.loads(text)
        if not isinstance(spec, dict) or len(text) > SPEC_LIMIT:
            raise ValueError("not a JSON object under 1 MiB")
    except ValueError as e:
        raise UsageError(f"vml deploy task: the spec on stdin does not parse ({e})") from None
    return Task(spec).run(daemon)


def register(cli) -> None:
    sp = cli.add(
        "deploy",
        cmd_deploy,
        "run an entry on a Slurm cluster, one VM per task; `deploy status [JOBID]`, `deploy cancel JOBID`",
    )
    sp.add_argument("words", nargs="+", metavar="ENTRY | status [JOBID] | cancel JOBID")
    sp.add_argument("--slurm", action="store_true", help="submit to Slurm (sbatch)")
    sp.add_argument("--count", type=int, default=1, metavar="N", help="VMs to run, one per array task (default 1)")
    sp.add_argument("--partition", metavar="P")
    sp.add_argument("--time", metavar="T", help="Slurm time limit, e.g. 2:00:00; the VM is stopped and saved before it")
    sp.add_argument("--memory", metavar="SIZE", help="the VM's memory (default: the entry's)")
    sp.add_argument("--vcpus", type=int, metavar="V", help="the VM's vCPUs, and CPUs per task")
    sp.add_argument("--save-as", metavar="PREFIX", help="save each task's result as PREFIX-1 … PREFIX-N")
    sp.add_argument("--accel", choices=("auto", "kvm", "tcg"), help="QEMU accelerator on the nodes (default auto)")
    sp.add_argument("--sbatch-arg", action="append", metavar="ARG", help="passed to sbatch as is (repeatable)")
    sp.add_argument("--records", metavar="DIR", help="where tasks record their progress (default $VML_HOME/deploys)")
    sp.add_argument("--json", action="store_true", help="status as JSON")
