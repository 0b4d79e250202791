"""The release manager's pages (GET): what the CLI's listing commands show, as HTML.

Each handler gathers through the library (vml.overview, vml.vms.boot,
vml.envs) and renders a template; none changes anything.
"""

import time
from pathlib import Path

from starlette.requests import Request
from starlette.routing import Route

from .. import config, control, layout, overview
from ..envs import show_environment
from ..envs.restore import checked_meta
from ..errors import NotFound, UsageError, VmlError
from ..home import DEFAULT_HYPERVISOR, free_area_name
from ..names import check_name, check_repository_name
from ..times import parse_iso
from ..vms import areas, boot
from ..vms.hypervisors import NAMES

CONSOLE_LINES = 12
CONSOLE_BYTES = 16384


def parse_spec(spec: str) -> tuple[str, str]:
    """``REPO:ENTRY`` from a request, both names checked as the CLI checks them."""
    repo, sep, name = (spec or "").partition(":")
    if not sep:
        raise UsageError(f"entry {spec!r}: give it as REPOSITORY:ENTRY")
    return check_repository_name(repo), check_name(name)


def console_tail(home: Path, area: str) -> str:
    """The last lines of an area's serial console."""
    path = areas.areas_dir(home) / area / "console.log"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - CONSOLE_BYTES))
            data = f.read()
    except OSError:
        return ""
    lines = data.decode(errors="replace").replace("\r", "").splitlines()
    return "\n".join(lines[-CONSOLE_LINES:])


def uptime(started: str | None, state: str) -> str:
    if not started or state not in ("running", "paused"):
        return "-"
    s = int(time.time() - parse_iso(started).timestamp())
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def running_items(web) -> list[dict]:
    items = boot.status(web.home)
    records = {r.name: r for r in areas.list_areas(web.home)}
    for item in items:
        rec = records.get(item["area"])
        item["changed"] = areas.overlay_bytes(web.home, rec) if rec else 0
        item["uptime"] = uptime(item.get("started"), item["state"])
        item["console"] = console_tail(web.home, item["area"])
    return items


def routes(web) -> list[Route]:
    def available(request: Request):
        cfg = config.Config.load(web.home)
        books = overview.logbooks(cfg)
        state = control.mount_state(web.home)
        mountpoint = Path(state["mountpoint"]) if state else web.mountpoint
        count = sum(len(b.rows) for b in books)
        return web.render(
            request,
            "available.html",
            books=books,
            mountpoint=mountpoint,
            count=count,
            log_file=layout.log_path(web.home),
            running=len(areas.list_areas(web.home)),
        )

    def customize(request: Request):
        spec = request.query_params.get("entry", "")
        try:
            parse_spec(spec)
            cfg = config.Config.load(web.home)
            _, entry = cfg.find_entry(spec, None)
        except VmlError as e:
            return web.error(request, e)
        hw = entry.manifest.hardware
        return web.render(
            request,
            "customize.html",
            spec=spec,
            entry=entry,
            hw=hw,
            hypervisors=NAMES,
            default_hypervisor=cfg.hypervisor or DEFAULT_HYPERVISOR,
            area=free_area_name(web.home, entry.name),
        )

    def running(request: Request):
        return web.render(request, "running.html", items=running_items(web))

    def running_list(request: Request):
        return web.render(request, "_running_list.html", items=running_items(web))

    def configure(request: Request):
        cfg = config.Config.load(web.home)
        return web.render(
            request,
            "configure.html",
            cfg=cfg,
            hypervisors=NAMES,
            default_hypervisor=cfg.hypervisor or DEFAULT_HYPERVISOR,
            default_mountpoint=web.mountpoint,
        )

    def cache(request: Request):
        cfg = config.Config.load(web.home)
        books = {b.name: b for b in overview.logbooks(cfg) if b.remote}
        return web.render(request, "cache.html", caches=overview.cache_status(cfg), books=books)

    def usage(request: Request):
        cfg = config.Config.load(web.home)
        items = overview.disk_usage(cfg)
        top = max((i["bytes"] for i in items), default=0) or 1
        return web.render(request, "usage.html", items=items, top=top)

    def backup(request: Request):
        cfg = config.Config.load(web.home)
        books = overview.logbooks(cfg)
        envs = [
            (b, r, _saved_adds(r.entry)) for b in books for r in b.rows if r.entry and r.entry.manifest.is_environment
        ]
        vms = [(b, r) for b in books for r in b.rows if r.entry and not r.entry.manifest.is_environment]
        return web.render(
            request,
            "backup.html",
            envs=envs,
            vms=vms,
            areas=areas.list_areas(web.home),
            local=[b for b in books if not b.remote],
        )

    def _saved_adds(entry) -> list[str]:
        """The backup's --add paths the page offers to restore, as restore checks them (none if it would refuse)."""
        try:
            return checked_meta(entry)["patterns"]["add"]
        except VmlError:
            return []

    def backup_show(request: Request):
        spec = request.query_params.get("entry", "")
        try:
            parse_spec(spec)
            repo, entry = config.Config.load(web.home).find_entry(spec, None)
            if not entry.manifest.is_environment:
                raise NotFound(f"entry {spec!r} is not an environment backup")
            info = show_environment(repo, entry)
        except VmlError as e:
            return web.error(request, e)
        return web.render(request, "backup_show.html", spec=spec, info=info)

    def share(request: Request):
        cfg = config.Config.load(web.home)
        books = overview.logbooks(cfg)
        return web.render(request, "share.html", books=books, local=[b for b in books if not b.remote])

    def job(request: Request):
        found = web.jobs.get(int(request.path_params["job"]))
        if found is None:
            return web.error(request, NotFound(f"no job {request.path_params['job']} (the server restarted?)"))
        return web.render(request, "_job.html", job=found)

    return [
        Route("/", available),
        Route("/start", customize),
        Route("/running", running),
        Route("/running/list", running_list),
        Route("/configure", configure),
        Route("/cache", cache),
        Route("/usage", usage),
        Route("/backup", backup),
        Route("/backup/show", backup_show),
        Route("/share", share),
        Route("/jobs/{job:int}", job),
    ]
