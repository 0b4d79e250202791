"""vml deploy --slurm against a real one-node Slurm cluster (munged, slurmctld, slurmd on this machine).

Each task boots the busybox test guest under TCG through a real mount, with
its base read from a real nginx origin through a real Squid; what the tasks
leave behind (areas, QEMU processes, mounts, leases, scratch homes) is
checked from outside, as a site admin would.
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Vml, hold_lock, need, need_fuse
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
