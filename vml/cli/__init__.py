"""The `vml` command: argument parsing and output, nothing else.

Errors from the library are printed as one line, ``vml: error: ...``, and
exit with the status their class carries; a traceback only with --debug.
"""

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from .. import config, control
from ..entries import bundle, maintenance
from ..entries import copies as incoming
from ..entries.checkout import checkout
from ..entries.save import save
from ..errors import AlreadyExists, Corrupt, NotFound, UsageError, VmlError
from ..names import check_repository_name, format_size, parse_size
from ..progress import SILENT, Progress
from ..remotes import catalog, fetch, publish, remote
from ..repo import leases
from ..repo.manifest import KINDS
from ..repo.store import DEFAULT_CHUNK_SIZE, METADATA_LIMIT, Store, check_chunk_size
from ..vms import areas, boot
from .output import show_lines, table, tree_lines

INTERNAL_ERROR = 70
HYPERVISORS = ("libvirt", "vmware", "qemu")


class TerminalProgress(Progress):
    """A tqdm bar on stderr, shown only when stderr is a terminal."""

    def __init__(self, what: str, unit: str):
        self.what, self.unit, self.bar = what, unit, None

    def start(self, total: int | None) -> None:
        from tqdm import tqdm

        self.close()
        scale = {"unit_scale": True, "unit_divisor": 1024} if self.unit == "B" else {}
        self.bar = tqdm(total=total, desc=self.what, unit=self.unit, leave=False, **scale)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def progress_bar(what: str, unit: str = "B"):
    if not sys.stderr.isatty():
        yield SILENT
        return
    p = TerminalProgress(what, unit)
    try:
        yield p
    finally:
        p.close()


def _repo(args):
    return config.Config.load().open(args.repo)


def cmd_init(args) -> int:
    path = Path(args.path).absolute()
    name = check_repository_name(args.name or path.name)
    chunk_size = check_chunk_size(parse_size(args.chunk_size)) if args.chunk_size else DEFAULT_CHUNK_SIZE
    if (path / "vml-repository.json").exists():
        store = Store(path)
        verb = "registered existing"
    else:
        store = Store.create(path, chunk_size)
        verb = "created"
    with config.editing() as cfg:
        cfg.register(name, path, args.default)
        star = " (default)" if cfg.default == name else ""
    print(f"{verb} repository {name}{star} at {path}, chunk size {format_size(store.chunk_size)}")
    return 0


def cmd_save(args) -> int:
    if args.area:
        return _save_area(args)
    if not args.source:
        raise UsageError("say what to save: --from PATH (an image or VM directory) or --area NAME")
    cfg = config.Config.load()
    repo = cfg.open(args.repo)
    parent = args.parent
    if parent and ":" in parent:
        parent_repo, parent = cfg.find_entry(parent, args.repo)
        if not parent_repo.read_only and parent_repo.store.path != repo.store.path:
            raise UsageError(
                f"--parent {args.parent}: an entry can build on its own repository or a remote; "
                f"to build on {parent_repo.name}, export and import the entry into {repo.name} first"
            )
    with progress_bar(f"saving {args.entry}") as bar:
        entry = save(
            repo,
            args.entry,
            args.source,
            parent=parent,
            kind=args.kind,
            message=args.message or "",
            fmt=args.format,
            progress=bar,
            allow_outside=args.allow_backing_outside,
        )
    stored = repo.stored_bytes(entry.digest)
    total = sum(s.size for s in entry.manifest.disks + entry.manifest.files)
    print(
        f"saved {entry.name} ({entry.manifest.kind}) in {repo.name}: {format_size(total)} of disks and files, "
        f"{format_size(stored)} stored"
    )
    return 0


