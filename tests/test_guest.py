"""A real guest boots from a working area on the mount, and its change is saved.

The guest (tests/guest/build.py, Debian kernel + busybox on a syslinux FAT
disk) reads BASE.TXT of its disk, writes GUEST.TXT and powers off.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import need
from helpers import mtype

BOOT_TIMEOUT = 180


def boot(disk: Path, cache: str) -> str:
    """Boot the guest under TCG from ``disk``; return what it printed."""
    r = subprocess.run(
        [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
            "-drive",
            f"file={disk},format=raw,if=virtio,cache={cache}",
        ],
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    return r.stdout


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_the_guest_boots_from_an_area_and_its_write_is_saved(vml, mounted, guest_disk, tmp_path, cache):
    vm = tmp_path / "vm"
    vm.mkdir()
    shutil.copy(guest_disk, vm / "disk.img")
    vml("init", tmp_path / "rep1")
    vml("save", "guest", "--from", vm, "-m", "the test guest")
    vml("open", "guest", "--area", "run")
    out = boot(mounted / "areas" / "run" / "disk.img", cache)
    assert "VML-GUEST-DONE" in out, out[-2000:]
    vml("save", "booted", "--area", "run", "-m", f"after a boot with cache={cache}")

    saved = mtype(mounted / "rep1" / "booted" / "disk.img", "GUEST.TXT")
    assert saved.returncode == 0 and saved.stdout.strip() == "guest read: hello from the base image tag: base"
    parent = mtype(mounted / "rep1" / "guest" / "disk.img", "GUEST.TXT")
    assert parent.returncode != 0  # the parent entry is unchanged
    assert mtype(mounted / "rep1" / "guest" / "disk.img", "BASE.TXT").stdout == "hello from the base image\n"
    show = vml("show", "booted").stdout
    assert "kind:      incremental" in show and "parent:    guest" in show


@pytest.mark.parametrize("server", ["nginx", "a static server without ranges"])
def test_the_guest_boots_from_an_area_on_a_remote_entry(vml, home, mounted, guest_disk, tmp_path, server):
    """Publish the guest, boot it from an area opened on the remote entry, save into a local repository; from
    nginx, and from Python's http.server, which answers every Range request with the whole file."""
    from conftest import Vml
    from servers import Nginx, StaticServer

    need("nginx")
    publisher = Vml(tmp_path / "publisher", tmp_path)
    vm = tmp_path / "vm"
    vm.mkdir()
    shutil.copy(guest_disk, vm / "disk.img")
    publisher("init", tmp_path / "published-repo")
    publisher("save", "guest", "--from", vm)
    publisher("keygen", tmp_path / "key")
    publisher("publish", tmp_path / "pub", "--key", tmp_path / "key")
    origin = Nginx(tmp_path / "pub") if server == "nginx" else StaticServer(tmp_path / "pub")
    try:
        vml("remote", "add", "cern", origin.url, "--key", tmp_path / "key.pub")
        vml("init", tmp_path / "mine")
        vml("open", "cern:guest", "--area", "run")
        if server == "nginx":
            assert len(origin.object_requests()) <= 2  # the manifest and chunk map, no data yet
        out = boot(mounted / "areas" / "run" / "disk.img", "writeback")
        assert "VML-GUEST-DONE" in out, out[-2000:]
        if server == "nginx":
            fetched = sum(size for _, p, st, size in origin.requests() if p.split("/")[1] in ("objects", "packs"))
            stored = sum(p.stat().st_size for d in ("objects", "packs") for p in (tmp_path / "pub" / d).glob("*/*"))
            print(f"booting fetched {fetched} of {stored} stored bytes from the origin ({100 * fetched / stored:.1f}%)")
            assert 0 < fetched <= 1.05 * stored  # a frame read alone, then its pack whole: a little twice
        else:  # whole packs only, each once however many reads wanted it
            packs = [p for p, st in origin.requests() if p.startswith("/packs/") and not p.endswith(".idx")]
            assert packs and len(packs) == len(set(packs)), packs
        vml("save", "booted", "--area", "run")
        saved = mtype(mounted / "mine" / "booted" / "disk.img", "GUEST.TXT")
        assert saved.returncode == 0 and saved.stdout.strip() == "guest read: hello from the base image tag: base"
        assert "[on cern:guest]" in vml("log", "mine").stdout
    finally:
        origin.stop()
