"""HTTP fetching for remotes: proxies in CVMFS notation, failover, retries, deadlines.

A proxy setting is groups separated by ``;``, tried in order; members of a
group, separated by ``|``, share the load; ``DIRECT`` means no proxy. A
member that fails (connection error, timeout, HTTP error, a reply that
fails its check, or a transfer that stalls below the minimum rate) is set
aside for ``proxy_reset_after`` seconds and the next one is tried; when a
whole group has failed, the next group takes over. After
``proxy_reset_after`` seconds on a later group, fetching goes back to the
first. One fetch ends, successfully or not, before its deadline: a read
that cannot be served fails in bounded time instead of hanging.
"""

import contextlib
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from ..errors import Corrupt, FetchError, ObjectMissing, UsageError

log = logging.getLogger(__name__)

BLOCK = 256 << 10
WATCHDOG_GRACE = 0.5  # seconds past the deadline before a request's sockets are shut down


@dataclass(frozen=True)
class Settings:
    proxy: str = "DIRECT"
    timeout: float = 30.0  # whole-fetch deadline, retries included
    connect_timeout: float = 5.0
    read_timeout: float = 10.0  # no byte for this long: the member failed
    low_speed_limit: int = 16 << 10  # bytes per second ...
    low_speed_time: float = 5.0  # ... below which, for this long, a transfer has stalled
    proxy_reset_after: float = 300.0
    backoff: float = 0.25  # first pause between rounds; doubles, at most 2 s
    parallel: int = 16  # connections for preload and read-ahead
    verify_tls: bool | str = True  # or a CA bundle path


def parse_proxies(spec: str) -> list[list[str | None]]:
    """``"http://a:3128|http://b:3128;DIRECT"`` -> [["http://a:3128", "http://b:3128"], [None]]."""
    groups = []
    for group in spec.split(";"):
        members = []
        for member in group.split("|"):
            member = member.strip()
            if member.upper() == "DIRECT":
                members.append(None)
            elif member:
                u = urlsplit(member if "://" in member else f"http://{member}")
                if u.scheme not in ("http", "https") or not u.hostname:
                    raise UsageError(f"invalid proxy {member!r}: use http://HOST:PORT or DIRECT")
                members.append(f"{u.scheme}://{u.netloc}")
        if members:
            groups.append(members)
    if not groups:
        raise UsageError(f"invalid proxy setting {spec!r}: give proxies separated by | and ;, or DIRECT")
    return groups


def proxy_label(proxy: str | None) -> str:
    return proxy or "DIRECT"


