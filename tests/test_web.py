"""vml web over real HTTP: the real command serving, and what it lets through.

The browser tests (test_web_browser.py) drive the pages; these check the
rules at the door with plain requests: the Host header, authentication off
loopback, the token and the password, CSRF, names and uploads from requests,
TLS, and bad options.
"""

import contextlib
import json
import os
import pwd
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from vml import config, overview

from helpers import bundle, crafted_backup, d, f, manifest, set_web_password
from servers import end_process, free_port, self_signed, wait_port


class WebServer:
    """`vml web` in a subprocess, with the lines it prints (read as they come: it never blocks on them)."""

    def __init__(self, vml, *args, listen_host="127.0.0.1", env=None):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vml", "web", "--listen", f"{listen_host}:{self.port}", *args],
            env={**vml.env, **(env or {})},
            cwd=vml.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        try:
            wait_port(self.port, self.proc, "vml web")
            self.line(r"^vml web: the release manager")
        except BaseException:
            end_process(self.proc, 10)
            raise
        scheme = "https" if "--tls-cert" in args else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, verify=False, timeout=30, follow_redirects=False)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def line(self, pattern: str) -> re.Match:
        """The first line printed that matches ``pattern``, waiting for it a while."""
        deadline = time.monotonic() + 10
        while not (found := next(filter(None, (re.search(pattern, x) for x in list(self.lines))), None)):
            assert time.monotonic() < deadline, f"vml web printed no line matching {pattern!r}: {self.lines}"
            time.sleep(0.05)
        return found

    def link(self) -> str:
        """The one-time token of the printed sign-in link."""
        return self.line(r"/login\?token=(\S+)").group(1)

    def token(self) -> str:
        """The printed token, for the sign-in form and for scripts."""
        return self.line(r"Authorization: Bearer\): (\S+)$").group(1)

    def csrf(self) -> str:
        """The token a page of this server carries, as the browser would read it."""
        return re.search(r'"X-CSRF-Token": "([^"]+)"', self.client.get("/").text).group(1)

    def login_csrf(self) -> str:
        """The sign-in form's CSRF token (the form of a browser not signed in)."""
        page = httpx.get(f"{self.url}/login", verify=False, timeout=30).text
        return re.search(r'name="csrf" value="([^"]+)"', page).group(1)

    def stop(self):
        self.client.close()
        end_process(self.proc, 30)


