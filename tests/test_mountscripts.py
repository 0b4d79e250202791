"""mountscripts/: mount -t fuse.vmlfs and an fstab line, through the real mount(8)."""

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need_fuse

ROOT = Path(__file__).resolve().parent.parent
HELPER = Path("/sbin/mount.fuse.vmlfs")


@pytest.fixture
def helper():
    """Install the helper as mount(8) looks for it, for this test only."""
    need_fuse()
    if HELPER.exists() and HELPER.resolve() != (ROOT / "mountscripts" / "mount.vmlfs").resolve():
        pytest.skip(f"{HELPER} belongs to another installation")
    created = not HELPER.exists()
    if created:
        HELPER.symlink_to(ROOT / "mountscripts" / "mount.vmlfs")
    yield dict(os.environ, VML_BIN=str(Path(sys.executable).parent / "vml"))
    if created:
        HELPER.unlink()


@pytest.fixture
def vml_home(vml, home, tmp_path, image_copy):
    vml("init", tmp_path / "rep1")
    vml("save", "entry1", "--from", image_copy())
    return home


def unmount(mp: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)


@pytest.mark.parametrize("how", ["mount -t", "fstab"])
def test_mount_helper(helper, vml_home, tmp_path, how):
    mp = tmp_path / "vml"
    mp.mkdir()
    if how == "fstab":
        fstab = tmp_path / "fstab"
        fstab.write_text(f"{vml_home}  {mp}  fuse.vmlfs  defaults,nofail  0 0\n")
        cmd = ["mount", "-T", str(fstab), str(mp)]
    else:
        cmd = ["mount", "-t", "fuse.vmlfs", str(vml_home), str(mp)]
    try:
        r = subprocess.run(cmd, env=helper, capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert os.listdir(mp / "rep1") == ["entry1"]
        assert (mp / "rep1/entry1/disk.img").stat().st_size == 64 << 20
        line = next(ln for ln in Path("/proc/mounts").read_text().splitlines() if f" {mp} " in ln)
        assert line.split()[2] == "fuse.vmlfs"
    finally:
        unmount(mp)


def test_mount_helper_names_a_missing_home(helper, tmp_path):
    mp = tmp_path / "vml"
    mp.mkdir()
    r = subprocess.run(
        ["mount", "-t", "fuse.vmlfs", str(tmp_path / "nohome"), str(mp)],
        env=helper,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode != 0 and f"{tmp_path / 'nohome'}: no such VML home" in r.stderr


def test_systemd_unit_and_autofs_map_agree_with_the_helper():
    unit = configparser.ConfigParser()
    unit.read(ROOT / "mountscripts" / "vml.mount")
    assert unit["Mount"]["Type"] == "fuse.vmlfs" and unit["Mount"]["What"] == "/var/lib/vml"
    # systemd requires a mount unit to be named after its mount point
    assert unit["Mount"]["Where"].strip("/").replace("/", "-") + ".mount" == "vml.mount"
    entries = [
        ln.split()
        for ln in (ROOT / "mountscripts" / "auto.vml").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert entries == [["/vml", "-fstype=fuse.vmlfs", ":/var/lib/vml"]]
