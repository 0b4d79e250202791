"""Errors the library raises.

Each class carries the exit status the command line uses for it, so a script
can tell "no such entry" from "the repository is corrupt" without parsing
messages. Every error is raised with the file, entry or object it concerns in
its message; the message is one line.
"""


class VmlError(Exception):
    """Base class: an error the user can act on."""

    exit_status = 1


class UsageError(VmlError):
    """The command was asked something that makes no sense."""

    exit_status = 2


class NotFound(VmlError):
    """A repository, entry or file that was named does not exist."""

    exit_status = 3


class AlreadyExists(VmlError):
    """Creating something whose name is taken."""

    exit_status = 4


class Locked(VmlError):
    """Another process holds the repository's writer lock."""

    exit_status = 5


class Corrupt(VmlError):
    """Stored data is damaged: it does not parse or does not match its digest."""

    exit_status = 6


class CorruptObject(Corrupt):
    """An object whose content does not match its name, or that does not decode."""


class ObjectTooLarge(CorruptObject):
    """An object that decompresses to more than the reader's bound allows (forged, or not what was asked for)."""


class CorruptManifest(Corrupt):
    """A manifest, chunk map or refs file that does not parse."""


class ObjectMissing(Corrupt):
    """An object that a manifest references is not in the store."""

    exit_status = 7


class BadBundle(Corrupt):
    """A bundle file that is truncated, tampered with or incomplete."""


class MissingAncestor(VmlError):
    """A bundle builds on an entry the receiving repository does not have."""

    exit_status = 8


class BadSource(VmlError):
    """A disk image or VM directory that cannot be read or is not supported."""

    exit_status = 9


class StorageError(VmlError):
    """The operating system refused a write (disk full, permissions, I/O)."""

    exit_status = 10


class HasChildren(VmlError):
    """Removing an entry that other entries build on."""

    exit_status = 11


class DiskFull(VmlError):
    """A write past the end of a working area's disk (disks keep their size)."""

    exit_status = 12


class ReadOnly(VmlError):
    """Writing to an entry, which never changes (working areas are writable)."""

    exit_status = 13


class FetchError(VmlError):
    """A remote object or catalog could not be fetched: every proxy and retry failed, or the deadline passed."""

    exit_status = 14


class BadSignature(Corrupt):
    """A remote catalog whose signature does not verify with the configured key."""


class ExpiredCatalog(Corrupt):
    """A remote catalog past the time it expires: the publisher must re-sign it."""


class HypervisorError(VmlError):
    """A hypervisor could not be reached, or refused or failed to run a VM."""

    exit_status = 15


class NotCertified(VmlError):
    """An entry that the trust policy in force does not let run: no certificate it accepts."""

    exit_status = 16


class UnsafeBackup(VmlError):
    """An environment backup that would write outside its home or through a symlink: refused before any write."""

    exit_status = 17
