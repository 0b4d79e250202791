"""vml deploy --slurm against a real one-node Slurm cluster (munged, slurmctld, slurmd on this machine).

Each task boots the busybox test guest under TCG through a real mount, with
its base read from a real nginx origin through a real Squid; what the tasks
leave behind (areas, QEMU processes, mounts, leases, scratch homes) is
checked from outside, as a site admin would.
"""

import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vml.errors import UsageError
from vml.sites import deploy
from vml.sites.task import Task

from conftest import Vml, hold_lock, need, need_fuse, need_root
from helpers import mtype
from servers import Nginx, Slurm, Squid

EXPECTED = "guest read: hello from the base image tag: base"
TASK_TIMEOUT = 420


@pytest.fixture(scope="module")
def cluster():
    need("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "qemu-system-x86_64", "squid", "nginx")
    need_fuse()
    slurm = Slurm()
    yield slurm
    slurm.stop()


@pytest.fixture
def site(cluster, guest_disk, tmp_path):
    """A publisher's certified guest on nginx behind a Squid; a user with the remote and a shared repository."""
    pub = Vml(tmp_path / "publisher", tmp_path)
    shutil.copy(guest_disk, tmp_path / "guest.img")
    pub("init", tmp_path / "origin-repo")
    pub("save", "guest", "--from", tmp_path / "guest.img")
    pub("keygen", tmp_path / "signing")
    pub("keygen", tmp_path / "certifier")
    pub("certify", "guest", "--key", tmp_path / "certifier", "--level", "production")
    pub("publish", tmp_path / "pub", "--key", tmp_path / "signing")
    origin, squid = Nginx(tmp_path / "pub"), Squid()
    user = Vml(tmp_path / "user", tmp_path)
    user.env.update(cluster.env)
    user("remote", "add", "cern", origin.url, "--key", tmp_path / "signing.pub", "--proxy", squid.url)
    user("init", tmp_path / "shared", "--name", "shared")
    try:
        yield {"vml": user, "origin": origin, "squid": squid, "dir": tmp_path, "pub": tmp_path / "pub"}
    finally:
        assert_nothing_left(tmp_path / "shared")
        squid.stop()
        origin.stop()


def job_of(out: str) -> str:
    assert out.startswith("submitted job "), out
    return out.split()[2].rstrip(":")


def wait_tasks(vml, job: str, done, timeout: float = TASK_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(vml("deploy", "status", job, "--json").stdout)
        if done([t["state"] for t in status["tasks"]]):
            return status
        assert time.monotonic() < deadline, f"tasks of job {job} still {status['tasks']}"
        time.sleep(1)


def task_processes() -> str:
    """Processes a task could leave: QEMU of its areas, the task itself or the mount it forked."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in out.splitlines() if "vml-task-" in line or "vml deploy task" in line)


def assert_nothing_left(shared: Path) -> None:
    deadline = time.monotonic() + 30
    while task_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert task_processes() == ""
    mounts = Path("/proc/mounts").read_text()
    assert "vml-task-" not in mounts
    assert list(Path("/tmp").glob("vml-task-*")) == []
    assert [p.name for p in (shared / "leases").glob("*")] == []


def test_two_tasks_boot_the_certified_guest_and_save_their_results(site, tmp_path):
    vml, d = site["vml"], site["dir"]
    vml("trust", "add", d / "certifier.pub", "--name", "cern-certifier")
    vml("trust", "policy", "--require", "production")
    before = len(site["origin"].requests())
    args = ("--slurm", "--count", "2", "--save-as", "run", "--repo", "shared", "--memory", "256M", "--accel", "tcg")
    out = vml("deploy", "cern:guest", *args).stdout
    job = job_of(out)
    assert "results will be run-1 … run-2" in out
    # The script carries all a task needs; nothing comes from this environment.
    script = (d / "user" / "deploys" / f"{job}.sh").read_text()
    assert site["origin"].url in script and site["squid"].url in script and "[policy]" in script

    status = wait_tasks(vml, job, lambda states: all(s in ("done", "failed", "cancelled") for s in states))
    assert [t["state"] for t in status["tasks"]] == ["done", "done"], status["tasks"]
    assert [t["entry"] for t in status["tasks"]] == ["run-1", "run-2"]
    assert all(t["node"] for t in status["tasks"])
    table = vml("deploy", "status", job).stdout
    assert "run-1" in table and "done" in table
    assert f"job {job}: guest of cern, 2 task(s)" in vml("deploy", "status").stdout  # every job recorded
    assert not Path("/vml").is_mount()  # the tasks needed no /vml on this node

    for i in (1, 2):
        assert "VML-GUEST-DONE" in (d / "user" / "deploys" / job / f"task-{i}.console.log").read_text()
    mounted = d / "usermnt"
    vml("mount", mounted)
    try:
        for name in ("run-1", "run-2"):
            assert mtype(mounted / "shared" / name / "guest.img", "GUEST.TXT").stdout.strip() == EXPECTED
    finally:
        vml("umount", mounted)
    log = vml("log", "shared").stdout
    assert "run-1" in log and "run-2" in log

    # Two nodes read the base through one Squid: the origin served each published file about once.
    served = [(p, n) for _, p, _, n in site["origin"].requests()[before:] if p != "/catalog.json"]
    stored = sum(p.stat().st_size for p in site["pub"].rglob("*") if p.is_file() and p.name != "catalog.json")
    assert 0 < sum(n for _, n in served) <= 1.1 * stored, (served, stored)

    line = vml.fails("deploy", "cern:guest", *args)
    assert "--save-as run: run-1, run-2 already in shared; choose another prefix" in line
    vml("trust", "policy", "--require", "gold")
    line = vml.fails("deploy", "cern:guest", "--slurm", "--accel", "tcg", status=16)
    assert "entry 'guest' of cern is not certified at level 'gold'" in line


def test_cancel_mid_boot_leaves_no_area_vm_mount_or_lease(site, tmp_path):
    vml, d = site["vml"], site["dir"]
    stay = d / "stay.img"
    shutil.copy(d / "guest.img", stay)
    subprocess.run(["mcopy", "-i", stay, "-", "::STAY.TXT"], input=b"stay\n", check=True)
    vml("save", "stayer", "--from", stay, "--repo", "shared")  # a local entry on the shared file system
    job = job_of(vml("deploy", "stayer", "--slurm", "--repo", "shared", "--memory", "256M", "--accel", "tcg").stdout)
    wait_tasks(vml, job, lambda states: states == ["running"], timeout=180)
    assert "-name vml-task-1" in task_processes()
    leases = list((d / "shared" / "leases").glob("*"))
    assert leases, "an area on a local entry holds a lease while it runs"
    vml("deploy", "cancel", job)
    status = wait_tasks(vml, job, lambda states: states[0] in ("done", "failed", "cancelled"), timeout=120)
    assert status["tasks"][0]["state"] == "cancelled", status
    assert_nothing_left(d / "shared")


def test_bad_deploys_fail_at_submission_in_one_line(site):
    vml = site["vml"]
    assert "no entry 'nothing'" in vml.fails("deploy", "cern:nothing", "--slurm")
    assert "--count 0" in vml.fails("deploy", "cern:guest", "--slurm", "--count", "0")
    assert "--time 'soon'" in vml.fails("deploy", "cern:guest", "--slurm", "--time", "soon")
    assert "--save-as: cern is a remote" in vml.fails(
        "deploy", "cern:guest", "--slurm", "--save-as", "x", "--repo", "cern"
    )
    assert "say where to run it: --slurm" in vml.fails("deploy", "cern:guest")
    assert "no deployment 999" in vml.fails("deploy", "status", "999")
    assert "invalid Slurm job id" in vml.fails("deploy", "cancel", "1;rm")


def test_time_nearly_up_stops_the_guest_in_order_and_saves_it(site):
    """--time 1: Slurm signals USR1 15 s before the end; the task stops the guest that stays up, and saves."""
    vml, d = site["vml"], site["dir"]
    stay = d / "stay.img"
    shutil.copy(d / "guest.img", stay)
    subprocess.run(["mcopy", "-i", stay, "-", "::STAY.TXT"], input=b"stay\n", check=True)
    vml("save", "stayer", "--from", stay, "--repo", "shared")
    args = ("--slurm", "--repo", "shared", "--memory", "256M", "--accel", "tcg", "--time", "1", "--save-as", "late")
    job = job_of(vml("deploy", "stayer", *args).stdout)
    submitted = json.loads((d / "user" / "deploys" / f"{job}.json").read_text())
    assert "--signal=B:USR1@15" in submitted["sbatch"] and "--export=NONE" in submitted["sbatch"]
    status = wait_tasks(vml, job, lambda states: states[0] in ("done", "failed", "cancelled"), timeout=150)
    assert status["tasks"][0]["state"] == "done", status
    record = json.loads((d / "user" / "deploys" / job / "task-1.json").read_text())
    assert record["stopped"] == "the job's time limit was near"
    console = (d / "user" / "deploys" / job / "task-1.console.log").read_text()
    assert "VML-GUEST-ALIVE 5" in console  # it stayed up until told to stop
    assert "late-1" in vml("log", "shared").stdout


def test_a_save_waits_for_the_lock_as_long_as_lock_wait_says(vml, home, tmp_path):
    """What lets many tasks save at once: the writer lock's wait is the config's [limits] lock_wait."""
    img = tmp_path / "d.img"
    img.write_bytes(b"x" * 65536)
    vml("init", tmp_path / "rep")
    holder = hold_lock(tmp_path / "rep", "another save", seconds=4)
    try:
        (home / "config.toml").write_text((home / "config.toml").read_text() + "\n[limits]\nlock_wait = 1\n")
        r = vml("save", "a", "--from", img, ok=False)
        assert r.returncode == 5 and "waiting up to 1 s" in r.stderr and "is busy" in r.stderr
        text = (home / "config.toml").read_text().replace("lock_wait = 1", "lock_wait = 60")
        (home / "config.toml").write_text(text)
        r = vml("save", "b", "--from", img)  # waited for the holder to finish
        assert "waiting up to 60 s" in r.stderr
    finally:
        holder.wait()


# -- records another user could have prepared, and names that reach the batch script --------------


def nobody() -> int:
    return pwd.getpwnam("nobody").pw_uid


def plant(link: Path, target: Path, owner: int | None = None) -> None:
    """What another user leaves where a task will write: a symlink to a victim file, owned by them."""
    link.symlink_to(target)
    if owner is not None:
        os.lchown(link, owner, owner)


@pytest.fixture
def task_signals():
    """Task.run sets handlers for SIGTERM and SIGUSR1, as on a node; pytest keeps its own."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


class NoFuse:
    """A node where the mount fails after the guest printed something (the console log exists)."""

    def __init__(self):
        self.mounted = []

    def mount(self, home: Path, mountpoint: Path) -> None:
        self.mounted.append(mountpoint)
        console = home / "areas" / "task-1" / "console.log"
        console.parent.mkdir(parents=True)
        console.write_text("VML-GUEST-SAID hello\n")
        raise OSError("fusermount3: /dev/fuse: no such device")


def a_task(tmp_path: Path, records: Path) -> Task:
    spec = {"version": deploy.SPEC_VERSION, "records": str(records), "config": "", "entry": "e", "repository": "r"}
    (tmp_path / "scratch").mkdir(exist_ok=True)
    env = {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "1", "SLURM_TMPDIR": str(tmp_path / "scratch")}
    return Task(spec, env)


def test_task_records_replace_a_planted_link_and_never_write_through_it(tmp_path, task_signals):
    records = tmp_path / "records"
    (records / "77").mkdir(parents=True, mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for name in ("task-1.console.log", "task-1.json"):
        plant(records / "77" / name, victim)
    assert a_task(tmp_path, records).run(NoFuse()) == 1
    assert victim.read_text() == "precious\n"
    console = records / "77" / "task-1.console.log"
    assert not console.is_symlink() and console.read_text() == "VML-GUEST-SAID hello\n"
    record = json.loads((records / "77" / "task-1.json").read_text())
    assert record["state"] == "failed" and "no such device" in record["error"]
    assert (console.stat().st_mode & 0o777, (records / "77" / "task-1.json").stat().st_mode & 0o777) == (0o600, 0o600)


@pytest.mark.parametrize("who", ["another user", "group-writable", "a symlink"])
def test_a_task_refuses_a_job_directory_others_could_have_prepared(tmp_path, task_signals, who):
    need_root()
    records = tmp_path / "records"
    records.mkdir(mode=0o700)
    job_dir = records / "77"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    if who == "a symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        job_dir.symlink_to(elsewhere)
    else:
        job_dir.mkdir(mode=0o700)
        if who == "another user":
            os.lchown(job_dir, nobody(), nobody())
        else:
            job_dir.chmod(0o770)
    plant(job_dir / "task-1.console.log", victim)
    mounter = NoFuse()
    with pytest.raises(UsageError) as refused:
        a_task(tmp_path, records).run(mounter)
    assert str(job_dir) in str(refused.value) and "\n" not in str(refused.value)
    assert mounter.mounted == [] and victim.read_text() == "precious\n"
    assert sorted(p.name for p in job_dir.iterdir()) == ["task-1.console.log"]


def test_deploy_refuses_records_another_user_owns_or_could_write(vml, tmp_path):
    need_root()
    img = tmp_path / "d.img"
    img.write_bytes(b"x" * 65536)
    vml("init", tmp_path / "rep")
    vml("save", "e", "--from", img)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, nobody(), nobody())
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o1777)
    for records, why in ((theirs, "owned by uid 65534"), (open_to_all, "writable by group or others")):
        line = vml.fails("deploy", "e", "--slurm", "--records", records, status=2)
        assert str(records) in line and why in line, line
        assert list(records.iterdir()) == []


def squeue(cluster) -> str:
    env = dict(os.environ, **cluster.env)
    return subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, check=True).stdout


