"""Whose certificates count, and which entries may run: trusted keys and the certification policy.

Trusted keys and the policy live in TOML, in the user's config.toml and in
the machine's /etc/vml/policy.toml (written by root with ``--system``)::

    [trust.cern]
    key = "ed25519:..."            # a certifier's public key (KEYFILE.pub)
    levels = ["production"]        # what it may certify; absent: any level

    [policy]
    require = "production"         # entries must be certified at exactly this level
    allow_user_changes = false     # true: also an uncertified entry built on a certified one

Each policy in force must accept an entry: the machine's counts only the
machine's keys, the user's counts both. So a user's policy can add a
requirement but never lift one the machine sets, and a key the user trusts
never satisfies the machine. `vml open`, `vml boot`, `vml deploy` and the
release manager's Start call ``check`` before anything runs.
"""

import contextlib
import dataclasses
import os
import stat
import tomllib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from .errors import BadSignature, CorruptManifest, NotCertified, NotFound, UsageError, VmlError
from .files import read_regular, storage_error, write_atomic
from .keys import load_private_key, parse_public_key, public_key_text
from .names import check_name
from .repo import certificates
from .repo.repository import Entry, Repository

SYSTEM_POLICY = Path("/etc/vml/policy.toml")
SYSTEM_LIMIT = 1 << 20


@dataclass(frozen=True)
class TrustedKey:
    name: str
    key: str  # canonical "ed25519:<base64>"
    levels: tuple[str, ...] = ()  # empty: any level

    def may_certify(self, level: str) -> bool:
        return not self.levels or level in self.levels

    def doc(self) -> dict:
        return {"key": self.key, **({"levels": list(self.levels)} if self.levels else {})}


@dataclass(frozen=True)
class Policy:
    require: str
    allow_user_changes: bool = False
    source: str = ""  # the file it came from, for messages
    keys: tuple[TrustedKey, ...] = field(default=(), compare=False)

    def doc(self) -> dict:
        return {"require": self.require, "allow_user_changes": self.allow_user_changes}


def parse_trust(path: Path, doc) -> dict[str, TrustedKey]:
    """The ``[trust.NAME]`` tables of file ``path``."""
    if not isinstance(doc, dict):
        raise CorruptManifest(f"{path}: trust must be a table of [trust.NAME] sections")
    out = {}
    for name, t in doc.items():
        where = f"{path}: [trust.{name}]"
        try:
            check_name(name, "trusted key")
            if not isinstance(t, dict) or set(t) - {"key", "levels"} or not isinstance(t.get("key"), str):
                raise ValueError('needs key = "ed25519:..." and optionally levels = [...], nothing else')
            levels = t.get("levels", [])
            if not isinstance(levels, list):
                raise ValueError("levels must be a list of names")
            key = public_key_text(parse_public_key(t["key"], "key"))
            out[name] = TrustedKey(name, key, tuple(certificates.check_level(v) for v in levels))
        except (ValueError, UsageError) as e:
            raise CorruptManifest(f"{where}: {e}") from None
    return out


def parse_policy(path: Path, doc, keys: dict[str, TrustedKey]) -> Policy | None:
    """``[policy]`` of file ``path``, or None when it has none."""
    if doc is None:
        return None
    try:
        if not isinstance(doc, dict) or set(doc) - {"require", "allow_user_changes"}:
            raise ValueError("known settings are require and allow_user_changes")
        allow = doc.get("allow_user_changes", False)
        if not isinstance(allow, bool):
            raise ValueError("allow_user_changes must be true or false")
        return Policy(certificates.check_level(doc.get("require")), allow, str(path), tuple(keys.values()))
    except (ValueError, UsageError) as e:
        raise CorruptManifest(f"{path}: [policy]: {e}") from None


@dataclass(frozen=True)
class SystemTrust:
    keys: dict[str, TrustedKey]
    policy: Policy | None


