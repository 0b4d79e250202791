"""Signing in and out: the one-time link, the printed token, the password, and the back-off guarding them.

Concurrency. Sign-ins are answered on the event loop, never in the worker
threads that pages and actions share (Starlette's pool of 40): nothing here
sleeps or waits on a lock, so a flood of sign-ins delays no one who holds
a session. Only the password's scrypt hash (16 MiB, tens of milliseconds)
runs in a thread, in a pool of its own: at most MAX_HASHES at once and
one per client; a sign-in that finds no slot free is answered 429 at
once, not queued. The back-off table, the hashes in flight, the link and
the sessions are touched on the event loop only, so they need no lock.

Who a client is. An IPv4 address, or an IPv6 /64 (one host commonly holds
a whole /64). On loopback every local user comes from 127.0.0.1, so there
a client is the user who owns the connecting socket (asked of the kernel,
as `ss -e` asks), and another user's guessing costs that user alone. Behind
a reverse proxy every browser shares the proxy's address, and the back-off
spans them all (sessions never wait). A guesser with more addresses than
the table holds (MAX_CLIENTS; an IPv6 /48 has 65,536 /64s) fills it, and
new clients from outside then share one entry in back-off: password
sign-ins from new addresses wait until the flood stops, while local users
(and so `ssh -L` to the machine) keep entries of their own and get in.

What a wrong guess costs. After FREE_FAILURES (typing mistakes), each
further failure doubles the client's wait, from FIRST_WAIT to LONGEST_WAIT,
during which it gets 429 and nothing is hashed. The printed token and the
link are checked even then: 192 random bits compared in constant time
cannot be guessed, and their holder gets in while its address is guessing.
"""

import asyncio
import ipaddress
import logging
import math
import socket
import struct
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from .security import OPEN_BODY_MAX, declared_length, refuse_body, verify_password

log = logging.getLogger(__name__)

FREE_FAILURES = 3  # wrong sign-ins a client may make before it has to wait
FIRST_WAIT, LONGEST_WAIT = 1.0, 60.0  # seconds, doubled at each failure past the free ones
FORGET_AFTER = 900.0  # seconds without a failure after which a client starts afresh
MAX_CLIENTS = 10_000  # clients the table remembers; past that, new ones share one entry
MAX_HASHES = 2  # password hashes at once (a hash keeps a core busy); one per client
SHARED = "(others)"  # the entry of clients the full table has no room for
LOCAL_USER = "uid "  # a client on loopback: the local user it is
FORM = "application/x-www-form-urlencoded"
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST = 4, 20, 1  # linux/sock_diag.h, linux/netlink.h
UID_AT = 16 + 4 + 48 + 12  # in a reply: nlmsghdr; inet_diag_msg's family to retrans, sockid, expires and queues


@dataclass
class _Client:
    failures: int = 0
    until: float = 0.0  # time.monotonic() before which the client gets 429
    last: float = 0.0  # its last failure


class Backoff:
    """Wrong sign-ins per client, and how long each must wait before its next try.

    The table is ordered by last failure, so forgotten clients are dropped from its front as new
    ones come; when it is full of clients failing now, new clients share one entry (SHARED), so many
    addresses buy a guesser nothing but one client's pace.
    """

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.clients: OrderedDict[str, _Client] = OrderedDict()

    def wait(self, client: str) -> float:
        """Seconds ``client`` must still wait (0: it may try now)."""
        record = self.clients.get(self._entry(client))
        return max(0.0, record.until - self.clock()) if record else 0.0

    def failed(self, client: str) -> float:
        """Count a wrong sign-in; returns the wait it starts (0 while failures are free)."""
        now, key = self.clock(), self._entry(client)
        record = self.clients.pop(key, None)
        if record is None or now - record.last > FORGET_AFTER:
            record = _Client()
        record.failures += 1
        record.last = now
        self.clients[key] = record  # to the end: the table stays ordered by last failure
        past = record.failures - FREE_FAILURES
        if past <= 0:
            return 0.0
        record.until = now + min(FIRST_WAIT * 2 ** min(past - 1, 32), LONGEST_WAIT)
        return record.until - now

    def _entry(self, client: str) -> str:
        # A local user keeps an entry of its own even then (there are only so many): so the owner can
        # always sign in from the machine itself (or through `ssh -L`), whoever floods from outside.
        if client in self.clients or len(self.clients) < MAX_CLIENTS or client.startswith(LOCAL_USER):
            return client
        now = self.clock()
        while self.clients and now - next(iter(self.clients.values())).last > FORGET_AFTER:
            self.clients.popitem(last=False)
        return client if len(self.clients) < MAX_CLIENTS else SHARED


def client_of(scope) -> str:
    """Who is signing in, for the back-off: an address, an IPv6 /64, or on loopback a local user."""
    host, port = scope.get("client") or ("", 0)
    try:
        address = _unmapped(host)
        server, server_port = scope["server"]
        server = _unmapped(server)
    except (ValueError, KeyError, TypeError):
        return str(host)  # not an IP peer (a Unix socket): all such callers are one client
    if address.is_loopback:
        uid = _socket_owner(address, port, server, server_port)
        return f"{LOCAL_USER}{uid}" if uid is not None else str(address)
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _unmapped(host: str):
    """The address ``host`` names; an IPv4 client of a dual-stack listener is the IPv4 address it is."""
    address = ipaddress.ip_address(host)
    return address.ipv4_mapped or address if address.version == 6 else address


