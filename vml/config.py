"""The user's VML home: registered repositories and the default one.

Everything per-user lives under ``$VML_HOME`` (default
``~/.local/share/vml``): ``config.toml``, working areas and caches. The
config is TOML so that people can read and edit it::

    default = "rep1"

    [repositories.rep1]
    path = "/scratch/vml/rep1"

    [limits]
    max_disk_size = "16T"          # entries declaring larger disks or files are refused
    mount_memory = "512M"          # what the mount may hold in memory (decompressed chunks mostly)
    lock_wait = 60                 # seconds a writer waits for a repository's lock before giving up

    [defaults]
    hypervisor = "libvirt"         # what `vml web`'s Start boots on (default qemu)

    [web]                          # vml web (docs/web.md)
    listen = "127.0.0.1:8004"
    password = "scrypt$..."        # from `vml web --set-password`; else a token is printed at start
    tls_cert = "/etc/vml/web.crt"  # both, or neither
    tls_key = "/etc/vml/web.key"
    allowed_hosts = ["vml.example.org"]   # names the browser may reach it by, besides the address

    [trust.cern]                   # whose certificates count (vml.trust)
    key = "ed25519:..."
    levels = ["production"]

    [policy]                       # what may run: `vml trust policy`
    require = "production"

    [remotes.cernvm]
    url = "http://vml.example.org/cernvm"
    key = "ed25519:..."            # the publisher's KEYFILE.pub
    proxy = "http://squid1:3128|http://squid2:3128;DIRECT"
    cache_quota = 10737418240
    timeout = 30                   # seconds before an unservable read fails
    catalog_max_age = 60           # how old a proxy's copy of the catalog may be (0: the origin's)

Repository and remote names share one namespace, so ``NAME`` and
``NAME:ENTRY`` mean the same thing everywhere.
"""

import contextlib
import dataclasses
import fcntl
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from .errors import AlreadyExists, CorruptManifest, NotFound, UsageError
from .files import write_atomic
from .keys import parse_public_key
from .layout import config_path
from .names import check_repository_name, parse_size
from .remotes.fetch import Settings, parse_proxies
from .remotes.remote import RemoteConfig, RemoteRepository, open_remote
from .repo.manifest import DEFAULT_MAX_DISK_SIZE, MAX_STREAM_SIZE
from .repo.repository import Entry, Repository
from .repo.store import Store
from .trust import Policy, TrustedKey, check, load_system, parse_policy, parse_trust, policies

DEFAULT_MOUNT_MEMORY = 512 << 20
MIN_MOUNT_MEMORY = 256 << 20  # the process itself and what is fetched ahead need about 200 MiB

REMOTE_KEYS = {"url": str, "key": str, "cache_quota": int, "catalog_ttl": (int, float), "repository": str}
SETTING_TYPES = {f.name: f.type for f in dataclasses.fields(Settings)}
DAY = 86400.0
DEFAULT_LOCK_WAIT = 60.0
# The most each number setting may be. A larger one is a typo; and TOML
# reads 1e309 as infinity, which would make a read wait for ever.
NUMBER_LIMITS = {
    "cache_quota": 1 << 60,
    "catalog_ttl": DAY,
    "timeout": DAY,
    "connect_timeout": DAY,
    "read_timeout": DAY,
    "low_speed_limit": 1 << 40,
    "low_speed_time": DAY,
    "proxy_reset_after": DAY,
    "backoff": 60.0,
    "parallel": 256,
    "lock_wait": 7 * DAY,
    "catalog_max_age": DAY,
}
ZERO_ALLOWED = {"catalog_max_age"}  # 0 means "never a proxy's copy", not "none at all"


def vml_home() -> Path:
    home = os.environ.get("VML_HOME")
    return (Path(home) if home else Path.home() / ".local" / "share" / "vml").absolute()


