"""Ed25519 signing keys, as `vml keygen` writes them: the publisher's and the certifier's."""

import base64
import binascii
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import AlreadyExists, NotFound, UsageError
from .files import read_regular, storage_error, write_atomic

KEY_PREFIX = "ed25519:"
KEY_FILE_LIMIT = 64 << 10


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
        data = read_regular(path, KEY_FILE_LIMIT, "key file", private=True)
    except NotFound:
        raise NotFound(f"{path}: no such key file (create one with `vml keygen {path}`)") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
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
    text = read_regular(path, KEY_FILE_LIMIT, "key file").decode(errors="replace")
    return public_key_text(parse_public_key(text, str(path)))
