"""Build small TCG event logs in tests (PFP 10.2 layouts, little-endian)."""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Mapping, Sequence

SIZES = {"sha1": (0x0004, 20), "sha256": (0x000B, 32), "sha384": (0x000C, 48)}


def spec_id_header(banks: Sequence[str]) -> bytes:
    body = b"Spec ID Event03\x00" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(banks))
    for bank in banks:
        body += struct.pack("<HH", *SIZES[bank])
    body += b"\x00"
    return struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(body)) + body


def agile_event(
    pcr: int,
    type_: int,
    data: bytes,
    banks: Sequence[str],
    *,
    measured: bytes | None = None,
    digests: Mapping[str, bytes] | None = None,
) -> bytes:
    """A TCG_PCR_EVENT2 logging ``data`` with the digests of ``measured`` (what firmware hashed;
    default ``data``), or with ``digests`` as given (a forgery keeps the original's)."""
    given = digests or {
        b: hashlib.new(b, data if measured is None else measured).digest() for b in banks
    }
    out = struct.pack("<III", pcr, type_, len(given))
    for bank, digest in given.items():
        out += struct.pack("<H", SIZES[bank][0]) + digest
    return out + struct.pack("<I", len(data)) + data


EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
EFI_CERT_SHA256 = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")


def variable(name: str, value: bytes, guid: uuid.UUID = EFI_GLOBAL_VARIABLE) -> bytes:
    """UEFI_VARIABLE_DATA (PFP 10.4.4)."""
    encoded = name.encode("utf-16-le")
    return guid.bytes_le + struct.pack("<QQ", len(name), len(value)) + encoded + value


def sha256_list(*hashes: bytes) -> bytes:
    """An EFI_SIGNATURE_LIST of EFI_CERT_SHA256 entries (UEFI 2.10, 32.4.1), owner zero."""
    size = 16 + 32
    body = b"".join(bytes(16) + h for h in hashes)
    return EFI_CERT_SHA256.bytes_le + struct.pack("<III", 28 + len(body), 0, size) + body


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
