"""TCG PC Client event logs: parse, replay, extract boot facts. Pure.

Formats (TCG PC Client Platform Firmware Profile, PFP, rev 1.05, section 10):
- legacy (TCG 1.2 style, SHA-1 only): TCG_PCClientPCREvent records throughout;
- crypto-agile: a first TCG_PCClientPCREvent whose data is the ``Spec ID Event03``
  (TCG_EfiSpecIdEvent, PFP 10.4.5.1) naming the banks and digest sizes, then TCG_PCR_EVENT2
  records (PFP 10.2.2) with one digest per listed algorithm.
All integers in the log are little-endian (unlike TPM structures).

Replay (PFP 10.4.5.3 and 3.3.4.5): each PCR starts at zero, except PCR 0 when an EV_NO_ACTION
``StartupLocality`` event sets its last byte to the locality, or when the first PCR 0 event
is EV_EFI_HCRTM_EVENT (PCR 0 starts at 00..04). EV_NO_ACTION events are never extended. Every
other event extends ``PCR = H(PCR || digest)`` with the digest *as logged*: a digest that does
not match the event data still went into the TPM; recomputing it is a separate check.

A truncated or malformed log raises ``MalformedInput`` naming the byte offset; more records
than a caller's ``max_events`` raise ``LimitExceeded`` before the rest is read.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from devtrust.verifier.errors import LimitExceeded, MalformedInput
from devtrust.verifier.tpm.constants import DIGEST_SIZES, HASH_NAMES

EV_PREBOOT_CERT = 0x0
EV_POST_CODE = 0x1
EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_ACTION = 0x5
EV_EVENT_TAG = 0x6
EV_S_CRTM_CONTENTS = 0x7
EV_S_CRTM_VERSION = 0x8
EV_CPU_MICROCODE = 0x9
EV_PLATFORM_CONFIG_FLAGS = 0xA
EV_TABLE_OF_DEVICES = 0xB
EV_COMPACT_HASH = 0xC
EV_IPL = 0xD
EV_IPL_PARTITION_DATA = 0xE
EV_NONHOST_CODE = 0xF
EV_NONHOST_CONFIG = 0x10
EV_NONHOST_INFO = 0x11
EV_OMIT_BOOT_DEVICE_EVENTS = 0x12
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
EV_EFI_GPT_EVENT = 0x80000006
EV_EFI_ACTION = 0x80000007
EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
EV_EFI_HANDOFF_TABLES = 0x80000009
EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
EV_EFI_HANDOFF_TABLES2 = 0x8000000B
EV_EFI_VARIABLE_BOOT2 = 0x8000000C
EV_EFI_GPT_EVENT2 = 0x8000000D
EV_EFI_HCRTM_EVENT = 0x80000010
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
EV_EFI_SPDM_FIRMWARE_BLOB = 0x800000E1
EV_EFI_SPDM_FIRMWARE_CONFIG = 0x800000E2

EVENT_NAMES = {v: k for k, v in list(globals().items()) if k.startswith("EV_")}

# TPM_ALG_ID -> (bank name, digest size) for banks outside verifier.tpm.constants.
_EXTRA_BANKS = {0x0012: ("sm3_256", 32)}
SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"
MAX_EVENT_SIZE = 16 * 1024 * 1024
MAX_PCR = 23


def _bank(alg: int) -> str | None:
    if alg in HASH_NAMES:
        return HASH_NAMES[alg]
    extra = _EXTRA_BANKS.get(alg)
    return extra[0] if extra else None


@dataclass(frozen=True, slots=True)
class Event:
    number: int
    offset: int
    pcr: int
    type: int
    digests: Mapping[str, bytes]
    data: bytes

    @property
    def type_name(self) -> str:
        return EVENT_NAMES.get(self.type, f"0x{self.type:08x}")


@dataclass(frozen=True)
class EventLog:
    format: str  # "crypto-agile" or "legacy-sha1"
    banks: Mapping[str, int]  # bank name -> digest size, in Spec ID order
    events: tuple[Event, ...]  # every record, the Spec ID header included
    end: int  # byte offset after the last record

    def type_counts(self) -> dict[str, int]:
        counts = Counter(e.type for e in self.events)
        return {f"0x{t:08x}": n for t, n in sorted(counts.items())}


class _Cursor:
    """Reads ``buf``; offsets in messages and events are ``base`` + position, so that an
    incremental part reports offsets in the whole log."""

    __slots__ = ("base", "buf", "pos")

    def __init__(self, buf: bytes, pos: int, base: int = 0) -> None:
        self.buf = buf
        self.pos = pos
        self.base = base

    def take(self, n: int, what: str, start: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise MalformedInput(
                f"event log truncated at byte {self.base + self.pos} reading {what} of the "
                f"event at byte {start} (need {n} bytes, {len(self.buf) - self.pos} left)"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str, start: int) -> int:
        return int(struct.unpack("<H", self.take(2, what, start))[0])

    def u32(self, what: str, start: int) -> int:
        return int(struct.unpack("<I", self.take(4, what, start))[0])


def _event_data(c: _Cursor, start: int) -> bytes:
    size = c.u32("eventSize", start)
    if size > MAX_EVENT_SIZE:
        raise MalformedInput(f"event at byte {start}: eventSize {size} is implausible")
    return c.take(size, "event data", start)


def _check_pcr(pcr: int, type_: int, start: int) -> None:
    # EV_NO_ACTION records are informational and never extended: Windows logs end with one
    # on PCR 0xFFFFFFFF. Anything that claims to be measured must name a real PCR.
    if pcr > MAX_PCR and type_ != EV_NO_ACTION:
        raise MalformedInput(f"event at byte {start}: PCR index {pcr} is above {MAX_PCR}")


def _spec_id_length(data: bytes, start: int) -> int:
    """Length of a TCG_EfiSpecIdEvent as its own fields describe it (vendorInfo included)."""
    c = _Cursor(data, 24)
    count = c.u32("numberOfAlgorithms", start)
    c.take(4 * count, "digestSizes", start)
    vendor = c.take(1, "vendorInfoSize", start)[0]
    return c.pos + vendor


def _spec_id_banks(data: bytes, start: int) -> dict[str, int]:
    """Banks from TCG_EfiSpecIdEvent (PFP 10.4.5.1)."""
    c = _Cursor(data, 16)
    c.take(8, "platformClass/version", start)  # platformClass, minor, major, errata, uintnSize
    count = c.u32("numberOfAlgorithms", start)
    if not 0 < count <= 16:
        raise MalformedInput(f"Spec ID event at byte {start}: {count} algorithms")
    banks: dict[str, int] = {}
    for _ in range(count):
        alg = c.u16("algorithmId", start)
        size = c.u16("digestSize", start)
        name = _bank(alg) or f"alg_0x{alg:04x}"
        # A bank the log declares decides how digests are read and how PCRs start: its
        # size must be what the algorithm makes (a size of 0 crashed the replay).
        known = DIGEST_SIZES.get(alg) or (_EXTRA_BANKS[alg][1] if alg in _EXTRA_BANKS else None)
        if (known is not None and size != known) or not 0 < size <= 64:
            raise MalformedInput(
                f"Spec ID event at byte {start}: algorithm 0x{alg:04x} ({name}) has digestSize "
                f"{size}" + (f", not {known}" if known is not None else "")
            )
        if name in banks:
            raise MalformedInput(f"Spec ID event at byte {start}: bank {name} is listed twice")
        banks[name] = size
    return banks


def _legacy_record(c: _Cursor, number: int) -> Event:
    start = c.base + c.pos
    pcr = c.u32("pcrIndex", start)
    type_ = c.u32("eventType", start)
    _check_pcr(pcr, type_, start)
    digest = c.take(20, "SHA-1 digest", start)
    return Event(number, start, pcr, type_, {"sha1": digest}, _event_data(c, start))


def _agile_record(
    c: _Cursor,
    number: int,
    banks: Mapping[str, int],
    ids: Mapping[int, str],
) -> Event:
    start = c.base + c.pos
    pcr = c.u32("pcrIndex", start)
    type_ = c.u32("eventType", start)
    _check_pcr(pcr, type_, start)
    count = c.u32("digests.count", start)
    if count > len(banks):
        raise MalformedInput(
            f"event at byte {start}: {count} digests for a log of {len(banks)} banks"
        )
    digests: dict[str, bytes] = {}
    for _ in range(count):
        alg = c.u16("digest algorithm", start)
        name = ids.get(alg)
        if name is None:
            raise MalformedInput(
                f"event at byte {start}: digest algorithm 0x{alg:04x} is not in the Spec ID event"
            )
        digests[name] = c.take(banks[name], f"{name} digest", start)
    return Event(number, start, pcr, type_, digests, _event_data(c, start))


def _bank_ids(banks: Mapping[str, int]) -> dict[int, str]:
    ids = {alg: name for alg, name in HASH_NAMES.items() if name in banks}
    ids.update({alg: n for alg, (n, _) in _EXTRA_BANKS.items() if n in banks})
    for name in banks:
        if name.startswith("alg_0x"):
            ids[int(name[6:], 16)] = name
    return ids


def parse(
    data: bytes,
    *,
    offset: int = 0,
    banks: Mapping[str, int] | None = None,
    base: int = 0,
    first: int = 0,
    max_events: int | None = None,
) -> EventLog:
    """Parse a whole log, or (with ``banks`` from an earlier parse) the records from
    ``offset`` on: the incremental part an agent sends once the verifier has the beginning.
    ``base`` is where ``data`` starts in the whole log (for offsets in events and errors),
    ``first`` the number of its first record there. More than ``max_events`` records (the
    Spec ID header included) raise ``LimitExceeded`` as soon as the next one starts, so a
    flood costs no more than the limit."""
    if banks is None and offset == 0:
        if not data:
            raise MalformedInput("event log is empty: no record at byte 0")
        c = _Cursor(data, 0)
        header = _legacy_record(c, 0)
        if header.type == EV_NO_ACTION and header.data.startswith(SPEC_ID_SIGNATURE):
            # Quirk accepted (tpm2-tools' specid-vendordata fixture, parsed by tpm2_eventlog):
            # an eventSize that leaves out vendorInfo. The structure says how long it is.
            data_start = c.pos - len(header.data)
            whole = _spec_id_length(data[data_start:], header.offset)
            if whole > len(header.data):
                c.pos = data_start
                header = replace(header, data=c.take(whole, "Spec ID vendorInfo", header.offset))
            banks = _spec_id_banks(header.data, header.offset)
            fmt, events = "crypto-agile", [header]
        else:
            banks, fmt, c.pos, events = {"sha1": 20}, "legacy-sha1", 0, []
    elif banks is None:
        raise ValueError("an incremental parse needs the banks of the log's Spec ID event")
    else:
        fmt = "legacy-sha1" if dict(banks) == {"sha1": 20} else "crypto-agile"
        c, events = _Cursor(data, offset, base), []
    ids = _bank_ids(banks)
    limit = len(data) if max_events is None else max_events
    if len(events) > limit:
        raise LimitExceeded(f"more than {limit} records by byte {c.base + c.pos}")
    while c.pos < len(data):
        number = first + len(events)
        if len(events) >= limit:
            raise LimitExceeded(f"more than {limit} records by byte {c.base + c.pos}")
        if fmt == "legacy-sha1":
            events.append(_legacy_record(c, number))
        else:
            events.append(_agile_record(c, number, banks, ids))
    return EventLog(format=fmt, banks=dict(banks), events=tuple(events), end=c.base + c.pos)


def _hash(bank: str, data: bytes) -> bytes:
    return hashlib.new("sm3" if bank == "sm3_256" else bank, data).digest()


@dataclass
class ReplayState:
    """PCR values per bank after the events seen so far (kept between incremental parts)."""

    pcrs: dict[str, dict[int, bytes]] = field(default_factory=dict)
    seen_pcr0: bool = False
    # PCRs some event extended (a StartupLocality start value alone is no measurement).
    measured: set[int] = field(default_factory=set)


def replay(
    events: Iterable[Event], banks: Mapping[str, int], state: ReplayState | None = None
) -> ReplayState:
    state = state or ReplayState()
    for event in events:
        if event.type == EV_NO_ACTION:
            if (
                event.pcr == 0
                and event.data.startswith(STARTUP_LOCALITY_SIGNATURE)
                and (not state.seen_pcr0)
            ):
                locality = event.data[len(STARTUP_LOCALITY_SIGNATURE) :][:1]
                for bank, size in banks.items():
                    state.pcrs.setdefault(bank, {})[0] = bytes(size - 1) + locality
            continue
        if event.pcr == 0 and not state.seen_pcr0 and event.type == EV_EFI_HCRTM_EVENT:
            for bank, size in banks.items():
                state.pcrs.setdefault(bank, {})[0] = bytes(size - 1) + b"\x04"
        if event.pcr == 0:
            state.seen_pcr0 = True
        state.measured.add(event.pcr)
        for bank, digest in event.digests.items():
            if bank.startswith("alg_0x"):
                continue  # an algorithm we cannot compute: reported, not replayed
            values = state.pcrs.setdefault(bank, {})
            current = values.get(event.pcr, bytes(banks[bank]))
            values[event.pcr] = _hash(bank, current + digest)
    return state


def replay_log(log: EventLog) -> dict[str, dict[int, bytes]]:
    """Replay a whole log: bank -> PCR -> value, for the PCRs the log measures."""
    state = replay(log.events, log.banks)
    return {
        bank: {i: v for i, v in sorted(state.pcrs.get(bank, {}).items()) if i in state.measured}
        for bank in log.banks
        if not bank.startswith("alg_0x")
    }