@dataclass
class Config:
    path: Path
    repositories: dict[str, Path] = field(default_factory=dict)
    default: str | None = None
    remotes: dict[str, RemoteConfig] = field(default_factory=dict)
    max_disk_size: int = DEFAULT_MAX_DISK_SIZE
    mount_memory: int = DEFAULT_MOUNT_MEMORY
    hypervisor: str | None = None  # [defaults] hypervisor
    web: dict = field(default_factory=dict)  # [web], checked by _web_section
    trust: dict[str, TrustedKey] = field(default_factory=dict)  # [trust.NAME] (vml.trust)
    policy: Policy | None = None  # [policy]
    lock_wait: float = DEFAULT_LOCK_WAIT  # [limits] lock_wait

    @property
    def home(self) -> Path:
        return self.path.parent

    @classmethod
    def load(cls, home: Path | None = None) -> "Config":
        path = config_path(home or vml_home())
        try:
            doc = tomllib.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise CorruptManifest(f"{path}: cannot read the configuration ({e})") from None
        try:
            repos = {check_repository_name(n): Path(r["path"]) for n, r in doc.get("repositories", {}).items()}
        except (KeyError, TypeError, AttributeError, UsageError) as e:
            raise CorruptManifest(f"{path}: invalid [repositories] section ({e})") from None
        default = doc.get("default")
        if default is not None and not isinstance(default, str):
            raise CorruptManifest(f"{path}: default must be a repository name")
        remotes = {}
        if not isinstance(doc.get("remotes", {}), dict):
            raise CorruptManifest(f"{path}: remotes must be a table of [remotes.NAME] sections")
        for n, r in doc.get("remotes", {}).items():
            remotes[n] = _remote_config(path, n, r)
        both = sorted(set(repos) & set(remotes))
        if both:
            raise CorruptManifest(f"{path}: {both[0]!r} names both a repository and a remote; rename one")
        limits = doc.get("limits", {})
        limit = _size_limit(path, limits, "max_disk_size", DEFAULT_MAX_DISK_SIZE, 1, MAX_STREAM_SIZE, "16T")
        memory = _size_limit(path, limits, "mount_memory", DEFAULT_MOUNT_MEMORY, MIN_MOUNT_MEMORY, 1 << 50, "512M")
        lock_wait = limits.get("lock_wait", DEFAULT_LOCK_WAIT)
        try:
            check_number("lock_wait", lock_wait, f"{path}: [limits] lock_wait =")
        except UsageError as e:
            raise CorruptManifest(str(e)) from None
        hypervisor = doc.get("defaults", {}).get("hypervisor") if isinstance(doc.get("defaults"), dict) else None
        if hypervisor is not None and not (isinstance(hypervisor, str) and hypervisor.isalpha()):
            raise CorruptManifest(f"{path}: [defaults] hypervisor = {hypervisor!r}: not a hypervisor name")
        web = _web_section(path, doc.get("web", {}))
        keys = parse_trust(path, doc.get("trust", {}))
        policy = parse_policy(path, doc.get("policy"), keys)
        default = default if default in repos else None
        return cls(path, repos, default, remotes, limit, memory, hypervisor, web, keys, policy, lock_wait)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0600 on every rewrite: [web] password is a hash a guesser could attack offline, and a
        # config made readable by others earlier is tightened here.
        write_atomic(self.path, self.to_toml().encode(), mode=0o600)

    def to_toml(self) -> str:
        doc = {"repositories": {n: {"path": str(p)} for n, p in sorted(self.repositories.items())}}
        if self.default:
            doc["default"] = self.default
        if self.remotes:
            doc["remotes"] = {n: _remote_doc(rc) for n, rc in sorted(self.remotes.items())}
        limits = {}
        if self.max_disk_size != DEFAULT_MAX_DISK_SIZE:
            limits["max_disk_size"] = self.max_disk_size
        if self.mount_memory != DEFAULT_MOUNT_MEMORY:
            limits["mount_memory"] = self.mount_memory
        if self.lock_wait != DEFAULT_LOCK_WAIT:
            limits["lock_wait"] = self.lock_wait
        if limits:
            doc["limits"] = limits
        if self.hypervisor:
            doc["defaults"] = {"hypervisor": self.hypervisor}
        if self.web:
            doc["web"] = self.web
        if self.trust:
            doc["trust"] = {n: k.doc() for n, k in sorted(self.trust.items())}
        if self.policy:
            doc["policy"] = self.policy.doc()
        return tomli_w.dumps(doc)

    # -- certification ---------------------------------------------------

    def trusted_keys(self) -> frozenset[str]:
        """The public keys whose certificates count here: this user's and the machine's."""
        return frozenset(k.key for k in [*self.trust.values(), *load_system().keys.values()])

    def check_certified(self, repo: Repository, entry: Entry, changes: Callable[[], list[str]] | None = None) -> None:
        """Refuse (NotCertified) an entry that a policy in force, the machine's or this user's, does not accept.

        ``changes``: see vml.trust.check (a working area about to boot).
        """
        check(policies(self.trust, self.policy, load_system()), repo, entry, changes)

    # -- repositories ----------------------------------------------------

    def open(self, ref: str | None) -> Repository:
        """The repository named ``ref`` (a configured name or a path), or the default."""
        if ref is None:
            if self.default is None:
                raise NotFound("no default repository: create one with `vml init PATH` or pass --repo")
            ref = self.default
        if ref in self.remotes:
            return RemoteRepository(open_remote(self.home, self.remotes[ref]), self.max_disk_size)
        if ref in self.repositories:
            return self.local(self.repositories[ref], ref)
        if "/" in ref or Path(ref).is_dir():
            path = Path(ref).absolute()
            return self.local(path)
        raise NotFound(
            f"no repository or remote named {ref!r} (see `vml consult`); pass a path for an unregistered one"
        )

    def local(self, path: Path | str, name: str | None = None) -> Repository:
        """The local repository at ``path``; its entries may build on any configured remote.

        Unless registered or named, it is called by its directory's name, checked as a name the user
        types: the name reaches file names, the mount's directories and batch scripts.
        """
        if name is None:
            name = next((n for n, p in self.repositories.items() if p == Path(path)), None) or _directory_name(path)
        fallbacks = [open_remote(self.home, rc) for _, rc in sorted(self.remotes.items())]
        store = Store(path)
        store.lock_wait = self.lock_wait
        return Repository(store, name, fallbacks, self.max_disk_size)

    def parent_for(self, spec: str | None, repo: Repository) -> str | Entry | None:
        """What ``--parent SPEC`` names for an entry saved into ``repo``.

        An entry builds on its own repository's entries (SPEC is a name) or on
        a remote's (REMOTE:ENTRY); another local repository's entry must be
        imported first, so that each repository holds what it needs.
        """
        if not spec or ":" not in spec:
            return spec
        parent_repo, parent = self.find_entry(spec, None)
        if not parent_repo.read_only and parent_repo.store.path != repo.store.path:
            raise UsageError(
                f"--parent {spec}: an entry can build on its own repository or a remote; "
                f"to build on {parent_repo.name}, export and import the entry into {repo.name} first"
            )
        return parent

    def find_entry(self, spec: str, repo: str | None) -> tuple[Repository, Entry]:
        """The entry ``spec`` names: ``REPO:ENTRY`` (a repository or remote), or ENTRY in ``repo``."""
        where, sep, name = spec.rpartition(":")
        r = self.open(where if sep else repo)
        return r, r.entry(name)

    def register(self, name: str, path: Path, make_default: bool = False) -> None:
        check_repository_name(name)
        if name in self.remotes:
            raise AlreadyExists(f"{name!r} is already the name of a remote")
        if name in self.repositories and self.repositories[name] != path:
            raise AlreadyExists(f"a repository named {name!r} is already registered at {self.repositories[name]}")
        self.repositories[name] = path
        if make_default or self.default is None:
            self.default = name

    def add_remote(self, rc: RemoteConfig) -> None:
        check_repository_name(rc.name)
        if rc.name in self.repositories or rc.name in self.remotes:
            raise AlreadyExists(f"{rc.name!r} is already the name of a repository or remote")
        self.remotes[rc.name] = rc


