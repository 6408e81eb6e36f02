"""Facts an operator recognizes, read from a parsed event log. Pure.

Secure Boot state and its databases (UEFI_VARIABLE_DATA, PFP 10.4.4; EFI_SIGNATURE_LIST,
UEFI 2.10 32.4.1), boot applications and their digests, the kernel command line and GRUB
commands (GRUB and systemd-boot measure them as EV_IPL), separators, S-CRTM version,
StartupLocality and H-CRTM.

Event data is the device's word; only the digests went into the TPM. So (issue 7):

1. Every fact is tagged with the PCR its event extended (``Contribution``); the verifier folds
   in only those of PCRs the quote covers and the log replays to (``fold``, called through
   ``verifier.measured_boot.facts_of``).
2. Where the TCG PC Client Platform Firmware Profile (PFP 1.05 rev 23, 10.4.1 and 3.3.4)
   defines an event's digest over its data, the data is hashed in every bank the event
   carries and compared (``data_mismatch``); an event that fails gives no fact. Real firmware
   quirks are accepted narrowly below, each with the corpus log that shows it
   (``shared/corpus/eventlogs/...``).
3. Secure Boot policy facts come only from EV_EFI_VARIABLE_DRIVER_CONFIG events on PCR 7
   before PCR 7's EV_SEPARATOR (PFP 3.3.4.8): the OS can extend PCR 7 after boot, so a later
   "SecureBoot = 1" event would replay and hash correctly and still be a lie.

Anything that does not parse is reported in ``problems``, never raised.
"""

from __future__ import annotations

import hashlib
import re
import struct
import uuid
import warnings
from collections.abc import Container, Iterable
from dataclasses import dataclass, field, replace

from cryptography import x509

from verifier.tpm import eventlog as ev

EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
EFI_CERT_X509 = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
EFI_CERT_SHA256 = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")
SECURE_BOOT_DBS = ("PK", "KEK", "db", "dbx")

# PFP 3.3.4: PCR 7 holds the Secure Boot policy (SecureBoot, PK, KEK, db, dbx); PCR 4 the
# boot applications (EV_EFI_BOOT_SERVICES_APPLICATION). The default reference rules
# (verifier.refs: secure_boot, dbx_contains, boot_applications) read facts from these, so the
# default challenge (verifier.config.AttestationConfig.pcrs) must quote them.
SECURE_BOOT_PCR = 7
BOOT_APPLICATION_PCR = 4
RULE_PCRS = frozenset({BOOT_APPLICATION_PCR, SECURE_BOOT_PCR})
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


@dataclass(frozen=True)
class SignatureEntry:
    kind: str  # "x509", "sha256" or the type GUID
    owner: str
    sha256: str  # of the certificate DER, or the listed hash itself
    subject: str = ""


@dataclass(frozen=True)
class BootApplication:
    pcr: int
    digests: dict[str, str]
    path: str


@dataclass(slots=True)
class BootFacts:
    startup_locality: int | None = None
    hcrtm: bool = False
    scrtm_version: str | None = None
    secure_boot: bool | None = None
    secureboot_variable: str | None = None  # hex of the measured data, "" when empty
    setup_mode: bool | None = None
    databases: dict[str, list[SignatureEntry]] = field(default_factory=dict)
    boot_applications: list[BootApplication] = field(default_factory=list)
    kernel_cmdlines: list[str] = field(default_factory=list)
    grub_commands: list[str] = field(default_factory=list)
    separators: dict[int, str] = field(default_factory=dict)  # PCR -> "ok" or "error"
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Contribution:
    """One fact an event claims, tagged with the PCR whose replay vouches for it. ``name`` is
    a BootFacts field: a list field gets ``value`` appended, a dict field ``value`` at
    ``key``, any other field is set (a later event overrides an earlier one)."""

    pcr: int
    name: str
    value: object
    key: object = None


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


def _utf16(data: bytes) -> str:
    return data.decode("utf-16-le", errors="replace").rstrip("\x00")


def _text(data: bytes) -> str | None:
    """Printable text in UTF-16LE or ASCII, else None."""
    for codec in ("utf-16-le", "ascii"):
        raw = data
        if codec == "utf-16-le" and len(raw) % 2:
            if not raw.endswith(b"\x00"):
                continue
            raw = raw[:-1]  # a UTF-16 string logged one byte short (see _systemd_text)
        try:
            text = raw.decode(codec).rstrip("\x00")
        except UnicodeDecodeError:
            continue
        if text and text.isprintable():
            return text
    return None


def _variable_layout(data: bytes) -> tuple[uuid.UUID, str, int, int]:
    """UEFI_VARIABLE_DATA (PFP 10.4.4): GUID, name, and where VariableData starts and ends."""
    if len(data) < 32:
        raise ValueError("UEFI_VARIABLE_DATA shorter than its header")
    guid = uuid.UUID(bytes_le=data[:16])
    name_len, data_len = struct.unpack_from("<QQ", data, 16)
    end_name = 32 + 2 * name_len
    if end_name + data_len > len(data):
        raise ValueError("UEFI_VARIABLE_DATA lengths exceed the event")
    return guid, _utf16(data[32:end_name]), end_name, end_name + data_len


