"""Certificates: a signer's word, signed with Ed25519, that the entry with one manifest is fit to run at a level.

A certificate is a small JSON file::

    {"payload": "<canonical JSON text>", "signature": "<base64 Ed25519>"}

whose payload holds ``type`` ("vml-certificate"), ``version`` (1), the
``manifest`` digest it certifies, the ``level`` (a name such as
"production"), the signer's public key (``key``, as `vml keygen` writes it),
the time, the entry's name when it was certified (``entry``, a label only)
and a ``note``. It names the manifest, not the entry: the manifest digest is
the entry's identity (content, chain, hardware), so a certificate cannot be
moved to other content, and renaming or copying the entry keeps it valid.

Certificates lie beside the entries, never inside a manifest, so certifying
does not change an entry's identity: ``certificates/<manifest hex>/<BLAKE3
of the file>.json`` in a repository, the catalog's ``certificates`` key in a
published one, the index of a bundle. A certificate verifies by itself (its
signature with the key it names); whether that key is trusted, and for which
level, is the reader's policy (vml.trust).
"""

import base64
import binascii
import contextlib
import json
import re
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import BadSignature, CorruptManifest, StorageError, UsageError, VmlError
from ..files import open_regular, storage_error, write_atomic
from ..keys import parse_public_key, public_key_text
from ..names import check_name
from ..times import now_iso, parse_iso
from .objects import parse_hex
from .paths import real_directory

DIR = "certificates"
LIMIT = 16 << 10  # one certificate file
PER_MANIFEST = 64  # certificates kept for one manifest (more are a flood, not a policy)
NOTE_LIMIT = 1000
_LEVEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def check_note(note: str) -> str:
    """``note`` if it is one printable line of at most NOTE_LIMIT characters, else UsageError.

    A note is shown to people deciding what to run: a line break or a
    terminal escape in it could print a line no one signed.
    """
    if not isinstance(note, str) or len(note) > NOTE_LIMIT or not all(_printable(c) for c in note):
        raise UsageError(f"the note must be one line of at most {NOTE_LIMIT} printable characters")
    return note


def _printable(c: str) -> bool:
    return c.isprintable() or unicodedata.category(c) == "Zs"  # spaces, the no-break ones too


def check_level(level: str) -> str:
    if not isinstance(level, str) or not _LEVEL.fullmatch(level):
        raise UsageError(f"invalid level name {level!r}: use letters, digits and . _ + - (at most 64)")
    return level


@dataclass(frozen=True)
class Certificate:
    manifest: bytes
    level: str
    key: str  # "ed25519:<base64>"
    certified: str
    entry: str = ""
    note: str = ""


def make(key: Ed25519PrivateKey, manifest: bytes, entry: str, level: str, note: str = "") -> bytes:
    """A certificate of ``manifest`` at ``level``, signed with ``key``."""
    payload = {
        "type": "vml-certificate",
        "version": 1,
        "manifest": manifest.hex(),
        "entry": entry,
        "level": check_level(level),
        "key": public_key_text(key.public_key()),
        "certified": now_iso(),
        "note": check_note(note),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return encode({"payload": text.decode(), "signature": base64.b64encode(key.sign(text)).decode()})


def encode(doc) -> bytes:
    """A certificate as its file holds it, from the object a bundle index or catalog carries."""
    if not isinstance(doc, dict):
        raise BadSignature("a certificate must be an object with payload and signature")
    return (json.dumps({"payload": doc.get("payload"), "signature": doc.get("signature")}, indent=1) + "\n").encode()


def as_object(data: bytes) -> dict:
    """The object a bundle index or catalog carries for certificate file ``data`` (checked already)."""
    return json.loads(data)


def check(data: bytes, manifest: bytes, where: str) -> Certificate:
    """The certificate in ``data`` if its signature verifies and it certifies ``manifest``; else BadSignature."""
    if len(data) > LIMIT:
        raise BadSignature(f"{where}: certificate larger than {LIMIT} bytes")
    try:
        doc = json.loads(data)
        payload = doc["payload"].encode()
        signature = base64.b64decode(doc["signature"], validate=True)
        p = json.loads(payload)
        if p["type"] != "vml-certificate" or p["version"] != 1:
            raise ValueError("not a version 1 VML certificate")
        got = parse_hex(p["manifest"])
        # Checked as make() checks them: these fields are shown to people (vml show).
        when, entry = p["certified"], p["entry"]
        parse_iso(when)
        cert = Certificate(got, check_level(p["level"]), p["key"], when, check_name(entry), check_note(p["note"]))
        public = parse_public_key(cert.key, "its key")
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, RecursionError, UsageError) as e:
        raise BadSignature(f"{where}: not a VML certificate ({e})") from None
    try:
        public.verify(signature, payload)
    except InvalidSignature:
        raise BadSignature(f"{where}: its signature does not verify with the key it names") from None
    if got != manifest:
        shown = got.hex()[:16] if got else "nothing"
        raise BadSignature(f"{where}: it certifies manifest {shown}, not {manifest.hex()[:16]}")
    return cert


