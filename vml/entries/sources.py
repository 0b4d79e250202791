"""What `vml save --from PATH` reads: a disk image or a VM directory.

A disk image in any format `qemu-img` reads is saved as its raw content;
non-raw images are converted to a sparse raw file first (in the
repository's tmp/, so a crash leaves nothing behind that the next writer
does not clear). A VM directory is saved as its disk images plus every other
regular file in it (configuration, NVRAM, logs). Files that belong to a disk
(VMDK extents, a qcow2 backing file in the same directory) are part of that
disk, not separate files.

Every file an image names is checked before qemu-img sees the image: the
headers are read in Python (vml/entries/imagecheck.py) through the whole backing
chain, a URL, ``json:`` name, device or file outside the source's directory
is refused, and qemu-img then gets the chain pinned layer by layer, so it
opens nothing the checks did not pass.
"""

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadSource, StorageError
from ..names import check_relative_path
from ..repo.manifest import RESERVED_FILE
from . import imagecheck

DISK_SUFFIXES = {".img", ".raw", ".qcow2", ".qcow", ".qed", ".vmdk", ".vdi", ".vhd", ".vhdx"}
IGNORED_SUFFIXES = {".lck"}  # VMware lock directories and files
QEMU_IMG_TIMEOUT = 120
MAX_CHAIN = 16
BACKING_FORMATS = {"qcow2", "qcow", "qed", "vmdk"}  # the formats qemu gives a backing file


@dataclass(frozen=True)
class Layer:
    """One image of a backing chain, as qemu must open it."""

    path: Path  # absolute, symbolic links resolved
    format: str
    data_file: Path | None = None


@dataclass(frozen=True)
class Chain:
    """An image and its backing files, every file they name checked."""

    layers: tuple[Layer, ...]  # the image first
    size: int  # the virtual size the image's header declares
    parts: frozenset[Path]  # every other file the image is made of
    missing: str | None = None  # the first named file that does not exist, as an error message


@dataclass(frozen=True)
class SourceDisk:
    name: str
    path: Path
    format: str
    size: int
    layers: tuple[Layer, ...] = ()  # how qemu-img must open it, if it is not raw


@dataclass(frozen=True)
class SourceFile:
    name: str
    path: Path
    mode: int


def disk_name(path: Path) -> str:
    """A valid disk name from a file name: its stem with odd characters replaced."""
    stem = path.name
    if path.suffix.lower() in DISK_SUFFIXES:
        stem = stem[: -len(path.suffix)]
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", stem).strip(".-") or "disk"
    name = re.sub(r"\.\.+", ".", name)
    return name[:100]


