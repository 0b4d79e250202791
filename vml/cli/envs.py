"""vml env save, restore, show, diff: environment backups."""

import json
import sys

from .. import config
from ..errors import UsageError
from ..names import format_size
from .output import progress_bar

# The commands import the environment code when they run: it loads dissect's file system parsers, which
# would cost every other `vml` command a tenth of a second at start.


def cmd_env_save(args) -> int:
    from ..envs.capture import area_source, entry_source, save_environment
    from ..envs.patterns import read_file

    if bool(args.source) == bool(args.area):
        raise UsageError("say what to capture from: --from ENTRY or --area AREA (one of them)")
    if bool(args.user) == bool(args.home):
        raise UsageError("say whose home: --user USER or --home PATH (one of them)")
    excludes = list(args.exclude)
    for f in args.exclude_file:
        excludes += read_file(f)
    cfg = config.Config.load()
    repo = cfg.open(args.repo)
    if args.source:
        src_repo, entry = cfg.find_entry(args.source, args.repo)
        source = entry_source(src_repo, entry)
    else:
        source = area_source(config.vml_home(), args.area)
    with source, progress_bar(f"saving {args.entry}") as bar:
        env = save_environment(
            repo,
            args.entry,
            source,
            user=args.user,
            home=args.home,
            includes=args.include,
            excludes=excludes,
            adds=args.add,
            parent=args.parent,
            message=args.message or "",
            progress=bar,
        )
    meta = env.manifest.extra["environment"]
    for path in meta.get("left_out", []):
        print(f"vml: warning: left out {path!r}: a name with a line break", file=sys.stderr)
    stored = repo.stored_bytes(env.digest)
    print(
        f"saved {env.name} (environment of {meta['home']}) in {repo.name}: {meta['files']} files, "
        f"{format_size(meta['bytes'])}, {len(meta['environment']['variables'])} variables; "
        f"{format_size(stored)} stored"
    )
    return 0


def cmd_env_restore(args) -> int:
    from ..envs.restore import restore_environment

    repo, entry = config.Config.load().find_entry(args.entry, args.repo)
    warn = lambda msg: print(f"vml: {msg}", file=sys.stderr)  # noqa: E731
    report = restore_environment(config.vml_home(), repo, entry, args.area, args.force, warn, args.add, args.home)
    print(
        f"restored {entry.name} into area {args.area} ({report.disk}): {report.files} files, "
        f"{format_size(report.bytes)}"
    )
    for path in report.conflicts:
        print(f"  newer in the area, kept; the backup's copy is {path}.vml-restored")
    for path in report.skipped:
        print(f"  skipped {path}")
    for path in report.not_added:
        print(f"  not restored: {path} (saved with --add; name it with --add to restore it)")
    for note in report.notes:
        print(f"  {note}")
    print("  the saved variables are in ~/.vml-environment, sourced by a line at the end of ~/.profile")
    return 0


def cmd_env_show(args) -> int:
    from ..envs import show_environment

    repo, entry = config.Config.load().find_entry(args.entry, args.repo)
    info = show_environment(repo, entry)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    osinfo = info["os"]
    osname = osinfo.get("pretty_name") or f"{osinfo.get('id', '')} {osinfo.get('version_id', '')}".strip() or "unknown"
    print(f"{info['name']}  (environment backup in {repo.name})")
    print(f"  home:        {info['home']} (user {info['user'] or '-'})")
    print(f"  os:          {osname}")
    origin = info["from"]
    print(f"  from:        {'area ' + origin['area'] if 'area' in origin else 'entry ' + origin.get('entry', '?')}")
    print(f"  files:       {info['files']} ({format_size(info['bytes'])})")
    print(f"  histories:   {', '.join(info['histories']) or '-'}")
    pats = info["patterns"]
    for key in ("include", "exclude", "add"):
        if pats.get(key):
            print(f"  {key + ':':<12} {' '.join(pats[key])}")
    print(f"  environment: {info['source']}: {', '.join(info['environment_files']) or 'none found'}")
    for name, var in sorted(info["environment"].items()):
        print(f"    {name}={var['raw']}    ({var['source']})")
    for s in info["skipped"]:
        print(f"    not taken: {s['name']} ({s['source']}: {s['reason']})")
    return 0


def cmd_env_diff(args) -> int:
    from ..envs import diff_environments

    cfg = config.Config.load()
    a = cfg.find_entry(args.a, args.repo)
    b = cfg.find_entry(args.b, args.repo)
    for line in diff_environments(a, b):
        print(line)
    return 0


def register(cli) -> None:
    sp = cli.add("env", None, "environment backups: a user's home, histories and login environment")
    sub = sp.add_subparsers(dest="env_command", metavar="ACTION", required=True)
    s = cli.add_to(sub, "save", cmd_env_save, "capture a home from an entry's or area's disk as an entry")
    s.add_argument("entry", metavar="NAME")
    s.add_argument("--from", dest="source", metavar="ENTRY", help="an entry (REPO:ENTRY for another repository)")
    s.add_argument("--area", metavar="AREA", help="a working area (its VM should be stopped)")
    s.add_argument("--user", help="the user (home from the guest's /etc/passwd, else /home/USER)")
    s.add_argument("--home", metavar="PATH", help="the home directory, as a path in the guest")
    s.add_argument("--include", action="append", default=[], metavar="PATTERN", help="take only what matches")
    s.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="leave out what matches")
    s.add_argument("--exclude-file", action="append", default=[], metavar="FILE", help="exclude patterns, one a line")
    s.add_argument("--add", action="append", default=[], metavar="PATH", help="also take this guest path")
    s.add_argument("--parent", metavar="ENV", help="an earlier backup: store only what changed since")
    s.add_argument("-m", "--message", help="a note kept with the entry")

    s = cli.add_to(sub, "restore", cmd_env_restore, "write a backup's files and variables into an area's disk")
    s.add_argument("entry", metavar="NAME")
    s.add_argument("--area", required=True, metavar="AREA")
    s.add_argument("--force", action="store_true", help="overwrite files that are newer in the area")
    s.add_argument(
        "--add", action="append", default=[], metavar="PATH", help="also restore this --add path of the backup"
    )
    s.add_argument(
        "--home",
        metavar="PATH",
        help="the backup's home, to confirm writing it when the area has no account of the backup's user",
    )

    s = cli.add_to(sub, "show", cmd_env_show, "describe an environment backup")
    s.add_argument("entry", metavar="NAME")
    s.add_argument("--json", action="store_true", help="print one JSON object")

    s = cli.add_to(sub, "diff", cmd_env_diff, "what differs between two environment backups")
    s.add_argument("a", metavar="A")
    s.add_argument("b", metavar="B")