def _save_area(args) -> int:
    if args.source or args.parent or args.kind or args.format or args.allow_backing_outside:
        raise UsageError(
            "--area saves what changed in the area as an incremental entry on the area's entry; "
            "--from, --parent, --kind, --format and --allow-backing-outside do not apply"
        )
    home = config.vml_home()
    with progress_bar(f"saving {args.entry}") as bar:
        rec, running = boot.save(home, args.area, args.entry, args.message or "", bar)
    repo = config.Config.load().open(rec.repository_path)
    entry = repo.entry(rec.entry)
    stored = repo.stored_bytes(entry.digest)
    memory = " with the running VM's memory state" if running else ""
    print(
        f"saved {entry.name} ({entry.manifest.kind} on {entry.manifest.parent.name}) in {rec.repository} "
        f"from working area {rec.name}{memory}: {format_size(stored)} stored; the area now builds on {entry.name}"
    )
    return 0


def cmd_open(args) -> int:
    cfg = config.Config.load()
    repo, entry = cfg.find_entry(args.entry, args.repo)
    save_to = cfg.open(args.repo) if repo.read_only else None
    home = config.vml_home()
    rec = areas.create_area(home, args.area or entry.name, repo, entry, save_to)
    state = control.mount_state(home)
    where = f"at {Path(state['mountpoint']) / 'areas' / rec.name}" if state else "(run `vml mount` to use its files)"
    saves = f"; saves go to {save_to.name}" if save_to else ""
    booted = ""
    if args.boot:
        try:
            booted = _boot(args, rec.name, args.boot)
        except BaseException:
            areas.close_area(home, rec.name, discard=True)  # nothing was written: the VM did not start
            raise
    print(f"opened working area {rec.name} on {entry.name} of {repo.name} {where}{saves}")
    print(booted, end="")
    return 0


def _hv_options(args) -> dict:
    keys = ("connect", "accel", "network", "host", "user", "password", "datastore", "vm_datastore", "insecure", "qemu")
    return {k: getattr(args, k, None) for k in keys if getattr(args, k, None)}


def _memory(text: str | None) -> int | None:
    if not text:
        return None
    return int(text) if text.isdigit() else parse_size(text) >> 20


def _boot(args, area: str, hypervisor: str) -> str:
    """Boot ``area`` (or describe the boot, with --dry-run); return what to print."""
    home = config.vml_home()
    memory = _memory(args.memory)
    if args.dry_run:
        return boot.describe(home, area, hypervisor, _hv_options(args), memory, args.vcpus)
    rec = boot.boot(home, area, hypervisor, _hv_options(args), memory, args.vcpus)
    where = rec.details.get("connect") or rec.details.get("host")
    what = f"({where}) as {rec.vm}" if where else f"as process {rec.vm}"
    hw = rec.hardware
    log = areas.areas_dir(home) / area / "console.log"
    console = f"; serial console in {log}" if hypervisor != "vmware" else ""
    return f"booted area {area} on {hypervisor} {what}: {hw['memory_mib']} MiB, {hw['vcpus']} vCPU{console}\n"


def cmd_boot(args) -> int:
    print(_boot(args, args.area, args.hypervisor), end="")
    return 0


def cmd_stop(args) -> int:
    how = boot.stop(config.vml_home(), args.area, args.force, args.timeout, _hv_options(args))
    print(f"area {args.area}: {how}")
    return 0


def cmd_status(args) -> int:
    items = boot.status(config.vml_home(), _hv_options(args))
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    rows = [
        [i["area"], i["entry"], i["hypervisor"] or "-", i["vm"] or "-", i["state"], i.get("error", "")] for i in items
    ]
    print("\n".join(table(rows, ["area", "entry", "hypervisor", "vm", "state", ""])) if rows else "(no working areas)")
    return 0


def cmd_close(args) -> int:
    boot.close(config.vml_home(), args.area, args.discard, _hv_options(args))
    print(f"closed working area {args.area}" + (" and discarded its changes" if args.discard else ""))
    return 0


def default_mountpoint() -> Path:
    return Path("/vml") if os.geteuid() == 0 else Path.home() / "vml"