class ProxyChain:
    """Which proxy to try next, and which ones failed recently."""

    def __init__(self, spec: str, reset_after: float):
        self.groups = parse_proxies(spec)
        self.reset_after = reset_after
        self._lock = threading.Lock()
        self._group = 0
        self._since = 0.0  # when fetching left the first group
        self._bad: dict[str | None, float] = {}  # member -> until when it is set aside

    def order(self) -> list[str | None]:
        """Members in the order to try them for the next request."""
        now = time.monotonic()
        with self._lock:
            if self._group and now - self._since > self.reset_after:
                log.info("going back to the first proxy group")
                self._group = 0
                self._bad.clear()
            out = []
            for g in self.groups[self._group :] + self.groups[: self._group]:
                members = list(g)
                random.shuffle(members)  # members of a group share the load
                good = [m for m in members if self._bad.get(m, 0) <= now]
                out += good + [m for m in members if m not in good]
            return out

    def failed(self, member: str | None, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._bad[member] = now + self.reset_after
            g = self._group_of(member)
            if g == self._group and all(self._bad.get(m, 0) > now for m in self.groups[g]):
                nxt = (g + 1) % len(self.groups)
                if nxt != g:
                    log.warning("proxy group %d failed; switching to group %d", g + 1, nxt + 1)
                    self._group = nxt
                    self._since = now
        log.info("proxy %s failed: %s", proxy_label(member), reason)

    def succeeded(self, member: str | None) -> None:
        with self._lock:
            self._bad.pop(member, None)
            g = self._group_of(member)
            if g != self._group:
                self._group = g
                self._since = time.monotonic()

    def _group_of(self, member: str | None) -> int:
        return next(i for i, g in enumerate(self.groups) if member in g)


# A watchdog enforces each request's deadline: a socket timeout bounds each
# recv, not the request, so a peer trickling header lines could hold a
# request for hours. Connections note themselves when they send a request,
# and the watchdog shuts down the sockets of its request when time is up.
_active = threading.local()


class _Noted:
    def request(self, *args, **kwargs):
        noted = getattr(_active, "connections", None)
        if noted is not None:
            noted.append(self)
        return super().request(*args, **kwargs)


class _HTTPConnection(_Noted, HTTPConnection):
    pass


class _HTTPSConnection(_Noted, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _noting(manager):
    manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    return manager


class _Adapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        _noting(self.poolmanager)

    def proxy_manager_for(self, proxy, **kwargs):
        fresh = proxy not in self.proxy_manager
        manager = super().proxy_manager_for(proxy, **kwargs)
        return _noting(manager) if fresh else manager


def _cut(connections: list, fired: threading.Event) -> None:
    fired.set()
    for c in connections:
        sock = getattr(c, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Failed(Exception):
    """One member failed one request; try the next."""

    def __init__(self, reason: str, missing: bool = False):
        super().__init__(reason)
        self.missing = missing


class Fetcher:
    """GETs from one base URL through a ProxyChain, one requests session per thread."""

    def __init__(self, base_url: str, settings: Settings, what: str):
        self.base = base_url.rstrip("/") + "/"
        self.settings = settings
        self.what = what
        self.proxies = ProxyChain(settings.proxy, settings.proxy_reset_after)
        self._local = threading.local()
        self._lock = threading.Lock()
        self.bytes = 0

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.trust_env = False  # the remote's proxy setting decides, not http_proxy
            adapter = _Adapter(pool_connections=4, pool_maxsize=4, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.verify = self.settings.verify_tls
            self._local.session = s
        return s

    def get(self, path: str, max_bytes: int, check=None, fresh: bool = False, deadline: float | None = None):
        """The body at ``path``, passed through ``check`` (which may raise Corrupt to reject it).

        Tries members in order and rounds of them with back-off until the
        deadline; raises ObjectMissing when every member of a round said 404,
        the last Corrupt when replies kept failing their check, FetchError
        otherwise.
        """
        st = self.settings
        deadline = deadline or time.monotonic() + st.timeout
        pause = st.backoff
        last: Exception | None = None
        url = self.base + path
        while True:
            order = self.proxies.order()
            missing = refused = 0
            for member in order:
                if time.monotonic() >= deadline:
                    break
                try:
                    body = self._get_once(url, member, max_bytes, fresh, deadline)
                    result = check(body) if check else body
                except _Failed as e:
                    if not e.missing:  # a 404 is the origin's answer, not the proxy's failure
                        self.proxies.failed(member, f"{path}: {e}")
                    missing += e.missing
                    last = FetchError(f"{self.what}: {path}: {e}")
                    continue
                except Corrupt as e:
                    self.proxies.failed(member, f"{path}: {e}")
                    refused += 1
                    last = e
                    continue
                self.proxies.succeeded(member)
                return result
            if missing == len(order):
                raise ObjectMissing(f"{self.what}: {path} is not there (HTTP 404 from every proxy)")
            if refused and missing + refused == len(order):
                raise last  # every member answered, and each answer was refused: retrying would not help
            now = time.monotonic()
            if now + pause >= deadline:
                if isinstance(last, Corrupt):
                    raise last
                reason = f" (last: {last})" if last else ""
                raise FetchError(f"{self.what}: cannot fetch {path} within {st.timeout:g} s{reason}")
            time.sleep(pause)
            pause = min(pause * 2, 2.0)

    def _get_once(self, url: str, member: str | None, max_bytes: int, fresh: bool, deadline: float) -> bytes:
        # identity: bodies are checked byte for byte, and nothing is inflated unbounded.
        headers = {"Accept-Encoding": "identity"} | ({"Cache-Control": "no-cache"} if fresh else {})
        remaining = max(0.1, deadline - time.monotonic())
        _active.connections = noted = []
        fired = threading.Event()
        watchdog = threading.Timer(remaining + WATCHDOG_GRACE, _cut, (noted, fired))
        watchdog.daemon = True
        watchdog.start()
        try:
            body = self._get_watched(url, member, max_bytes, headers, remaining, deadline)
        finally:
            watchdog.cancel()
            _active.connections = None
        if fired.is_set():  # what came was cut short, whatever it looks like
            raise _Failed("deadline passed during the request")
        return body

    def _get_watched(self, url, member, max_bytes, headers, remaining, deadline) -> bytes:
        st = self.settings
        try:
            r = self._session().get(
                url,
                proxies={"http": member, "https": member},
                headers=headers,
                stream=True,
                timeout=(min(st.connect_timeout, remaining), min(st.read_timeout, remaining)),
                allow_redirects=False,
            )
        except requests.RequestException as e:
            raise _Failed(_reason(e)) from None
        try:
            if r.status_code != 200:
                raise _Failed(f"HTTP {r.status_code}", missing=r.status_code == 404)
            length = r.headers.get("Content-Length")
            if length is not None and (not length.isdigit() or int(length) > max_bytes):
                raise _Failed(f"reply of {length} bytes, more than the {max_bytes} it may have")
            return self._body(r, max_bytes, deadline)
        finally:
            r.close()

    def _body(self, r: requests.Response, max_bytes: int, deadline: float) -> bytes:
        st = self.settings
        buf = bytearray()
        window_start, window_bytes = time.monotonic(), 0
        try:
            while block := r.raw.read1(BLOCK):  # returns after each arrival, so a trickle is seen
                buf += block
                window_bytes += len(block)
                if len(buf) > max_bytes:
                    raise _Failed(f"reply longer than the {max_bytes} bytes it may have")
                now = time.monotonic()
                if now >= deadline:
                    raise _Failed("deadline passed during the transfer")
                if now - window_start >= st.low_speed_time:
                    rate = window_bytes / (now - window_start)
                    if rate < st.low_speed_limit:
                        raise _Failed(f"transfer stalled at {rate:.0f} B/s")
                    window_start, window_bytes = now, 0
        except requests.RequestException as e:
            raise _Failed(_reason(e)) from None
        except Exception as e:  # urllib3 errors: reset, incomplete read, timeout
            if isinstance(e, _Failed):
                raise
            raise _Failed(_reason(e)) from None
        length = r.headers.get("Content-Length")
        if length is not None and int(length) != len(buf):
            raise _Failed(f"truncated reply: {len(buf)} of {length} bytes")
        with self._lock:
            self.bytes += len(buf)
        return bytes(buf)


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{type(e).__name__}: {text[:200]}"
