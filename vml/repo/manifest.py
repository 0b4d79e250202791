"""Entry manifests: what an entry is, stored as a canonical JSON object.

A manifest names its kind, its parent in the tree and, for a differential
entry, the full entry its delta is taken against; both links carry the
manifest digest, so a chain cannot change under an entry. Each disk and file
has a size and the digest of its chunk map. Unknown keys are ignored, so
later versions can add fields without breaking older readers; a different
"format" number is refused.
"""

import json
from dataclasses import dataclass, field

from ..errors import CorruptManifest, UsageError
from ..names import check_name, check_relative_path
from ..times import parse_iso
from .hardware import Hardware
from .objects import parse_hex
from .store import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

FORMAT = 1
KINDS = ("full", "incremental", "differential")
MAX_STREAM_SIZE = 1 << 60
# What reading an entry costs is in proportion to the chunks it stores, not
# to the sizes it declares (chunk tables hold only chunks with data), so a
# manifest declaring petabytes of holes is cheap. On top of that, readers
# refuse disks and files larger than this limit (config.toml, [limits]
# max_disk_size): no real VM has them, and a checkout could not write them.
DEFAULT_MAX_DISK_SIZE = 16 << 40
RESERVED_FILE = "entry.json"
# An environment backup (vml.envs) is an entry whose manifest carries this
# key; its two disks hold a file tree. Its kind says how it is stored (full,
# or incremental on an earlier backup); it is shown as "environment". An
# older vml sees two disks, so it keeps, copies and collects it correctly.
ENVIRONMENT = "environment"


def disk_file_names(disk: str) -> tuple[str, str, str]:
    """The names disk ``disk`` has in a checkout or the mount: raw image, VMDK descriptor, flat extent."""
    return f"{disk}.img", f"{disk}.vmdk", f"{disk}-flat.vmdk"


@dataclass(frozen=True)
class Link:
    """A reference to another entry: its name when linked, and its manifest."""

    name: str
    manifest: bytes

    def to_json(self):
        return {"name": self.name, "manifest": self.manifest.hex()}


@dataclass(frozen=True)
class Stream:
    """One disk or file of an entry."""

    name: str
    size: int
    map: bytes
    mode: int = 0o644

    def to_json(self, with_mode: bool):
        out = {"name": self.name, "size": self.size, "map": self.map.hex()}
        if with_mode:
            out["mode"] = self.mode
        return out