@pytest.fixture
def served(vml, tmp_path, image_copy):
    """A repository with two entries, and `vml web ARGS` serving its home; stopped at the end."""
    vml("init", tmp_path / "rep1")
    vml("save", "base", "--from", image_copy(), "-m", "the <b>base</b>")
    vml("save", "child", "--from", image_copy("b.img"), "--parent", "base")
    servers = []

    def start(*args, **kw) -> WebServer:
        servers.append(WebServer(vml, *args, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def test_on_loopback_pages_show_the_tree_and_a_foreign_host_name_gets_nothing(served, tmp_path):
    web = served()
    r = web.client.get("/")
    assert r.status_code == 200
    assert 'data-entry="rep1:base"' in r.text and 'data-entry="rep1:child"' in r.text
    assert "the &lt;b&gt;base&lt;/b&gt;" in r.text  # messages are escaped
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for page in ("/running", "/configure", "/cache", "/usage", "/backup", "/share", "/start?entry=rep1:child"):
        assert web.client.get(page).status_code == 200, page
    # DNS rebinding: a name that resolves to 127.0.0.1 for an attacker's page is still not this server's.
    for host in ("attacker.example", f"attacker.example:{web.port}", f"127.0.0.1:{web.port + 1}", ""):
        r = web.client.get("/", headers={"Host": host})
        assert r.status_code in (400, 421), host
        assert "rep1" not in r.text
    assert web.client.get("/", headers={"Host": f"localhost:{web.port}"}).status_code == 200


def test_off_loopback_every_page_needs_the_printed_token(served, tmp_path):
    web = served(listen_host="0.0.0.0")
    token = web.token()
    assert len(token) >= 30 and len(web.link()) >= 30
    for page in ("/", "/running", "/configure", "/cache", "/usage", "/backup", "/share", "/jobs/1"):
        r = web.client.get(page)
        assert r.status_code == 401, page
        assert "rep1" not in r.text and str(tmp_path) not in r.text, page
    assert web.client.post("/start", data={"entry": "rep1:base"}).status_code == 401
    assert web.client.get("/static/vml.css").status_code == 200  # no data in it
    assert web.client.get("/loginX").status_code == 401  # only /login itself is open
    assert web.client.get("/login?token=wrong").status_code == 401
    assert web.client.get("/", headers={"Authorization": f"Bearer {token}x"}).status_code == 401
    assert web.client.get("/", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    r = web.client.get(f"/login?token={web.link()}")
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert 'data-entry="rep1:child"' in web.client.get("/").text  # the session cookie is kept by the client
    page = web.client.get("/").text
    assert "Sign out" in page and "Max-Age=43200" in cookie.replace("max-age", "Max-Age")
    # Sign out: the session ends here, whatever the browser keeps.
    session = web.client.cookies.get("vml_session")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = web.client.post("/logout", data={"csrf": csrf}, headers={"Origin": web.url.replace("127.0.0.1", "0.0.0.0")})
    assert r.status_code == 403  # another origin
    r = web.client.post("/logout", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    web.client.cookies.set("vml_session", session)  # as a browser that kept the cookie would send it
    assert web.client.get("/").status_code == 401
    web.client.cookies.clear()
    r = web.client.post("/login", data={"secret": token, "csrf": web.login_csrf()})
    assert r.status_code == 303
    # Listening on every address, any of the machine's addresses names it; a DNS name must be known.
    assert web.client.get("/", headers={"Host": f"10.1.2.3:{web.port}"}).status_code == 200
    assert web.client.get("/", headers={"Host": f"rebound.example:{web.port}"}).status_code == 421


def test_a_password_from_config_replaces_the_token(vml, served):
    assert "password set" in set_web_password(vml, "correct horse battery").stdout
    stored = (vml.cwd / "home" / "config.toml").read_text()
    assert "scrypt$" in stored and "correct horse" not in stored
    web = served("--require-auth")
    web.line("sign in with the password")
    assert not any("token" in line for line in web.lines)
    assert web.client.get("/").status_code == 401
    csrf = web.login_csrf()
    r = web.client.post("/login", data={"secret": "wrong password", "csrf": csrf})
    assert r.status_code == 401 and "neither the token nor the password" in r.text
    assert web.client.get("/", headers={"Authorization": "Bearer correct horse battery"}).status_code == 401
    r = web.client.post("/login", data={"secret": "correct horse battery", "csrf": csrf})
    assert r.status_code == 303
    assert web.client.get("/").status_code == 200
    # Signed in, the session has its own CSRF token: the sign-in form's no longer does.
    assert web.csrf() != csrf
    r = web.client.post("/share/export", data={"entry": "rep1:child"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 403


PASSWORD = "correct horse battery"
FLOOD_SECONDS = 10.0
# What an authorised request or the right sign-in may take while the flood runs: generous for a
# loaded 2-core machine, yet far below the flood's length, so one served after the flood fails.
FAST = 3.0
FLOOD = r"""
import collections, encodings.idna, http.client, json, os, sys, threading, time
port, seconds, threads, method, path, body, uid = sys.argv[1:8]
if uid:  # after the imports: Python itself may lie where that user cannot read
    os.setgroups([])
    os.setgid(int(uid))
    os.setuid(int(uid))
counts, end = collections.Counter(), time.monotonic() + float(seconds)
headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}

def guess():
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=60)
    while time.monotonic() < end:
        try:
            conn.request(method, path, body=body or None, headers=headers)
            reply = conn.getresponse()
            reply.read()
            counts[reply.status] += 1
        except Exception:
            counts["error"] += 1
            conn.close()

workers = [threading.Thread(target=guess) for _ in range(int(threads))]
for w in workers:
    w.start()
print("flooding", flush=True)
for w in workers:
    w.join()
print(json.dumps(counts), flush=True)
"""


class Flood:
    """60 threads sending wrong sign-ins for FLOOD_SECONDS from another process (as user ``uid`` if given)."""

    def __init__(self, port: int, method: str, path: str, body: str = "", uid: int | None = None):
        args = [sys.executable, "-I", "-c", FLOOD, str(port), str(FLOOD_SECONDS), "60", method, path, body]
        self.proc = subprocess.Popen([*args, "" if uid is None else str(uid)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "flooding"

    def running(self) -> bool:
        return self.proc.poll() is None

    def counts(self) -> dict[str, int]:
        """How the server answered the guesses: status -> count."""
        out, _ = self.proc.communicate(timeout=FLOOD_SECONDS + 90)
        return json.loads(out)


def timed(call):
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


def probe_during(flood: Flood, call, seconds: float = FLOOD_SECONDS) -> float:
    """The longest ``call()`` took, made again and again while the flood runs (at most ``seconds``)."""
    longest, end = 0.0, time.monotonic() + seconds
    while flood.running() and time.monotonic() < end:
        ok, took = timed(call)
        assert ok, "an authorised request failed during the flood"
        longest = max(longest, took)
    return longest


def test_a_flood_of_wrong_tokens_holds_no_thread_and_costs_only_the_guesser(served):
    web = served("--require-auth")
    assert web.client.get(f"/login?token={web.link()}").status_code == 303
    flood = Flood(web.port, "GET", "/login?token=wrong")
    longest = probe_during(flood, lambda: web.client.get("/").status_code == 200, FLOOD_SECONDS / 2)
    assert longest < FAST, f"GET / took {longest:.1f} s during the flood"  # a session never waits for sign-ins
    # The right token signs in at once, though this user is the one guessing (it cannot be guessed:
    # a back-off protects nothing there), and Bearer works as ever.
    fresh = httpx.Client(base_url=web.url, timeout=60)
    r, took = timed(lambda: fresh.post("/login", data={"secret": web.token(), "csrf": web.login_csrf()}))
    assert r.status_code == 303 and took < FAST, (r.status_code, took)
    longest = probe_during(flood, lambda: web.client.get("/").status_code == 200)
    assert longest < FAST, f"GET / took {longest:.1f} s during the flood"
    r, took = timed(lambda: fresh.get("/", headers={"Authorization": f"Bearer {web.token()}"}))
    assert r.status_code == 200 and took < FAST
    counts = flood.counts()
    # Every guess was answered, nearly all of them 429 at once: a few wrong ones, then the back-off.
    assert counts.get("303", 0) == 0 and counts.get("error", 0) == 0, counts
    assert counts.get("429", 0) > 100 and counts.get("401", 0) <= 10, counts
    fresh.close()


def set_password(vml, password: str = PASSWORD) -> None:
    subprocess.run(
        [sys.executable, "-m", "vml", "web", "--set-password"],
        input=f"{password}\n",
        env=vml.env,
        capture_output=True,
        text=True,
        check=True,
    )


def test_another_users_flood_of_wrong_passwords_neither_stalls_the_server_nor_locks_the_user_out(vml, served):
    if os.geteuid() != 0:
        pytest.skip("needs root, to guess passwords as another user (nobody) of this machine")
    set_password(vml)
    web = served("--require-auth")
    csrf = web.login_csrf()
    assert web.client.post("/login", data={"secret": PASSWORD, "csrf": csrf}).status_code == 303
    # On loopback every user of the machine comes from 127.0.0.1: the back-off is per user there.
    nobody = pwd.getpwnam("nobody").pw_uid
    flood = Flood(web.port, "POST", "/login", urlencode({"secret": "wrong guess", "csrf": csrf}), uid=nobody)
    longest = probe_during(flood, lambda: web.client.get("/").status_code == 200, FLOOD_SECONDS / 2)
    assert longest < FAST, f"GET / took {longest:.1f} s during the flood"
    fresh = httpx.Client(base_url=web.url, timeout=60)
    r, took = timed(lambda: fresh.post("/login", data={"secret": PASSWORD, "csrf": csrf}))
    assert r.status_code == 303 and took < FAST, (r.status_code, took)
    longest = probe_during(flood, lambda: web.client.get("/").status_code == 200)
    assert longest < FAST, f"GET / took {longest:.1f} s during the flood"
    counts = flood.counts()
    # Few passwords were hashed for the guesser (its first tries, then one per back-off), the rest 429.
    assert counts.get("303", 0) == 0 and counts.get("error", 0) == 0, counts
    assert counts.get("429", 0) > 100 and counts.get("401", 0) <= 10, counts
    fresh.close()


def test_the_back_off_doubles_per_client_and_its_table_stays_bounded(monkeypatch):
    from vml.web import signin

    monkeypatch.setattr(signin, "MAX_CLIENTS", 50)
    now = [0.0]
    backoff = signin.Backoff(clock=lambda: now[0])
    assert [backoff.failed("a") for _ in range(signin.FREE_FAILURES)] == [0] * signin.FREE_FAILURES
    assert [backoff.failed("a") for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.wait("a") == 60 and backoff.wait("b") == 0  # one client's guessing costs no other
    for i in range(1000):  # a guesser with many addresses
        backoff.failed(f"192.0.2.{i}")
    assert len(backoff.clients) <= 50 + 1
    assert backoff.wait("198.51.100.1") > 0  # a new address shares the entry of the many, which waits
    assert backoff.wait("uid 1000") == 0  # a local user does not: the owner gets in from the machine
    now[0] += signin.FORGET_AFTER + 60  # quiet clients are forgotten, and make room
    assert backoff.wait("198.51.100.1") == 0 and backoff.failed("198.51.100.1") == 0
    assert "198.51.100.1" in backoff.clients and len(backoff.clients) == 1


def test_a_client_is_an_address_an_ipv6_64_or_on_loopback_a_user():
    from vml.web.signin import client_of

    def of(host, port=1000):
        return client_of({"client": (host, port), "server": ("127.0.0.1", 8004)})

    assert of("192.0.2.7") == of("::ffff:192.0.2.7") == "192.0.2.7" != of("192.0.2.8")
    assert of("2001:db8:1:2::7") == of("2001:db8:1:2:ffff::1") != of("2001:db8:1:3::7")
    # A dual-stack listener sees an IPv4 client as ::ffff:127.0.0.1; its socket is an IPv4 one.
    for listen, family, host in (("127.0.0.1", 4, "127.0.0.1"), ("::1", 6, "::1"), ("::", 6, "127.0.0.1")):
        server = socket.create_server(
            (listen, 0), family=socket.AF_INET6 if family == 6 else socket.AF_INET, dualstack_ipv6=listen == "::"
        )
        with server, socket.create_connection((host, server.getsockname()[1])):
            accepted = server.accept()[0]
            with accepted:  # the server's view, as uvicorn puts it in the scope
                scope = {"client": accepted.getpeername()[:2], "server": accepted.getsockname()[:2]}
                assert client_of(scope) == f"uid {os.getuid()}", (listen, scope)


def raw_request(port: int, head: str) -> tuple[str, socket.socket]:
    """Send only the request's head; the reply's head, which must come without the body being sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        data = sock.recv(65536)
        assert data, f"the connection closed with no reply to {head.splitlines()[0]}"
        reply += data
    return reply.decode(errors="replace"), sock


def test_nothing_unauthenticated_makes_the_server_store_a_body(served, tmp_path):
    spool = tmp_path / "server-tmp"
    spool.mkdir()
    web = served("--require-auth", env={"TMPDIR": str(spool)})
    csrf = web.login_csrf()
    host = f"Host: 127.0.0.1:{web.port}\r\n"
    multipart = f"Content-Type: multipart/form-data; boundary=b\r\nX-CSRF-Token: {csrf}\r\n"
    form = "Content-Type: application/x-www-form-urlencoded\r\n"
    huge = f"Content-Length: {256 << 20}\r\n"
    cases = [
        (f"POST /login HTTP/1.1\r\n{host}{multipart}{huge}\r\n", 413),  # the sign-in form's token is public
        (f"POST /login HTTP/1.1\r\n{host}{form}{huge}\r\n", 413),
        (f"POST /login HTTP/1.1\r\n{host}{form}Transfer-Encoding: chunked\r\n\r\n", 411),
        (f"GET /login HTTP/1.1\r\n{host}{huge}\r\n", 413),
        (f"POST /share/import HTTP/1.1\r\n{host}{multipart}{huge}\r\n", 401),
    ]
    for head, status in cases:
        reply, sock = raw_request(web.port, head)
        with sock:
            assert reply.startswith(f"HTTP/1.1 {status} "), (head, reply)
            assert "connection: close" in reply.lower(), reply  # the rest of the body is not even read
            with contextlib.suppress(OSError):
                sock.sendall(b"--b\r\nContent-Disposition: form-data; name=f; filename=x\r\n\r\n" + bytes(4 << 20))
    held = [os.readlink(f) for f in Path(f"/proc/{web.proc.pid}/fd").iterdir()]
    assert not [f for f in held if f.startswith(str(spool))], held
    assert not list(spool.iterdir()) and not list((tmp_path / "home" / "run" / "web").iterdir())
    # A sign-in is a small form, never a multipart upload.
    r = web.client.post("/login", files={"f": ("x", b"x")}, data={"csrf": csrf}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 415
    assert web.client.get("/").status_code == 401  # the server still answers


def test_a_form_must_declare_its_length(served, tmp_path):
    web = served()  # on loopback: every request is let in, and its form still has a bound
    head = (
        f"POST /repositories HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\nX-CSRF-Token: {web.csrf()}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    reply, sock = raw_request(web.port, head)
    with sock:
        assert reply.startswith("HTTP/1.1 411 "), reply
    assert not (tmp_path / "rep9").exists()


def test_a_password_never_signs_in_from_a_url_and_the_printed_link_works_once(vml, served):
    web = served("--require-auth")
    link = web.link()
    r = web.client.get(f"/login?token={link}")
    assert r.status_code == 303 and "vml_session=" in r.headers["set-cookie"]
    web.client.cookies.clear()
    r = web.client.get(f"/login?token={link}")
    assert r.status_code == 401 and "set-cookie" not in r.headers  # the link died on use
    token = web.token()
    assert token != link
    r = web.client.get(f"/login?token={token}")
    assert r.status_code == 401 and "set-cookie" not in r.headers  # the lasting token is never taken from a URL
    assert web.client.post("/login", data={"secret": token, "csrf": web.login_csrf()}).status_code == 303
    web.stop()
    set_password(vml)
    web = served("--require-auth")
    web.line("sign in with the password")
    assert not any("token" in line for line in web.lines)
    r = web.client.get("/login", params={"token": PASSWORD})
    assert r.status_code == 401 and "set-cookie" not in r.headers
    r = web.client.post("/login", params={"secret": PASSWORD}, data={"csrf": web.login_csrf()})
    assert r.status_code == 401 and "set-cookie" not in r.headers  # nor from a POST's URL
    assert web.client.post("/login", data={"secret": PASSWORD, "csrf": web.login_csrf()}).status_code == 303


def test_posts_from_another_origin_or_without_the_token_are_refused(served, tmp_path):
    web = served()
    token = web.csrf()
    refused = [
        {},
        {"X-CSRF-Token": "not-the-token"},
        {"X-CSRF-Token": token, "Origin": "http://attacker.example"},
        {"X-CSRF-Token": token, "Origin": f"http://127.0.0.1:{web.port + 1}"},
        {"X-CSRF-Token": token, "Sec-Fetch-Site": "cross-site"},
        {"X-CSRF-Token": token, "Sec-Fetch-Site": "same-site"},
    ]
    before = sorted(p.name for p in (tmp_path / "rep1").rglob("*"))
    for headers in refused:
        r = web.client.post("/share/export", data={"entry": "rep1:child"}, headers=headers)
        assert r.status_code == 403, headers
        r = web.client.post("/repositories", data={"path": str(tmp_path / "rep9")}, headers=headers)
        assert r.status_code == 403, headers
    assert not (tmp_path / "rep9").exists()
    assert 'class="job' not in web.client.get("/").text  # no job was started
    assert sorted(p.name for p in (tmp_path / "rep1").rglob("*")) == before
    # The same request from the page itself goes through.
    r = web.client.post(
        "/share/export", data={"entry": "rep1:child"}, headers={"X-CSRF-Token": token, "Origin": web.url}
    )
    assert r.status_code == 202 and "Export rep1:child" in r.text


def wait_job(web, job_id: int) -> str:
    deadline = time.monotonic() + 60
    while True:
        html = web.client.get(f"/jobs/{job_id}").text
        if "job running" not in html:
            return html
        assert time.monotonic() < deadline, html
        time.sleep(0.2)


def test_names_and_uploads_from_requests_cannot_reach_outside(served, vml, tmp_path):
    web = served()
    headers = {"X-CSRF-Token": web.csrf()}
    for entry in ("rep1:../../etc/passwd", "../rep1:base", "rep1:/etc", "rep1:a/b", "rep1:.hidden", "rep1"):
        r = web.client.post("/start", data={"entry": entry}, headers=headers)
        assert r.status_code == 400, entry
        assert re.fullmatch(r'<div class="job failed"><span class="result">vml: error: [^\n]+</span></div>\n?', r.text)
        assert web.client.get("/backup/show", params={"entry": entry}).status_code == 400
    r = web.client.post("/areas/.x/close", headers=headers)
    assert r.status_code == 400 and "invalid area name &#39;.x&#39;" in r.text
    r = web.client.post("/start", data={"entry": "rep1:base", "area": "../../x"}, headers=headers)
    assert r.status_code == 400 and "invalid area name" in r.text
    # An upload named to climb out, holding a well-formed bundle whose entry name climbs out too.
    evil = bundle(tmp_path / "evil.vml", [("../../escaped", manifest("../../escaped"))], [])
    name = f"../../../../{tmp_path.name}-escaped.vml"
    r = web.client.post(
        "/share/import",
        files={"bundle": (name, evil.read_bytes(), "application/octet-stream")},
        data={"repo": "rep1"},
        headers=headers,
    )
    assert r.status_code == 202
    done = wait_job(web, int(re.search(r'id="job-(\d+)"', r.text).group(1)))
    assert "job failed" in done and "vml: error:" in done and "invalid entry name" in done
    assert not list(tmp_path.parent.glob("*-escaped.vml"))
    assert not list(tmp_path.rglob("escaped*")) and not (tmp_path.parent / "escaped").exists()
    assert not list((tmp_path / "home" / "run" / "web").glob("import-*"))  # the upload is gone
    assert [r.name for r in overview.tree(config.Config.load(tmp_path / "home").open("rep1"))] == ["base", "child"]
    # Uploads need the token in the header: a form cannot carry it before the body is read.
    r = web.client.post("/share/import", files={"bundle": ("b.vml", b"x")}, data={"repo": "rep1"})
    assert r.status_code == 403


def test_the_backup_page_offers_a_backups_add_paths_and_survives_a_hostile_one(served, tmp_path):
    home = tmp_path / "home"
    files = [d("/home/alice"), f("/home/alice/x", b"x")]
    crafted_backup(home, "ok1", files, repo="rep1", patterns={"include": [], "exclude": [], "add": ["/opt/data"]})
    crafted_backup(home, "bad", files, repo="rep1", patterns={"include": [], "exclude": [], "add": 5})
    r = served().client.get("/backup")
    assert r.status_code == 200 and 'data-entry="rep1:bad"' in r.text
    assert r.text.count('name="add" value="/opt/data"') == 1  # a box to tick, for the backup that holds it


def test_tls_serves_https_with_a_secure_cookie(served, tmp_path):
    cert, key = self_signed(tmp_path)
    web = served("--tls-cert", cert, "--tls-key", key, "--require-auth")
    assert web.url.startswith("https://")
    r = web.client.get(f"/login?token={web.link()}")
    assert r.status_code == 303 and "Secure" in r.headers["set-cookie"]
    assert web.client.get("/").status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{web.port}/", timeout=5)


def test_bad_options_get_one_line(vml, tmp_path):
    port = free_port()
    assert "--listen 'nonsense'" in vml.fails("web", "--listen", "nonsense")
    assert "--listen 'example.org:80'" in vml.fails("web", "--listen", "example.org:80")
    assert "both a certificate and a key" in vml.fails("web", "--tls-cert", tmp_path / "c.pem")
    assert "no such file" in vml.fails("web", "--tls-cert", tmp_path / "c", "--tls-key", tmp_path / "k")
    cert, key = self_signed(tmp_path)
    key.chmod(0o644)
    assert "permissions 0644 are too open" in vml.fails("web", "--tls-cert", cert, "--tls-key", key, status=2)
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "home" / "config.toml").write_text('[web]\npassword = "plain text"\n')
    assert "set it again with `vml web --set-password`" in vml.fails("web", "--listen", f"127.0.0.1:{port}")
    (tmp_path / "home" / "config.toml").write_text("[web]\nlisten = 8004\n")
    assert "[web] listen = 8004 has the wrong type" in vml.fails("web")
    (tmp_path / "home" / "config.toml").unlink()
    with socket.create_server(("127.0.0.1", port)):
        assert f"cannot listen on 127.0.0.1:{port}" in vml.fails("web", "--listen", f"127.0.0.1:{port}")


def test_start_names_the_area_after_the_entry_and_boots_on_the_configured_hypervisor(served, vml, home):
    from vml import home as vml_home

    vml("open", "base")
    vml("open", "base", "--area", "base-2")
    assert vml_home.free_area_name(home, "base") == "base-3"
    assert vml_home.free_area_name(home, "child") == "child"
    web = served()
    page = web.client.get("/start", params={"entry": "rep1:base"}).text
    assert 'name="area" value="base-3"' in page
    assert '<option value="qemu" selected>' in page  # no [defaults] hypervisor: QEMU
    r = web.client.post("/defaults", data={"hypervisor": "libvirt"}, headers={"X-CSRF-Token": web.csrf()})
    assert r.status_code == 202
    wait_job(web, int(re.search(r'id="job-(\d+)"', r.text).group(1)))
    assert config.Config.load(home).hypervisor == "libvirt"
    assert '<option value="libvirt" selected>' in web.client.get("/start", params={"entry": "rep1:base"}).text
    r = web.client.post("/defaults", data={"hypervisor": "bochs"}, headers={"X-CSRF-Token": web.csrf()})
    assert r.status_code == 400 and "unknown hypervisor" in r.text
    assert 'data-area="base-2"' in web.client.get("/running").text


def test_start_refuses_what_the_certification_policy_refuses(served, vml, home):
    vml("trust", "policy", "--require", "production")
    web = served()
    r = web.client.post("/start", data={"entry": "rep1:base"}, headers={"X-CSRF-Token": web.csrf()})
    assert r.status_code == 403, r.text
    assert "vml: error: entry &#39;base&#39; of rep1 is not certified at level &#39;production&#39;" in r.text
    assert not (home / "areas").exists() or list((home / "areas").iterdir()) == []
