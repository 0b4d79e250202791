"""vml keygen, publish, remote, cache: publishing repositories and reading them over HTTP."""

import json
from pathlib import Path

from .. import config, home, keys, overview
from ..errors import NotFound, UsageError
from ..names import format_size, parse_size
from ..remotes import catalog, fetch, pinning, publish, remote
from ..repo.packs import PACK_SIZE
from .output import progress_bar, table


def cmd_keygen(args) -> int:
    pub = keys.keygen(Path(args.keyfile))
    print(f"wrote private key {args.keyfile} (keep it secret) and public key {pub} (give it to your remote's users)")
    return 0


def cmd_publish(args) -> int:
    days = catalog.check_expiry_days(args.expires_in, "--expires-in")
    if args.resign:
        if args.entries:
            raise UsageError("--resign signs the catalog in DIR again as it is: give no entries")
        cat = publish.resign(Path(args.dir), Path(args.key), days)
        print(
            f"re-signed the catalog of {cat.repository} in {args.dir}: revision {cat.revision}, "
            f"{len(cat.refs)} entries, expires {cat.expires}"
        )
        return 0
    repo = config.Config.load().open(args.repo)
    if repo.read_only:
        raise UsageError(f"{repo.name} is a remote: publish from a local repository")
    with progress_bar(f"publishing {repo.name}", unit="obj") as bar:
        s = publish.publish(repo, Path(args.dir), Path(args.key), args.entries, bar, days)
    print(
        f"published {', '.join(s.entries) or 'no entries'} of {repo.name} into {args.dir}: catalog revision "
        f"{s.revision}, {s.new_objects} new objects ({format_size(s.new_bytes)}), expires {s.expires}"
    )
    return 0


def cmd_remote_add(args) -> int:
    settings = {"proxy": args.proxy} if args.proxy else {}
    if args.timeout is not None:
        settings["timeout"] = config.check_number("timeout", args.timeout, "--timeout")
    quota = parse_size(args.cache_quota) if args.cache_quota else remote.DEFAULT_QUOTA
    rc = remote.RemoteConfig(
        args.name,
        args.url.rstrip("/"),
        keys.read_public_key(Path(args.key)),
        config.check_number("cache_quota", quota, "--cache-quota"),
        settings=fetch.Settings(**settings),
    )
    cat = home.add_remote(config.vml_home(), rc, check=not args.no_check)
    if cat is not None:
        print(f"remote {rc.name}: catalog revision {cat.revision} of {cat.repository}, {len(cat.refs)} entries")
        if remote.open_remote(config.vml_home(), rc).serves_ranges() is False:
            print(
                f"remote {rc.name}: the server ignores Range requests (a plain static server?): a read of a chunk "
                f"not cached fetches its whole pack (about {format_size(PACK_SIZE)}), which is then cached"
            )
    print(f"added remote {rc.name} ({rc.url}), proxies {rc.settings.proxy}, cache quota {format_size(rc.cache_quota)}")
    return 0


def cmd_remote_list(args) -> int:
    cfg = config.Config.load()
    rows = [[name, rc.url, rc.settings.proxy, format_size(rc.cache_quota)] for name, rc in sorted(cfg.remotes.items())]
    print("\n".join(table(rows, ["name", "url", "proxies", "cache quota"])) if rows else "(no remotes)")
    return 0


def cmd_remote_rm(args) -> int:
    home.remove_remote(config.vml_home(), args.name)
    print(f"removed remote {args.name} and its cache")
    return 0


def _cached_remotes(args) -> list:
    cfg = config.Config.load()
    names = [args.remote] if getattr(args, "remote", None) else sorted(cfg.remotes)
    for n in names:
        if n not in cfg.remotes:
            raise NotFound(f"no remote named {n!r}")
    return [remote.open_remote(cfg.home, cfg.remotes[n]) for n in names]


def cmd_cache_status(args) -> int:
    cfg = config.Config.load()
    names = [args.remote] if args.remote else None
    if args.remote and args.remote not in cfg.remotes:
        raise NotFound(f"no remote named {args.remote!r}")
    out = overview.cache_status(cfg, names)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    rows = [
        [
            s["remote"],
            s["objects"],
            s["packs"],
            format_size(s["size"]),
            format_size(s["quota"]),
            ", ".join(s["pinned"]) or "-",
            s["hits"],
            s["misses"],
            format_size(s["fetched_bytes"]),
        ]
        for s in out
    ]
    head = ["remote", "objects", "packs", "size", "quota", "pinned", "hits", "misses", "fetched"]
    print("\n".join(table(rows, head)) if rows else "(no remotes)")
    return 0


