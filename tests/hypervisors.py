"""Real hypervisors for the tests: a libvirtd of this machine, and govmomi's vSphere simulator.

libvirtd and virtlogd are started as DESIGN.md's recipe says, unless one
already answers on qemu:///system; they are stopped again only if we
started them. The vSphere simulator is built from Debian's
golang-github-vmware-govmomi-dev source (tests/vcsim/main.go) with
golang-go, offline, and cached in ~/.cache/vml-vcsim/.
"""

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from servers import end_process

LIBVIRT_DIRS = ("/var/log/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/run/libvirt")
GOPATH = "/usr/share/gocode"


def libvirt_answers() -> bool:
    r = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True, timeout=30, check=False)
    return r.returncode == 0


class Libvirtd:
    """libvirtd and virtlogd for qemu:///system."""

    def __init__(self):
        self.started = False
        if libvirt_answers():
            return
        for group in ("kvm", "libvirt-qemu"):
            subprocess.run(["groupadd", "-r", "-f", group], check=True)
        if subprocess.run(["id", "libvirt-qemu"], capture_output=True, check=False).returncode != 0:
            subprocess.run(["useradd", "-r", "-g", "libvirt-qemu", "libvirt-qemu"], check=True)
        for d in LIBVIRT_DIRS:
            os.makedirs(d, exist_ok=True)
        # A virtlogd left by a run that was killed holds its pid file: use it.
        if subprocess.run(["pgrep", "-x", "virtlogd"], capture_output=True, check=False).returncode != 0:
            subprocess.run(["virtlogd", "-d"], check=True)
        subprocess.run(["libvirtd", "-d"], check=True)
        self.started = True
        deadline = time.monotonic() + 60
        while not libvirt_answers():
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd did not answer on qemu:///system within 60 s")
            time.sleep(0.5)

    def virsh(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60, check=False
        )

    def domains(self) -> set[str]:
        return set(self.virsh("list", "--all", "--name").stdout.split())

    def stop(self) -> None:
        if not self.started:
            return
        for pidfile in ("/run/libvirtd.pid", "/run/virtlogd.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(Path(pidfile).read_text().strip()), signal.SIGTERM)


def build_vcsim() -> Path:
    """The simulator binary, built once per main.go and govmomi version."""
    source = Path(__file__).parent / "vcsim" / "main.go"
    version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "golang-github-vmware-govmomi-dev"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    key = hashlib.sha256(source.read_bytes() + version.encode()).hexdigest()[:12]
    out = Path.home() / ".cache" / "vml-vcsim" / key / "vcsim"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / "src"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    shutil.copy(source, work / "main.go")
    env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOCACHE=str(out.parent / "gocache"), GOFLAGS="")
    r = subprocess.run(
        ["go", "build", "-o", str(out.with_suffix(".tmp")), "main.go"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"building the vSphere simulator failed:\n{r.stderr[-3000:]}")
    os.rename(out.with_suffix(".tmp"), out)
    return out


class Vcsim:
    """govmomi's ESX simulator on a free loopback port; user "user", password "pass"."""

    def __init__(self, binary: Path):
        self.proc = subprocess.Popen(
            [str(binary), "-listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://"):
            self.proc.kill()
            raise RuntimeError(f"the vSphere simulator did not start: {line}{self.proc.stderr.read()}")
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        self.port = port
        self.url = f"http://127.0.0.1:{port}/sdk"

    def connect(self):
        from pyVim.connect import SmartConnect

        return SmartConnect(protocol="http", host="127.0.0.1", port=self.port, user="user", pwd="pass")

    def stop(self) -> None:
        end_process(self.proc, 10)
