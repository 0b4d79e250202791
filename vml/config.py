"""The user's VML home: registered repositories and the default one.

Everything per-user lives under ``$VML_HOME`` (default
``~/.local/share/vml``): ``config.toml``, working areas and caches. The
config is TOML so that people can read and edit it::

    default = "rep1"

    [repositories.rep1]
    path = "/scratch/vml/rep1"
"""

import contextlib
import fcntl
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from .errors import AlreadyExists, CorruptManifest, NotFound, UsageError
from .names import check_repository_name
from .repository import Repository
from .store import Store, write_atomic


def vml_home() -> Path:
    home = os.environ.get("VML_HOME")
    return Path(home) if home else Path.home() / ".local" / "share" / "vml"


@dataclass
class Config:
    path: Path
    repositories: dict[str, Path] = field(default_factory=dict)
    default: str | None = None

    @classmethod
    def load(cls, home: Path | None = None) -> "Config":
        path = (home or vml_home()) / "config.toml"
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
        return cls(path, repos, default if default in repos else None)

    def save(self) -> None:
        doc = {"repositories": {n: {"path": str(p)} for n, p in sorted(self.repositories.items())}}
        if self.default:
            doc["default"] = self.default
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, tomli_w.dumps(doc).encode())

    # -- repositories ----------------------------------------------------

    def open(self, ref: str | None) -> Repository:
        """The repository named ``ref`` (a configured name or a path), or the default."""
        if ref is None:
            if self.default is None:
                raise NotFound("no default repository: create one with `vml init PATH` or pass --repo")
            ref = self.default
        if ref in self.repositories:
            return Repository(Store(self.repositories[ref]), ref)
        if "/" in ref or Path(ref).is_dir():
            path = Path(ref).absolute()
            name = next((n for n, p in self.repositories.items() if p == path), None)
            return Repository(Store(path), name or path.name)
        raise NotFound(f"no repository named {ref!r} (see `vml consult`); pass a path to use an unregistered one")

    def register(self, name: str, path: Path, make_default: bool = False) -> None:
        check_repository_name(name)
        if name in self.repositories and self.repositories[name] != path:
            raise AlreadyExists(f"a repository named {name!r} is already registered at {self.repositories[name]}")
        self.repositories[name] = path
        if make_default or self.default is None:
            self.default = name


@contextlib.contextmanager
def editing(home: Path | None = None):
    """Load the config under an exclusive lock, and save it on success."""
    home = home or vml_home()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "config.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cfg = Config.load(home)
        yield cfg
        cfg.save()
