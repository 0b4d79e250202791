"""What `vml save --from PATH` reads: a disk image or a VM directory.

A disk image in any format `qemu-img` reads is saved as its raw content;
non-raw images are converted to a sparse raw file first (in the
repository's tmp/, so a crash leaves nothing behind that the next writer
does not clear). A VM directory is saved as its disk images plus every other
regular file in it (configuration, NVRAM, logs). Files that belong to a disk
(VMDK extents, a qcow2 backing file in the same directory) are part of that
disk, not separate files.
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

from .errors import BadSource, StorageError
from .manifest import RESERVED_FILE
from .names import check_relative_path

DISK_SUFFIXES = {".img", ".raw", ".qcow2", ".qcow", ".vmdk", ".vdi", ".vhd", ".vhdx"}
IGNORED_SUFFIXES = {".lck"}  # VMware lock directories and files
QEMU_IMG_TIMEOUT = 120


@dataclass(frozen=True)
class SourceDisk:
    name: str
    path: Path
    format: str
    size: int


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


def qemu_img_info(path: Path, fmt: str | None = None) -> list[dict]:
    """`qemu-img info --backing-chain` of an image: one dict per image of the chain."""
    if shutil.which("qemu-img") is None:
        raise BadSource(f"{path}: reading this image needs qemu-img (Debian package qemu-utils)")
    cmd = ["qemu-img", "info", "--output=json", "--backing-chain"]
    if fmt:
        cmd += ["-f", fmt]
    try:
        r = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise BadSource(f"{path}: qemu-img info did not answer in {QEMU_IMG_TIMEOUT} s") from None
    if r.returncode != 0:
        raise BadSource(f"{path}: not a readable disk image ({_first_line(r.stderr)})")
    info = json.loads(r.stdout)
    return info if isinstance(info, list) else [info]


def probe_disk(path: Path, fmt: str | None = None) -> tuple[SourceDisk, set[Path]]:
    """Describe one disk image; also return the other files it is made of."""
    chain = qemu_img_info(path, fmt)
    top = chain[0]
    parts: set[Path] = set()
    for img in chain:
        here = Path(img["filename"])
        here = here if here.is_absolute() else path.parent / here
        parts.add(here.resolve())
        for ext in img.get("format-specific", {}).get("data", {}).get("extents", []):
            parts.add((here.parent / ext["filename"]).resolve())
    parts.discard(path.resolve())
    size = int(top["virtual-size"])
    if top["format"] == "raw" and path.is_file():
        size = path.stat().st_size  # qemu-img rounds raw sizes up to 512 bytes
    return SourceDisk(disk_name(path), path, top["format"], size), parts


def discover(path: Path | str, fmt: str | None = None) -> tuple[list[SourceDisk], list[SourceFile]]:
    """The disks and files to save from an image file or a VM directory."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BadSource(f"{path}: no such file or directory") from None
    except OSError as e:
        raise BadSource(f"{path}: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
        disk, _ = probe_disk(path, fmt)
        return [disk], []
    if not stat.S_ISDIR(st.st_mode):
        raise BadSource(f"{path}: neither a disk image nor a directory")
    if fmt:
        raise BadSource(f"{path}: --format applies to a single image file, not a directory")
    return _discover_dir(path)


def _discover_dir(root: Path) -> tuple[list[SourceDisk], list[SourceFile]]:
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
    candidates = [p for p in regular if p.suffix.lower() in DISK_SUFFIXES]
    probed = [probe_disk(p) for p in candidates]
    members = set().union(*(parts for _, parts in probed)) if probed else set()
    disks = [d for d, _ in probed if d.path.resolve() not in members]
    # A VML checkout or copy of a mounted entry shows each disk twice: as
    # NAME.img and as the VMDK descriptor NAME.vmdk over NAME-flat.vmdk.
    raw = {(d.name, d.size) for d in disks if d.format == "raw" and d.path.suffix == ".img"}
    views = [d for d in disks if d.format == "vmdk" and (d.name, d.size) in raw]
    members |= {d.path.resolve() for d in views}
    disks = [d for d in disks if d not in views]
    names = [d.name for d in disks]
    for n in names:
        if names.count(n) > 1:
            same = ", ".join(str(d.path) for d in disks if d.name == n)
            raise BadSource(f"{root}: disks {same} would share the name {n!r}")
    disk_paths = {d.path for d in disks}
    files = []
    for p in regular:
        if p in disk_paths or p.resolve() in members:
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
    out = tmp_dir / f"{disk.name}.raw"
    try:
        r = subprocess.run(
            ["qemu-img", "convert", "-q", "-f", disk.format, "-O", "raw", str(disk.path), str(out)],
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


def _is_entry_description(path: Path) -> bool:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and {"name", "manifest", "disks"} <= doc.keys()


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else "no message"
