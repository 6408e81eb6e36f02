"""Identifiers with their own types (STYLE 12), so that a device id, a certificate serial and
a challenge nonce cannot be passed for one another where the type checker can see it.
"""

from __future__ import annotations

import hashlib
import re
from typing import NewType

# sha256 of the EK's DER SubjectPublicKeyInfo, lowercase hex (DESIGN.md flow 1, step 4):
# the same TPM always has the same id, and the id says nothing else about the device.
DeviceId = NewType("DeviceId", str)
# A certificate's serial number, lowercase hex without leading zeros, as records and logs
# show it.
Serial = NewType("Serial", str)
# The verifier's fresh random challenge; the quote binds it (binding.qualifying_data).
Nonce = NewType("Nonce", bytes)
NONCE_SIZE = 32

_DEVICE_ID = re.compile(r"[0-9a-f]{64}")


def device_id_of(ek_spki: bytes) -> DeviceId:
    """The device id of the TPM whose EK has this DER SubjectPublicKeyInfo."""
    return DeviceId(hashlib.sha256(ek_spki).hexdigest())


def parse_device_id(text: str) -> DeviceId:
    """``text`` as a device id; ``ValueError`` naming what was found when it is not one."""
    if not _DEVICE_ID.fullmatch(text):
        shown = text if len(text) <= 80 else f"{text[:77]}..."
        raise ValueError(f"device id {shown!r} is not 64 lowercase hex digits (a sha256)")
    return DeviceId(text)


def serial_of(number: int) -> Serial:
    """How a certificate serial number is written: ``f"{number:x}"``."""
    if number < 0:
        raise ValueError(f"certificate serial {number} is negative")
    return Serial(f"{number:x}")
