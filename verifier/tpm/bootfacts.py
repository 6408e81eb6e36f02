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
   carries and compared (``verifier.tpm.eventdata.data_mismatch``); an event that fails
   gives no fact. Real firmware quirks are accepted narrowly there, each with the corpus log
   that shows it.
3. Secure Boot policy facts come only from PCR 7 before its separator (PFP 3.3.4.8): the OS
   can extend PCR 7 after boot, so a later "SecureBoot = 1" event would replay and hash
   correctly and still be a lie. Such a late variable is an ``Anomaly``, and so is a variable
   measured twice before the separator (then it reads as not measured).
4. The event type is not measured (PFP 10.2.2: only the digest is extended), so a device can
   relabel any event and replay still matches. A type never exempts an event from a fact that
   a reference rule reads (``verifier.refs``: Secure Boot, dbx, boot applications): the PCR 7
   separator is found by its digest (``separator_in_any_bank``), and on PCR 4 every event is
   a boot application but a separator (by digest) and a short text its digest is the hash of
   (``measured_no_code``). Facts nothing decides on (command lines, GRUB commands, S-CRTM
   version, the ``separators`` map) stay type-based: a relabel can hide or, from text whose
   digest still checks, add one; a rule that reads them must first apply the same principle.
   StartupLocality and H-CRTM are type-based in replay too (PFP 10.4.5.3), so a relabel
   changes PCR 0's replay and PCR 0 no longer verifies.

Anything that does not parse is reported in ``problems``, never raised.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
import warnings
from collections.abc import Container, Iterable
from dataclasses import dataclass, field, replace

from cryptography import x509

from devtrust.verifier.tpm import eventlog as ev
from devtrust.verifier.tpm.eventdata import (
    EFI_GLOBAL_VARIABLE,
    DataMismatch,
    data_mismatch,
    grub_string,
    measured_data,
    measured_no_code,
    separator_in_any_bank,
    systemd_text,
    utf16,
    variable_layout,
)

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
# Anomaly kinds (Finding ids eventlog.<kind>, see verifier.measured_boot.fact_findings).
LATE_SECURE_BOOT_VARIABLE = "late_secure_boot_variable"
DUPLICATE_SECURE_BOOT_VARIABLE = "duplicate_secure_boot_variable"


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


@dataclass(frozen=True)
class Anomaly:
    """An event against the PFP's order for the Secure Boot policy: a variable measured in
    PCR 7 after its separator, or a second time before it."""

    kind: str  # LATE_SECURE_BOOT_VARIABLE or DUPLICATE_SECURE_BOOT_VARIABLE
    number: int
    offset: int
    pcr: int
    type_name: str
    variable: str


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
    anomalies: list[Anomaly] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Contribution:
    """One fact an event claims, tagged with the PCR whose replay vouches for it. ``name`` is
    a BootFacts field: a list field gets ``value`` appended, a dict field ``value`` at
    ``key`` (``None`` removes ``key``), any other field is set (a later event overrides an
    earlier one)."""

    pcr: int
    name: str
    value: object
    key: object = None


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


def _variable(event: ev.Event) -> tuple[uuid.UUID, str, bytes]:
    guid, name, start, end = variable_layout(event.data)
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
                # Device data: whatever cryptography raises for it (ValueError, InvalidVersion,
                # a TypeError for a BitString name value under another OID than
                # x500UniqueIdentifier, ...) the entry is listed, as unparsable.
                except Exception:  # noqa: BLE001
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
            parts.append(utf16(data[pos + 4 : pos + length]))
        if kind == 0x7F:
            break
        pos += length
    return "".join(parts)


def _image_path(data: bytes) -> str | None:
    """The file path of a UEFI_IMAGE_LOAD_EVENT (PFP 10.4.3: location u64, length u64, link
    u64, device path length u64, device path), "" when it names none; None when the data is
    not one."""
    if len(data) < 32:
        return None
    (dp_len,) = struct.unpack_from("<Q", data, 24)
    if 32 + dp_len > len(data):
        return None
    return _device_path_file(data[32 : 32 + dp_len])


def _boot_application(event: ev.Event) -> BootApplication:
    path = _image_path(event.data)
    if path is None:
        path = f"<{event.type_name} event {event.number}>"
    return BootApplication(event.pcr, {b: d.hex() for b, d in event.digests.items()}, path)


# --- facts ----------------------------------------------------------------------------------


def _policy_variable(event: ev.Event) -> tuple[str, bytes] | None:
    """The Secure Boot policy variable (PFP 3.3.4.8: SecureBoot, SetupMode, PK, KEK, db, dbx)
    the event's data names as UEFI_VARIABLE_DATA, and its value; None for any other data."""
    try:
        guid, name, value = _variable(event)
    except ValueError:
        return None
    if guid == EFI_GLOBAL_VARIABLE and name in ("SecureBoot", "SetupMode", "PK", "KEK"):
        return name, value
    if name in ("db", "dbx") and guid in (EFI_GLOBAL_VARIABLE, EFI_IMAGE_SECURITY_DATABASE):
        return name, value
    return None