def file_name(data: bytes) -> str:
    return blake3.blake3(data).hexdigest() + ".json"


def _files(d: Path) -> list[Path]:
    """The certificate files in directory ``d``, in name order (none if there is no directory)."""
    try:
        return sorted(p for p in d.iterdir() if p.suffix == ".json" and not p.name.startswith("."))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise storage_error(e, f"reading {d}") from None


def _read(p: Path) -> bytes | None:
    """Certificate file ``p``, or None if it cannot count: removed by gc meanwhile, unreadable, not a file."""
    try:
        # Only regular files, opened without blocking: a FIFO would hang every open and boot.
        with open_regular(p, "certificate", follow=False) as f:
            return f.read(LIMIT + 1)  # one byte more, so that check() calls it too large
    except (OSError, VmlError):
        return None


def stored(root: Path, manifest: bytes) -> list[bytes]:
    """The certificate files kept in repository ``root`` for ``manifest``, unchecked."""
    files = _files(root / DIR / manifest.hex())[:PER_MANIFEST]
    return [data for data in map(_read, files) if data is not None]


def keep(root: Path, manifest: bytes, data: bytes, trusted: Collection[str] = ()) -> bool:
    """Store certificate ``data`` of ``manifest`` in repository ``root``; False if it was there or left out.

    At most PER_MANIFEST are kept for one manifest: a flood must not cost
    every reader. A certificate by a key in ``trusted`` (keys whose
    certificates count here, and a certifier's own) never waits on that cap:
    it takes the place of one that does not verify or is by another key.
    Any other that finds the cap reached is left out.
    """
    d = root / DIR / manifest.hex()
    p = d / file_name(data)
    if p.exists():
        return False
    try:
        d.mkdir(parents=True, exist_ok=True)
        if problem := real_directory(d):  # through a link, this would remove and write files elsewhere
            raise CorruptManifest(f"{d}: {problem}; refusing to write through it (run vml verify)")
        files = _files(d)
        if len(files) >= PER_MANIFEST:
            if check(data, manifest, f"certificate {p}").key not in trusted:
                return False
            excess = len(files) - PER_MANIFEST + 1
            for victim in _displaceable(files, manifest, trusted):
                if excess:
                    with contextlib.suppress(IsADirectoryError):  # a directory is not read, so costs nothing
                        victim.unlink(missing_ok=True)
                        excess -= 1
            if excess:
                raise StorageError(f"{d}: already {PER_MANIFEST} certificates by trusted keys for this entry")
        write_atomic(p, data)
    except OSError as e:
        raise storage_error(e, f"writing certificate {p}") from None
    return True


def _displaceable(files: list[Path], manifest: bytes, trusted: Collection[str]) -> list[Path]:
    """Of ``files``, those that do not count for anyone first, then those by keys not in ``trusted``."""
    invalid, untrusted = [], []
    for p in files:
        data = _read(p)
        try:
            key = None if data is None else check(data, manifest, "certificate").key
        except BadSignature:
            key = None
        if key is None:
            invalid.append(p)
        elif key not in trusted:
            untrusted.append(p)
    return invalid + untrusted


def manifests_with_certificates(root: Path) -> list[bytes]:
    d = root / DIR
    if not d.is_dir():
        return []
    return [m for m in (parse_hex(p.name) for p in d.iterdir()) if m is not None]