def _socket_owner(client, port: int, server, server_port: int) -> int | None:
    """The uid owning the local TCP socket ``client:port`` connected to ``server:server_port``, or None.

    Asked of the kernel as `ss -e` asks it (sock_diag, one exact lookup: no table to read).
    """
    sockid = (
        struct.pack("!HH", port, server_port)
        + client.packed.ljust(16, b"\0")
        + server.packed.ljust(16, b"\0")
        + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)  # any interface, no cookie
    )
    family = socket.AF_INET6 if client.version == 6 else socket.AF_INET
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    header = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as diag:
            diag.send(header + request)
            reply = diag.recv(4096, socket.MSG_DONTWAIT)  # the kernel answers within send()
    except OSError:
        return None
    if len(reply) < UID_AT + 4 or struct.unpack_from("=H", reply, 4)[0] != SOCK_DIAG_BY_FAMILY:
        return None  # an error message: no such socket
    return struct.unpack_from("=I", reply, UID_AT)[0]


class SignIns:
    """The sign-in checks of one `vml web` and their back-off (event loop only; see the module's notes)."""

    def __init__(self, guard, page):
        self.guard, self.page = guard, page  # page(request, status, message, headers): the sign-in form
        self.backoff = Backoff()
        self.hashing: set[str] = set()  # clients whose password is being hashed
        self.hasher = ThreadPoolExecutor(MAX_HASHES, "vml-web-sign-in")  # not the pool pages and actions use

    async def sign_in(self, request: Request, secret: str, by_link: bool = False) -> Response:
        """303 to the pages with a new session, 401 for a wrong secret, 429 while the client must wait."""
        client = client_of(request.scope)
        if self.guard.take_link(secret) if by_link else self.guard.token_ok(secret):
            return self._signed_in()
        wait = self.backoff.wait(client)
        if wait > 0:
            return self._later(request, wait, "too many wrong sign-ins from here")
        if self.guard.password_hash and not by_link:  # a password is never taken from a URL
            if client in self.hashing or len(self.hashing) >= MAX_HASHES:
                return self._later(request, 1, "busy checking other sign-ins")
            if await self._password_ok(client, secret):
                return self._signed_in()
        wait = self.backoff.failed(client)
        if wait:
            log.warning("vml web: wrong sign-ins from %s: it waits %.0f s before the next", client, wait)
        return self.page(request, 401, "that is neither the token nor the password")

    async def _password_ok(self, client: str, secret: str) -> bool:
        self.hashing.add(client)
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.hasher, verify_password, secret, self.guard.password_hash)
        finally:
            self.hashing.discard(client)

    def _signed_in(self) -> Response:
        # The client's failures stay counted: its address (NAT, a proxy) or user may be shared with
        # whoever made them, who would otherwise start afresh.
        response = RedirectResponse("/", 303)
        self.guard.new_session(response)
        return response

    def _later(self, request: Request, wait: float, why: str) -> Response:
        seconds = math.ceil(wait)
        return self.page(request, 429, f"{why}; try again in {seconds} s", {"Retry-After": str(seconds)})


async def small_form(request: Request):
    """The fields of a sign-in or sign-out form, or the response refusing it (a body is at most a few KiB)."""
    refused = refuse_body(request.headers, OPEN_BODY_MAX)
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if refused is None and declared_length(request.headers) and kind != FORM:
        refused = PlainTextResponse(f"vml web: refused: a sign-in is a small form ({FORM})\n", 415)
        refused.headers["connection"] = "close"
    if refused is not None:
        return refused
    return await request.form(max_files=0, max_fields=8)


def routes(web) -> list[Route]:
    door = SignIns(web.guard, web.login_page)
    csrf_refused = "vml web: refused: a request from another page or site (CSRF)\n"

    async def login_form(request: Request) -> Response:
        """GET /login: the form, or the printed link's one-time token in ``?token=``."""
        if not web.guard.auth:
            return RedirectResponse("/", 303)  # on loopback without --require-auth there is nothing to sign in to
        link = request.query_params.get("token")
        if link is not None:
            return await door.sign_in(request, link, by_link=True)
        if web.guard.authenticated(request):
            return RedirectResponse("/", 303)
        return web.login_page(request, 200)

    async def login(request: Request) -> Response:
        form = await small_form(request)
        if isinstance(form, Response):
            return form
        if not web.guard.auth:
            return RedirectResponse("/", 303)
        if not web.guard.csrf_ok(request, form.get("csrf")):
            return PlainTextResponse(csrf_refused, 403)
        return await door.sign_in(request, form.get("secret", ""))

    async def logout(request: Request) -> Response:
        """Sign out: the session is forgotten here, not only in the browser."""
        form = await small_form(request)
        if isinstance(form, Response):
            return form
        if not web.guard.csrf_ok(request, form.get("csrf")):
            return PlainTextResponse(csrf_refused, 403)
        response = RedirectResponse("/login", 303)
        web.guard.end_session(request, response)
        return response

    return [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]