def load_system(path: Path | None = None) -> SystemTrust:
    """The machine's trusted keys and policy (/etc/vml/policy.toml); none if nothing is at the path.

    Anything else at the path that is not a readable, well-formed policy
    (a dangling symlink, a directory, a FIFO, a file past SYSTEM_LIMIT)
    refuses everything: failing open would lift the machine's rule.
    """
    path = path or SYSTEM_POLICY
    try:
        os.lstat(path)
    except FileNotFoundError:
        return SystemTrust({}, None)
    except OSError as e:
        raise _unreadable(path, e.strerror) from None

    def roots_only(st: os.stat_result) -> None:  # whoever may write it would set the machine's rule
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise _unreadable(
                path, f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}: only root may write it"
            )

    try:
        doc = tomllib.loads(read_regular(path, SYSTEM_LIMIT, "policy file", check=roots_only).decode())
    except NotFound:  # lstat saw something: a symlink to nothing
        raise _unreadable(path, "a symbolic link to a file that does not exist") from None
    except CorruptManifest:
        raise
    except VmlError as e:
        raise _unreadable(path, str(e).removeprefix(f"{path}: ")) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise _unreadable(path, str(e)) from None
    if set(doc) - {"trust", "policy"}:
        raise CorruptManifest(f"{path}: known sections are [trust.NAME] and [policy]")
    keys = parse_trust(path, doc.get("trust", {}))
    return SystemTrust(keys, parse_policy(path, doc.get("policy"), keys))


def _unreadable(path: Path, why: str) -> CorruptManifest:
    return CorruptManifest(f"{path}: cannot read the machine's policy ({why}); nothing runs until it is fixed")


def policies(user_keys: dict[str, TrustedKey], user_policy: Policy | None, system: SystemTrust) -> list[Policy]:
    """Every policy in force: the machine's with its keys, the user's with both."""
    out = [system.policy] if system.policy else []
    if user_policy:
        merged = {**{k.key: k for k in user_keys.values()}, **{k.key: k for k in system.keys.values()}}
        out.append(dataclasses.replace(user_policy, keys=tuple(merged.values())))
    return out


@dataclass(frozen=True)
class Verdict:
    """What one certificate is worth to one policy."""

    cert: certificates.Certificate | None
    why: str  # empty: accepted


def judge(policy: Policy, data: bytes, manifest: bytes) -> Verdict:
    try:
        cert = certificates.check(data, manifest, "certificate")
    except BadSignature as e:
        return Verdict(None, str(e).removeprefix("certificate: "))
    signer = next((k for k in policy.keys if k.key == cert.key), None)
    if signer is None:
        return Verdict(cert, f"level {cert.level!r} by an untrusted key ({cert.key[:20]}…)")
    if cert.level != policy.require:
        return Verdict(cert, f"level {cert.level!r} by {signer.name}")
    if not signer.may_certify(cert.level):
        return Verdict(
            cert, f"level {cert.level!r} by {signer.name}, who is trusted only for {', '.join(signer.levels)}"
        )
    return Verdict(cert, "")


def _certified(policy: Policy, repo: Repository, digest: bytes) -> tuple[bool, list[str]]:
    whys = []
    for data in repo.certificates(digest):
        v = judge(policy, data, digest)
        if not v.why:
            return True, []
        whys.append(v.why)
    return False, whys


def check(
    all_policies: list[Policy], repo: Repository, entry: Entry, changes: Callable[[], list[str]] | None = None
) -> None:
    """Raise NotCertified, naming the entry and what is missing, unless every policy accepts ``entry``.

    ``changes``, for a working area about to boot: what of it differs from
    ``entry`` (such as "disk 'd' of working area 'w'"), asked only if a
    policy in force does not allow user changes, which then refuses any.
    """
    changed = None
    for policy in all_policies:
        ok, whys = _certified(policy, repo, entry.digest)
        if ok:
            if changes is not None and not policy.allow_user_changes:
                changed = changes() if changed is None else changed
                if changed:
                    raise _changed(policy, repo, entry, changed)
            continue
        if policy.allow_user_changes:
            try:
                if any(_certified(policy, repo, d)[0] for d, _ in repo.data_chain(entry.digest)[1:]):
                    continue
            except VmlError as e:
                whys.append(f"its chain cannot be read ({e})")
        wanted = f"certified at level {policy.require!r} by a trusted key"
        if policy.allow_user_changes:
            wanted += ", nor built on an entry that is"
        has = f"; it has: {'; '.join(whys)}" if whys else "; it has no certificate"
        raise NotCertified(f"entry {entry.name!r} of {repo.name} is not {wanted} (policy of {policy.source}){has}")