WEB_KEYS = {"listen": str, "password": str, "tls_cert": str, "tls_key": str, "allowed_hosts": list}


def _directory_name(path: Path | str) -> str:
    path = Path(path)
    try:
        return check_repository_name(path.name)
    except UsageError:
        raise UsageError(
            f"repository {str(path)!r}: its directory's name {path.name!r} is not a valid repository name; "
            "register it under one with `vml init PATH --name NAME`"
        ) from None


def _web_section(path: Path, web) -> dict:
    """``[web]``: known keys of the right types (what they mean is checked by vml web)."""
    if not isinstance(web, dict):
        raise CorruptManifest(f"{path}: [web] must be a table")
    for k, v in web.items():
        want = WEB_KEYS.get(k)
        if want is None:
            raise CorruptManifest(f"{path}: [web] {k}: unknown setting (known: {', '.join(WEB_KEYS)})")
        if not isinstance(v, want) or (want is list and not all(isinstance(h, str) for h in v)):
            raise CorruptManifest(f"{path}: [web] {k} = {v!r} has the wrong type")
    return dict(web)


def _size_limit(path: Path, limits, key: str, default: int, low: int, high: int, example: str) -> int:
    """``[limits] KEY``: bytes, or a size such as ``example``, from ``low`` to ``high``."""
    where = f"{path}: [limits] {key}"
    if not isinstance(limits, dict):
        raise CorruptManifest(f"{path}: [limits] must be a table")
    value = limits.get(key, default)
    try:
        size = parse_size(value) if isinstance(value, str) else value
    except UsageError as e:
        raise CorruptManifest(f"{where}: {e}") from None
    if not isinstance(size, int) or isinstance(size, bool) or not low <= size <= high:
        raise CorruptManifest(f'{where} = {value!r}: use a size such as "{example}" (from {low} to {high} bytes)')
    return size