def _remote_part(args):
    repo, entry = config.Config.load().find_entry(args.entry, args.repo)
    return pinning.remote_part(repo, entry)


def cmd_cache_preload(args) -> int:
    store, digest, name = _remote_part(args)
    with progress_bar(f"preloading {store.name}:{name}", unit="obj") as bar:
        count, fetched = pinning.preload(store, digest, name, args.pin, bar)
    pinned = " and pinned" if args.pin else ""
    print(f"{store.name}:{name}: {count} objects cached{pinned}, {format_size(fetched)} fetched")
    return 0


def cmd_cache_unpin(args) -> int:
    store, _, name = _remote_part(args)
    pinning.unpin(store, name)
    print(f"unpinned {store.name}:{name}; its objects may now be evicted")
    return 0


def cmd_cache_clear(args) -> int:
    for store in _cached_remotes(args):
        removed = store.cache.clear()
        print(f"{store.name}: removed {removed} cached objects (pinned entries kept)")
    return 0


def register(cli) -> None:
    sp = cli.add("keygen", cmd_keygen, "create an Ed25519 key pair for signing published catalogs")
    sp.add_argument("keyfile", metavar="KEYFILE", help="private key; the public key goes to KEYFILE.pub")

    sp = cli.add("publish", cmd_publish, "write entries as static files for any HTTP server, with a signed catalog")
    sp.add_argument("dir", metavar="DIR")
    sp.add_argument("--key", required=True, metavar="KEYFILE", help="private key from `vml keygen`")
    sp.add_argument("entries", nargs="*", metavar="ENTRY", help="default: every entry of the repository")
    sp.add_argument(
        "--expires-in",
        type=float,
        default=catalog.DEFAULT_EXPIRY_DAYS,
        metavar="DAYS",
        help="clients refuse the catalog after DAYS days (default 30): publish or --resign before then",
    )
    sp.add_argument(
        "--resign", action="store_true", help="renew the signature and expiry of the catalog in DIR; writes no object"
    )

    sp = cli.add("remote", None, "add, list or remove remotes (published repositories read over HTTP)")
    rsub = sp.add_subparsers(dest="remote_command", metavar="ACTION", required=True)
    r = cli.add_to(rsub, "add", cmd_remote_add, "add a remote")
    r.add_argument("name", metavar="NAME")
    r.add_argument("url", metavar="URL")
    r.add_argument("--key", required=True, metavar="PUBKEY", help="the publisher's KEYFILE.pub")
    r.add_argument("--proxy", metavar="PROXIES", help="e.g. 'http://p1:3128|http://p2:3128;DIRECT' (default DIRECT)")
    r.add_argument("--cache-quota", metavar="SIZE", help="soft limit of the local cache (default 10G)")
    r.add_argument("--timeout", type=float, metavar="SECONDS", help="how long a read may wait for the network")
    r.add_argument("--no-check", action="store_true", help="do not fetch the catalog now")
    cli.add_to(rsub, "list", cmd_remote_list, "list remotes")
    r = cli.add_to(rsub, "rm", cmd_remote_rm, "remove a remote and its cache")
    r.add_argument("name", metavar="NAME")

    sp = cli.add("cache", None, "the local caches of remotes: status, preload, pin, unpin, clear")
    csub = sp.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    c = cli.add_to(csub, "status", cmd_cache_status, "size, quota, pins, hits and misses")
    c.add_argument("remote", nargs="?", metavar="REMOTE")
    c.add_argument("--json", action="store_true")
    for action, help_text, pin in (
        ("preload", "fetch everything an entry needs into the cache", False),
        ("pin", "preload an entry and never evict it", True),
    ):
        c = cli.add_to(csub, action, cmd_cache_preload, help_text)
        c.set_defaults(pin=pin)
        c.add_argument("entry", metavar="REMOTE:ENTRY")
    c = cli.add_to(csub, "unpin", cmd_cache_unpin, "let an entry's objects be evicted again")
    c.add_argument("entry", metavar="REMOTE:ENTRY")
    c = cli.add_to(csub, "clear", cmd_cache_clear, "remove cached objects, except pinned entries'")
    c.add_argument("remote", nargs="?", metavar="REMOTE")