def _changed(policy: Policy, repo: Repository, entry: Entry, changed: list[str]) -> NotCertified:
    return NotCertified(
        f"{', '.join(changed)} {'differ' if len(changed) > 1 else 'differs'} from entry {entry.name!r} of "
        f"{repo.name}, and the policy of {policy.source} boots only what was certified at level "
        f"{policy.require!r}: save the area as an entry and certify that (`vml certify`), or use a policy "
        "with --allow-user-changes"
    )


def certify(
    repo: Repository, name: str, key_path: Path, level: str, note: str = "", trusted: Collection[str] = ()
) -> certificates.Certificate:
    """Sign entry ``name``'s manifest at ``level`` with the key in ``key_path`` and keep the certificate beside it.

    The certificate takes the place of one by a key not in ``trusted`` if
    the entry has as many as a repository keeps (certificates.keep).
    """
    if repo.read_only:
        raise UsageError(f"{repo.name} is a remote: certify {name} where it is published from, and publish again")
    entry = repo.entry(name)
    key = load_private_key(key_path)
    data = certificates.make(key, entry.digest, name, level, note)
    with repo.store.lock(f"vml certify {name}"):
        if repo.refs().get(name) != entry.digest:
            raise UsageError(f"entry {name!r} changed while it was being certified; certify it again")
        certificates.keep(repo.store.path, entry.digest, data, {*trusted, public_key_text(key.public_key())})
    return certificates.check(data, entry.digest, f"certificate of {name}")


@contextlib.contextmanager
def editing_system(path: Path | None = None):
    """The machine's trust and policy, to change (root only); written back atomically on success."""
    path = path or SYSTEM_POLICY
    if os.geteuid() != 0:
        raise UsageError(f"--system writes {path}, which needs root")
    current = load_system(path)
    holder = {"keys": dict(current.keys), "policy": current.policy}
    yield holder
    doc = {}
    if holder["keys"]:
        doc["trust"] = {n: k.doc() for n, k in sorted(holder["keys"].items())}
    if holder["policy"]:
        doc["policy"] = holder["policy"].doc()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, tomli_w.dumps(doc).encode())
        os.chmod(path, 0o644)  # every user's vml reads it; only root writes it
    except OSError as e:
        raise storage_error(e, f"writing {path}") from None


def trusted_key(key_text: str, name: str, level: str | None) -> TrustedKey:
    """A key to trust, checked: ``key_text`` as KEYFILE.pub holds it."""
    check_name(name, "trusted key")
    levels = (certificates.check_level(level),) if level else ()
    return TrustedKey(name, public_key_text(parse_public_key(key_text, "PUBKEY")), levels)


def describe_certificates(known: list[TrustedKey], repo: Repository, digest: bytes) -> list[dict]:
    """The entry's certificates as `vml show` lists them, each with its signer's trusted name if any."""
    out = []
    for data in repo.certificates(digest):
        try:
            c = certificates.check(data, digest, "certificate")
        except BadSignature as e:
            out.append({"valid": False, "problem": str(e).removeprefix("certificate: ")})
            continue
        names = sorted({k.name for k in known if k.key == c.key})
        signer = {"key": c.key, "trusted_as": names}
        out.append({"valid": True, "level": c.level, "signer": signer, "certified": c.certified, "note": c.note})
    return out