def scontrol(cluster, *args: str) -> None:
    subprocess.run(["scontrol", *args], env=dict(os.environ, **cluster.env), check=True, timeout=60)


def wait_gone(cluster, job: str, timeout: float = TASK_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while any(i.split("_")[0] == job for i in squeue(cluster).split()):  # an array's tasks are JOB_N
        assert time.monotonic() < deadline, f"job {job} still queued"
        time.sleep(1)


def next_job_id(cluster) -> int:
    """Job ids count up: the one a held job got, plus one, is the next (what another user can guess)."""
    env = dict(os.environ, **cluster.env)
    r = subprocess.run(["sbatch", "--parsable", "--hold", "--wrap", "true"], env=env, capture_output=True, text=True)
    job = r.stdout.strip()
    subprocess.run(["scancel", job], env=env, check=True)
    return int(job) + 1


def test_records_others_can_write_are_refused_before_any_job_runs(site, cluster):
    """The reported attack: --records in a directory anyone can write, a job directory planted ahead."""
    need("scontrol")
    vml, d = site["vml"], site["dir"]
    vml("save", "guest", "--from", d / "guest.img", "--repo", "shared")
    records = d / "open-records"
    records.mkdir()
    records.chmod(0o1777)
    victim = d / "victim"
    victim.write_text("precious\n")
    first = next_job_id(cluster)
    for job in range(first, first + 4):
        planted = records / str(job)
        planted.mkdir(mode=0o777)
        os.lchown(planted, nobody(), nobody())
        plant(planted / "task-1.console.log", victim, nobody())
    args = ("--slurm", "--repo", "shared", "--memory", "256M", "--accel", "tcg", "--records", records)
    r = vml("deploy", "guest", *args, ok=False)
    if r.returncode == 0:  # today's vml submits: let the task show what it does with the planted link
        wait_gone(cluster, job_of(r.stdout))
    assert victim.read_text() == "precious\n"
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{records}: writable by group or others" in r.stderr
    assert squeue(cluster).split() == []
    assert sorted(p.name for p in records.iterdir()) == [str(j) for j in range(first, first + 4)]


def test_a_task_refuses_a_job_directory_it_does_not_own(site, cluster):
    """Whoever made RECORDS/JOBID (vml deploy or the task, whichever came first), the task writes only into its own."""
    need("scontrol")
    vml, d = site["vml"], site["dir"]
    vml("save", "guest", "--from", d / "guest.img", "--repo", "shared")
    records = d / "records"
    args = ("--slurm", "--repo", "shared", "--memory", "256M", "--accel", "tcg", "--records", records)
    job = job_of(vml("deploy", "guest", *args, "--sbatch-arg=--hold").stdout)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (records, records / f"{job}.json", records / f"{job}.sh")}
    victim = d / "victim"
    victim.write_text("precious\n")
    job_dir = records / job
    job_dir.mkdir(exist_ok=True)  # today's vml leaves it to the task
    job_dir.chmod(0o777)
    os.lchown(job_dir, nobody(), nobody())
    plant(job_dir / "task-1.console.log", victim, nobody())
    scontrol(cluster, "release", job)
    wait_gone(cluster, job)
    assert victim.read_text() == "precious\n"
    assert [p.name for p in job_dir.iterdir()] == ["task-1.console.log"]
    out = (records / f"slurm-{job}_1.out").read_text()
    assert f"vml: error: {job_dir}: owned by uid 65534" in out, out
    status = json.loads(vml("deploy", "status", job, "--json", "--records", records).stdout)
    assert [t["state"] for t in status["tasks"]] == ["unknown"]  # it could not say more, and wrote nothing
    assert modes == {"records": 0o700, f"{job}.json": 0o600, f"{job}.sh": 0o600}  # the remote's URLs and proxies


