"""The release manager's actions (POST): each checks its form as the CLI checks arguments, then runs a job.

Every action needs the page's CSRF token and a same-origin request
(vml.web.security); names are checked before anything starts, so a bad
one is refused at once with the CLI's one-line error, and the work itself
runs as a job whose card the page shows.
"""

import dataclasses
import shutil
import tempfile
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from .. import config, home, keys
from ..entries import bundle
from ..envs.capture import area_source, entry_source, save_environment
from ..envs.restore import restore_environment
from ..errors import NotFound, StorageError, UsageError, VmlError
from ..names import check_name, check_repository_name, format_size, parse_size
from ..remotes import fetch, pinning, remote
from ..repo.store import DEFAULT_CHUNK_SIZE
from ..vms import boot
from ..vms.hypervisors import NAMES
from . import mounting
from .jobs import Job
from .pages import parse_spec
from .security import refuse_body

MAX_FIELDS = 200
MAX_FIELD = 64 << 10
MAX_FORM = 1 << 20  # a form without a file; uploads are multipart


class _Form:
    """A submitted form whose text fields are text: a file sent where text belongs is refused in one line."""

    def __init__(self, form):
        self._form = form

    def get(self, key: str, default: str = ""):
        value = self._form.get(key, default)
        if key != "bundle" and not isinstance(value, str):
            raise UsageError(f"form field {key!r}: expected text")
        return value

    def __getitem__(self, key: str) -> str:
        return self.get(key)

    def getlist(self, key: str) -> list[str]:
        values = self._form.getlist(key)
        if not all(isinstance(v, str) for v in values):
            raise UsageError(f"form field {key!r}: expected text")
        return values


