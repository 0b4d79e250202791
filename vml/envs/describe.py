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

    def state(r, data, cs) -> tuple:  # what makes a file the same: metadata, and its chunks' digests
        chunks = tuple(data.table.digest(r.slot + i) for i in range(r.slots(cs)))
        return (r.type, r.mode, r.uid, r.gid, r.size, r.mtime_ns, r.target, chunks)

    cs_a, cs_b = ea.manifest.chunk_size, eb.manifest.chunk_size
    lines = _changes(
        {r.path: state(r, data_a, cs_a) for r in recs_a}, {r.path: state(r, data_b, cs_b) for r in recs_b}, "{}"
    )
    raw_a = {n: v["raw"] for n, v in ia["environment"].items()}
    raw_b = {n: v["raw"] for n, v in ib["environment"].items()}
    lines += _changes(raw_a, raw_b, "${}", values=True)
    oa, ob = ia["os"], ib["os"]
    if (oa.get("id"), oa.get("version_id")) != (ob.get("id"), ob.get("version_id")):
        lines.append(f"os: {oa.get('id')} {oa.get('version_id')} -> {ob.get('id')} {ob.get('version_id')}")
    return lines


def _changes(before: dict, after: dict, shown: str, values: bool = False) -> list[str]:
    """ "+ KEY", "- KEY" and "M KEY" lines, sorted, for what differs; with ``values``, the values too."""
    out = []
    for key in sorted(before.keys() | after.keys()):
        name = shown.format(key)
        if key not in before:
            out.append(f"+ {name}" + (f"={after[key]}" if values else ""))
        elif key not in after:
            out.append(f"- {name}" + (f"={before[key]}" if values else ""))
        elif before[key] != after[key]:
            out.append(f"M {name}" + (f": {before[key]} -> {after[key]}" if values else ""))
    return out
