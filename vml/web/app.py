"""The release manager's application: routes, templates, and the answers every page shares.

Handlers are plain functions that Starlette runs in worker threads, since
the library blocks on disks and networks; what takes longer than a page
load runs as a job (vml.web.jobs). Every answer carries a Content Security
Policy that lets a page load nothing from another origin, so a page that
renders here renders the same on a site without internet.
"""

import contextlib
import logging
import time
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from .. import control
from ..errors import AlreadyExists, Locked, NotCertified, NotFound, UsageError, VmlError
from ..names import format_size
from ..times import parse_iso
from . import actions, pages, signin
from .jobs import Jobs
from .security import Guard, GuardMiddleware

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
SHUTDOWN_WAIT = 60.0
RECENT = 120.0  # seconds a finished job's card stays on the pages
STATUS = {NotFound: 404, UsageError: 400, AlreadyExists: 409, Locked: 409, NotCertified: 403}


def http_status(error: VmlError) -> int:
    return next((code for cls, code in STATUS.items() if isinstance(error, cls)), 500)


def _when(iso: str) -> str:
    return parse_iso(iso).astimezone().strftime("%Y-%m-%d %H:%M")


class Web:
    """What every handler reaches: the home, the guard, the jobs and the templates."""

    def __init__(self, home: Path, guard: Guard, mountpoint: Path | None = None):
        self.home, self.guard, self.jobs = home, guard, Jobs()
        self.mountpoint = (mountpoint or control.default_mountpoint()).absolute()  # where Start and Mount mount
        self.scratch = home / "run" / "web"  # bundles made for download and uploads being imported
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["size"] = format_size
        self.templates.filters["when"] = _when

    def render(self, request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        """Template ``name`` with what every page shows (menu, mount state, jobs, CSRF token)."""
        now = time.time()
        context.setdefault("jobs", [j for j in self.jobs.recent() if j.ended is None or now - j.ended < RECENT])
        state = None
        with contextlib.suppress(VmlError, OSError):
            state = control.mount_state(self.home)
        html = self.templates.get_template(name).render(
            request=request,
            csrf=self.guard.csrf(request),
            mount=state,
            auth=self.guard.auth,
            path=request.url.path,
            **context,
        )
        return HTMLResponse(html, status, headers=HEADERS)

    def error(self, request: Request, e: VmlError) -> HTMLResponse:
        """The CLI's one line, as a fragment where the page shows job cards."""
        return self.render(request, "_error.html", http_status(e), message=str(e), jobs=[])

    def login_page(
        self, request: Request, status: int = 401, message: str | None = None, headers: dict | None = None
    ) -> HTMLResponse:
        """The sign-in form; it reads no file, so it is rendered on the event loop (vml.web.signin)."""
        html = self.templates.get_template("login.html").render(csrf=self.guard.csrf(request), message=message)
        return HTMLResponse(html, status, headers={**HEADERS, **(headers or {})})


def create_app(home: Path, guard: Guard, mountpoint: Path | None = None) -> Starlette:
    web = Web(home, guard, mountpoint)
    routes = [
        *pages.routes(web),
        *actions.routes(web),
        *signin.routes(web),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        web.scratch.mkdir(parents=True, exist_ok=True)
        yield
        # A save cut short must be done again: let running jobs end, but not for ever.
        left = await run_in_threadpool(web.jobs.wait, SHUTDOWN_WAIT)
        if left:
            log.warning("vml web: stopped while %s still ran", ", ".join(left))
        for leftover in web.scratch.glob("*"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    async def vml_error(request: Request, e: VmlError):
        """A page whose data cannot be read says why in the CLI's one line, within the page."""
        return web.render(request, "error.html", http_status(e), message=str(e))

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={VmlError: vml_error})
    app.add_middleware(GuardMiddleware, guard=guard, login_page=web.login_page)
    app.state.web = web
    return app