def _memory(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    mib = int(text) if text.isdecimal() and text.isascii() else parse_size(text) >> 20
    if not 16 <= mib <= 1 << 22:
        raise UsageError(f"memory {text!r}: give MiB (16 to 4194304) or a size such as 2G")
    return mib


def _vcpus(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not (text.isdecimal() and text.isascii()) or not 1 <= int(text) <= 256:
        raise UsageError(f"vCPUs {text!r}: give a number from 1 to 256")
    return int(text)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _area(request: Request) -> str:
    return check_name(request.path_params["area"], "area")


def routes(web) -> list[Route]:
    def action(work):
        """A POST endpoint: CSRF check, form parsed, ``work(request, form)`` in a thread, errors as one line."""

        async def endpoint(request: Request) -> Response:
            refused = PlainTextResponse("vml web: refused: a request from another page or site (CSRF)\n", 403)
            header = request.headers.get("x-csrf-token")
            multipart = request.headers.get("content-type", "").lower().startswith("multipart/")
            # Nothing of the body is read before the request is known to come from our own page.
            if not web.guard.same_origin(request) or (multipart and not web.guard.csrf_ok(request, None)):
                return refused
            too_large = None if multipart else refuse_body(request.headers, MAX_FORM)
            if too_large is not None:
                return too_large
            form = await request.form(max_files=1, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD)
            try:
                token = header if header or multipart else form.get("csrf")
                if not web.guard.csrf_ok(request, token if isinstance(token, str) else None):
                    return refused
                out = await run_in_threadpool(work, request, _Form(form))
            except VmlError as e:
                return web.error(request, e)
            finally:
                await form.close()
            if isinstance(out, Job):
                return web.render(request, "_job.html", 202, job=out)
            return out

        return endpoint

    def start(request, form):
        spec = form.get("entry", "")
        parse_spec(spec)
        area = form.get("area", "").strip() or None
        if area:
            check_name(area, "area")
        hypervisor = form.get("hypervisor", "").strip() or None
        if hypervisor and hypervisor not in NAMES:
            raise UsageError(f"unknown hypervisor {hypervisor!r}: use one of {', '.join(NAMES)}")
        options = {k: form.get(k).strip() for k in ("network", "accel") if form.get(k).strip()}
        how = home.StartOptions(area, hypervisor, _memory(form.get("memory", "")), _vcpus(form.get("vcpus", "")))
        how = dataclasses.replace(how, options=options)
        cfg = config.Config.load(web.home)
        cfg.check_certified(*cfg.find_entry(spec, None))  # a missing or uncertified entry is refused now

        def work(job: Job) -> str:
            mounting.ensure_mounted(web.home, web.mountpoint)
            rec, vm = home.start(cfg, spec, how)
            hw, where = vm.hardware, vm.details.get("connect") or vm.details.get("host")
            what = f"({where}) as {vm.vm}" if where else f"as process {vm.vm}"
            return f"booted area {rec.name} on {vm.hypervisor} {what}: {hw['memory_mib']} MiB, {hw['vcpus']} vCPU"

        return web.jobs.run(f"Start {spec}", work)

    def stop(request, form):
        area = _area(request)
        force = form.get("force") == "on"
        return web.jobs.run(f"Stop {area}", lambda job: f"area {area}: {boot.stop(web.home, area, force)}")

    def save(request, form):
        area = _area(request)
        entry = check_name(form.get("entry", "").strip())
        message = form.get("message", "")

        def work(job: Job) -> str:
            rec, running = boot.save_with_vm(web.home, area, entry, message, job)
            memory = " with the running VM's memory state" if running else ""
            return f"saved {entry} in {rec.repository} from working area {area}{memory}; the area now builds on it"

        return web.jobs.run(f"Save {area} as {entry}", work)

    def close(request, form, discard=False):
        area = _area(request)

        def work(job: Job) -> str:
            boot.close(web.home, area, discard)
            return f"closed working area {area}" + (" and discarded its changes" if discard else "")

        return web.jobs.run(f"{'Discard' if discard else 'Close'} {area}", work)

    def mount(request, form):
        return web.jobs.run("Mount", lambda job: f"mounted the logbook at {mounting.mount(web.home, web.mountpoint)}")

    def umount(request, form):
        return web.jobs.run("Unmount", lambda job: f"unmounted {mounting.unmount(web.home)}")

    def init_repository(request, form):
        path = Path(form.get("path", "").strip())
        if not path.is_absolute():
            raise UsageError(f"repository path {str(path)!r}: give an absolute path")
        name = check_repository_name(form.get("name", "").strip() or path.name)

        def work(job: Job) -> str:
            _, created, _ = home.init_repository(web.home, path, name, DEFAULT_CHUNK_SIZE, False)
            return f"{'created' if created else 'registered existing'} repository {name} at {path}"

        return web.jobs.run(f"Repository {name}", work)

    def add_remote(request, form):
        name = check_repository_name(form.get("name", "").strip(), "remote")
        key = keys.public_key_text(keys.parse_public_key(form.get("key", ""), "public key"))
        quota = form.get("cache_quota", "").strip()
        rc = remote.RemoteConfig(
            name,
            form.get("url", "").strip().rstrip("/"),
            key,
            config.check_number("cache_quota", parse_size(quota) if quota else remote.DEFAULT_QUOTA, "cache quota"),
            settings=fetch.Settings(proxy=form.get("proxy", "").strip() or "DIRECT"),
        )

        def work(job: Job) -> str:
            cat = home.add_remote(web.home, rc)
            return f"added remote {name} ({rc.url}): catalog revision {cat.revision}, {len(cat.refs)} entries"

        return web.jobs.run(f"Add remote {name}", work)

    def remove_remote(request, form):
        name = check_repository_name(request.path_params["name"], "remote")

        def work(job: Job) -> str:
            home.remove_remote(web.home, name)
            return f"removed remote {name} and its cache"

        return web.jobs.run(f"Remove remote {name}", work)

    def defaults(request, form):
        hypervisor = form.get("hypervisor", "")
        home.set_default_hypervisor(web.home, hypervisor)
        return web.jobs.run("Defaults", lambda job: f"Start boots on {hypervisor} from now on")

    def preload(request, form):
        spec, pin = form.get("entry", ""), form.get("pin") == "on"
        parse_spec(spec)
        repo, entry = config.Config.load(web.home).find_entry(spec, None)
        store, digest, name = pinning.remote_part(repo, entry)

        def work(job: Job) -> str:
            count, fetched = pinning.preload(store, digest, name, pin, job)
            pinned = " and pinned" if pin else ""
            return f"{store.name}:{name}: {count} objects cached{pinned}, {format_size(fetched)} fetched"

        return web.jobs.run(f"{'Pin' if pin else 'Preload'} {spec}", work)

    def unpin(request, form):
        spec = form.get("entry", "")
        parse_spec(spec)
        repo, entry = config.Config.load(web.home).find_entry(spec, None)
        store, _, name = pinning.remote_part(repo, entry)
        pinning.unpin(store, name)
        return web.jobs.run(f"Unpin {spec}", lambda job: f"unpinned {spec}; its objects may now be evicted")

    def clear(request, form):
        name = check_repository_name(request.path_params["name"], "remote")
        cfg = config.Config.load(web.home)
        if name not in cfg.remotes:
            raise NotFound(f"no remote named {name!r}")
        store = remote.open_remote(cfg.home, cfg.remotes[name])
        return web.jobs.run(
            f"Clear cache of {name}", lambda job: f"{name}: removed {store.cache.clear()} cached objects (pinned kept)"
        )

    def env_save(request, form):
        name = check_name(form.get("name", "").strip())
        source, area = form.get("source", ""), form.get("area", "").strip()
        if bool(source) == bool(area):
            raise UsageError("say what to capture from: an entry or a working area (one of them)")
        user, home_dir = form.get("user", "").strip() or None, form.get("home", "").strip() or None
        if bool(user) == bool(home_dir):
            raise UsageError("say whose home: a user or a home directory (one of them)")
        cfg = config.Config.load(web.home)
        repo = cfg.open(check_repository_name(form.get("repo", "")))
        if source:
            parse_spec(source)
            src_repo, src_entry = cfg.find_entry(source, None)
        else:
            check_name(area, "area")
        parent = form.get("parent", "").strip() or None

        def work(job: Job) -> str:
            src = entry_source(src_repo, src_entry) if source else area_source(web.home, area)
            with src:
                env = save_environment(
                    repo,
                    name,
                    src,
                    user=user,
                    home=home_dir,
                    includes=_lines(form.get("include", "")),
                    excludes=_lines(form.get("exclude", "")),
                    adds=_lines(form.get("add", "")),
                    parent=parent,
                    message=form.get("message", ""),
                    progress=job,
                )
            meta = env.manifest.extra["environment"]
            return (
                f"saved {name} (environment of {meta['home']}) in {repo.name}: {meta['files']} files, "
                f"{format_size(meta['bytes'])}, {len(meta['environment']['variables'])} variables"
            )

        return web.jobs.run(f"Back up into {name}", work)

    def env_restore(request, form):
        spec, area, force = form.get("entry", ""), form.get("area", "").strip(), form.get("force") == "on"
        parse_spec(spec)
        check_name(area, "area")
        repo, entry = config.Config.load(web.home).find_entry(spec, None)

        def work(job: Job) -> str:
            lines: list[str] = []
            adds, confirmed = form.getlist("add"), form.get("home", "").strip() or None
            report = restore_environment(web.home, repo, entry, area, force, lines.append, adds, confirmed)
            lines.append(f"restored {entry.name} into area {area}: {report.files} files, {format_size(report.bytes)}")
            lines += [f"newer in the area, kept; the backup's copy is {p}.vml-restored" for p in report.conflicts]
            lines += [f"skipped {p}" for p in report.skipped] + list(report.notes)
            lines += [f"not restored: {p} (saved with --add: tick it to restore it too)" for p in report.not_added]
            return "\n".join(lines)

        return web.jobs.run(f"Restore {spec} into {area}", work)

    def export(request, form):
        spec = form.get("entry", "")
        parse_spec(spec)
        against, full = form.get("against", "").strip() or None, form.get("full") == "on"
        if against:
            check_name(against)
        repo, entry = config.Config.load(web.home).find_entry(spec, None)
        web.scratch.mkdir(parents=True, exist_ok=True)

        def work(job: Job) -> str:
            out = web.scratch / f"export-{job.id}.vml"
            job.files.append(out)
            s = bundle.export(repo, entry.name, out, against=against, full=full, progress=job)
            job.link = (f"{entry.name}.vml", f"/share/download/{job.id}")
            return f"bundle of {', '.join(s.entries)}: {format_size(s.size)}, {s.objects} objects"

        return web.jobs.run(f"Export {spec}", work)

    def import_bundle(request, form):
        upload = form.get("bundle")
        if not isinstance(upload, UploadFile):
            raise UsageError("choose a bundle file to import")
        cfg = config.Config.load(web.home)
        repo = cfg.open(check_repository_name(form.get("repo", "")))
        if repo.read_only:
            raise UsageError(f"{repo.name} is a remote: import into a local repository")
        web.scratch.mkdir(parents=True, exist_ok=True)
        # The upload's own name is never a path here: it is shown, and nothing else.
        fd, tmp = tempfile.mkstemp(dir=web.scratch, prefix="import-", suffix=".vml")
        try:
            with open(fd, "wb") as out:
                shutil.copyfileobj(upload.file, out, 1 << 20)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"cannot keep the uploaded bundle in {web.scratch}: {e.strerror}") from None
        shown = Path(upload.filename or "bundle").name

        def work(job: Job) -> str:
            try:
                names = bundle.import_bundle(repo, tmp, progress=job, trusted=cfg.trusted_keys())
            finally:
                Path(tmp).unlink(missing_ok=True)
            return f"imported {', '.join(names)} into {repo.name}" if names else f"nothing new for {repo.name}"

        return web.jobs.run(f"Import {shown}", work)

    def download(request: Request) -> Response:
        job = web.jobs.get(int(request.path_params["job"]))
        path = web.scratch / f"export-{request.path_params['job']}.vml"
        if job is None or job.link is None or not path.is_file():
            return web.error(request, NotFound("no such bundle (its export failed, or the server restarted)"))
        return FileResponse(path, filename=job.link[0], media_type="application/octet-stream")

    post = {"methods": ["POST"]}
    return [
        Route("/start", action(start), **post),
        Route("/areas/{area}/stop", action(stop), **post),
        Route("/areas/{area}/save", action(save), **post),
        Route("/areas/{area}/close", action(close), **post),
        Route("/areas/{area}/discard", action(lambda r, f: close(r, f, discard=True)), **post),
        Route("/mount", action(mount), **post),
        Route("/umount", action(umount), **post),
        Route("/repositories", action(init_repository), **post),
        Route("/remotes", action(add_remote), **post),
        Route("/remotes/{name}/rm", action(remove_remote), **post),
        Route("/defaults", action(defaults), **post),
        Route("/cache/preload", action(preload), **post),
        Route("/cache/unpin", action(unpin), **post),
        Route("/cache/{name}/clear", action(clear), **post),
        Route("/backup/save", action(env_save), **post),
        Route("/backup/restore", action(env_restore), **post),
        Route("/share/export", action(export), **post),
        Route("/share/import", action(import_bundle), **post),
        Route("/share/download/{job:int}", download),
    ]
