"""The 512-byte footer of a fixed VHD, so Azure can import a page blob as a managed disk.

Azure imports a page blob as a managed disk only when the blob is a *fixed*
VHD: the raw disk, its virtual size a whole number of MiB, followed by one
512-byte footer. Layout of the footer (integers big-endian), from the published Virtual Hard
Disk Image Format Specification:

    offset  size  field
    0       8     cookie "conectix"
    8       4     features (0x00000002, reserved bit set)
    12      4     file format version 1.0 (0x00010000)
    16      8     data offset: all ones for a fixed disk
    24      4     timestamp: seconds since 2000-01-01 00:00 UTC
    28      4     creator application ("sr  ")
    32      4     creator version
    36      4     creator host OS ("Wi2k")
    40      8     original size
    48      8     current size (the virtual size)
    56      4     geometry: cylinders (2), heads (1), sectors per track (1)
    60      4     disk type: 2 = fixed
    64      4     checksum: ones' complement of the sum of all footer bytes, itself as zeros
    68      16    unique id
    84      1     saved state
    85      427   zeros
"""

from __future__ import annotations

import struct
import uuid
from datetime import UTC, datetime

FOOTER_SIZE = 512
MiB = 1024 * 1024
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
FIXED = 2


def virtual_size(disk_size: int) -> int:
    """The VHD's virtual size for a disk: its size rounded up to whole MiB."""
    return -(-disk_size // MiB) * MiB


def geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) as the specification's algorithm derives them."""
    total = min(size // 512, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_heads = total // spt
    else:
        spt = 17
        cyl_heads = total // spt
        heads = max(4, (cyl_heads + 1023) // 1024)
        if cyl_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_heads = total // spt
        if cyl_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_heads = total // spt
    return cyl_heads // heads, heads, spt


def footer(size: int, unique_id: uuid.UUID, created: datetime) -> bytes:
    """The footer of a fixed VHD whose virtual size is `size` (a multiple of 1 MiB)."""
    if size <= 0 or size % MiB:
        raise ValueError(f"a VHD's virtual size must be a positive multiple of 1 MiB, not {size}")
    cylinders, heads, spt = geometry(size)
    timestamp = max(0, int((created - _EPOCH).total_seconds())) & 0xFFFFFFFF
    body = struct.pack(
        ">8sIIQI4sI4sQQHBBII16sB",
        b"conectix",
        0x00000002,
        0x00010000,
        0xFFFFFFFFFFFFFFFF,
        timestamp,
        b"sr  ",
        0x00010000,
        b"Wi2k",
        size,
        size,
        cylinders,
        heads,
        spt,
        FIXED,
        0,  # checksum, filled in below
        unique_id.bytes,
        0,
    )
    body = body.ljust(FOOTER_SIZE, b"\0")
    checksum = ~sum(body) & 0xFFFFFFFF
    return body[:64] + struct.pack(">I", checksum) + body[68:]


def parse(data: bytes) -> dict[str, int]:
    """The fields a reader checks: current size, disk type, and whether the checksum holds."""
    if len(data) != FOOTER_SIZE or data[:8] != b"conectix":
        raise ValueError("not a VHD footer")
    (current,) = struct.unpack_from(">Q", data, 48)
    (disk_type,) = struct.unpack_from(">I", data, 60)
    (stored,) = struct.unpack_from(">I", data, 64)
    computed = ~sum(data[:64] + b"\0\0\0\0" + data[68:]) & 0xFFFFFFFF
    return {"current_size": current, "disk_type": disk_type, "checksum_ok": int(stored == computed)}
