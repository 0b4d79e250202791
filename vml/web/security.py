"""Who may use the release manager: the Host header, authentication, CSRF tokens, password hashes.

- Every request must name this server in its Host header (its address, a
  loopback name when it listens on loopback, its host name when it listens
  on every address, or a name in ``[web] allowed_hosts``), so a page of
  another site that DNS rebinding points at this port gets 421, not data.
- On loopback, anyone who can reach the port may use it (as with Jupyter
  and with `vml` itself, that is any local user: use ``--require-auth`` on
  a shared machine). On any other address, and with ``--require-auth``,
  every request but the login form and the static files answers 401 until
  the browser holds a session cookie, got through the sign-in link printed
  at start (once), the token printed with it, or the password whose hash is
  in config.toml (vml.web.signin).
- A request without a session may send a sign-in form and nothing larger:
  a longer or unbounded body is refused before any of it is read, and the
  connection closed, so no one unknown can make the server store a body.
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
import time
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from ..errors import UsageError

SESSION_COOKIE = "vml_session"
CSRF_HEADER = "x-csrf-token"
OPEN_BODY_MAX = 4096  # bytes a request without a session may send: a sign-in form
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
MAX_SESSIONS = 1000
SESSION_LIFETIME = 12 * 3600.0  # seconds a sign-in lasts


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
    link: str | None = None  # the printed sign-in link's token: it signs in once
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))  # CSRF tokens derive from it
    sessions: dict[str, float] = field(default_factory=dict)  # session id -> when it ends (time.time())

    def __post_init__(self):
        if self.password_hash:
            check_password_hash(self.password_hash)
        names = {self.host, *self.allowed_hosts}
        if is_loopback(self.host):
            names |= {"localhost", "127.0.0.1", "::1"}
        self.wildcard = self.host in ("0.0.0.0", "::")
        if self.wildcard:
            names |= {socket.gethostname(), socket.getfqdn(), "localhost"}
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
        # Listening on every address, it is reached by any of the machine's addresses; an address
        # cannot be rebound the way a DNS name can, so any IP literal is this server then.
        return name.lower() in self.names or (self.wildcard and _is_ip(name))

    # -- sessions --------------------------------------------------------

    def authenticated(self, request: Request) -> bool:
        if not self.auth:
            return True
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie and self._live(cookie):
            return True
        # A script may present the printed token (never the password: hashing it on every request
        # would let anyone stall the server).
        bearer = request.headers.get("authorization", "")
        return bearer.startswith("Bearer ") and self.token_ok(bearer[7:])

    def token_ok(self, secret: str) -> bool:
        """Whether ``secret`` is the printed token (constant time: it is compared, not hashed)."""
        return bool(self.token) and _same(secret, self.token)

    def take_link(self, secret: str) -> bool:
        """Whether ``secret`` is the link's token, which then dies (run on the event loop: no two take it)."""
        if not (self.link and _same(secret, self.link)):
            return False
        self.link = None
        return True

    def new_session(self, response: Response) -> None:
        now = time.time()
        self.sessions = {s: end for s, end in self.sessions.items() if end > now}
        while len(self.sessions) >= MAX_SESSIONS:
            del self.sessions[min(self.sessions, key=self.sessions.get)]
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = now + SESSION_LIFETIME
        response.set_cookie(
            SESSION_COOKIE, sid, max_age=int(SESSION_LIFETIME), httponly=True, samesite="strict", secure=self.tls
        )

    def end_session(self, request: Request, response: Response) -> None:
        """Sign out: the session is forgotten here and its cookie removed from the browser."""
        self.sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
        response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict", secure=self.tls)

    def _live(self, sid: str) -> bool:
        end = self.sessions.get(sid)
        return end is not None and end > time.time()

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

    def csrf(self, request: Request) -> str:
        """The CSRF token of this request's session (one for the sign-in form, one per session)."""
        session = request.cookies.get(SESSION_COOKIE) if self.auth else None
        sid = session if session and self._live(session) else ""
        return hmac.new(self.key, sid.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, request: Request, form_token: str | None) -> bool:
        token = request.headers.get(CSRF_HEADER) or form_token or ""
        return self.same_origin(request) and _same(token, self.csrf(request))


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def declared_length(headers) -> int | None:
    """The body's length as the request declares it (0: none); None if it comes chunked, of unknown length."""
    length = headers.get("content-length") or "0"
    return int(length) if "transfer-encoding" not in headers and length.isdigit() else None


def refuse_body(headers, limit: int) -> Response | None:
    """413 (411 if chunked) for a body past ``limit`` bytes, before any of it is read; else None.

    The refusal closes the connection, so the server does not go on receiving what it refused.
    """
    length = declared_length(headers)
    if length is not None and length <= limit:
        return None
    if length is None:
        response = PlainTextResponse(f"vml web: refused: a body needs its length (here at most {limit} bytes)\n", 411)
    else:
        response = PlainTextResponse(f"vml web: refused: a body of {length} bytes (here at most {limit})\n", 413)
    response.headers["connection"] = "close"
    return response


def is_open(path: str) -> bool:
    """Paths answered without a session: the sign-in form and the static files show no data."""
    return path == "/login" or path.startswith("/static/")


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
        if not self.guard.authenticated(request):
            if is_open(scope["path"]):
                refused = refuse_body(request.headers, OPEN_BODY_MAX)
            else:
                refused = self.login_page(request, 401)
                if declared_length(request.headers) != 0:
                    refused.headers["connection"] = "close"  # its body will never be read
            if refused is not None:
                return await refused(scope, receive, send)
        return await self.app(scope, receive, send)
