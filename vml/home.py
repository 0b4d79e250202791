"""The user's VML home as a whole: its repositories, remotes, caches and areas kept in step.

A repository is a directory and a line in config.toml; a remote is a line,
a cache directory, and possibly working areas built on its entries; gc must
keep what this home's areas read. These functions keep those in step, so
that the command line only parses and prints.
"""

import contextlib
import dataclasses
import shutil
from pathlib import Path

from . import config, layout, trust
from .entries import maintenance
from .errors import AlreadyExists, NotFound, UsageError, VmlError
from .names import check_repository_name
from .remotes import fetch
from .remotes.catalog import Catalog
from .remotes.remote import RemoteConfig, RemoteStore
from .repo import certificates
from .repo.repository import Repository
from .repo.store import FORMAT, META_FILE, Store
from .vms import areas, boot
from .vms.areas import list_areas, roots
from .vms.hypervisors import NAMES


def init_repository(
    home: Path, path: Path, name: str, chunk_size: int, make_default: bool, format: int = FORMAT
) -> tuple[Store, bool, bool]:
    """Create the repository at ``path`` in ``format`` (or take the one there) and register it as ``name``.

    Returns (its store, whether it was created, whether it is the default now).
    """
    check_repository_name(name)
    created = not (path / META_FILE).exists()
    store = Store.create(path, chunk_size, format) if created else Store(path)
    with config.editing(home) as cfg:
        cfg.register(name, path, make_default)
        return store, created, cfg.default == name


def collect(home: Path, repo: Repository) -> maintenance.GcSummary:
    """vml gc: what no entry, no lease and no area of this home needs goes.

    This home's areas are kept even without a lease (opened by a version that
    wrote none); every other home's are kept through their leases.
    """
    return maintenance.gc(repo, keep=roots(home, repo))


def add_remote(home: Path, rc: RemoteConfig, check: bool = True) -> Catalog | None:
    """Add remote ``rc`` to the config; with ``check``, fetch and verify its catalog now.

    A wrong URL or key is refused now rather than at first use, and leaves
    neither a config entry nor a cache behind. Returns the catalog checked.
    """
    check_repository_name(rc.name, "remote")
    if not rc.url.startswith(("http://", "https://")):
        raise UsageError(f"remote URL {rc.url!r}: use http:// or https://")
    fetch.parse_proxies(rc.settings.proxy)
    cache = layout.cache_dir(home, rc.name)
    with config.editing(home) as cfg:
        cfg.add_remote(rc)
        # A cache left under this name (config.toml edited by hand) may know another repository.
        shutil.rmtree(cache, ignore_errors=True)
        if not check:
            return None
        try:
            cat = RemoteStore(home, rc).catalog(refresh=True)
        except VmlError:
            shutil.rmtree(cache, ignore_errors=True)
            raise
        cfg.remotes[rc.name] = dataclasses.replace(rc, repository=cat.repository)
        return cat


def remove_remote(home: Path, name: str) -> None:
    """Remove remote ``name`` and its cache; refused while working areas build on its entries."""
    with config.editing(home) as cfg:
        if name not in cfg.remotes:
            raise NotFound(f"no remote named {name!r}")
        users = [r.name for r in list_areas(home) if r.repository == name and not r.repository_path]
        if users:
            raise UsageError(f"working areas {', '.join(users)} are open on remote {name}: close them first")
        del cfg.remotes[name]
    shutil.rmtree(layout.cache_dir(home, name), ignore_errors=True)


DEFAULT_HYPERVISOR = "qemu"


@dataclasses.dataclass(frozen=True)
class StartOptions:
    """What Start boots with; None means the default (config, then the entry's hardware)."""

    area: str | None = None
    hypervisor: str | None = None
    memory_mib: int | None = None
    vcpus: int | None = None
    options: dict = dataclasses.field(default_factory=dict)  # the driver's options (accel, network, ...)


def free_area_name(home: Path, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``... : the first name no working area has."""
    taken = {r.name for r in list_areas(home)} | {p.name for p in areas.areas_dir(home).glob("*")}
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


def start(cfg: config.Config, spec: str, how: StartOptions = StartOptions()) -> tuple[areas.AreaRecord, object]:
    """Open entry ``spec`` (REPO:ENTRY) in a new working area and boot it: the release manager's Start.

    The area is named ``how.area``, or after the entry with -2, -3... when
    that is taken; the hypervisor is ``how.hypervisor``, else the config's
    default, else QEMU. The mount must be up. If the VM does not start, the
    area is closed again. Returns (the area's record, the VM's record).
    """
    hypervisor = how.hypervisor or cfg.hypervisor or DEFAULT_HYPERVISOR
    _, entry = cfg.find_entry(spec, None)
    for _ in range(100):  # another Start may take the same free name at the same moment
        name = how.area or free_area_name(cfg.home, entry.name)
        try:
            rec = areas.open_area(cfg.home, cfg, spec, None, name)
            break
        except AlreadyExists:
            if how.area:
                raise
    else:
        raise AlreadyExists(f"no free working area name for {entry.name!r}; give one")
    vm = boot.boot_new_area(cfg.home, rec.name, hypervisor, how.options, how.memory_mib, how.vcpus)
    return rec, vm


def set_default_hypervisor(home: Path, name: str) -> None:
    """``[defaults] hypervisor``: what Start boots on when not told."""
    if name not in NAMES:
        raise UsageError(f"unknown hypervisor {name!r}: use one of {', '.join(NAMES)}")
    with config.editing(home) as cfg:
        cfg.hypervisor = name


# -- trust ---------------------------------------------------------------------


@contextlib.contextmanager
def editing_trust(home: Path, system: bool = False):
    """The trusted keys and policy to change: this user's (config.toml), or the machine's with ``system``.

    Yields a dict with "keys" (name -> TrustedKey) and "policy" (Policy or None).
    """
    if system:
        with trust.editing_system() as holder:
            yield holder
        return
    with config.editing(home) as cfg:
        holder = {"keys": dict(cfg.trust), "policy": cfg.policy}
        yield holder
        cfg.trust, cfg.policy = holder["keys"], holder["policy"]


def trust_key(home: Path, key: trust.TrustedKey, system: bool = False) -> None:
    with editing_trust(home, system) as t:
        if key.name in t["keys"]:
            raise AlreadyExists(f"a trusted key named {key.name!r} exists; remove it first (`vml trust rm`)")
        t["keys"][key.name] = key


def distrust_key(home: Path, name: str, system: bool = False) -> None:
    with editing_trust(home, system) as t:
        if t["keys"].pop(name, None) is None:
            where = trust.SYSTEM_POLICY if system else layout.config_path(home)
            raise NotFound(f"no trusted key named {name!r} in {where} (see `vml trust list`)")


def set_policy(home: Path, require: str | None, allow_user_changes: bool = False, system: bool = False) -> None:
    """Require certification at level ``require`` (None: this file's policy off)."""
    with editing_trust(home, system) as t:
        where = str(trust.SYSTEM_POLICY if system else layout.config_path(home))
        t["policy"] = trust.Policy(certificates.check_level(require), allow_user_changes, where) if require else None
