"""Event data against event digests, and what an event measured whatever its type says. Pure.

Event data is the device's word; only the digests went into the TPM, and the event type is
not measured at all (TCG PC Client Platform Firmware Profile, PFP 1.05 rev 23, 10.2.2). So:

1. Where the PFP defines an event's digest over its data (10.4.1 and 3.3.4), the data is
   hashed in every bank the event carries and compared (``data_mismatch``). Real firmware
   quirks are accepted narrowly below, each with the corpus log that shows it
   (``tests/data/corpus/eventlogs/...``).
2. A separator is recognized by its digest, H(00000000) or H(FFFFFFFF) (PFP 10.4.1), not by
   its type (``separator_in_any_bank``, ``separator_in_every_bank``), and an event on PCR 4
   measured no code only when it is a separator or a short text its digests are the hash of
   (``measured_no_code``).

Used by ``verifier.tpm.bootfacts``, which takes facts only from what passes.
"""

from __future__ import annotations

import hashlib
import re
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from devtrust.verifier.tpm import eventlog as ev

EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
# systemd-boot and systemd-stub measure the kernel command line into PCR 8 (older) or 12.
SYSTEMD_CMDLINE_PCRS = frozenset({8, 12})
# GRUB's EV_IPL strings: prefix -> (BootFacts field, "" to keep none; whether the measured
# text includes the logged NUL).
GRUB_STRINGS = {
    # Upstream GRUB 2.04 on (grub-core/commands/tpm.c): "prefix X" + NUL logged, X measured.
    b"grub_cmd: ": ("grub_commands", False),
    b"kernel_cmdline: ": ("kernel_cmdlines", False),
    b"module_cmdline: ": ("", False),
    # Quirk: Red Hat's GRUB 2.02 TPM patches log "grub_cmd X" + NUL and measure X + NUL, and
    # "grub_kernel_cmdline X" + NUL measuring X (go-tpm-tools/rhel8-uefi.bin events 28-79).
    b"grub_cmd ": ("grub_commands", True),
    b"grub_kernel_cmdline ": ("kernel_cmdlines", False),
}


@dataclass(frozen=True, slots=True)
class DataMismatch:
    """An event whose logged digests are not the hash of its data (where the PFP defines
    them so), or that lacks a digest for one of the log's banks."""

    number: int
    offset: int
    pcr: int
    type_name: str
    banks: tuple[str, ...]  # the banks that do not match (or are missing)
    logged: str  # hex digest as logged in banks[0], "" when missing
    computed: str  # hex hash of the event data in banks[0]


def utf16(data: bytes) -> str:
    return data.decode("utf-16-le", errors="replace").rstrip("\x00")


def variable_layout(data: bytes) -> tuple[uuid.UUID, str, int, int]:
    """UEFI_VARIABLE_DATA (PFP 10.4.4): GUID, name, and where VariableData starts and ends."""
    if len(data) < 32:
        raise ValueError("UEFI_VARIABLE_DATA shorter than its header")
    guid = uuid.UUID(bytes_le=data[:16])
    name_len, data_len = struct.unpack_from("<QQ", data, 16)
    end_name = 32 + 2 * name_len
    if end_name + data_len > len(data):
        raise ValueError("UEFI_VARIABLE_DATA lengths exceed the event")
    return guid, utf16(data[32:end_name]), end_name, end_name + data_len


# --- data digests (PFP 1.05 rev 23, 10.4.1 table 9) ----------------------------------------

# Types whose digest the PFP defines as the hash of the event data, as logged. Not here, so
# neither checked nor a source of facts beyond their digests: EV_POST_CODE, EV_S_CRTM_CONTENTS,
# EV_CPU_MICROCODE and the firmware blobs, drivers, applications and handoff tables (the digest
# is of code or memory the data only locates); EV_NO_ACTION (never extended); EV_EVENT_TAG
# (Linux and systemd-stub tag their initrd and LoadOptions measurements with it, digest over
# the content: tpm2-tools/event-sd-boot-fedora37.bin event 25, go-tpm-tools/gdc-host.bin 155);
# EV_PLATFORM_CONFIG_FLAGS, EV_COMPACT_HASH, EV_TABLE_OF_DEVICES, EV_NONHOST_* (vendor content:
# tpm2-tss/binary_measurements_pc_client.bin events 4-6, keylime/binary_bios_measurements 21);
# EV_EFI_GPT_EVENT2 and EV_EFI_SPDM_* (the digest is over a transformed structure).
DATA_DIGEST_TYPES = frozenset(
    {
        ev.EV_SEPARATOR,
        ev.EV_ACTION,
        ev.EV_S_CRTM_VERSION,
        ev.EV_OMIT_BOOT_DEVICE_EVENTS,
        ev.EV_EFI_ACTION,
        ev.EV_EFI_VARIABLE_DRIVER_CONFIG,
        ev.EV_EFI_VARIABLE_BOOT,
        ev.EV_EFI_VARIABLE_BOOT2,
        ev.EV_EFI_VARIABLE_AUTHORITY,
        ev.EV_EFI_GPT_EVENT,
    }
)
_BOOT_OPTION = re.compile(r"Boot[0-9A-Fa-f]{4}|BootOrder")
_hashable: dict[str, bool] = {}


