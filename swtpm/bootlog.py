"""A measured boot for a software TPM: what UEFI firmware does on a real host, done to a
fresh swtpm so that the demo and tests have an event log that replays to the quoted PCRs.

Each event is extended with TPM2_PCR_Event (the TPM hashes the data in every active bank)
and written to a crypto-agile TCG event log (PFP 10.2) with the digests the TPM returned, in
the order firmware logs them: S-CRTM version, the Secure Boot variables (PK, KEK, db, dbx
empty lists, SecureBoot = 1), separators on PCRs 0-7, a boot application on PCR 4.

``header_only_log`` is a log with no measurement at all: it replays to the initial values of
PCRs 0-7, which is what a freshly started swtpm quotes.

The events and the log format are shared with the in-process soft TPM (``devtrust.swtpm.soft``),
which must not load tpm2-pytss: only ``simulate_boot``, which drives a real swtpm, imports it.
"""

from __future__ import annotations

import struct
import uuid
from pathlib import Path
from typing import Any

EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_S_CRTM_VERSION = 0x8
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
TPM_ALG_SHA1 = 0x0004
TPM_ALG_SHA256 = 0x000B
_BANKS = {TPM_ALG_SHA1: ("sha1", 20), TPM_ALG_SHA256: ("sha256", 32)}


def spec_id_event(banks: list[tuple[int, int]]) -> bytes:
    """The TCG_PCClientPCREvent carrying TCG_EfiSpecIdEvent (PFP 10.4.5.1)."""
    body = b"Spec ID Event03\x00" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(banks))
    body += b"".join(struct.pack("<HH", alg, size) for alg, size in banks)
    body += b"\x00"  # vendorInfoSize
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(body)) + body


def header_only_log(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(spec_id_event([(TPM_ALG_SHA1, 20), (TPM_ALG_SHA256, 32)]))
    return path


def _variable(guid: uuid.UUID, name: str, data: bytes) -> bytes:
    """UEFI_VARIABLE_DATA (PFP 10.4.4)."""
    encoded = name.encode("utf-16-le")
    return guid.bytes_le + struct.pack("<QQ", len(name), len(data)) + encoded + data


def _image_load(path: str) -> bytes:
    """UEFI_IMAGE_LOAD_EVENT (PFP 10.4.3) with a file-path device path node."""
    node_path = (path + "\x00").encode("utf-16-le")
    file_node = struct.pack("<BBH", 4, 4, 4 + len(node_path)) + node_path
    device_path = file_node + struct.pack("<BBH", 0x7F, 0xFF, 4)
    return struct.pack("<QQQQ", 0x1000, 0x20000, 0, len(device_path)) + device_path


def boot_events() -> list[tuple[int, int, bytes]]:
    separator = b"\x00\x00\x00\x00"
    events: list[tuple[int, int, bytes]] = [
        (0, EV_S_CRTM_VERSION, "devtrust simulated firmware 1.0\x00".encode("utf-16-le")),
        (7, EV_EFI_VARIABLE_DRIVER_CONFIG, _variable(EFI_GLOBAL_VARIABLE, "SecureBoot", b"\x01")),
        (7, EV_EFI_VARIABLE_DRIVER_CONFIG, _variable(EFI_GLOBAL_VARIABLE, "PK", b"")),
        (7, EV_EFI_VARIABLE_DRIVER_CONFIG, _variable(EFI_GLOBAL_VARIABLE, "KEK", b"")),
        (7, EV_EFI_VARIABLE_DRIVER_CONFIG, _variable(EFI_IMAGE_SECURITY_DATABASE, "db", b"")),
        (7, EV_EFI_VARIABLE_DRIVER_CONFIG, _variable(EFI_IMAGE_SECURITY_DATABASE, "dbx", b"")),
    ]
    events += [(pcr, EV_SEPARATOR, separator) for pcr in range(8)]
    events.append((4, EV_EFI_BOOT_SERVICES_APPLICATION, _image_load("\\EFI\\BOOT\\BOOTX64.EFI")))
    return events


def event_record(pcr: int, type_: int, digests: list[tuple[int, bytes]], data: bytes) -> bytes:
    """TCG_PCR_EVENT2 (PFP 10.2.2): PCR, type, (algorithm, digest) per bank, event data."""
    return (
        struct.pack("<III", pcr, type_, len(digests))
        + b"".join(struct.pack("<H", alg) + digest for alg, digest in digests)
        + struct.pack("<I", len(data))
        + data
    )


def simulate_boot(esapi: Any, path: Path) -> Path:
    """Measure ``boot_events()`` into the TPM behind ``esapi`` and write their log."""
    from tpm2_pytss.constants import ESYS_TR  # noqa: PLC0415 (only a real swtpm needs it)

    records: list[bytes] = []
    banks: dict[int, int] = {}
    for pcr, type_, data in boot_events():
        digests = esapi.pcr_event(getattr(ESYS_TR, f"PCR{pcr}"), data)
        entries = []
        for d in digests.digests:
            alg = int(d.hashAlg)
            if alg not in _BANKS:
                continue
            size = _BANKS[alg][1]
            banks[alg] = size
            entries.append((alg, bytes(d.marshal())[2 : 2 + size]))
        records.append(event_record(pcr, type_, entries, data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(spec_id_event(sorted(banks.items())) + b"".join(records))
    return path