@dataclass(frozen=True)
class Manifest:
    name: str
    kind: str
    created: str
    chunk_size: int
    disks: tuple[Stream, ...]
    files: tuple[Stream, ...] = ()
    parent: Link | None = None
    base: Link | None = None
    message: str = ""
    hardware: Hardware | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.check()

    @property
    def reference(self) -> Link | None:
        """The entry whose data this one is a delta against, if any."""
        if self.kind == "incremental":
            return self.parent
        if self.kind == "differential":
            return self.base
        return None

    @property
    def is_environment(self) -> bool:
        return isinstance(self.extra.get(ENVIRONMENT), dict)

    @property
    def shown_kind(self) -> str:
        """What users see as the kind: "environment" for an environment backup."""
        return ENVIRONMENT if self.is_environment else self.kind

    def encode(self) -> bytes:
        doc = dict(self.extra)
        doc.update(
            format=FORMAT,
            name=self.name,
            kind=self.kind,
            created=self.created,
            message=self.message,
            chunk_size=self.chunk_size,
            parent=self.parent.to_json() if self.parent else None,
            base=self.base.to_json() if self.base else None,
            disks=[s.to_json(False) for s in self.disks],
            files=[s.to_json(True) for s in self.files],
        )
        if self.hardware is not None:  # absent, not null, so older entries keep their digest
            doc["hardware"] = self.hardware.to_json()
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def check_sizes(self, limit: int) -> None:
        """Raise ValueError if a disk or file is larger than ``limit`` bytes."""
        for s in self.disks + self.files:
            check_size(s.name, s.size, limit)

    @classmethod
    def decode(cls, data: bytes, where: str, max_size: int = DEFAULT_MAX_DISK_SIZE) -> "Manifest":
        """Parse and check a manifest; ``max_size`` bounds the size of each disk and file."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise TypeError("not a JSON object")
            if doc.get("format") != FORMAT:
                raise ValueError(f"unsupported manifest format {doc.get('format')!r}")
            m = cls(
                name=check_name(_str(doc["name"])),
                kind=_str(doc["kind"]),
                created=_timestamp(doc["created"]),
                message=_str(doc.get("message", "")),
                chunk_size=_int(doc["chunk_size"], MIN_CHUNK_SIZE, MAX_CHUNK_SIZE),
                parent=_link(doc.get("parent")),
                base=_link(doc.get("base")),
                disks=tuple(_stream(s, False) for s in _list(doc["disks"])),
                files=tuple(_stream(s, True) for s in _list(doc.get("files", []))),
                hardware=_hardware(doc.get("hardware")),
                extra={k: v for k, v in doc.items() if k not in _KNOWN or (k == "hardware" and not _hardware(v))},
            )
            m.check_sizes(max_size)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, UsageError) as e:
            raise CorruptManifest(f"{where}: invalid manifest ({e})") from None
        return m

    def check(self) -> None:
        """Raise ValueError if a field is of the wrong type or the fields contradict each other."""
        for value in (self.name, self.kind, self.created, self.message):
            if not isinstance(value, str):
                raise ValueError(f"{value!r} is not a string")
        if self.hardware is not None and not isinstance(self.hardware, Hardware):
            raise ValueError("hardware must be a Hardware description")
        if not isinstance(self.extra, dict):
            raise ValueError("extra fields must be a mapping")
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}")
        if self.chunk_size & (self.chunk_size - 1):
            raise ValueError("chunk size is not a power of two")
        if self.kind != "full" and self.parent is None:
            raise ValueError(f"{self.kind} entry without a parent")
        if (self.kind == "differential") != (self.base is not None):
            raise ValueError("only a differential entry has a base")
        for group in (self.disks, self.files):
            names = [s.name for s in group]
            if len(set(names)) != len(names):
                raise ValueError("duplicate disk or file name")
        # Checked out or mounted, disks and files share one directory.
        taken = {RESERVED_FILE} | {n for s in self.disks for n in disk_file_names(s.name)}
        dirs = {p for s in self.files for p in _parents(s.name)}
        for s in self.files:
            if s.name in taken or s.name in dirs:
                raise ValueError(f"file name {s.name!r} collides with a disk, a directory or {RESERVED_FILE}")

    def map_digests(self) -> list[bytes]:
        return [s.map for s in self.disks + self.files]


def check_size(name: str, size: int, limit: int) -> None:
    """Raise ValueError if disk or file ``name`` of ``size`` bytes is over ``limit``."""
    if size > limit:
        raise ValueError(f"{name} declares {size} bytes, more than the limit of {limit} (max_disk_size in config.toml)")


_KNOWN = {"format", "name", "kind", "created", "message", "chunk_size", "parent", "base", "disks", "files", "hardware"}


def _hardware(v) -> Hardware | None:
    """The hardware description, or None if there is none or it is one this version cannot read.

    A description a newer writer made (another firmware, bus or model) must
    not make the whole entry unreadable: it is kept as it is, as unknown
    keys are, and the entry boots with the defaults.
    """
    if v is None:
        return None
    try:
        return Hardware.from_json(v)
    except (ValueError, TypeError):
        return None


def _str(v) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


def _timestamp(v) -> str:
    parse_iso(_str(v))  # ValueError if malformed
    return v


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _int(v, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"number {v!r} out of range")
    return v


def _list(v) -> list:
    if not isinstance(v, list):
        raise TypeError("expected a list")
    return v


def _digest(v) -> bytes:
    d = parse_hex(_str(v))
    if d is None:
        raise ValueError(f"bad digest {v!r}")
    return d


def _link(v) -> Link | None:
    if v is None:
        return None
    return Link(check_name(_str(v["name"])), _digest(v["manifest"]))


def _stream(v, is_file: bool) -> Stream:
    if is_file:
        name = check_relative_path(_str(v["name"]))
        mode = _int(v.get("mode", 0o644), 0, 0o7777)
    else:
        name, mode = check_name(_str(v["name"]), "disk"), 0o644
    return Stream(name, _int(v["size"], 0, MAX_STREAM_SIZE), _digest(v["map"]), mode)