def cmd_mount(args) -> int:
    home = config.vml_home()
    mountpoint = Path(args.mountpoint or default_mountpoint()).absolute()
    state = control.mount_state(home)
    if state:
        raise AlreadyExists(f"{home} is already mounted at {state['mountpoint']} (pid {state['pid']})")
    mountpoint.mkdir(parents=True, exist_ok=True)
    if control.is_mounted(mountpoint):
        raise AlreadyExists(f"{mountpoint} is already a mount point; `vml umount {mountpoint}` first")
    from vmlfs import daemon

    if args.foreground:
        daemon.run_foreground(home, mountpoint, args.debug)
        return 0
    daemon.start(home, mountpoint, args.debug)
    print(f"mounted the logbook of {home} at {mountpoint}")
    return 0


def cmd_umount(args) -> int:
    home = config.vml_home()
    state = control.mount_state(home)
    mountpoint = Path(args.mountpoint or (state or {}).get("mountpoint") or default_mountpoint()).absolute()
    from vmlfs import daemon

    daemon.stop(home, mountpoint)
    print(f"unmounted {mountpoint}")
    return 0


def cmd_log(args) -> int:
    repo = config.Config.load().open(args.repository or args.repo)
    damaged: dict = {}
    lines = tree_lines(repo, damaged)
    print("\n".join(lines) if lines else f"(repository {repo.name} has no entries)")
    return _report_damaged(repo, damaged)


def _report_damaged(repo, damaged: dict) -> int:
    """After a listing: say on stderr which entries are damaged; the exit status says so too."""
    if not damaged:
        return 0
    print(
        f"vml: {len(damaged)} damaged entr{'y' if len(damaged) == 1 else 'ies'} in {repo.name} "
        f"({', '.join(sorted(damaged))}): run `vml verify`",
        file=sys.stderr,
    )
    return Corrupt.exit_status


def cmd_consult(args) -> int:
    cfg = config.Config.load()
    rows, repos = [], []
    for name, path in sorted(cfg.repositories.items()):
        try:
            repo = cfg.open(name)
            entries = [e.name for e in repo.entries({})]
            repos.append(repo)
        except VmlError as e:
            entries = f"(unreadable: {e})"
        rows.append([name + ("*" if name == cfg.default else ""), entries, path])
    print("Repositories:")
    print("\n".join(table(rows, ["name", "entries", "path"])) if rows else "(none: create one with vml init PATH)")
    if cfg.remotes:
        print("\nRemotes:")
        rows = []
        for name, rc in sorted(cfg.remotes.items()):
            try:
                entries = sorted(cfg.open(name).refs())
            except VmlError as e:
                entries = f"(unreachable: {e})"
            rows.append([name, entries, rc.url])
        print("\n".join(table(rows, ["name", "entries", "url"])))
    print("\nWorking areas:")
    home = config.vml_home()
    state = control.mount_state(home)
    rows = []
    for rec in areas.list_areas(home):
        path = Path(state["mountpoint"]) / "areas" / rec.name if state else areas.areas_dir(home) / rec.name
        rows.append([rec.name, rec.entry, rec.repository, format_size(areas.changed_bytes(home, rec)), path])
    print("\n".join(table(rows, ["name", "entry", "repository", "changed", "path"])) if rows else "(none)")
    staged = [[name, repo_name, path] for repo_name, name, path in incoming.pending(home)]
    if staged:
        print("\nCopies in repository directories that are not entries (see the mount's log for why;")
        print("save them with `vml save NAME --from PATH`, or remove them from the mount with rm -r):")
        print("\n".join(table(staged, ["name", "repository", "path"])))
    status = 0
    for repo in repos:
        print(f"\nEntries in repository {repo.name}:")
        damaged: dict = {}
        print("\n".join(tree_lines(repo, damaged)) or "(none)")
        status = _report_damaged(repo, damaged) or status
    return status


def _entry(args, spec: str):
    """(repository, entry) for ENTRY or REPO:ENTRY."""
    return config.Config.load().find_entry(spec, args.repo)


def cmd_show(args) -> int:
    repo, entry = _entry(args, args.entry)
    info = repo.describe(entry)
    print(json.dumps(info, indent=2) if args.json else "\n".join(show_lines(info)))
    return 0