def hash_in(bank: str, data: bytes) -> bytes | None:
    """H(data) in ``bank``, None for a bank hashlib cannot compute here."""
    name = "sm3" if bank == "sm3_256" else bank
    if _hashable.get(name) is False or bank.startswith("alg_0x"):
        return None
    try:
        digest = hashlib.new(name, data).digest()
    except ValueError:
        _hashable[name] = False
        return None
    _hashable[name] = True
    return digest


def grub_string(data: bytes) -> tuple[str, bytes, bytes] | None:
    """A GRUB string (GRUB_STRINGS): the BootFacts field, the text, and what was measured."""
    for prefix, (name, with_nul) in GRUB_STRINGS.items():
        if data.startswith(prefix):
            logged = data[len(prefix) :]
            text = logged[:-1] if logged.endswith(b"\x00") else logged
            return name, text, logged if with_nul else text
    return None


def systemd_text(event: ev.Event) -> tuple[str, tuple[bytes, ...]] | None:
    """systemd-boot / systemd-stub: the kernel command line in UTF-16LE on PCR 8 or 12,
    measured as logged (tpm2-tools/event-sd-boot-fedora37.bin event 23). The text and the
    byte strings its digest may be over."""
    data = event.data
    if event.pcr not in SYSTEMD_CMDLINE_PCRS or grub_string(data) is not None:
        return None
    measured: tuple[bytes, ...] = (data,)
    raw = data
    if len(data) % 2:
        if not data.endswith(b"\x00"):
            return None
        # Quirk: older systemd-boot logs its UTF-16 string one byte short of the measured
        # one: the data ends in a single NUL byte, the digest covers the whole two-byte
        # terminator (go-tpm-tools/arch-linux-workstation.bin and tpm2-tools/
        # event-arch-linux.bin, event 24; tpm2_eventlog warns about it).
        raw, measured = data[:-1], (data, data + b"\x00")
    if any(raw[1::2]):
        return None  # not UTF-16 of Latin-1 text (ASCII data would decode to CJK "text")
    text = raw.decode("utf-16-le").rstrip("\x00")
    return (text, measured) if text and text.isprintable() else None


def _ipl_measured(event: ev.Event) -> tuple[bytes, ...] | None:
    grub = grub_string(event.data)
    if grub is not None:
        return (grub[2],)
    systemd = systemd_text(event)
    return systemd[1] if systemd else None


def _variable_quirk(event: ev.Event) -> bytes | None:
    """What firmware measured instead of the whole UEFI_VARIABLE_DATA, where the corpus shows
    it; None for anything else."""
    if event.type not in (ev.EV_EFI_VARIABLE_BOOT, ev.EV_EFI_VARIABLE_AUTHORITY):
        return None
    try:
        guid, name, start, end = variable_layout(event.data)
    except ValueError:
        return None
    if (
        event.type == ev.EV_EFI_VARIABLE_BOOT
        and guid == EFI_GLOBAL_VARIABLE
        and _BOOT_OPTION.fullmatch(name)
    ):
        # Quirk (EDK2 and most firmware before PFP 1.05 added EV_EFI_VARIABLE_BOOT2):
        # Boot#### and BootOrder measured as their VariableData only (go-tpm-tools/
        # debian-10.bin events 8-10, rhel8-uefi.bin 9-12, keylime/binary_bios_measurements
        # 27-29, go-attestation/option_rom_eventlog 22-32, and most corpus logs).
        return event.data[start:end]
    if event.type == ev.EV_EFI_VARIABLE_AUTHORITY and len(event.data) == end + 6:
        # Quirk (shim, sizeof(EFI_VARIABLE_DATA_TREE) padding): six bytes follow the
        # structure and the digest covers all but the last (go-attestation/sb_cert_eventlog
        # events 12 and 14, go-tpm-tools/cos-85-amd-sev.bin and cos-93-amd-sev.bin 24 and
        # 42, debian-10.bin 23, tpm2-tools/event-postcode.bin 40 and 54).
        return event.data[:-1]
    return None


