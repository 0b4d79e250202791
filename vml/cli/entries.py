"""vml save, checkout, export, import, rm, gc, verify, leases: entries and what holds them."""

import dataclasses
import json
import sys
from pathlib import Path

from .. import config, home
from ..entries import bundle, maintenance, repair
from ..entries.checkout import checkout
from ..entries.save import save_source
from ..errors import Corrupt, NotFound, UsageError
from ..names import format_size
from ..remotes.remote import open_remote
from ..repo import leases, repack
from ..repo.manifest import KINDS
from ..vms import boot
from .output import progress_bar, table


def _repo(args):
    return config.Config.load().open(args.repo)


def cmd_save(args) -> int:
    if args.area:
        return _save_area(args)
    if not args.source:
        raise UsageError("say what to save: --from PATH (an image or VM directory) or --area NAME")
    cfg = config.Config.load()
    repo = cfg.open(args.repo)
    with progress_bar(f"saving {args.entry}") as bar:
        entry = save_source(
            repo,
            args.entry,
            args.source,
            parent=cfg.parent_for(args.parent, repo),
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
    with progress_bar(f"saving {args.entry}") as bar:
        rec, running = boot.save_with_vm(config.vml_home(), args.area, args.entry, args.message or "", bar)
    repo = config.Config.load().open(rec.repository_path)
    entry = repo.entry(rec.entry)
    stored = repo.stored_bytes(entry.digest)
    memory = " with the running VM's memory state" if running else ""
    print(
        f"saved {entry.name} ({entry.manifest.kind} on {entry.manifest.parent.name}) in {rec.repository} "
        f"from working area {rec.name}{memory}: {format_size(stored)} stored; the area now builds on {entry.name}"
    )
    return 0


def cmd_checkout(args) -> int:
    repo, entry = config.Config.load().find_entry(args.entry, args.repo)
    with progress_bar(f"checking out {args.entry}") as bar:
        paths = checkout(repo, entry.name, args.dir, keep_special_bits=args.keep_special_bits, progress=bar)
    for p in paths:
        print(p)
    return 0


def cmd_export(args) -> int:
    repo, entry = config.Config.load().find_entry(args.entry, args.repo)
    with progress_bar(f"exporting {args.entry}") as bar:
        s = bundle.export(repo, entry.name, args.output, against=args.against, full=args.full, progress=bar)
    needs = f"; the receiver needs {', '.join(s.requires)}" if s.requires else ""
    print(f"wrote {args.output}: {format_size(s.size)}, entries {', '.join(s.entries)}, {s.objects} objects{needs}")
    return 0


def cmd_import(args) -> int:
    cfg = config.Config.load()
    repo = cfg.open(args.repo)
    with progress_bar(f"importing {Path(args.file).name}") as bar:
        names = bundle.import_bundle(repo, args.file, progress=bar, trusted=cfg.trusted_keys())
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
    s = home.collect(config.vml_home(), repo)
    kept = f" (with what {s.areas} working area{'s' if s.areas != 1 else ''} build on)" if s.areas else ""
    packs = ""
    if s.packs is not None and (s.packs.removed or s.packs.rewritten):
        p = s.packs
        packs = f"; packs: {p.removed} removed, {p.rewritten} rewritten into {p.written}"
    print(f"{repo.name}: removed {s.removed} objects, freed {format_size(s.freed)}, {s.kept} objects kept{kept}{packs}")
    if s.packs is not None and s.packs.skipped:
        print(
            f"vml: {repo.name}: packs were not rewritten ({s.packs.skipped}); run vml gc again with more room",
            file=sys.stderr,
        )
    return 0


def cmd_upgrade(args) -> int:
    repo = _repo(args)
    s = repack.upgrade(repo)
    if s.was == 2 and not s.packed and not s.dropped:
        print(f"{repo.name}: already format 2")
    else:
        print(f"{repo.name}: format 2; {s.packed} chunks moved into packs, {s.dropped} loose copies removed")
    return 0


def cmd_verify(args) -> int:
    cfg = config.Config.load()
    repo = cfg.open(args.repo)
    if args.sources and not args.repair:
        raise UsageError("--from names where --repair takes damaged objects from: add --repair")
    sources = [_repair_source(cfg, s) for s in args.sources] or list(repo.fallbacks)
    with progress_bar(f"verifying {repo.name}", unit="obj") as bar:
        problems = maintenance.verify(repo, args.entry, progress=bar)
    if args.repair and problems and not repair.unrepaired(repo):
        print("--repair: none of these problems is a damaged copy of an object that a source could replace")
    if args.repair and repair.unrepaired(repo):
        if not sources:
            raise UsageError(f"{repo.name} has damaged objects: say where good copies are (--from IMAGE|BUNDLE|REMOTE)")
        with progress_bar(f"repairing {repo.name}", unit="obj") as bar:
            summary = repair.repair(repo, sources, bar)
        for source, count in summary.found.items():
            print(f"repaired {count} of {summary.wanted} damaged objects from {source}")
        with progress_bar(f"verifying {repo.name}", unit="obj") as bar:
            problems = maintenance.verify(repo, args.entry, progress=bar)
    for p in problems:
        print(p)
    replaced = sum(1 for d, _ in repo.store.damage.copies() if repo.store.has_good(d))
    if replaced:
        copies = "a damaged copy of an object" if replaced == 1 else f"{replaced} damaged copies of objects"
        print(f"{copies} stored again since found: `vml gc` removes the damaged ones")
    what = f"entry {args.entry}" if args.entry else f"repository {repo.name}"
    if problems:
        hint = "" if args.repair else "; `vml verify --repair --from SOURCE` stores damaged objects anew"
        print(f"{what}: {len(problems)} problem(s) found{hint}", file=sys.stderr)
        return 1
    print(f"{what}: ok")
    return 0


def _repair_source(cfg, text: str):
    """A path (image, VM directory, bundle) or the name of a configured remote."""
    path = Path(text)
    if path.exists():
        return path.absolute()
    if text in cfg.remotes:
        return open_remote(cfg.home, cfg.remotes[text])
    raise NotFound(f"--from {text}: no such file, directory or remote")


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


def register(cli) -> None:
    sp = cli.add("save", cmd_save, "save a disk image or VM directory as an entry")
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

    sp = cli.add("checkout", cmd_checkout, "write an entry's disks (as sparse raw images) and files into DIR")
    sp.add_argument("entry", metavar="ENTRY")
    sp.add_argument("dir", metavar="DIR")
    sp.add_argument(
        "--keep-special-bits",
        action="store_true",
        help="keep setuid, setgid and sticky bits of the entry's files (dropped by default: entries come from anyone)",
    )

    sp = cli.add("export", cmd_export, "write a bundle of an entry for another repository")
    sp.add_argument("entry", metavar="ENTRY")
    sp.add_argument("-o", "--output", required=True, metavar="FILE")
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--against", metavar="ENTRY", help="leave out what this entry holds (the receiver has it)")
    group.add_argument("--full", action="store_true", help="include everything the entry needs")

    sp = cli.add("import", cmd_import, "add a bundle's entries to a repository")
    sp.add_argument("file", metavar="FILE")

    sp = cli.add("rm", cmd_rm, "remove an entry")
    sp.add_argument("entry", metavar="ENTRY")
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--recursive", action="store_true", help="also remove the entries built on it")
    group.add_argument("--reparent", action="store_true", help="attach the entries built on it to its parent")
    sp.add_argument("--force", action="store_true", help="even if working areas build on it (they keep their data)")

    cli.add("gc", cmd_gc, "free the objects no entry needs")

    cli.add("upgrade", cmd_upgrade, "convert a repository to the current format (2: packs), in place")

    sp = cli.add("verify", cmd_verify, "check objects and entries; exit 1 if anything is wrong")
    sp.add_argument("entry", nargs="?", metavar="ENTRY")
    sp.add_argument(
        "--repair", action="store_true", help="store damaged objects anew from where good copies are (--from)"
    )
    sp.add_argument(
        "--from",
        dest="sources",
        action="append",
        default=[],
        metavar="SOURCE",
        help="an image or VM directory holding the damaged chunks, a bundle, or a remote (default: the remotes)",
    )

    sp = cli.add("leases", cmd_leases, "the working areas of every home that build on a repository's entries")
    sp.add_argument("--json", action="store_true", help="print a list of objects")
    lsub = sp.add_subparsers(dest="leases_command", metavar="ACTION")
    r = cli.add_to(lsub, "drop", cmd_leases_drop, "remove leases whose areas are gone")
    r.add_argument("ids", nargs="*", metavar="ID", help="a lease id, or its first characters (see `vml leases`)")
    r.add_argument("--stale", action="store_true", help="every lease of this host whose area is gone")
