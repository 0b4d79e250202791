"""Signing keys and the signed catalog of a published repository.

A published repository is static files: objects under ``objects/ab/cdef...``
exactly as stored (named by their BLAKE3 digest, so they never change and
HTTP caches may keep them for ever), and ``catalog.json``, the only file
that changes. The catalog is::

    {"payload": "<canonical JSON text>", "signature": "<base64 Ed25519>"}

where the payload holds the format, the repository name, a revision that
grows with every publish, the time, the time it expires, the refs (entry
name -> manifest digest) and every manifest digest published, so that a
client can check an entry is there without fetching it. Clients hold the
public key, as CVMFS clients hold a repository's key; a catalog that does
not verify is refused whole, and one with a lower revision than already
seen is refused as a replay. Everything else is checked by digest from the
signed refs down.

Formats, and how the payload may grow:

- format 1: no expiry; such a catalog is valid until a newer one is seen.
- format 2: adds ``expires`` (ISO UTC, like ``published``), required.
  A client refuses an expired catalog from the network, so a server or
  proxy cannot keep serving a frozen catalog for ever.
- format 3: chunks are published in packs (docs/format.md), no longer as
  loose objects, so a format-2 reader would miss content. Adds
  ``packsets`` (manifest digest -> BLAKE3 of ``packsets/<manifest>``) and
  ``indexes`` (pack digest -> BLAKE3 of ``packs/ab/<pack>.idx``): the
  signature covers every pack set and index, and each pack is named by the
  BLAKE3 of its bytes.

A reader ignores payload keys it does not know. A later addition that a
reader may safely ignore (a certificate, a pack index beside the loose
objects) is therefore a new key in the same format. The format number goes
up only when ignoring a change would make an older reader misread the
catalog (accept what it should refuse, or miss content), as ``expires``
would have; a reader refuses a format greater than it knows. A catalog
with no expiry is written as format 1, so that every reader reads it.
"""

import base64
import binascii
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import BadSignature, CorruptManifest, NotFound, UsageError, VmlError
from ..files import read_regular, write_atomic
from ..names import check_name
from ..repo import certificates
from ..repo.objects import parse_hex
from ..times import format_iso, parse_iso

log = logging.getLogger(__name__)

FORMAT = 3  # the newest format this module reads and writes
CATALOG_FILE = "catalog.json"
CATALOG_LIMIT = 64 << 20
DEFAULT_EXPIRY_DAYS = 30.0
MAX_EXPIRY_DAYS = 3650.0


# -- when to try the network again --------------------------------------------

RETRY_FILE = "catalog.retry"  # in a remote's cache: when a failed refresh may be tried again
RETRY_FIRST = 30.0  # seconds after a first failed refresh; doubles with each failure after it ...
RETRY_MOST = 300.0  # ... up to this (never less than the TTL)