def cmd_checkout(args) -> int:
    repo, entry = _entry(args, args.entry)
    with progress_bar(f"checking out {args.entry}") as bar:
        paths = checkout(repo, entry.name, args.dir, keep_special_bits=args.keep_special_bits, progress=bar)
    for p in paths:
        print(p)
    return 0


def cmd_export(args) -> int:
    repo, entry = _entry(args, args.entry)
    with progress_bar(f"exporting {args.entry}") as bar:
        s = bundle.export(repo, entry.name, args.output, against=args.against, full=args.full, progress=bar)
    needs = f"; the receiver needs {', '.join(s.requires)}" if s.requires else ""
    print(f"wrote {args.output}: {format_size(s.size)}, entries {', '.join(s.entries)}, {s.objects} objects{needs}")
    return 0


def cmd_import(args) -> int:
    repo = _repo(args)
    with progress_bar(f"importing {Path(args.file).name}") as bar:
        names = bundle.import_bundle(repo, args.file, progress=bar)
    print(f"imported {', '.join(names)} into {repo.name}" if names else f"nothing new for {repo.name} in {args.file}")
    return 0


def cmd_rm(args) -> int:
    repo = _repo(args)
    result = maintenance.remove(repo, args.entry, recursive=args.recursive, reparent=args.reparent, force=args.force)
    print(f"removed {', '.join(result['removed'])} from {repo.name}")
    if result["rewritten"]:
        print(f"reattached {', '.join(result['rewritten'])} to the removed entry's parent")
    print("run `vml gc` to free the space")
    return 0


def cmd_gc(args) -> int:
    repo = _repo(args)
    s = maintenance.gc(repo, keep=areas.roots(config.vml_home(), repo))
    kept = f" (with what {s.areas} working area{'s' if s.areas != 1 else ''} build on)" if s.areas else ""
    print(f"{repo.name}: removed {s.removed} objects, freed {format_size(s.freed)}, {s.kept} objects kept{kept}")
    return 0


def cmd_leases(args) -> int:
    repo = _repo(args)
    found, damaged = leases.read_all(repo)
    items = [dataclasses.asdict(lease) | {"id": lease.id, "stale": leases.is_stale(lease)} for lease in found]
    if args.json:
        print(json.dumps(items, indent=2))
    elif items:
        state = {True: "stale", False: "open", None: "other host"}
        rows = [
            [i["id"][:12], i["area"], i["entry"], i["user"], i["host"], i["home"], i["since"], state[i["stale"]]]
            for i in items
        ]
        print("\n".join(table(rows, ["id", "area", "entry", "user", "host", "home", "since", "state"])))
    else:
        print(f"(no working areas build on entries of {repo.name})")
    for line in damaged:
        print(f"vml: {line}", file=sys.stderr)
    return Corrupt.exit_status if damaged else 0


def cmd_leases_drop(args) -> int:
    repo = _repo(args)
    dropped = leases.drop(repo, args.ids, stale=args.stale)
    for what in dropped:
        print(f"dropped the lease of {what}")
    if not dropped:
        print(f"no stale leases in {repo.name}")
    return 0


def cmd_verify(args) -> int:
    repo = _repo(args)
    with progress_bar(f"verifying {repo.name}", unit="obj") as bar:
        problems = maintenance.verify(repo, args.entry, progress=bar)
    for p in problems:
        print(p)
    what = f"entry {args.entry}" if args.entry else f"repository {repo.name}"
    if problems:
        print(f"{what}: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{what}: ok")
    return 0


