"""vml web: serve the release manager."""

import getpass
import secrets
import socket
import sys
import webbrowser
from pathlib import Path

from .. import config
from ..errors import UsageError
from ..files import read_regular

DEFAULT_LISTEN = "127.0.0.1:8004"


# The page's code is imported when `vml web` runs: Starlette would cost every other command 60 ms at start.


def _set_password(home: Path) -> int:
    from ..web.security import hash_password

    if not sys.stdin.isatty():
        first = sys.stdin.readline().rstrip("\n")
        second = first
    else:
        first = getpass.getpass("new password for vml web: ")
        second = getpass.getpass("again: ")
    if first != second:
        raise UsageError("the two passwords differ; nothing changed")
    if len(first) < 8:
        raise UsageError("a password of at least 8 characters, please; nothing changed")
    with config.editing(home) as cfg:
        cfg.web["password"] = hash_password(first)
    print(f"vml web: password set in {cfg.path}; vml web now asks for it instead of printing a token")
    return 0


def _tls(args, cfg) -> tuple[str | None, str | None]:
    cert = args.tls_cert or cfg.web.get("tls_cert")
    key = args.tls_key or cfg.web.get("tls_key")
    if bool(cert) != bool(key):
        raise UsageError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
    for what, path in (("certificate", cert), ("key", key)):
        if path and not Path(path).is_file():
            raise UsageError(f"TLS {what} {path}: no such file")
    if key:  # as ssh refuses a private key others may read; uvicorn itself would take it
        read_regular(Path(key), 1 << 20, "TLS key file", private=True)
    return cert, key


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    # Connections inherit it: a reply's headers and body go out at once, not 40 ms apart (Nagle
    # waiting for the browser's delayed ACK), which was most of a page's time.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def cmd_web(args) -> int:
    import uvicorn

    from ..web.app import create_app
    from ..web.security import Guard, is_loopback, parse_listen

    home = config.vml_home()
    if args.set_password:
        return _set_password(home)
    cfg = config.Config.load()
    host, port = parse_listen(args.listen or cfg.web.get("listen") or DEFAULT_LISTEN)
    auth = args.require_auth or not is_loopback(host)
    password = cfg.web.get("password")
    token = secrets.token_urlsafe(24) if auth and not password else None
    link = secrets.token_urlsafe(24) if token else None  # a URL is kept in histories: this one signs in once
    cert, key = _tls(args, cfg)
    guard = Guard(
        host,
        port,
        auth,
        token,
        password,
        tuple(args.allow_host) + tuple(cfg.web.get("allowed_hosts", ())),
        tls=bool(cert),
        link=link,
    )
    sock = _listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"{'https' if cert else 'http'}://{shown}:{port}/"
    print(f"vml web: the release manager of {home} at {url}", flush=True)
    if token:
        print(f"vml web: sign in at {url}login?token={link} (the link works once)", flush=True)
        print(f"vml web: the token, for the sign-in form and for scripts (Authorization: Bearer): {token}", flush=True)
    elif auth:
        print("vml web: sign in with the password set by `vml web --set-password`", flush=True)
    if args.open:
        webbrowser.open(url)  # never with the token: a browser's command line is visible to every user
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(home, guard, Path(args.mountpoint) if args.mountpoint else None),
            ssl_certfile=cert,
            ssl_keyfile=key,
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
    )
    server.run(sockets=[sock])
    return 0


def register(cli) -> None:
    sp = cli.add("web", cmd_web, "serve the release manager: a web page to see, start, save and share VMs")
    sp.add_argument("--listen", metavar="HOST:PORT", help=f"address to listen on (default {DEFAULT_LISTEN})")
    sp.add_argument("--open", action="store_true", help="open it in a web browser")
    sp.add_argument(
        "--require-auth",
        action="store_true",
        help="ask for the token or password on loopback too (on a machine other users log in to)",
    )
    sp.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name browsers reach this server by (Host header), besides its address",
    )
    sp.add_argument(
        "--mountpoint", metavar="DIR", help="where Start and Mount mount the logbook (default /vml for root, ~/vml)"
    )
    sp.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    sp.add_argument("--tls-key", metavar="FILE", help="and this private key (PEM)")
    sp.add_argument(
        "--set-password", action="store_true", help="set the password (read twice from the terminal) and exit"
    )