def measured_data(event: ev.Event) -> tuple[bytes, ...] | None:
    """The byte strings the event's digests may be the hash of (the PFP's, then any quirk
    accepted), or None when its digest is not defined over its data."""
    if event.type == ev.EV_IPL:
        return _ipl_measured(event)
    if event.type not in DATA_DIGEST_TYPES:
        return None
    quirk = _variable_quirk(event)
    return (event.data,) if quirk is None else (event.data, quirk)


def data_mismatch(event: ev.Event, banks: Iterable[str]) -> DataMismatch | None:
    """None when the event's data is what its digests are over (or they are not over its
    data); else what does not match. ``banks``: the log's banks, each of which an event that
    extends a PCR must carry (PFP 10.2.2) for its data to be checked in all of them."""
    if event.type == ev.EV_NO_ACTION:
        return None
    missing = tuple(b for b in banks if b not in event.digests and not b.startswith("alg_0x"))
    candidates = measured_data(event)
    if candidates is None and not missing:
        return None
    if missing:
        return DataMismatch(event.number, event.offset, event.pcr, event.type_name, missing, "", "")
    assert candidates is not None
    computed: dict[str, tuple[bytes | None, ...]] = {
        bank: tuple(hash_in(bank, c) for c in candidates) for bank in event.digests
    }
    for i in range(len(candidates)):
        if all(h[i] is None or h[i] == event.digests[b] for b, h in computed.items()):
            return None
    bad = tuple(b for b, h in computed.items() if h[0] is not None and h[0] != event.digests[b])
    first = computed[bad[0]][0] if bad else None
    return DataMismatch(
        event.number,
        event.offset,
        event.pcr,
        event.type_name,
        bad,
        event.digests[bad[0]].hex() if bad else "",
        first.hex() if first else "",
    )


# --- what an event measured, whatever its type says ---------------------------------------

# PFP 1.05 rev 23, 10.4.1 (EV_SEPARATOR): the data is 00000000, or FFFFFFFF where firmware
# met an error; the digest is its hash. Found by that digest, whatever the event's type says.
SEPARATOR_DATA = (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff")
# PCR 4 events that measure a text, not code: their digest is the hash of their data (PFP
# 10.4.1). A code image can be logged as such an event with its Authenticode byte stream as
# data and still pass that check, so the text must also be short printable ASCII, which no
# PE image is (its headers hold NUL bytes). The PFP's strings are under 64 characters.
TEXT_EVENT_TYPES = frozenset({ev.EV_EFI_ACTION, ev.EV_ACTION, ev.EV_OMIT_BOOT_DEVICE_EVENTS})
MAX_TEXT_EVENT = 256
_separator_digests: dict[str, tuple[bytes, ...]] = {}


def _separator_digests_of(bank: str) -> tuple[bytes, ...]:
    """H(00000000) and H(FFFFFFFF) in ``bank``; empty for a bank hashlib cannot compute here
    (no quote carries one: verifier.tpm.constants.HASH_BY_NAME)."""
    digests = _separator_digests.get(bank)
    if digests is None:
        hashes = [hash_in(bank, data) for data in SEPARATOR_DATA]
        digests = tuple(h for h in hashes if h is not None)
        _separator_digests[bank] = digests
    return digests


def separator_in_any_bank(event: ev.Event) -> bool:
    """Whether some digest of the event is a separator's (PFP 10.4.1), whatever its type:
    where a separator ends what may be believed (PCR 7), the quoted bank decides, and the
    device chooses the others."""
    return any(d in _separator_digests_of(b) for b, d in event.digests.items())


def separator_in_every_bank(event: ev.Event) -> bool:
    """Whether the event extended one separator value in every bank it carries that can be
    computed here (at least one), whatever its type: where being a separator exempts an
    event from a fact (PCR 4), whichever bank is quoted must show it."""
    for i in range(len(SEPARATOR_DATA)):
        checked = 0
        for bank, digest in event.digests.items():
            digests = _separator_digests_of(bank)
            if not digests:
                continue
            if digest != digests[i]:
                break
            checked += 1
        else:
            if checked:
                return True
    return False


def measured_no_code(event: ev.Event, banks: Iterable[str]) -> bool:
    """A PCR 4 event that is no boot application: a separator in every bank, or an action
    whose digest is the hash, in every bank, of its data, a short printable text
    (TEXT_EVENT_TYPES). Any other event on PCR 4 extended something that may be code."""
    if separator_in_every_bank(event):
        return True
    data = event.data
    if event.type not in TEXT_EVENT_TYPES or not 0 < len(data) <= MAX_TEXT_EVENT:
        return False
    if not (data.isascii() and data.decode("ascii").isprintable()):
        return False
    computable = any(hash_in(b, data) is not None for b in event.digests)
    return computable and data_mismatch(event, banks) is None