HOSTILE = "rep\ntouch ran-on-the-node #"  # run where sbatch was called, as the job is


def test_the_batch_script_carries_hostile_names_harmlessly(tmp_path):
    """Every value reaches the task in the JSON on stdin; no line of the script is made of one."""
    marker = tmp_path / "ran-on-the-node"
    python = tmp_path / "py"
    python.write_text(f"#!/bin/sh\ncat > {tmp_path / 'stdin'}\n")
    python.chmod(0o755)
    spec = {
        "version": deploy.SPEC_VERSION, "submitted": "2026-12-07T10:00:00Z", "python": str(python),
        "entry": "e\ntouch ran-on-the-node", "repository": HOSTILE, "count": 1,
    }  # fmt: skip
    subprocess.run(["bash", "-c", deploy.batch_script(spec)], cwd=tmp_path, check=True, timeout=30)
    assert not marker.exists()
    assert json.loads((tmp_path / "stdin").read_text()) == spec
    assert sorted(p.name for p in tmp_path.iterdir()) == ["py", "stdin"]


def test_a_repository_directory_name_with_a_newline_is_refused_at_submission(cluster, guest_disk, tmp_path):
    user = Vml(tmp_path / "user", tmp_path)
    user.env.update(cluster.env)
    marker = tmp_path / "ran-on-the-node"
    good = tmp_path / "rep"
    user("init", good, "--name", "rep")
    shutil.copy(guest_disk, tmp_path / "guest.img")
    user("save", "guest", "--from", tmp_path / "guest.img", "--repo", "rep")
    evil = tmp_path / HOSTILE
    good.rename(evil)
    args = ("--slurm", "--memory", "256M", "--accel", "tcg", "--repo", evil)
    r = user("deploy", "guest", *args, ok=False)
    if r.returncode == 0:  # today's vml submits it: let the node show what the name does
        wait_gone(cluster, job_of(r.stdout))
    assert not marker.exists()
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert repr(evil.name) in r.stderr and "vml init" in r.stderr
    assert squeue(cluster).split() == []