def cmd_keygen(args) -> int:
    pub = catalog.keygen(Path(args.keyfile))
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
    repo = _repo(args)
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
    check_repository_name(args.name)
    url = args.url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"remote URL {args.url!r}: use http:// or https://")
    settings = {"proxy": args.proxy} if args.proxy else {}
    if args.timeout is not None:
        settings["timeout"] = config.check_number("timeout", args.timeout, "--timeout")
    quota = parse_size(args.cache_quota) if args.cache_quota else remote.DEFAULT_QUOTA
    rc = remote.RemoteConfig(
        args.name,
        url,
        catalog.read_public_key(Path(args.key)),
        config.check_number("cache_quota", quota, "--cache-quota"),
        settings=fetch.Settings(**settings),
    )
    fetch.parse_proxies(rc.settings.proxy)
    home = config.vml_home()
    with config.editing(home) as cfg:
        cfg.add_remote(rc)
        # A cache left under this name (config.toml edited by hand) may know another repository.
        shutil.rmtree(home / "cache" / rc.name, ignore_errors=True)
        if not args.no_check:  # refuse a wrong URL or key now, not at first use
            try:
                cat = remote.RemoteStore(home, rc).catalog(refresh=True)
            except VmlError:
                shutil.rmtree(home / "cache" / rc.name, ignore_errors=True)
                raise
            cfg.remotes[rc.name] = rc = dataclasses.replace(rc, repository=cat.repository)
            print(f"remote {rc.name}: catalog revision {cat.revision} of {cat.repository}, {len(cat.refs)} entries")
    print(f"added remote {rc.name} ({url}), proxies {rc.settings.proxy}, cache quota {format_size(rc.cache_quota)}")
    return 0


def cmd_remote_list(args) -> int:
    cfg = config.Config.load()
    rows = []
    for name, rc in sorted(cfg.remotes.items()):
        rows.append([name, rc.url, rc.settings.proxy, format_size(rc.cache_quota)])
    print("\n".join(table(rows, ["name", "url", "proxies", "cache quota"])) if rows else "(no remotes)")
    return 0


def cmd_remote_rm(args) -> int:
    home = config.vml_home()
    with config.editing(home) as cfg:
        if args.name not in cfg.remotes:
            raise NotFound(f"no remote named {args.name!r}")
        users = [r.name for r in areas.list_areas(home) if r.repository == args.name and not r.repository_path]
        if users:
            raise UsageError(f"working areas {', '.join(users)} are open on remote {args.name}: close them first")
        del cfg.remotes[args.name]
    shutil.rmtree(home / "cache" / args.name, ignore_errors=True)
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
    out = []
    for store in _cached_remotes(args):
        objects, size = store.cache.usage()
        pins = store.pins()
        out.append(
            {"remote": store.name, "objects": objects, "size": size, "quota": store.cache.quota}
            | {"pinned": sorted(pins)}
            | store.cache.stats()
        )
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    rows = [
        [s["remote"], s["objects"], format_size(s["size"]), format_size(s["quota"]), ", ".join(s["pinned"]) or "-"]
        for s in out
    ]
    for row, s in zip(rows, out, strict=True):
        row += [s["hits"], s["misses"], format_size(s["fetched_bytes"])]
    head = ["remote", "objects", "size", "quota", "pinned", "hits", "misses", "fetched"]
    print("\n".join(table(rows, head)) if rows else "(no remotes)")
    return 0


def _remote_part(args):
    """(remote store, manifest digest, name) of the remote part of ENTRY."""
    repo, entry = _entry(args, args.entry)
    if repo.read_only:
        return repo.store, entry.digest, entry.name
    local = repo.local_chain(entry.digest)
    link = local[-1][1].reference if local else None
    if link is None:
        raise UsageError(f"entry {entry.name!r} of {repo.name} is all local: there is nothing to fetch for it")
    for store in repo.fallbacks:
        if store.lists(link.manifest):
            return store, link.manifest, link.name
    raise NotFound(f"entry {entry.name!r} builds on {link.name!r}, which no configured remote lists")


def cmd_cache_preload(args) -> int:
    store, digest, name = _remote_part(args)
    objs = remote.RemoteRepository(store).entry_objects(digest)
    with progress_bar(f"preloading {store.name}:{name}", unit="obj") as bar:
        fetched = store.fetch_all(objs, METADATA_LIMIT, bar)
    if args.pin:  # only once all is there; eviction during the preload is the quota's business
        store.set_pins(store.pins() | {name: digest})
    pinned = " and pinned" if args.pin else ""
    print(f"{store.name}:{name}: {len(objs)} objects cached{pinned}, {format_size(fetched)} fetched")
    return 0


