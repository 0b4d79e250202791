"""vml web over real HTTP: the real command serving, and what it lets through.

The browser tests (test_web_browser.py) drive the pages; these check the
rules at the door with plain requests: the Host header, authentication off
loopback, the token and the password, CSRF, names and uploads from requests,
TLS, and bad options.
"""

import re
import socket
import subprocess
import sys
import time

import httpx
import pytest

from vml import config, overview

from helpers import bundle, manifest
from servers import end_process, free_port, self_signed, wait_port


class WebServer:
    """`vml web` in a subprocess, with the lines it printed at start."""

    def __init__(self, vml, *args, listen_host="127.0.0.1"):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vml", "web", "--listen", f"{listen_host}:{self.port}", *args],
            env=vml.env,
            cwd=vml.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            wait_port(self.port, self.proc, "vml web")
            self.lines = [self.proc.stdout.readline().strip()]
            assert self.lines[0].startswith("vml web: the release manager"), self.lines
            if "--require-auth" in args or listen_host not in ("127.0.0.1", "::1"):
                self.lines.append(self.proc.stdout.readline().strip())
        except BaseException:
            end_process(self.proc, 10)
            raise
        scheme = "https" if "--tls-cert" in args else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, verify=False, timeout=30, follow_redirects=False)

    def token(self) -> str:
        return next(re.search(r"token=(\S+)", x).group(1) for x in self.lines if "token=" in x)

    def csrf(self) -> str:
        """The token a page of this server carries, as the browser would read it."""
        return re.search(r'"X-CSRF-Token": "([^"]+)"', self.client.get("/").text).group(1)

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
    assert len(token) >= 30
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
    r = web.client.get(f"/login?token={token}")
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
    r = web.client.get(f"/login?token={token}")
    assert r.status_code == 303
    # Listening on every address, any of the machine's addresses names it; a DNS name must be known.
    assert web.client.get("/", headers={"Host": f"10.1.2.3:{web.port}"}).status_code == 200
    assert web.client.get("/", headers={"Host": f"rebound.example:{web.port}"}).status_code == 421


def test_a_password_from_config_replaces_the_token(vml, served):
    r = subprocess.run(
        [sys.executable, "-m", "vml", "web", "--set-password"],
        input="correct horse battery\ncorrect horse battery\n",
        env=vml.env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "password set" in r.stdout
    stored = (vml.cwd / "home" / "config.toml").read_text()
    assert "scrypt$" in stored and "correct horse" not in stored
    web = served("--require-auth")
    assert not any("token=" in line for line in web.lines)
    assert web.client.get("/").status_code == 401
    csrf = re.search(r'name="csrf" value="([^"]+)"', web.client.get("/login").text).group(1)
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


def test_tls_serves_https_with_a_secure_cookie(served, tmp_path):
    cert, key = self_signed(tmp_path)
    web = served("--tls-cert", cert, "--tls-key", key, "--require-auth")
    assert web.url.startswith("https://")
    r = web.client.get(f"/login?token={web.token()}")
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