def discover(
    path: Path | str, fmt: str | None = None, *, allow_outside: bool = False
) -> tuple[list[SourceDisk], list[SourceFile]]:
    """The disks and files to save from an image file or a VM directory.

    Every backing file, data file and extent an image names must be a
    regular file in the image's directory (the VM directory for a
    directory); ``allow_outside`` accepts regular files elsewhere too.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BadSource(f"{path}: no such file or directory") from None
    except OSError as e:
        raise BadSource(f"{path}: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
        # The directory the image really is in, so a link to an image in
        # libvirt's pool finds its base next to it. A block device has no
        # directory of its own (/dev holds files anyone may write): every
        # file it names is outside.
        root = None if stat.S_ISBLK(st.st_mode) else Path(os.path.realpath(path)).parent
        return [_disk(path, check_chain(path, fmt, root=root, allow_outside=allow_outside))], []
    if not stat.S_ISDIR(st.st_mode):
        raise BadSource(f"{path}: neither a disk image nor a directory")
    if fmt:
        raise BadSource(f"{path}: --format applies to a single image file, not a directory")
    return _discover_dir(path, allow_outside)


def check_chain(path: Path, fmt: str | None = None, *, root: Path | None, allow_outside: bool = False) -> Chain:
    """Inspect an image and its backing chain, checking every file named, without running qemu.

    ``root`` is the directory files it names must be in; None for none.
    """
    shown = path
    current = Path(os.path.realpath(path))
    layers: list[Layer] = []
    parts: set[Path] = set()
    missing = size = None
    while True:
        info = imagecheck.inspect(current if layers else path, fmt)
        size = info.size if size is None else size
        data_file = backing = None
        for ref in info.references:
            target = _check_reference(shown, current, ref, root, allow_outside)
            if target is None:
                missing = missing or f"{shown}: {ref.role} {ref.name!r} does not exist"
            elif ref.role == "backing file":
                backing = target, ref.format
            else:
                if ref.role == "data file":
                    data_file = target
                else:
                    imagecheck.check_extent(target, ref.format)
                parts.add(target)
        layers.append(Layer(current, info.format, data_file))
        if backing is None:
            break
        current, fmt = backing
        if current in {layer.path for layer in layers}:
            raise BadSource(f"{shown}: backing file {current} is already in the chain (a loop)")
        if len(layers) == MAX_CHAIN:
            raise BadSource(f"{path}: backing chain longer than {MAX_CHAIN} images")
        parts.add(current)
        shown = current
    parts.discard(layers[0].path)
    return Chain(tuple(layers), size, frozenset(parts), missing)


# Never a backing file, whatever the user allows: files there are the system's, or anyone's (/dev/shm).
SYSTEM_DIRS = (Path("/dev"), Path("/proc"), Path("/sys"))


def _check_reference(
    image: Path, here: Path, ref: imagecheck.Reference, root: Path | None, allow_outside: bool
) -> Path | None:
    """The file a reference names, or None if it does not exist; refused unless we may read it."""
    name = ref.name
    if _is_protocol(name):
        raise BadSource(f"{image}: {ref.role} {name!r} is a URL or json: name; refused")
    target = Path(os.path.realpath(here.parent / name))  # as qemu resolves it; an absolute name stays
    shown = repr(name) if str(target) == name else f"{name!r} ({target})"
    try:
        st = target.stat()
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as e:
        raise BadSource(f"{image}: {ref.role} {shown}: {e.strerror}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise BadSource(f"{image}: {ref.role} {shown} is a device or special file; refused")
    if any(target == d or d in target.parents for d in SYSTEM_DIRS):
        raise BadSource(f"{image}: {ref.role} {shown} is in a system directory; refused")
    if not allow_outside and (root is None or (target != root and root not in target.parents)):
        where = f"outside {root}" if root else "named by a device"
        raise BadSource(f"{image}: {ref.role} {shown} is {where}; refused (--allow-backing-outside accepts it)")
    return None if st is None else target


def _is_protocol(name: str) -> bool:
    """Whether qemu would read ``name`` as ``protocol:...`` (json: included): a colon before any slash."""
    return re.match(r"[^:/]*:", name) is not None


def _disk(path: Path, chain: Chain) -> SourceDisk:
    if chain.missing:
        raise BadSource(chain.missing)
    top = chain.layers[0]
    size = chain.size if top.format == "raw" else _qemu_size(path, chain)
    return SourceDisk(disk_name(path), path, top.format, size, chain.layers)


def _qemu_size(path: Path, chain: Chain) -> int:
    """The virtual size qemu-img sees in the top image, opened exactly as checked."""
    # qemu-img info never opens backing files, so the top layer alone.
    info = _qemu_img(path, "info", "--output=json", qemu_spec(chain.layers[:1], backing=False))
    try:
        doc = json.loads(info)
        size = int(doc["virtual-size"])
    except (ValueError, KeyError, TypeError):
        raise BadSource(f"{path}: qemu-img info gave no virtual size") from None
    _check_report(path, doc, chain)
    return size


def _check_report(path: Path, doc: dict, chain: Chain) -> None:
    """A second line of defence: refuse if qemu-img opened a file the checks did not see."""
    known = {layer.path for layer in chain.layers} | chain.parts
    here = chain.layers[0].path.parent
    data = doc.get("format-specific", {}).get("data", {})
    names = [doc.get("filename"), doc.get("full-backing-filename"), data.get("data-file")]
    names += [e.get("filename") for e in data.get("extents", []) if isinstance(e, dict)]
    for name in names:
        if not isinstance(name, str):
            continue
        files = _files_in_spec(name) if name.startswith("json:") else [name]
        for f in files:
            if f is None or _is_protocol(f) or Path(os.path.realpath(here / f)) not in known:
                raise BadSource(f"{path}: qemu-img reports {name!r}, which the checks did not pass; refused")


def _files_in_spec(name: str) -> list[str | None]:
    """The ``filename`` values of a ``json:`` description (None if it does not parse)."""
    try:
        doc = json.loads(name[len("json:") :])
    except ValueError:
        return [None]
    found: list[str | None] = []
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found += [v if isinstance(v, str) else None for k, v in node.items() if k == "filename"]
            stack += [v for k, v in node.items() if k != "filename"]
        elif isinstance(node, list):
            stack += node
    return found


def qemu_spec(layers: tuple[Layer, ...], backing: bool = True) -> str:
    """A ``json:`` name that pins every layer's format and file, so qemu neither probes nor follows names.

    We pin rather than refuse undeclared backing formats: qemu would probe a
    backing file whose format the image does not declare (qcow v1, QED
    without its raw flag, older qcow2, every VMDK parent), and a guest can
    write any header it likes into a raw disk. Pinned, qemu opens exactly the
    files and formats checked above, and nothing the headers name.
    """

    def layer(i: int) -> dict:
        here = layers[i]
        proto = "host_device" if here.path.is_block_device() else "file"
        spec: dict = {"driver": here.format, "file": {"driver": proto, "filename": str(here.path)}}
        if here.data_file:
            spec["data-file"] = {"driver": "file", "filename": str(here.data_file)}
        if backing and here.format in BACKING_FORMATS:
            spec["backing"] = layer(i + 1) if i + 1 < len(layers) else None
        return spec

    return "json:" + json.dumps(layer(0))


def _qemu_img(path: Path, *args: str) -> str:
    if shutil.which("qemu-img") is None:
        raise BadSource(f"{path}: reading this image needs qemu-img (Debian package qemu-utils)")
    try:
        r = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise BadSource(f"{path}: qemu-img {args[0]} did not answer in {QEMU_IMG_TIMEOUT} s") from None
    if r.returncode != 0:
        raise BadSource(f"{path}: not a readable disk image ({_first_line(r.stderr)})")
    return r.stdout


def _discover_dir(root: Path, allow_outside: bool = False) -> tuple[list[SourceDisk], list[SourceFile]]:
    regular: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if Path(d).suffix not in IGNORED_SUFFIXES)
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            if p.suffix in IGNORED_SUFFIXES:
                continue
            st = p.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise BadSource(f"{p}: only regular files are saved (this is a link or special file)")
            regular.append(p)
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                raise BadSource(f"{Path(dirpath) / d}: symbolic links are not saved")
    real_root = Path(os.path.realpath(root))
    chains: dict[Path, Chain | BadSource] = {}
    for p in (p for p in regular if p.suffix.lower() in DISK_SUFFIXES):
        try:
            chains[p] = check_chain(p, root=real_root, allow_outside=allow_outside)
        except BadSource as e:
            chains[p] = e  # raised below unless the file turns out to be part of another disk
    members = set().union(*(c.parts for c in chains.values() if isinstance(c, Chain)))
    tops = {p: c for p, c in chains.items() if Path(os.path.realpath(p)) not in members}
    # A VML checkout or copy of a mounted entry shows each disk twice: as
    # NAME.img and as the VMDK descriptor NAME.vmdk over NAME-flat.vmdk,
    # which a copy may have left out.
    raw = {(disk_name(p), -(-c.size // 512) * 512) for p, c in tops.items() if _is(c, "raw") and p.suffix == ".img"}
    views = {p for p, c in tops.items() if _is(c, "vmdk") and (disk_name(p), c.size) in raw}
    members |= {Path(os.path.realpath(p)) for p in views}
    disks = []
    for p, c in tops.items():
        if isinstance(c, BadSource):
            raise c
        if p not in views:
            disks.append(_disk(p, c))
    names = [d.name for d in disks]
    for n in names:
        if names.count(n) > 1:
            same = ", ".join(str(d.path) for d in disks if d.name == n)
            raise BadSource(f"{root}: disks {same} would share the name {n!r}")
    disk_paths = {d.path for d in disks}
    files = []
    for p in regular:
        if p in disk_paths or Path(os.path.realpath(p)) in members:
            continue
        rel = p.relative_to(root).as_posix()
        if rel == RESERVED_FILE:
            if _is_entry_description(p):
                continue  # what the mount shows of an entry; the new entry gets its own
            raise BadSource(f"{p}: {RESERVED_FILE} is a reserved name in an entry; rename it")
        try:
            check_relative_path(rel)
        except Exception:
            raise BadSource(f"{p}: file name not supported in an entry") from None
        files.append(SourceFile(rel, p, stat.S_IMODE(p.stat().st_mode)))
    if not disks:
        raise BadSource(f"{root}: no disk image found (looked for {', '.join(sorted(DISK_SUFFIXES))})")
    return disks, files


@contextlib.contextmanager
def raw_view(disk: SourceDisk, tmp_dir: Path):
    """A path whose bytes are the disk's raw content, converted if needed."""
    if disk.format == "raw":
        yield disk.path
        return
    if not disk.layers:
        raise BadSource(f"{disk.path}: a {disk.format} image whose files were not checked")
    out = Path(os.path.abspath(tmp_dir / f"{disk.name}.raw"))  # a relative name with a colon is a protocol
    try:
        r = subprocess.run(
            ["qemu-img", "convert", "-q", "-O", "raw", qemu_spec(disk.layers), str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            if "No space left on device" in r.stderr:
                raise StorageError(f"{disk.path}: no space left on device to convert it in {tmp_dir}")
            raise BadSource(f"{disk.path}: qemu-img could not convert it ({_first_line(r.stderr)})")
        yield out
    finally:
        with contextlib.suppress(FileNotFoundError):
            out.unlink()


def _is(chain: Chain | BadSource, fmt: str) -> bool:
    return isinstance(chain, Chain) and chain.layers[0].format == fmt


def _is_entry_description(path: Path) -> bool:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and {"name", "manifest", "disks"} <= doc.keys()


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else "no message"