def _remote_config(path: Path, name: str, r) -> RemoteConfig:
    where = f"{path}: [remotes.{name}]"
    try:
        check_repository_name(name, "remote")
        if not isinstance(r, dict):
            raise ValueError("not a table")
        fields, settings = {}, {}
        for k, v in r.items():
            want = REMOTE_KEYS.get(k) or SETTING_TYPES.get(k)
            if want is None:
                raise ValueError(f"unknown setting {k!r}")
            if k in NUMBER_LIMITS:
                check_number(k, v)
            elif not isinstance(v, (bool, str) if k == "verify_tls" else str):
                raise ValueError(f"{k} = {v!r} has the wrong type")
            (fields if k in REMOTE_KEYS else settings)[k] = v
        if "url" not in fields or "key" not in fields:
            raise ValueError("url and key are required")
        parse_proxies(settings.get("proxy", "DIRECT"))
        parse_public_key(fields["key"], "key")
        tls = settings.get("verify_tls", True)
        if isinstance(tls, str) and not Path(tls).is_file():
            raise ValueError(f"verify_tls = {tls!r}: no such CA bundle file (use true, false or a file)")
        return RemoteConfig(name, settings=Settings(**settings), **fields)
    except (ValueError, UsageError) as e:
        raise CorruptManifest(f"{where}: {e}") from None


def check_number(key: str, value, shown: str | None = None):
    """``value`` if it suits number setting ``key`` (above 0, at most its limit); else UsageError."""
    shown = shown or f"{key} ="
    whole = (REMOTE_KEYS.get(key) or SETTING_TYPES.get(key)) in (int, "int")
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        raise UsageError(f"{shown} {value!r}: not {'a whole number' if whole else 'a number'}")
    limit, low = NUMBER_LIMITS[key], key in ZERO_ALLOWED
    if not (value >= 0 if low else value > 0) or not value <= limit:  # NaN fails; infinity is past any limit
        least = "from 0" if low else "above 0"
        raise UsageError(f"{shown} {value!r}: use a number {least} and at most {limit:{'d' if whole else 'g'}}")
    return value


def _remote_doc(rc: RemoteConfig) -> dict:
    doc = {"url": rc.url, "key": rc.key, "cache_quota": rc.cache_quota, "catalog_ttl": rc.catalog_ttl}
    if rc.repository:
        doc["repository"] = rc.repository
    defaults = Settings()
    doc.update({k: v for k, v in dataclasses.asdict(rc.settings).items() if v != getattr(defaults, k)})
    return doc


@contextlib.contextmanager
def editing(home: Path | None = None):
    """Load the config under an exclusive lock, and save it on success."""
    home = home or vml_home()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "config.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cfg = Config.load(home)
        yield cfg
        cfg.write()
