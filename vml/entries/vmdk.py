"""VMDK descriptors, so VMware and QEMU can use an entry's raw disk as is.

A monolithicFlat descriptor names one FLAT extent, ``NAME-flat.vmdk``,
which the mount serves as the very same inode as ``NAME.img``: no
conversion and no second copy. The extent is declared in whole 512-byte
sectors, rounded up; VMware and QEMU read the tail of a partial last sector
as zeros.
"""

import zlib

SECTOR = 512


def geometry(sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) as VMware computes them for IDE."""
    heads, per_track = 16, 63
    if sectors > 16 * 63 * 1024:
        heads, per_track = 255, 63
    cylinders = max(1, min(sectors // (heads * per_track), 16383))
    return cylinders, heads, per_track


def descriptor(name: str, size: int, adapter: str = "lsilogic") -> bytes:
    """The descriptor text of disk ``name`` of ``size`` bytes."""
    sectors = -(-size // SECTOR)
    cylinders, heads, per_track = geometry(sectors)
    cid = zlib.crc32(f"{name}:{size}".encode()) & 0xFFFFFFFE  # stable, so the file never changes
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={cid:08x}\n"
        "parentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        "\n"
        "# Extent description\n"
        f'RW {sectors} FLAT "{name}-flat.vmdk" 0\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        'ddb.virtualHWVersion = "4"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        f'ddb.geometry.sectors = "{per_track}"\n'
        f'ddb.adapterType = "{adapter}"\n'
    ).encode()