def _variable(event: ev.Event) -> tuple[uuid.UUID, str, bytes]:
    guid, name, start, end = _variable_layout(event.data)
    return guid, name, event.data[start:end]


def signature_lists(data: bytes) -> list[SignatureEntry]:
    """Entries of a sequence of EFI_SIGNATURE_LIST (UEFI 2.10, 32.4.1)."""
    out: list[SignatureEntry] = []
    pos = 0
    while pos < len(data):
        if pos + 28 > len(data):
            raise ValueError(f"EFI_SIGNATURE_LIST header truncated at byte {pos}")
        sig_type = uuid.UUID(bytes_le=data[pos : pos + 16])
        list_size, header_size, sig_size = struct.unpack_from("<III", data, pos + 16)
        if list_size < 28 + header_size or pos + list_size > len(data) or sig_size < 16:
            raise ValueError(f"EFI_SIGNATURE_LIST at byte {pos} has inconsistent sizes")
        body = data[pos + 28 + header_size : pos + list_size]
        for i in range(0, len(body) - sig_size + 1, sig_size):
            owner = str(uuid.UUID(bytes_le=body[i : i + 16]))
            payload = body[i + 16 : i + sig_size]
            if sig_type == EFI_CERT_X509:
                try:
                    with warnings.catch_warnings():  # firmware certificates are often odd
                        warnings.simplefilter("ignore")
                        subject = x509.load_der_x509_certificate(payload).subject.rfc4514_string()
                except ValueError:
                    subject = "<unparsable certificate>"
                out.append(
                    SignatureEntry("x509", owner, hashlib.sha256(payload).hexdigest(), subject)
                )
            elif sig_type == EFI_CERT_SHA256:
                out.append(SignatureEntry("sha256", owner, payload.hex()))
            else:
                out.append(
                    SignatureEntry(str(sig_type), owner, hashlib.sha256(payload).hexdigest())
                )
        pos += list_size
    return out


def _device_path_file(data: bytes) -> str:
    """The file path nodes (type 4, subtype 4) of an EFI device path, joined."""
    parts = []
    pos = 0
    while pos + 4 <= len(data):
        kind, sub, length = data[pos], data[pos + 1], struct.unpack_from("<H", data, pos + 2)[0]
        if length < 4:
            break
        if kind == 4 and sub == 4:
            parts.append(_utf16(data[pos + 4 : pos + length]))
        if kind == 0x7F:
            break
        pos += length
    return "".join(parts)


def _boot_application(event: ev.Event) -> BootApplication:
    # UEFI_IMAGE_LOAD_EVENT (PFP 10.4.3): location u64, length u64, link u64, dp length u64.
    path = ""
    if len(event.data) >= 32:
        (dp_len,) = struct.unpack_from("<Q", event.data, 24)
        path = _device_path_file(event.data[32 : 32 + dp_len])
    return BootApplication(event.pcr, {b: d.hex() for b, d in event.digests.items()}, path)


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


def _hash(bank: str, data: bytes) -> bytes | None:
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


def _grub_string(data: bytes) -> tuple[str, bytes, bytes] | None:
    """A GRUB string (GRUB_STRINGS): the BootFacts field, the text, and what was measured."""
    for prefix, (name, with_nul) in GRUB_STRINGS.items():
        if data.startswith(prefix):
            logged = data[len(prefix) :]
            text = logged[:-1] if logged.endswith(b"\x00") else logged
            return name, text, logged if with_nul else text
    return None


def _systemd_text(event: ev.Event) -> tuple[str, tuple[bytes, ...]] | None:
    """systemd-boot / systemd-stub: the kernel command line in UTF-16LE on PCR 8 or 12,
    measured as logged (tpm2-tools/event-sd-boot-fedora37.bin event 23). The text and the
    byte strings its digest may be over."""
    data = event.data
    if event.pcr not in SYSTEMD_CMDLINE_PCRS or _grub_string(data) is not None:
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
    grub = _grub_string(event.data)
    if grub is not None:
        return (grub[2],)
    systemd = _systemd_text(event)
    return systemd[1] if systemd else None


def _variable_quirk(event: ev.Event) -> bytes | None:
    """What firmware measured instead of the whole UEFI_VARIABLE_DATA, where the corpus shows
    it; None for anything else."""
    if event.type not in (ev.EV_EFI_VARIABLE_BOOT, ev.EV_EFI_VARIABLE_AUTHORITY):
        return None
    try:
        guid, name, start, end = _variable_layout(event.data)
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
        bank: tuple(_hash(bank, c) for c in candidates) for bank in event.digests
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


