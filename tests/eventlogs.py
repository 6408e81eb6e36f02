"""Build small TCG event logs in tests (PFP 10.2 layouts, little-endian)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

SIZES = {"sha1": (0x0004, 20), "sha256": (0x000B, 32), "sha384": (0x000C, 48)}


def spec_id_header(banks: Sequence[str]) -> bytes:
    body = b"Spec ID Event03\x00" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(banks))
    for bank in banks:
        body += struct.pack("<HH", *SIZES[bank])
    body += b"\x00"
    return struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(body)) + body


def agile_event(pcr: int, type_: int, data: bytes, banks: Sequence[str]) -> bytes:
    out = struct.pack("<III", pcr, type_, len(banks))
    for bank in banks:
        out += struct.pack("<H", SIZES[bank][0]) + hashlib.new(bank, data).digest()
    return out + struct.pack("<I", len(data)) + data


def agile_log(
    events: Sequence[tuple[int, int, bytes]],
    banks: Sequence[str] = ("sha1", "sha256"),
) -> bytes:
    return spec_id_header(banks) + b"".join(agile_event(p, t, d, banks) for p, t, d in events)


def expected_pcrs(events: Sequence[tuple[int, int, bytes]], bank: str) -> dict[int, bytes]:
    values: dict[int, bytes] = {}
    for pcr, type_, data in events:
        if type_ == 3:
            continue
        current = values.get(pcr, bytes(SIZES[bank][1]))
        values[pcr] = hashlib.new(bank, current + hashlib.new(bank, data).digest()).digest()
    return values


SAMPLE = [
    (0, 0x8, b"S-CRTM version"),
    (0, 0x80000008, b"firmware blob"),
    (7, 0x80000001, b"secure boot variable"),
    (4, 0x80000003, b"boot application"),
    (8, 0xD, b"grub_cmd: linux /vmlinuz root=/dev/sda1\x00"),
    (8, 0xD, b"kernel_cmdline: /vmlinuz root=/dev/sda1\x00"),
    (0, 0x4, b"\x00\x00\x00\x00"),
    (7, 0x4, b"\x00\x00\x00\x00"),
]
