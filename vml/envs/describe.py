"""What `vml env show` and `vml env diff` print: an environment entry's description and changes."""

from ..entries import envtree
from ..entries.envtree import env_records
from ..errors import UsageError
from ..repo.repository import Entry, Repository


def show_environment(repo: Repository, entry: Entry) -> dict:
    """The keys of `vml env show --json`."""
    m = entry.manifest
    if not envtree.is_environment(m):
        raise UsageError(f"entry {entry.name!r} is not an environment backup (see `vml env save`)")
    meta = m.extra[envtree.KEY]
    env = meta.get("environment") or {}
    return {
        "name": entry.name,
        "repository": repo.name,
        "parent": m.parent.name if m.parent else None,
        "created": m.created,
        "message": m.message,
        "os": meta.get("os", {}),
        "user": meta.get("user"),
        "home": meta.get("home"),
        "from": meta.get("from", {}),
        "files": meta.get("files", 0),
        "bytes": meta.get("bytes", 0),
        "histories": meta.get("histories", []),
        "patterns": meta.get("patterns", {}),
        "environment": env.get("variables", {}),
        "environment_files": env.get("files", []),
        "skipped": env.get("skipped", []),
        "source": meta.get("source", ""),
        "stored_bytes": repo.stored_bytes(entry.digest),
    }


def diff_environments(a: tuple[Repository, Entry], b: tuple[Repository, Entry]) -> list[str]:
    """Lines: "+ PATH", "- PATH", "M PATH" for files; then variables and the OS, when they differ."""
    (ra, ea), (rb, eb) = a, b
    ia, ib = show_environment(ra, ea), show_environment(rb, eb)
    recs_a, data_a = env_records(ra, ea)
    recs_b, data_b = env_records(rb, eb)
    before, after = {r.path: r for r in recs_a}, {r.path: r for r in recs_b}

    def content(r, data, cs):  # the digests of its chunks: equal digests, equal bytes
        return [data.table.digest(r.slot + i) for i in range(r.slots(cs))]

    lines = []
    for path in sorted(before.keys() | after.keys()):
        x, y = before.get(path), after.get(path)
        if x is None:
            lines.append(f"+ {path}")
        elif y is None:
            lines.append(f"- {path}")
        elif (x.type, x.mode, x.uid, x.gid, x.size, x.mtime_ns, x.target) != (
            y.type,
            y.mode,
            y.uid,
            y.gid,
            y.size,
            y.mtime_ns,
            y.target,
        ) or content(x, data_a, ea.manifest.chunk_size) != content(y, data_b, eb.manifest.chunk_size):
            lines.append(f"M {path}")
    va, vb = ia["environment"], ib["environment"]
    for name in sorted(va.keys() | vb.keys()):
        x, y = va.get(name), vb.get(name)
        if x is None:
            lines.append(f"+ ${name}={y['raw']}")
        elif y is None:
            lines.append(f"- ${name}={x['raw']}")
        elif x["raw"] != y["raw"]:
            lines.append(f"M ${name}: {x['raw']} -> {y['raw']}")
    oa, ob = ia["os"], ib["os"]
    if (oa.get("id"), oa.get("version_id")) != (ob.get("id"), ob.get("version_id")):
        lines.append(f"os: {oa.get('id')} {oa.get('version_id')} -> {ob.get('id')} {ob.get('version_id')}")
    return lines
