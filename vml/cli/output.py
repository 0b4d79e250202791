"""What the command prints: the entry tree as the seeds show it, tables, descriptions, progress bars."""

import contextlib
import sys

from .. import overview
from ..errors import Corrupt
from ..names import format_size
from ..progress import SILENT, Progress
from ..repo.repository import Repository
from ..times import parse_iso

TREE_TIME = "%m/%d/%y - %H:%M:%S"


def tree_lines(repo: Repository, damaged: dict[str, tuple[bytes, str]] | None = None) -> list[str]:
    """The entry tree: ``+---entry1(10/16/08 - 09:51:25 - full)``, children indented.

    An entry whose manifest cannot be read is listed as a root, marked
    DAMAGED, with the entries built on it under it; ``damaged``, if given,
    receives them (name -> (digest, why)).
    """
    lines = []
    for row in overview.tree(repo, damaged):
        prefix = "".join("    " if last else "|   " for last in row.lasts[:-1])
        if row.entry is None:
            lines.append(f"{prefix}+---{row.name}(DAMAGED: {row.damage})")
            continue
        m = row.entry.manifest
        when = parse_iso(m.created).astimezone().strftime(TREE_TIME)
        lines.append(f"{prefix}+---{row.name}({when} - {m.shown_kind})" + (f" {row.note}" if row.note else ""))
    return lines


def table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip()] + [fmt.format(*map(str, r)).rstrip() for r in rows]


def escaped(text: str) -> str:
    """Text from a file someone else wrote, on one line: line breaks and terminal controls shown as escapes.

    Otherwise a message or note could print lines of its own, such as a
    forged "certified:" line under the real ones.
    """
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def show_lines(info: dict) -> list[str]:
    lines = [f"{info['name']}  (repository {info['repository']})"]
    lines.append(f"  kind:      {info['kind']}")
    lines.append(f"  parent:    {info['parent'] or '-'}")
    created = parse_iso(info["created"]).astimezone()
    lines.append(f"  created:   {created:%Y-%m-%d %H:%M:%S %Z}")
    if info["message"]:
        lines.append(f"  message:   {escaped(info['message'])}")
    for d in info["disks"]:
        lines.append(f"  disk:      {d['name']}  {format_size(d['size'])} ({d['size']} bytes)")
    for f in info["files"]:
        lines.append(f"  file:      {f['name']}  {format_size(f['size'])}")
    hw = info.get("hardware")
    env = info.get("environment")
    if env:
        lines.append(
            f"  holds:     {env.get('home')} of {env.get('user') or '-'}: {env.get('files')} files, "
            f"{format_size(env.get('bytes', 0))} (see `vml env show {info['name']}`)"
        )
    elif hw:
        boot = f", kernel {hw['kernel']}" if hw.get("kernel") else f", {hw['firmware']}"
        disks = ", ".join(f"{d['name']} on {d['bus']}" for d in hw["disks"]) or "virtio"
        nics = ", ".join(n["model"] for n in hw["nics"]) or "no network"
        lines.append(
            f"  hardware:  {hw['memory_mib']} MiB, {hw['vcpus']} vCPU{boot}, disks {disks}, network {nics}, "
            f"{hw['console']} console (from {hw['source']})"
        )
    else:
        lines.append("  hardware:  not recorded (booted with the defaults: 1024 MiB, 1 vCPU, virtio)")
    lines.append(f"  stored:    {format_size(info['stored_bytes'])} ({info['stored_bytes']} bytes) added by this entry")
    lines.append(f"  chain:     {' -> '.join(info['chain'])} (base)")
    lines.append(f"  manifest:  {info['manifest']}")
    for c in info.get("certificates", []):
        if not c["valid"]:
            lines.append(f"  certified: not valid: {escaped(c['problem'])}")
            continue
        who = ", ".join(c["signer"]["trusted_as"]) or f"untrusted key {c['signer']['key'][:24]}…"
        note = f": {escaped(c['note'])}" if c["note"] else ""
        lines.append(f"  certified: level {c['level']} by {who} on {c['certified'][:10]}{note}")
    return lines


def report_damaged(repo: Repository, damaged: dict) -> int:
    """After a listing: say on stderr which entries are damaged; the exit status says so too."""
    if not damaged:
        return 0
    print(
        f"vml: {len(damaged)} damaged entr{'y' if len(damaged) == 1 else 'ies'} in {repo.name} "
        f"({', '.join(sorted(damaged))}): run `vml verify`",
        file=sys.stderr,
    )
    return Corrupt.exit_status


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
