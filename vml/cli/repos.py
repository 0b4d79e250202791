"""vml init, log, consult, show: repositories and what they hold."""

import json
import sys
from pathlib import Path

from .. import config, control, home, trust
from ..entries import copies
from ..errors import VmlError
from ..names import check_repository_name, format_size, parse_size
from ..repo.store import DEFAULT_CHUNK_SIZE, FORMAT, FORMATS, check_chunk_size
from ..vms import areas
from .output import report_damaged, show_lines, table, tree_lines


def cmd_init(args) -> int:
    path = Path(args.path).absolute()
    name = check_repository_name(args.name or path.name)
    chunk_size = check_chunk_size(parse_size(args.chunk_size)) if args.chunk_size else DEFAULT_CHUNK_SIZE
    store, created, default = home.init_repository(
        config.vml_home(), path, name, chunk_size, args.default, args.format or FORMAT
    )
    if not created and args.format and args.format != store.format:
        print(f"vml: {path} is a repository of format {store.format} already; registered as it is", file=sys.stderr)
    verb = "created" if created else "registered existing"
    star = " (default)" if default else ""
    print(
        f"{verb} repository {name}{star} at {path}, format {store.format}, chunk size {format_size(store.chunk_size)}"
    )
    return 0


def cmd_log(args) -> int:
    repo = config.Config.load().open(args.repository or args.repo)
    damaged: dict = {}
    lines = tree_lines(repo, damaged)
    print("\n".join(lines) if lines else f"(repository {repo.name} has no entries)")
    return report_damaged(repo, damaged)


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
    where = config.vml_home()
    state = control.mount_state(where)
    rows = []
    for rec in areas.list_areas(where):
        path = Path(state["mountpoint"]) / "areas" / rec.name if state else areas.areas_dir(where) / rec.name
        rows.append([rec.name, rec.entry, rec.repository, format_size(areas.overlay_bytes(where, rec)), path])
    print("\n".join(table(rows, ["name", "entry", "repository", "changed", "path"])) if rows else "(none)")
    staged = [[name, repo_name, path] for repo_name, name, path in copies.pending(where)]
    if staged:
        print("\nCopies in repository directories that are not entries (see the mount's log for why;")
        print("save them with `vml save NAME --from PATH`, or remove them from the mount with rm -r):")
        print("\n".join(table(staged, ["name", "repository", "path"])))
    status = 0
    for repo in repos:
        print(f"\nEntries in repository {repo.name}:")
        damaged: dict = {}
        print("\n".join(tree_lines(repo, damaged)) or "(none)")
        status = report_damaged(repo, damaged) or status
    return status


def cmd_show(args) -> int:
    cfg = config.Config.load()
    repo, entry = cfg.find_entry(args.entry, args.repo)
    info = repo.describe(entry)
    known = [*cfg.trust.values(), *trust.load_system().keys.values()]
    info["certificates"] = trust.describe_certificates(known, repo, entry.digest)
    print(json.dumps(info, indent=2) if args.json else "\n".join(show_lines(info)))
    return 0


def register(cli) -> None:
    sp = cli.add("init", cmd_init, "create a repository (or register an existing one)")
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("--name", help="name to register it under (default: the directory name)")
    sp.add_argument("--chunk-size", metavar="SIZE", help=f"chunk size, e.g. 256K (default {DEFAULT_CHUNK_SIZE >> 10}K)")
    sp.add_argument("--default", action="store_true", help="make it the default repository")
    sp.add_argument(
        "--format",
        type=int,
        choices=FORMATS,
        help=f"repository format (default {FORMAT}; 1 for a repository older vml versions must also use)",
    )

    sp = cli.add("log", cmd_log, "print the tree of entries")
    sp.add_argument("repository", nargs="?", metavar="REPO")

    cli.add("consult", cmd_consult, "print repositories, working areas and entry trees")

    sp = cli.add("show", cmd_show, "describe one entry")
    sp.add_argument("entry", metavar="ENTRY")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