class RetryAfter:
    """The back-off after failed refreshes of a catalog, shared by every process of a home through a file.

    A server that hangs costs a whole timeout per try: without a back-off,
    every lookup past the TTL would pay it, in every command and in the
    mount. After a failure the cached catalog serves, as offline, until the
    back-off ends; one success clears it.
    """

    def __init__(self, path: Path, where: str):
        """``where``: what the failures are of (URL and proxies); a back-off of another place does not count."""
        self.path, self.where = path, where

    def _read(self) -> dict:
        none = {"failures": 0, "next": 0.0}
        try:
            doc = json.loads(read_regular(self.path, 4096, "retry file"))
            if doc["where"] != self.where:
                return none  # the URL or the proxies changed since: try them now
            return {"failures": int(doc["failures"]), "next": float(doc["next"])}
        except NotFound:
            return none
        except (VmlError, ValueError, KeyError, TypeError) as e:  # a damaged hint: try the network
            log.debug("%s: unreadable (%s); ignoring it", self.path, e)
            return none

    def waiting(self) -> float:
        """Seconds until the network may be tried again after a failed refresh (0: now)."""
        return max(0.0, self._read()["next"] - time.time())

    def failed(self, ttl: float) -> float:
        """Note a failed refresh; seconds until the next try."""
        failures = self._read()["failures"] + 1
        wait = max(ttl, min(RETRY_FIRST * 2 ** min(failures - 1, 16), RETRY_MOST))
        with contextlib.suppress(OSError):  # only a hint: a full disk must not fail the lookup
            doc = {"failures": failures, "next": time.time() + wait, "where": self.where}
            write_atomic(self.path, json.dumps(doc).encode())
        return wait

    def succeeded(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


# -- catalogs --------------------------------------------------------------


@dataclass(frozen=True)
class Catalog:
    repository: str
    revision: int
    published: str
    refs: dict[str, bytes]
    manifests: frozenset[bytes]
    expires: str | None = None  # ISO UTC; None (format 1) never expires
    packsets: dict[bytes, bytes] = field(default_factory=dict)  # manifest -> BLAKE3 of its pack set (format 3)
    indexes: dict[bytes, bytes] = field(default_factory=dict)  # pack -> BLAKE3 of its index (format 3)
    # manifest -> certificates (vml.repo.certificates), as objects; each verified on its own when read
    certificates: dict[bytes, tuple[dict, ...]] = field(default_factory=dict)

    @property
    def format(self) -> int:
        return 1 if self.expires is None else 3 if self.packsets or self.indexes else 2

    def payload(self) -> bytes:
        if self.format == 1 and (self.packsets or self.indexes):
            raise ValueError("a catalog of packs must expire")
        doc = {
            "format": self.format,
            "repository": self.repository,
            "revision": self.revision,
            "published": self.published,
            "refs": {n: d.hex() for n, d in sorted(self.refs.items())},
            "manifests": sorted(d.hex() for d in self.manifests),
        }
        if self.expires is not None:
            doc["expires"] = self.expires
        if self.format >= 3:
            doc["packsets"] = {m.hex(): d.hex() for m, d in sorted(self.packsets.items())}
            doc["indexes"] = {p.hex(): d.hex() for p, d in sorted(self.indexes.items())}
        if self.certificates:  # an older reader ignores it: no new format
            doc["certificates"] = {m.hex(): list(c) for m, c in sorted(self.certificates.items())}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def certificate_files(self, manifest: bytes) -> list[bytes]:
        """The certificates of ``manifest`` as their files hold them (checked by the reader, not here)."""
        return [certificates.encode(c) for c in self.certificates.get(manifest, ())]

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires is not None and parse_iso(self.expires) <= (now or datetime.now(UTC))


def check_expiry_days(days: float, where: str) -> float:
    """``days`` if it is a sane validity for a catalog; else UsageError naming ``where``."""
    if not (math.isfinite(days) and 0 < days <= MAX_EXPIRY_DAYS):
        raise UsageError(f"{where} {days:g}: give a number of days above 0 and at most {MAX_EXPIRY_DAYS:g}")
    return days


def expiry(days: float, now: datetime | None = None) -> str:
    """The ``expires`` time of a catalog signed ``now`` and valid for ``days``."""
    return format_iso((now or datetime.now(UTC)) + timedelta(days=days))


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
        fmt = doc["format"]
        if type(fmt) is not int or fmt < 1:
            raise ValueError(f"invalid format {fmt!r}")
        if fmt > FORMAT:
            raise ValueError(f"format {fmt} is newer than this vml reads (up to {FORMAT}); upgrade vml")
        expires = None
        if fmt >= 2:
            expires = doc["expires"]
            parse_iso(expires)  # a ValueError or TypeError if it is no time
        refs = {check_name(n): parse_hex(h) for n, h in doc["refs"].items()}
        manifests = frozenset(parse_hex(h) for h in doc["manifests"])
        revision = doc["revision"]
        if None in refs.values() or None in manifests or type(revision) is not int or revision < 1:
            raise ValueError("bad digest or revision")
        if not set(refs.values()) <= manifests:
            raise ValueError("a ref names a manifest that is not listed")
        repository = check_name(doc["repository"], "repository")
        packsets, indexes = {}, {}
        if fmt >= 3:
            packsets, indexes = _digest_map(doc["packsets"]), _digest_map(doc["indexes"])
            if not set(packsets) <= manifests:
                raise ValueError("a pack set is of a manifest that is not listed")
        certs = _certificates(doc.get("certificates", {}), manifests)
        return Catalog(repository, revision, str(doc["published"]), refs, manifests, expires, packsets, indexes, certs)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, UsageError) as e:
        raise CorruptManifest(f"{where}: invalid catalog ({e})") from None


def _certificates(doc, manifests: frozenset[bytes]) -> dict[bytes, tuple[dict, ...]]:
    """{manifest hex: [certificate object]}; a ValueError for anything else."""
    if not isinstance(doc, dict):
        raise ValueError("certificates must be an object")
    out = {}
    for m, certs in doc.items():
        d = parse_hex(m)
        if d not in manifests:
            raise ValueError("a certificate is of a manifest that is not listed")
        if not isinstance(certs, list) or not all(isinstance(c, dict) for c in certs):
            raise ValueError("certificates must be lists of certificate objects")
        out[d] = tuple(certs[: certificates.PER_MANIFEST])
    return out


def _digest_map(doc) -> dict[bytes, bytes]:
    """{hex digest: hex digest} as bytes; a ValueError for anything else."""
    if not isinstance(doc, dict):
        raise ValueError("expected an object of digests")
    out = {parse_hex(k): parse_hex(v) for k, v in doc.items()}
    if None in out or None in out.values():
        raise ValueError("bad digest")
    return out