@dataclass(slots=True)
class Scanner:
    """Reads the facts of a log event by event, in order; kept between the parts of a log."""

    check_digests: bool = True
    seen_pcr0: bool = False
    pcr7_separated: bool = False
    # Secure Boot policy variables measured in PCR 7 before its separator, so far.
    pcr7_variables: frozenset[str] = frozenset()

    def copy(self) -> Scanner:
        return replace(self)

    def scan(
        self, event: ev.Event, banks: Iterable[str]
    ) -> tuple[list[Contribution], DataMismatch | None]:
        """The facts the event gives (none taken from data that fails its digests) and the
        mismatch, if any."""
        mismatch = data_mismatch(event, banks) if self.check_digests else None
        facts: list[Contribution] = []
        try:
            if event.type != ev.EV_NO_ACTION:
                # 1. Facts that a relabelled type must not hide, whatever the data check says.
                if event.pcr == BOOT_APPLICATION_PCR:
                    if not measured_no_code(event, banks):
                        facts.append(
                            Contribution(event.pcr, "boot_applications", _boot_application(event))
                        )
                elif event.pcr == SECURE_BOOT_PCR:
                    facts.extend(self._policy_facts(event, mismatch))
            # 2. Facts read from data, which must hash to the event's digests.
            if not mismatch:
                facts.extend(self._facts(event))
        except (ValueError, IndexError, struct.error) as exc:
            facts.append(_problem(event, str(exc)))
        if event.type != ev.EV_NO_ACTION:
            self.seen_pcr0 = self.seen_pcr0 or event.pcr == 0
            if event.pcr == SECURE_BOOT_PCR and not self.pcr7_separated:
                self.pcr7_separated = separator_in_any_bank(event)
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
        elif kind == ev.EV_EFI_VARIABLE_DRIVER_CONFIG and pcr != SECURE_BOOT_PCR:
            _variable(event)  # raises, reported as a problem, when it does not parse
            policy = _policy_variable(event)
            if policy is not None:
                what = f"Secure Boot variable {policy[0]} measured in PCR {pcr}: ignored"
                out.append(_problem(event, what))
        elif kind == ev.EV_EFI_BOOT_SERVICES_APPLICATION and pcr != BOOT_APPLICATION_PCR:
            out.append(Contribution(pcr, "boot_applications", _boot_application(event)))
        elif kind == ev.EV_IPL:
            out.extend(_ipl_facts(event))
        elif kind == ev.EV_SEPARATOR:
            # Display only (nothing decides on it); PCR 7's separator is found by its digest.
            ok = data in (b"\x00\x00\x00\x00", b"")
            out.append(Contribution(pcr, "separators", "ok" if ok else "error", pcr))
        return out

    def _policy_facts(self, event: ev.Event, mismatch: DataMismatch | None) -> list[Contribution]:
        """PCR 7 (PFP 3.3.4.8): a Secure Boot policy variable gives its fact when it is
        measured once, before the separator, in an event whose digest is defined over its data
        and matches; measured again, it reads as not measured; after the separator, it gives
        nothing. Counted whatever the event's type, but EV_EFI_VARIABLE_AUTHORITY: its data
        is the db entry that verified an image (PFP 3.3.4.8, named "db"; before the separator
        for drivers and option ROMs), and it gives no fact either."""
        if event.type == ev.EV_EFI_VARIABLE_AUTHORITY:
            return []
        policy = _policy_variable(event)
        if policy is None:
            if event.type == ev.EV_EFI_VARIABLE_DRIVER_CONFIG and not mismatch:
                _variable(event)  # raises, reported as a problem, when it does not parse
            return []
        name, value = policy
        if self.pcr7_separated:
            return [
                _anomaly(event, LATE_SECURE_BOOT_VARIABLE, name),
                _problem(
                    event,
                    f"Secure Boot variable {name} measured in PCR 7 after its separator: ignored",
                ),
            ]
        if name in self.pcr7_variables:
            return [
                _anomaly(event, DUPLICATE_SECURE_BOOT_VARIABLE, name),
                _problem(
                    event,
                    f"Secure Boot variable {name} measured again before the "
                    "separator: read as not measured",
                ),
                *_policy_values(name, None),
            ]
        self.pcr7_variables |= {name}
        if mismatch or measured_data(event) is None:
            return []  # its data is not what was measured: not measured
        return _policy_values(name, value)


def _policy_values(name: str, value: bytes | None) -> list[Contribution]:
    """The facts of a policy variable's value; ``None``: not measured."""
    pcr = SECURE_BOOT_PCR
    if name == "SecureBoot":
        return [
            Contribution(pcr, "secureboot_variable", None if value is None else value.hex()),
            Contribution(pcr, "secure_boot", value[:1] == b"\x01" if value else None),
        ]
    if name == "SetupMode":
        return [Contribution(pcr, "setup_mode", value[:1] == b"\x01" if value else None)]
    return [Contribution(pcr, "databases", None if value is None else signature_lists(value), name)]


def _anomaly(event: ev.Event, kind: str, variable: str) -> Contribution:
    anomaly = Anomaly(kind, event.number, event.offset, event.pcr, event.type_name, variable)
    return Contribution(event.pcr, "anomalies", anomaly)


def _problem(event: ev.Event, what: str) -> Contribution:
    text = f"event {event.number} at byte {event.offset} ({event.type_name}): {what}"
    return Contribution(event.pcr, "problems", text)


def _ipl_facts(event: ev.Event) -> list[Contribution]:
    grub = grub_string(event.data)
    if grub is not None:
        name, text, _ = grub
        if not name:
            return []
        return [Contribution(event.pcr, name, text.decode("utf-8", errors="replace"))]
    systemd = systemd_text(event)
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
            if c.value is None:
                current.pop(c.key, None)
            else:
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
