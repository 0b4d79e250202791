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
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import certifi
import pycurl

from ..errors import Corrupt, FetchError, ObjectMissing, UsageError

log = logging.getLogger(__name__)

BUFFER = 256 << 10  # libcurl's receive buffer: one Python callback per this much of a body


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
    # How old a proxy's copy of the catalog may be (Cache-Control: max-age); 0: always the origin's.
    # Signatures and revisions refuse forged and older catalogs, so a minute's sharing is safe.
    catalog_max_age: float = 60.0


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


class _Failed(Exception):
    """One member failed one request; try the next."""

    def __init__(self, reason: str, missing: bool = False):
        super().__init__(reason)
        self.missing = missing


class Fetcher:
    """GETs from one base URL through a ProxyChain, one libcurl handle (and its connections) per thread."""

    def __init__(self, base_url: str, settings: Settings, what: str):
        self.base = base_url.rstrip("/") + "/"
        self.settings = settings
        self.what = what
        self.proxies = ProxyChain(settings.proxy, settings.proxy_reset_after)
        self._local = threading.local()
        self._lock = threading.Lock()
        self.bytes = 0
        # Whether the server answers Range requests with the bytes asked for: None until a reply says,
        # and again a while after one said no (one proxy may have been the one that ignored them).
        # Plain static servers (Python's http.server, some object stores) answer 200 and the whole file.
        self._ranges: bool | None = None
        self._ranges_until = 0.0

    def _curl(self) -> pycurl.Curl:
        c = getattr(self._local, "curl", None)
        if c is None:
            c = self._local.curl = pycurl.Curl()
        return c

    def get(
        self,
        path: str,
        max_bytes: int,
        check=None,
        max_age: float | None = None,
        deadline: float | None = None,
        span: tuple[int, int] | None = None,
        whole: int | None = None,
        into=None,
    ):
        """The body at ``path``, passed through ``check`` (which may raise Corrupt to reject it).

        ``into``, when given, makes a sink for one attempt (``write(block)``,
        ``discard()``): the body goes there as it arrives instead of into
        memory, and ``check`` gets the sink.

        ``max_age``: how old a proxy's copy may be (0: none, fetch from the
        origin); None says nothing, for objects that never change.
        With ``span`` (offset, length), only those bytes, by a Range request:
        a server that answers with anything but exactly them has failed,
        unless ``whole`` gives the file's size: a server that ignores Range
        may then answer with the whole file, which ``check`` gets instead
        (it tells the two apart by their length), and ``ranges`` says so
        from then on.

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
                    body = self._get_once(url, member, max_bytes, max_age, deadline, span, whole, into)
                    try:
                        result = check(body) if check else body
                    except Corrupt:
                        if into is not None:
                            body.discard()
                        raise
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

    def _get_once(
        self,
        url: str,
        member: str | None,
        max_bytes: int,
        max_age: float | None,
        deadline: float,
        span: tuple[int, int] | None,
        whole: int | None,
        into=None,
    ):
        """One GET through ``member`` (None: direct), bounded in time and size, on this thread's handle.

        libcurl enforces the whole request's deadline (TIMEOUT_MS covers
        connecting, a peer trickling header lines and the body alike), the
        minimum transfer rate, the size (MAXFILESIZE for a declared
        Content-Length; the write callback for the bytes that come), and
        reports a reply cut short of its Content-Length.
        """
        remaining = max(0.1, deadline - time.monotonic())
        body = bytearray()
        sink = into() if into is not None else None
        received = 0
        if span is not None and whole is not None:
            max_bytes = max(max_bytes, whole)  # a server without ranges sends the whole file

        def write(block: bytes):
            nonlocal received
            received += len(block)
            if received > max_bytes:
                return 0  # libcurl stops with CURLE_WRITE_ERROR
            if sink is None:
                body.extend(block)
            else:
                sink.write(block)

        try:
            self._perform(url, member, max_bytes, max_age, remaining, deadline, span, whole, write, lambda: received)
        except BaseException:
            if sink is not None:
                sink.discard()
            raise
        with self._lock:
            self.bytes += received
        return bytes(body) if sink is None else sink

    def _perform(self, url, member, max_bytes, max_age, remaining, deadline, span, whole, write, received) -> None:
        st = self.settings
        content_range = ""

        def header(line: bytes):
            nonlocal content_range
            name, _, value = line.decode("latin-1").partition(":")
            if name.startswith("HTTP/"):  # a new reply's headers (after a 100 Continue, say)
                content_range = ""
            elif name.strip().lower() == "content-range":
                content_range = value.strip()

        c = self._curl()
        c.reset()  # options back to defaults; open connections stay for reuse
        c.setopt(pycurl.URL, url)
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.FOLLOWLOCATION, 0)
        c.setopt(pycurl.NOSIGNAL, 1)  # timeouts without SIGALRM, so threads are safe
        # The remote's proxy setting decides, never http_proxy or no_proxy.
        c.setopt(pycurl.PROXY, member or "")
        c.setopt(pycurl.NOPROXY, "" if member else "*")
        c.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(min(st.connect_timeout, remaining) * 1000)))
        c.setopt(pycurl.TIMEOUT_MS, max(1, int(remaining * 1000)))
        # libcurl has one stall rule: below LIMIT bytes/s for TIME seconds. It also
        # catches "no byte for read_timeout", as nothing is below any limit.
        if st.low_speed_limit > 0:
            limit, within = st.low_speed_limit, min(st.low_speed_time, st.read_timeout)
        else:
            limit, within = 1, st.read_timeout
        c.setopt(pycurl.LOW_SPEED_LIMIT, limit)
        c.setopt(pycurl.LOW_SPEED_TIME, max(1, round(within)))
        c.setopt(pycurl.MAXFILESIZE_LARGE, max_bytes)
        # identity: bodies are checked byte for byte, and nothing is inflated unbounded.
        headers = ["Accept-Encoding: identity"]
        if max_age == 0:
            headers += ["Cache-Control: no-cache", "Pragma: no-cache"]
        elif max_age is not None:
            headers.append(f"Cache-Control: max-age={int(max_age)}")
        c.setopt(pycurl.HTTPHEADER, headers)
        if st.verify_tls is False:
            c.setopt(pycurl.SSL_VERIFYPEER, 0)
            c.setopt(pycurl.SSL_VERIFYHOST, 0)
        else:
            c.setopt(pycurl.CAINFO, certifi.where() if st.verify_tls is True else str(st.verify_tls))
        c.setopt(pycurl.WRITEFUNCTION, write)
        c.setopt(pycurl.HEADERFUNCTION, header)
        c.setopt(pycurl.BUFFERSIZE, BUFFER)
        if span is not None:
            c.setopt(pycurl.RANGE, f"{span[0]}-{span[0] + span[1] - 1}")
        try:
            c.perform()
        except pycurl.error as e:
            code, message = e.args
            if code == pycurl.E_WRITE_ERROR and received() > max_bytes:
                raise _Failed(f"reply longer than the {max_bytes} bytes it may have") from None
            if code == pycurl.E_FILESIZE_EXCEEDED:
                raise _Failed(f"reply declared more than the {max_bytes} bytes it may have") from None
            if code == pycurl.E_OPERATION_TIMEDOUT:
                if time.monotonic() >= deadline - 0.05:
                    raise _Failed("deadline passed during the request") from None
                raise _Failed(f"transfer stalled ({_curl_reason(code, message)})") from None
            if code == pycurl.E_PARTIAL_FILE:
                raise _Failed(f"truncated reply ({_curl_reason(code, message)})") from None
            raise _Failed(_curl_reason(code, message)) from None
        status = c.getinfo(pycurl.RESPONSE_CODE)
        if span is not None and status == 200:
            self._learn_ranges(False)
            if whole is None:
                raise _Failed("the server ignores Range requests")
            if received() != whole:
                raise _Failed(f"{received()} bytes in a whole-file reply to a Range request, not {whole}")
        elif status != (200 if span is None else 206):
            raise _Failed(f"HTTP {status}" + (" to a Range request" if span else ""), missing=status == 404)
        elif span is not None:
            asked = f"bytes {span[0]}-{span[0] + span[1] - 1}/"
            said = content_range
            if not said.startswith(asked):  # another part of the file than the one asked for
                raise _Failed(f"a reply with Content-Range {said or 'missing'!r} to a Range request of {asked}*")
            if received() != span[1]:
                raise _Failed(f"{received()} bytes in reply to a Range request of {span[1]}")
            self._learn_ranges(True)

    @property
    def ranges(self) -> bool | None:
        if self._ranges is False and time.monotonic() > self._ranges_until:
            self._ranges = None  # try a range again
        return self._ranges

    def _learn_ranges(self, served: bool) -> None:
        if not served:
            if not self._ranges_until:  # `vml remote add` says it to the user; here it is for the log only
                log.info("%s: the server ignores Range requests; reading whole files instead", self.what)
            self._ranges_until = time.monotonic() + self.settings.proxy_reset_after
        self._ranges = served

    def serves_ranges(self, path: str, limit: int) -> bool | None:
        """Whether the server answers a Range request of ``path`` with just that range (one request).

        None if it gave no answer. ``limit`` bounds the whole file a server without ranges sends.
        """
        member = self.proxies.order()[0]
        deadline = time.monotonic() + self.settings.timeout
        with contextlib.suppress(_Failed):
            self._get_once(self.base + path, member, limit, 0, deadline, (0, 1), None)
        return self.ranges


def _curl_reason(code: int, message: str) -> str:
    first = message.splitlines()[0][:200] if message else "no message"
    return f"curl error {code}: {first}"
