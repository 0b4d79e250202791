"""Real HTTP parts for tests and benchmarks: nginx as the origin, Squid as a
proxy, and a loopback TCP proxy of our own that injects latency, resets,
stalls, truncation and corruption (the kernel here has no netem).

Everything listens on 127.0.0.1 and free ports only.
"""

import contextlib
import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout} s")


def end_process(proc: subprocess.Popen, grace: float) -> None:
    """Terminate ``proc``; kill it if it has not ended after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _public_dir(prefix: str) -> Path:
    """A scratch directory that daemons running as other users can reach."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    d.chmod(0o755)
    return d


def self_signed(directory: Path, ip: str = "127.0.0.1", dns: str | None = None) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) for ``ip``, or for the host name ``dns`` only."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns or ip)])
    alt = x509.DNSName(dns) if dns else x509.IPAddress(ipaddress.ip_address(ip))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{dns or ip}.crt", directory / f"{dns or ip}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)  # as a private key is kept (vml web refuses one others may read)
    return cert_path, key_path


class Nginx:
    """nginx serving ``root`` as a published repository; logs every request."""

    def __init__(self, root: Path, tls: tuple[Path, Path] | None = None):
        """``tls``: (certificate, key) files to serve HTTPS with instead of HTTP."""
        self.root = Path(root)
        self.dir = _public_dir("vml-nginx.")
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        listen = (
            f"127.0.0.1:{self.port} ssl;\n        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]}"
            if tls
            else f"127.0.0.1:{self.port}"
        )
        self.log = self.dir / "access.log"
        user = "user root;" if os.geteuid() == 0 else ""
        conf = f"""
{user}
worker_processes 2;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    log_format vml '$request_method $uri $status $body_bytes_sent';
    access_log {self.log} vml;
    client_body_temp_path {self.dir}/body;
    proxy_temp_path {self.dir}/proxy;
    fastcgi_temp_path {self.dir}/fastcgi;
    uwsgi_temp_path {self.dir}/uwsgi;
    scgi_temp_path {self.dir}/scgi;
    server {{
        listen {listen};
        root {self.root};
        location /objects/ {{ add_header Cache-Control "public, max-age=31536000, immutable"; }}
        location = /catalog.json {{ add_header Cache-Control "public, max-age=61"; }}
    }}
}}
"""
        (self.dir / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen(
            ["nginx", "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir)],
            stderr=open(self.dir / "stderr", "wb"),  # noqa: SIM115
        )
        wait_port(self.port, self.proc, "nginx")

    def requests(self) -> list[tuple[str, str, int, int]]:
        """(method, path, status, body bytes) of every request so far.

        nginx logs a request after its reply is sent, so a client can have
        the reply before the line is written: read until the log stops growing.
        """
        text, deadline = self.log.read_text(), time.monotonic() + 2
        while time.monotonic() < deadline:
            time.sleep(0.05)
            again = self.log.read_text()
            if again == text:
                break
            text = again
        out = []
        for line in text.splitlines():
            method, path, status, size = line.split()
            out.append((method, path, int(status), int(size)))
        return out

    def object_requests(self) -> list[str]:
        return [p for m, p, st, _ in self.requests() if p.startswith("/objects/") and st == 200]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class StaticServer:
    """``python3 -m http.server`` serving ``root``, in its own process: a plain static server that
    ignores Range and answers every GET with 200 and the whole file, as many simple hosts do."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(root), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read_log, daemon=True).start()
        wait_port(self.port, self.proc, "http.server")

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def requests(self) -> list[tuple[str, int]]:
        """(path, status) of every GET so far (the server logs a request once it has answered)."""
        time.sleep(0.2)
        out = []
        for line in list(self.lines):
            words = line.split('"')
            if len(words) >= 3 and words[1].startswith("GET "):
                out.append((words[1].split()[1], int(words[2].split()[0])))
        return out

    def stop(self) -> None:
        end_process(self.proc, 5)


def documented_squid_settings() -> str:
    """The Squid settings docs/remote.md prescribes, exactly as written there."""
    doc = (Path(__file__).parent.parent / "docs" / "remote.md").read_text()
    block = doc.split("<!-- squid settings for vml: begin -->")[1].split("<!-- squid settings for vml: end -->")[0]
    return block.strip().removeprefix("```").removesuffix("```")


class Squid:
    """Squid on a free port: caching in memory (objects up to 16 MiB), or with ``settings``, the cache
    settings given (docs/remote.md's), with their spool directory moved into a temporary one."""

    def __init__(self, settings: str | None = None):
        self.dir = _public_dir("vml-squid.")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cache = """
cache_mem 256 MB
maximum_object_size_in_memory 16 MB
maximum_object_size 16 MB
collapsed_forwarding on
refresh_pattern . 0 20% 4320
"""
        if settings is not None:
            cache = settings.replace("/var/spool/squid", str(self.dir / "spool")) + "\nrefresh_pattern . 0 20% 4320\n"
        conf = f"""
http_port 127.0.0.1:{self.port}
pid_filename {self.dir}/squid.pid
{cache}
memory_replacement_policy lru
access_log stdio:{self.dir}/access.log
cache_log {self.dir}/cache.log
cache_store_log none
coredump_dir {self.dir}
acl local src 127.0.0.1/32
http_access allow local
http_access deny all
shutdown_lifetime 0 seconds
visible_hostname vml-test-squid
netdb_filename none
pinger_enable off
client_db off
"""
        (self.dir / "squid.conf").write_text(conf)
        if os.geteuid() == 0:
            proxy = pwd.getpwnam("proxy")
            os.chown(self.dir, proxy.pw_uid, proxy.pw_gid)
        if "cache_dir" in cache:  # the spool is made once, as DESIGN.md's recipe says
            subprocess.run(["squid", "-f", str(self.dir / "squid.conf"), "-z", "-N"], check=True, capture_output=True)
        self.proc = subprocess.Popen(
            ["squid", "-f", str(self.dir / "squid.conf"), "-N"],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "stderr", "wb"),  # noqa: SIM115
        )
        wait_port(self.port, self.proc, "squid")

    def stop(self) -> None:
        end_process(self.proc, 15)
        shutil.rmtree(self.dir, ignore_errors=True)


class FaultProxy:
    """A TCP relay to ``target_port`` whose faults can be changed while it runs.

    mode: "pass"; "reset" (close each connection as the reply starts);
    "stall" (send nothing of the reply); "slow" (trickle the reply at
    ``rate`` bytes/s); "corrupt" (flip one byte of each reply
    body, or with ``rng`` one random bit at a random place in it); "truncate"
    (end each reply half-way). ``delay`` seconds are added to each direction
    (so a round trip gains twice that), without limiting bandwidth.
    ``corrupted`` counts the replies that had a flip; ``asked`` lists the paths of the GETs relayed.
    """

    def __init__(
        self,
        target_port: int,
        mode: str = "pass",
        delay: float = 0.0,
        rate: int = 1000,
        rng: random.Random | None = None,
    ):
        self.target = target_port
        self.mode, self.delay, self.rate, self.rng = mode, delay, rate, rng
        self.corrupted = 0
        self.asked: list[str] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(128)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._open |= {client, server}
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, reply: bool) -> None:
        """Copy src to dst; replies get the faults. A delay line keeps bandwidth intact."""
        queue: list = []
        cond = threading.Condition()
        done = threading.Event()

        def deliver():
            while True:
                with cond:
                    while not queue:
                        if done.is_set():
                            return
                        cond.wait(0.5)
                    at, data = queue.pop(0)
                pause = at - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                if data is None:
                    self._close(src, dst)
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    self._close(src, dst)
                    return

        if self.delay:
            threading.Thread(target=deliver, daemon=True).start()

        def send(data):
            if self.delay:
                with cond:
                    queue.append((time.monotonic() + self.delay, data))
                    cond.notify()
            elif data is None:
                self._close(src, dst)
            else:
                dst.sendall(data)

        state = {"body_seen": 0, "length": None, "head": b"", "flipped": False}
        try:
            while True:
                data = src.recv(256 << 10)
                if not data:
                    break
                if not reply and data.startswith(b"GET "):
                    self.asked.append(data.split(b" ", 2)[1].decode(errors="replace"))
                if reply and self.mode == "slow":  # a trickle: small pieces, evenly spaced
                    for i in range(0, len(data), 512):
                        time.sleep(512 / self.rate)
                        if self._stopped:
                            return
                        send(data[i : i + 512])
                    continue
                if reply and self.mode != "pass":
                    data = self._fault(data, state)
                    if data is None:
                        send(None)
                        return
                send(data)
        except OSError:
            pass
        finally:
            send(None)
            done.set()

    def _fault(self, data: bytes, st: dict) -> bytes | None:
        mode = self.mode
        if mode == "reset":
            return None
        if st["length"] is None:  # still in the headers
            st["head"] += data
            end = st["head"].find(b"\r\n\r\n")
            if end < 0:
                return b"" if mode == "stall" else data
            head, body = st["head"][: end + 4], st["head"][end + 4 :]
            st["length"] = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    st["length"] = int(line.split(b":")[1])
            if self.rng is not None and st["length"]:
                st["flip_at"] = self.rng.randrange(st["length"])
            if mode == "stall":
                while not self._stopped:
                    time.sleep(0.1)
                return None
            body = self._fault_body(body, st)
            return None if body is None else head + body
        return self._fault_body(data, st)

    def _fault_body(self, body: bytes, st: dict) -> bytes | None:
        start = st["body_seen"]
        st["body_seen"] += len(body)
        if self.mode == "truncate" and st["body_seen"] > st["length"] // 2:
            return None
        if self.mode == "corrupt" and not st["flipped"] and body:
            at = st.get("flip_at")
            if at is None:
                i, mask = len(body) // 2, 0xFF
            elif at < st["body_seen"]:
                i, mask = at - start, 1 << self.rng.randrange(8)
            else:
                i = None  # the random place comes in a later piece
            if i is not None:
                st["flipped"] = True
                body = body[:i] + bytes([body[i] ^ mask]) + body[i + 1 :]
                with self._lock:
                    self.corrupted += 1
        if st["body_seen"] >= st["length"]:  # the next reply on this connection starts afresh
            st.update(length=None, head=b"", body_seen=0, flipped=False, flip_at=None)
        return body

    def _close(self, *socks) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def stop(self) -> None:
        self._stopped = True
        self._sock.close()
        with self._lock:
            socks = list(self._open)
        self._close(*socks)


class Slurm:
    """A one-node Slurm cluster, as a small site runs it: munged, slurmctld and slurmd on this machine.

    Its own munge key and socket, ports and spool, so it touches nothing of
    the system's. ``env`` is what a client needs to reach it (SLURM_CONF).
    The node has 2 CPUs and partition "vml"; tasks run as root.
    """

    def __init__(self):
        for tool in ("munged", "slurmctld", "slurmd", "sbatch", "sinfo"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} not installed (scripts/install-deps installs slurm-wlm and munge)")
        self.dir = Path(tempfile.mkdtemp(prefix="vml-slurm."))
        d = self.dir
        (d / "state").mkdir()
        (d / "spool").mkdir()
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.procs: list[subprocess.Popen] = []
        self._start(
            "munged",
            ["munged", "-F", "-f", f"--socket={d}/munge.sock", f"--key-file={key}", f"--log-file={d}/munged.log",
             f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed"],
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not (d / "munge.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        node = socket.gethostname().split(".")[0]
        ctld, slurmd = free_port(), free_port()
        (d / "slurm.conf").write_text(f"""
ClusterName=vmltest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
KillWait=30
MinJobAge=30
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=vml Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
        self.env = {"SLURM_CONF": str(d / "slurm.conf")}
        env = dict(os.environ, **self.env)
        self._start("slurmctld", ["slurmctld", "-D", "-f", str(d / "slurm.conf")], env)
        self._start("slurmd", ["slurmd", "-D", "-f", str(d / "slurm.conf"), "-N", node], env)
        deadline = time.monotonic() + 60
        while True:
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, check=False)
            if r.stdout.strip() == "idle":
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.stop()
                raise RuntimeError(f"Slurm did not come up: {r.stdout}{r.stderr}")
            time.sleep(0.5)

    def _start(self, name: str, cmd: list[str], env=None) -> None:
        self.procs.append(
            subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(self.dir / f"{name}.stderr", "wb"),  # noqa: SIM115
            )
        )

    def jobs(self) -> str:
        env = dict(os.environ, **self.env)
        return subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, check=False).stdout

    def stop(self) -> None:
        env = dict(os.environ, **self.env)
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True, check=False)
        for proc in reversed(self.procs):
            end_process(proc, 15)
        shutil.rmtree(self.dir, ignore_errors=True)


class ShiftedRanges:
    """A static server whose answer to a Range request is 206 with another range than the one asked for
    (one byte further on, of the same length), and a Content-Range that says so honestly."""

    def __init__(self, root: Path):
        import http.server

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):
                pass

            def do_GET(self):
                asked = self.headers.get("Range", "")
                path = Path(self.translate_path(self.path))
                if not asked.startswith("bytes=") or not path.is_file():
                    return super().do_GET()
                first, last = (int(x) for x in asked.removeprefix("bytes=").split("-"))
                data = path.read_bytes()
                first, last = min(first + 1, len(data) - 1), min(last + 1, len(data) - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
                self.send_header("Content-Length", str(last - first + 1))
                self.end_headers()
                self.wfile.write(data[first : last + 1])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
