"""Who may use the release manager: the Host header, authentication, CSRF tokens, password hashes.

- Every request must name this server in its Host header (its address, a
  loopback name when it listens on loopback, its host name when it listens
  on every address, or a name in ``[web] allowed_hosts``), so a page of
  another site that DNS rebinding points at this port gets 421, not data.
- On loopback, anyone who can reach the port may use it (as with Jupyter
  and with `vml` itself, that is any local user: use ``--require-auth`` on
  a shared machine). On any other address, and with ``--require-auth``,
  every request but the login form and the static files answers 401 until
  the browser holds a session cookie, got by presenting the token printed
  at start or the password whose hash is in config.toml.
- Every POST carries the page's CSRF token (header ``X-CSRF-Token``, or form
  field ``csrf``) and must not come from another origin (``Origin`` and
  ``Sec-Fetch-Site``); the session cookie is ``SameSite=Strict`` besides.
"""

import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from ..errors import UsageError

SESSION_COOKIE = "vml_session"
CSRF_HEADER = "x-csrf-token"
OPEN_PATHS = ("/login", "/static/")  # answered without a session: they show no data
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
MAX_SESSIONS = 1000


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64), for ``[web] password`` in config.toml."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password_hash(stored: str) -> None:
    """Refuse, in one line, a ``[web] password`` that is not what hash_password writes."""
    parts = stored.split("$")
    try:
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError("not scrypt$N$r$p$salt$hash")
        n, r, p = (int(x) for x in parts[1:4])
        if not (1 < n <= 1 << 20 and n & (n - 1) == 0 and 0 < r <= 32 and 0 < p <= 16):
            raise ValueError("cost parameters out of range")
        base64.b64decode(parts[4], validate=True)
        base64.b64decode(parts[5], validate=True)
    except ValueError as e:
        raise UsageError(f"[web] password in config.toml: {e}; set it again with `vml web --set-password`") from None


def verify_password(password: str, stored: str) -> bool:
    _, n, r, p, salt, want = stored.split("$")
    got = hashlib.scrypt(
        password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=32, maxmem=1 << 30
    )
    return hmac.compare_digest(got, base64.b64decode(want))


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (loopback) -> (host, port), refused in one line if malformed."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if host.startswith("[") else host
    try:
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("give HOST:PORT, e.g. 127.0.0.1:8004")
        host = host or "127.0.0.1"
        if host != "localhost":
            ipaddress.ip_address(host)
    except ValueError as e:
        raise UsageError(f"--listen {text!r}: {e} (an IP address, or localhost)") from None
    return host, int(port)


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


@dataclass
class Guard:
    """The security state of one `vml web` process."""

    host: str
    port: int
    auth: bool  # whether requests need a session
    token: str | None = None  # printed at start; None when a password is configured
    password_hash: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    tls: bool = False
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    sessions: set[str] = field(default_factory=set)

    def __post_init__(self):
        if self.password_hash:
            check_password_hash(self.password_hash)
        names = {self.host, *self.allowed_hosts}
        if is_loopback(self.host):
            names |= {"localhost", "127.0.0.1", "::1"}
        if self.host in ("0.0.0.0", "::"):
            names |= {socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1", "::1"}
        self.names = {n.lower() for n in names}

    # -- Host ------------------------------------------------------------

    def host_allowed(self, header: str | None) -> bool:
        """Whether the Host header names this server: a known name, and this port (omitted only if default)."""
        if not header:
            return False
        if header.startswith("["):
            name, _, rest = header[1:].partition("]")
            if rest and not rest.startswith(":"):
                return False
            port = rest[1:]
        else:
            name, _, port = header.partition(":")
        if port != str(self.port) and (port or self.port != (443 if self.tls else 80)):
            return False
        return name.lower() in self.names

    # -- sessions --------------------------------------------------------

    def authenticated(self, request: Request) -> bool:
        if not self.auth:
            return True
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie and cookie in self.sessions:
            return True
        bearer = request.headers.get("authorization", "")
        return bearer.startswith("Bearer ") and self.secret_ok(bearer[7:])

    def secret_ok(self, secret: str) -> bool:
        """Whether ``secret`` is the printed token or the configured password."""
        if self.token and hmac.compare_digest(secret.encode(), self.token.encode()):
            return True
        return bool(self.password_hash) and verify_password(secret, self.password_hash)

    def new_session(self, response: Response) -> None:
        if len(self.sessions) >= MAX_SESSIONS:
            self.sessions.pop()
        sid = secrets.token_urlsafe(32)
        self.sessions.add(sid)
        response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", secure=self.tls, path="/")

    # -- CSRF ------------------------------------------------------------

    def same_origin(self, request: Request) -> bool:
        """Whether a state-changing request comes from a page of this server."""
        if request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            return False
        origin = request.headers.get("origin")
        if origin is None:
            return True  # not sent by browsers that predate it; the token still has to match
        scheme = "https" if self.tls else "http"
        return origin.lower() == f"{scheme}://{request.headers.get('host', '').lower()}"

    def csrf_ok(self, request: Request, form_token: str | None) -> bool:
        token = request.headers.get(CSRF_HEADER) or form_token or ""
        return self.same_origin(request) and hmac.compare_digest(token.encode(), self.csrf.encode())


class GuardMiddleware:
    """Host check and authentication before any handler runs (pure ASGI: bodies stream through)."""

    def __init__(self, app, guard: Guard, login_page):
        self.app, self.guard, self.login_page = app, guard, login_page

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        if not self.guard.host_allowed(request.headers.get("host")):
            response = PlainTextResponse("vml web: this server is not known by that name (Host header)\n", 421)
            return await response(scope, receive, send)
        path = scope["path"]
        if not path.startswith(OPEN_PATHS) and not self.guard.authenticated(request):
            return await self.login_page(request, 401)(scope, receive, send)
        return await self.app(scope, receive, send)
