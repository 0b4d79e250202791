"""Signing keys and the signed catalog of a published repository.

A published repository is static files: objects under ``objects/ab/cdef...``
exactly as stored (named by their BLAKE3 digest, so they never change and
HTTP caches may keep them for ever), and ``catalog.json``, the only file
that changes. The catalog is::

    {"payload": "<canonical JSON text>", "signature": "<base64 Ed25519>"}

where the payload holds the format, the repository name, a revision that
grows with every publish, the time, the refs (entry name -> manifest digest)
and every manifest digest published, so that a client can check an entry
is there without fetching it. Clients hold the public key, as CVMFS clients
hold a repository's key; a catalog that does not verify is refused whole,
and one with a lower revision than already seen is refused as a replay.
Everything else is checked by digest from the signed refs down.
"""

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import AlreadyExists, BadSignature, CorruptManifest, NotFound, UsageError
from .names import check_name
from .objects import parse_hex
from .store import storage_error, write_atomic

FORMAT = 1
CATALOG_FILE = "catalog.json"
CATALOG_LIMIT = 64 << 20
KEY_PREFIX = "ed25519:"


# -- keys ------------------------------------------------------------------


def keygen(path: Path) -> Path:
    """Write a new private key to ``path`` (mode 0600) and its public key to ``path.pub``."""
    pub = path.with_name(path.name + ".pub")
    for p in (path, pub):
        if p.exists():
            raise AlreadyExists(f"{p}: exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        write_atomic(pub, (public_key_text(key.public_key()) + "\n").encode())
    except OSError as e:
        raise storage_error(e, f"writing key {path}") from None
    return pub


def public_key_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such key file (create one with `vml keygen {path}`)") from None
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"{path}: not an unencrypted Ed25519 private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path}: not an Ed25519 private key")
    return key


def parse_public_key(text: str, where: str) -> Ed25519PublicKey:
    """A public key as `vml keygen` writes it (``ed25519:<base64>``)."""
    text = text.strip()
    try:
        if not text.startswith(KEY_PREFIX):
            raise ValueError(f"does not start with {KEY_PREFIX!r}")
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error) as e:
        raise UsageError(f"{where}: not a VML public key ({e})") from None


def read_public_key(path: Path) -> str:
    """The canonical text of the public key in file ``path``."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise NotFound(f"{path}: no such key file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read the key ({e.strerror})") from None
    return public_key_text(parse_public_key(text, str(path)))


# -- catalogs --------------------------------------------------------------


@dataclass(frozen=True)
class Catalog:
    repository: str
    revision: int
    published: str
    refs: dict[str, bytes]
    manifests: frozenset[bytes]

    def payload(self) -> bytes:
        doc = {
            "format": FORMAT,
            "repository": self.repository,
            "revision": self.revision,
            "published": self.published,
            "refs": {n: d.hex() for n, d in sorted(self.refs.items())},
            "manifests": sorted(d.hex() for d in self.manifests),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sign(catalog: Catalog, key: Ed25519PrivateKey) -> bytes:
    payload = catalog.payload()
    doc = {"payload": payload.decode(), "signature": base64.b64encode(key.sign(payload)).decode()}
    return (json.dumps(doc, indent=1) + "\n").encode()


def verify(data: bytes, key: Ed25519PublicKey, where: str) -> Catalog:
    """The catalog in ``data`` if its signature verifies with ``key``; else BadSignature or CorruptManifest."""
    if len(data) > CATALOG_LIMIT:
        raise CorruptManifest(f"{where}: catalog larger than {CATALOG_LIMIT} bytes")
    try:
        doc = json.loads(data)
        payload = doc["payload"].encode()
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, RecursionError) as e:
        raise CorruptManifest(f"{where}: not a VML catalog ({e})") from None
    try:
        key.verify(signature, payload)
    except InvalidSignature:
        raise BadSignature(
            f"{where}: the catalog's signature does not verify with the configured key; refused"
        ) from None
    return _parse_payload(payload, where)


def _parse_payload(payload: bytes, where: str) -> Catalog:
    try:
        doc = json.loads(payload)
        if doc["format"] != FORMAT:
            raise ValueError(f"unsupported format {doc['format']!r}")
        refs = {check_name(n): parse_hex(h) for n, h in doc["refs"].items()}
        manifests = frozenset(parse_hex(h) for h in doc["manifests"])
        revision = doc["revision"]
        if None in refs.values() or None in manifests or type(revision) is not int or revision < 1:
            raise ValueError("bad digest or revision")
        if not set(refs.values()) <= manifests:
            raise ValueError("a ref names a manifest that is not listed")
        return Catalog(check_name(doc["repository"], "repository"), revision, str(doc["published"]), refs, manifests)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, UsageError) as e:
        raise CorruptManifest(f"{where}: invalid catalog ({e})") from None