# --- facts ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Scanner:
    """Reads the facts of a log event by event, in order; kept between the parts of a log."""

    check_digests: bool = True
    seen_pcr0: bool = False
    pcr7_separated: bool = False

    def copy(self) -> Scanner:
        return replace(self)

    def scan(
        self, event: ev.Event, banks: Iterable[str]
    ) -> tuple[list[Contribution], DataMismatch | None]:
        """The facts the event gives (none when its data fails its digests) and the
        mismatch, if any."""
        mismatch = data_mismatch(event, banks) if self.check_digests else None
        try:
            facts = [] if mismatch else self._facts(event)
        except (ValueError, IndexError, struct.error) as exc:
            facts = [_problem(event, str(exc))]
        if event.type != ev.EV_NO_ACTION:
            self.seen_pcr0 = self.seen_pcr0 or event.pcr == 0
            if event.type == ev.EV_SEPARATOR and event.pcr == SECURE_BOOT_PCR:
                self.pcr7_separated = True
        return facts, mismatch

    def _facts(self, event: ev.Event) -> list[Contribution]:
        pcr, data, kind = event.pcr, event.data, event.type
        if kind == ev.EV_NO_ACTION:
            # PFP 10.4.5.3: only before any PCR 0 measurement does it set PCR 0's start.
            if pcr == 0 and not self.seen_pcr0 and data.startswith(ev.STARTUP_LOCALITY_SIGNATURE):
                return [
                    Contribution(0, "startup_locality", data[len(ev.STARTUP_LOCALITY_SIGNATURE)])
                ]
            return []
        out = []
        if pcr == 0 and not self.seen_pcr0 and kind == ev.EV_EFI_HCRTM_EVENT:
            out.append(Contribution(0, "hcrtm", True))
        if kind == ev.EV_S_CRTM_VERSION:
            out.append(Contribution(pcr, "scrtm_version", _text(data) or data.hex()))
        elif kind == ev.EV_EFI_VARIABLE_DRIVER_CONFIG:
            out.extend(self._variable_facts(event))
        elif kind == ev.EV_EFI_BOOT_SERVICES_APPLICATION:
            out.append(Contribution(pcr, "boot_applications", _boot_application(event)))
        elif kind == ev.EV_IPL:
            out.extend(_ipl_facts(event))
        elif kind == ev.EV_SEPARATOR:
            ok = data in (b"\x00\x00\x00\x00", b"")
            out.append(Contribution(pcr, "separators", "ok" if ok else "error", pcr))
        return out

    def _variable_facts(self, event: ev.Event) -> list[Contribution]:
        guid, name, value = _variable(event)
        secure_boot = guid == EFI_GLOBAL_VARIABLE and name in ("SecureBoot", "SetupMode")
        database = name in SECURE_BOOT_DBS and guid in (
            EFI_GLOBAL_VARIABLE,
            EFI_IMAGE_SECURITY_DATABASE,
        )
        if not (secure_boot or database):
            return []
        pcr = event.pcr
        if pcr != SECURE_BOOT_PCR or self.pcr7_separated:
            where = f"PCR {pcr}" if pcr != SECURE_BOOT_PCR else "PCR 7 after its separator"
            return [_problem(event, f"Secure Boot variable {name} measured in {where}: ignored")]
        if name == "SecureBoot":
            return [
                Contribution(pcr, "secureboot_variable", value.hex()),
                Contribution(pcr, "secure_boot", value[:1] == b"\x01" if value else None),
            ]
        if name == "SetupMode":
            return [Contribution(pcr, "setup_mode", value[:1] == b"\x01" if value else None)]
        return [Contribution(pcr, "databases", signature_lists(value), name)]


def _problem(event: ev.Event, what: str) -> Contribution:
    text = f"event {event.number} at byte {event.offset} ({event.type_name}): {what}"
    return Contribution(event.pcr, "problems", text)


def _ipl_facts(event: ev.Event) -> list[Contribution]:
    grub = _grub_string(event.data)
    if grub is not None:
        name, text, _ = grub
        if not name:
            return []
        return [Contribution(event.pcr, name, text.decode("utf-8", errors="replace"))]
    systemd = _systemd_text(event)
    return [Contribution(event.pcr, "kernel_cmdlines", systemd[0])] if systemd else []


def fold(contributions: Iterable[Contribution], pcrs: Container[int] | None = None) -> BootFacts:
    """BootFacts from contributions in log order, those of ``pcrs`` only (None: all)."""
    facts = BootFacts()
    for c in contributions:
        if pcrs is not None and c.pcr not in pcrs:
            continue
        current = getattr(facts, c.name)
        if isinstance(current, list):
            current.append(c.value)
        elif isinstance(current, dict):
            current[c.key] = c.value
        else:
            setattr(facts, c.name, c.value)
    return facts


def boot_facts(log: ev.EventLog, *, check_digests: bool = False) -> BootFacts:
    """What a whole log claims, every PCR (for display: ``devtrust eventlog replay``, and
    conformance). Event data is not checked against the digests unless ``check_digests``;
    the appraisal takes facts only through ``verifier.measured_boot.facts_of``."""
    scanner = Scanner(check_digests=check_digests)
    contributions: list[Contribution] = []
    for event in log.events:
        contributions.extend(scanner.scan(event, log.banks)[0])
    return fold(contributions)