def cmd_cache_unpin(args) -> int:
    store, _, name = _remote_part(args)
    pins = store.pins()
    if name not in pins:
        raise NotFound(f"{store.name}:{name} is not pinned")
    del pins[name]
    store.set_pins(pins)
    print(f"unpinned {store.name}:{name}; its objects may now be evicted")
    return 0


def cmd_cache_clear(args) -> int:
    for store in _cached_remotes(args):
        removed = store.cache.clear()
        print(f"{store.name}: removed {removed} cached objects (pinned entries kept)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # --repo and --debug go before or after the command. The subcommands'
    # copies default to SUPPRESS, so they do not overwrite a value given
    # before the command.
    p = argparse.ArgumentParser(prog="vml", description="Virtual Machine Logbook")
    common = argparse.ArgumentParser(add_help=False)
    for parser, default in ((p, None), (common, argparse.SUPPRESS)):
        parser.add_argument(
            "--repo", metavar="REPO", default=default, help="repository name from the config, or a path"
        )
        parser.add_argument(
            "--debug", action="store_true", default=default or False, help="print a traceback on errors"
        )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, fn, help_text):
        sp = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        sp.set_defaults(func=fn)
        return sp

    sp = add("init", cmd_init, "create a repository (or register an existing one)")
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("--name", help="name to register it under (default: the directory name)")
    sp.add_argument("--chunk-size", metavar="SIZE", help=f"chunk size, e.g. 256K (default {DEFAULT_CHUNK_SIZE >> 10}K)")
    sp.add_argument("--default", action="store_true", help="make it the default repository")

    sp = add("save", cmd_save, "save a disk image or VM directory as an entry")
    sp.add_argument("entry", metavar="ENTRY")
    sp.add_argument("--from", dest="source", metavar="PATH", help="disk image or VM directory")
    sp.add_argument("--area", metavar="NAME", help="save what changed in working area NAME")
    sp.add_argument("--parent", metavar="ENTRY", help="entry this one follows in the tree")
    sp.add_argument("--kind", choices=KINDS, help="default: incremental with --parent, else full")
    sp.add_argument("-m", "--message", help="a note kept with the entry")
    sp.add_argument("--format", help="image format of a single file (default: detected from its header)")
    sp.add_argument(
        "--allow-backing-outside",
        action="store_true",
        help="accept backing files, data files and extents outside the image's directory "
        "(a real overlay on a base elsewhere)",
    )

    sp = add("log", cmd_log, "print the tree of entries")
    sp.add_argument("repository", nargs="?", metavar="REPO")

    add("consult", cmd_consult, "print repositories, working areas and entry trees")

    sp = add("show", cmd_show, "describe one entry")
    sp.add_argument("entry", metavar="ENTRY")
    sp.add_argument("--json", action="store_true", help="print one JSON object")

    sp = add("checkout", cmd_checkout, "write an entry's disks (as sparse raw images) and files into DIR")
    sp.add_argument("entry", metavar="ENTRY")
    sp.add_argument("dir", metavar="DIR")
    sp.add_argument(
        "--keep-special-bits",
        action="store_true",
        help="keep setuid, setgid and sticky bits of the entry's files (dropped by default: entries come from anyone)",
    )

    sp = add("export", cmd_export, "write a bundle of an entry for another repository")
    sp.add_argument("entry", metavar="ENTRY")
    sp.add_argument("-o", "--output", required=True, metavar="FILE")
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--against", metavar="ENTRY", help="leave out what this entry holds (the receiver has it)")
    group.add_argument("--full", action="store_true", help="include everything the entry needs")

    sp = add("import", cmd_import, "add a bundle's entries to a repository")
    sp.add_argument("file", metavar="FILE")

    sp = add("rm", cmd_rm, "remove an entry")
    sp.add_argument("entry", metavar="ENTRY")
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--recursive", action="store_true", help="also remove the entries built on it")
    group.add_argument("--reparent", action="store_true", help="attach the entries built on it to its parent")
    sp.add_argument("--force", action="store_true", help="even if working areas build on it (they keep their data)")

    add("gc", cmd_gc, "free the objects no entry needs")

    sp = add("leases", cmd_leases, "the working areas of every home that build on a repository's entries")
    sp.add_argument("--json", action="store_true", help="print a list of objects")
    lsub = sp.add_subparsers(dest="leases_command", metavar="ACTION")
    r = lsub.add_parser("drop", help="remove leases whose areas are gone", parents=[common])
    r.set_defaults(func=cmd_leases_drop)
    r.add_argument("ids", nargs="*", metavar="ID", help="a lease id, or its first characters (see `vml leases`)")
    r.add_argument("--stale", action="store_true", help="every lease of this host whose area is gone")

    hv = argparse.ArgumentParser(add_help=False)
    g = hv.add_argument_group("hypervisor options")
    g.add_argument("--connect", metavar="URI", help="libvirt: qemu:///system (default), xen:///system, qemu+ssh://...")
    g.add_argument("--accel", choices=("auto", "kvm", "tcg"), help="libvirt, qemu: KVM or emulation (default auto)")
    g.add_argument("--network", metavar="NAME", help="libvirt network or VMware port group (default user-mode NAT)")
    g.add_argument("--qemu", metavar="BINARY", help="qemu: the emulator (default qemu-system-ARCH)")
    g.add_argument("--host", metavar="URL", help="vmware: https://HOST/sdk (or VML_VMWARE_HOST)")
    g.add_argument("--user", metavar="USER", help="vmware: user name (or VML_VMWARE_USER)")
    g.add_argument("--password", metavar="PASSWORD", help="vmware: better given as VML_VMWARE_PASSWORD")
    g.add_argument("--datastore", metavar="NAME", help="vmware: the datastore whose root is the mount point")
    g.add_argument("--vm-datastore", metavar="NAME", help="vmware: where the VM's own files go (default: another)")
    g.add_argument("--insecure", action="store_true", help="vmware: do not verify the host's TLS certificate")
    boot_opts = argparse.ArgumentParser(add_help=False)
    g = boot_opts.add_argument_group("VM options")
    g.add_argument("--memory", metavar="SIZE", help="memory in MiB, or e.g. 2G (default: the entry's)")
    g.add_argument("--vcpus", type=int, metavar="N", help="virtual CPUs (default: the entry's)")
    g.add_argument("--dry-run", action="store_true", help="print the configuration instead of booting")

    def add_hv(name, fn, help_text, *extra):
        sp = sub.add_parser(name, help=help_text, description=help_text, parents=[common, hv, *extra])
        sp.set_defaults(func=fn)
        return sp

    sp = add_hv("open", cmd_open, "open an entry in a writable working area (and boot it)", boot_opts)
    sp.add_argument("entry", metavar="ENTRY")
    sp.add_argument("--area", metavar="NAME", help="name of the area (default: the entry's name)")
    sp.add_argument("--boot", choices=HYPERVISORS, metavar="HYPERVISOR", help="then boot it: libvirt, vmware or qemu")

    sp = add_hv("boot", cmd_boot, "start a VM on a working area's disks", boot_opts)
    sp.add_argument("area", metavar="NAME")
    sp.add_argument("--hypervisor", required=True, choices=HYPERVISORS, help="libvirt, vmware or qemu")

    sp = add_hv("stop", cmd_stop, "stop the VM of a working area: orderly shutdown, then power off")
    sp.add_argument("area", metavar="NAME")
    sp.add_argument("--force", action="store_true", help="power off at once")
    sp.add_argument("--timeout", type=float, default=boot.STOP_TIMEOUT, metavar="SECONDS", help="wait (default 60)")

    sp = add_hv("status", cmd_status, "working areas and their VMs: hypervisor, running or not")
    sp.add_argument("--json", action="store_true", help="print a list of objects (area, hypervisor, state, ...)")

    sp = add_hv("close", cmd_close, "remove a working area (and forget its stopped VM)")
    sp.add_argument("area", metavar="NAME")
    sp.add_argument("--discard", action="store_true", help="even if it has unsaved changes")

    sp = add("mount", cmd_mount, "show every repository and working area as a file system")
    sp.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT", help="default /vml for root, ~/vml otherwise")
    sp.add_argument("--foreground", action="store_true", help="stay attached (logs to stderr)")

    sp = add("umount", cmd_umount, "unmount the logbook")
    sp.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT")

    sp = add("keygen", cmd_keygen, "create an Ed25519 key pair for signing published catalogs")
    sp.add_argument("keyfile", metavar="KEYFILE", help="private key; the public key goes to KEYFILE.pub")

    sp = add("publish", cmd_publish, "write entries as static files for any HTTP server, with a signed catalog")
    sp.add_argument("dir", metavar="DIR")
    sp.add_argument("--key", required=True, metavar="KEYFILE", help="private key from `vml keygen`")
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
    sp.add_argument("entries", nargs="*", metavar="ENTRY", help="default: every entry of the repository")

    sp = add("remote", None, "add, list or remove remotes (published repositories read over HTTP)")
    rsub = sp.add_subparsers(dest="remote_command", metavar="ACTION", required=True)
    r = rsub.add_parser("add", help="add a remote", parents=[common])
    r.set_defaults(func=cmd_remote_add)
    r.add_argument("name", metavar="NAME")
    r.add_argument("url", metavar="URL")
    r.add_argument("--key", required=True, metavar="PUBKEY", help="the publisher's KEYFILE.pub")
    r.add_argument("--proxy", metavar="PROXIES", help="e.g. 'http://p1:3128|http://p2:3128;DIRECT' (default DIRECT)")
    r.add_argument("--cache-quota", metavar="SIZE", help="soft limit of the local cache (default 10G)")
    r.add_argument("--timeout", type=float, metavar="SECONDS", help="how long a read may wait for the network")
    r.add_argument("--no-check", action="store_true", help="do not fetch the catalog now")
    r = rsub.add_parser("list", help="list remotes", parents=[common])
    r.set_defaults(func=cmd_remote_list)
    r = rsub.add_parser("rm", help="remove a remote and its cache", parents=[common])
    r.set_defaults(func=cmd_remote_rm)
    r.add_argument("name", metavar="NAME")

    sp = add("cache", None, "the local caches of remotes: status, preload, pin, unpin, clear")
    csub = sp.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    c = csub.add_parser("status", help="size, quota, pins, hits and misses", parents=[common])
    c.set_defaults(func=cmd_cache_status)
    c.add_argument("remote", nargs="?", metavar="REMOTE")
    c.add_argument("--json", action="store_true")
    for action, help_text, pin in (
        ("preload", "fetch everything an entry needs into the cache", False),
        ("pin", "preload an entry and never evict it", True),
    ):
        c = csub.add_parser(action, help=help_text, parents=[common])
        c.set_defaults(func=cmd_cache_preload, pin=pin)
        c.add_argument("entry", metavar="REMOTE:ENTRY")
    c = csub.add_parser("unpin", help="let an entry's objects be evicted again", parents=[common])
    c.set_defaults(func=cmd_cache_unpin)
    c.add_argument("entry", metavar="REMOTE:ENTRY")
    c = csub.add_parser("clear", help="remove cached objects, except pinned entries'", parents=[common])
    c.set_defaults(func=cmd_cache_clear)
    c.add_argument("remote", nargs="?", metavar="REMOTE")

    sp = add("verify", cmd_verify, "check objects and entries; exit 1 if anything is wrong")
    sp.add_argument("entry", nargs="?", metavar="ENTRY")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "func", None) is cmd_publish and not any(a.startswith("-") for a in extra):
        args.entries += extra  # `vml publish DIR --key KEY ENTRY...`: entries after the option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(format="vml: %(message)s", level=logging.DEBUG if args.debug else logging.WARNING)
    try:
        return args.func(args)
    except VmlError as e:
        if args.debug:
            raise
        print(f"vml: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("vml: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug: say so in one line, details with --debug
        if args.debug:
            raise
        print(f"vml: internal error: {type(e).__name__}: {e} (rerun with --debug for details)", file=sys.stderr)
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
