"""Facts an operator recognizes, read from a parsed event log. Pure.

Secure Boot state and its databases (UEFI_VARIABLE_DATA, PFP 10.4.4; EFI_SIGNATURE_LIST,
UEFI 2.10 32.4.1), boot applications and their digests, the kernel command line and GRUB
commands (GRUB and systemd-boot measure them as EV_IPL), separators, S-CRTM version,
StartupLocality and H-CRTM. Event data is untrusted: anything that does not parse is reported
as such in ``problems``, never raised, because the digests (already replayed) are what the
TPM vouches for, not the data beside them.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import uuid
import warnings
from dataclasses import dataclass, field

from cryptography import x509

from verifier.tpm import eventlog as ev

EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
EFI_CERT_X509 = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
EFI_CERT_SHA256 = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")
SECURE_BOOT_DBS = ("PK", "KEK", "db", "dbx")


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


@dataclass
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


def _utf16(data: bytes) -> str:
    return data.decode("utf-16-le", errors="replace").rstrip("\x00")


def _text(data: bytes) -> str | None:
    """Printable text in UTF-16LE or ASCII, else None."""
    for codec in ("utf-16-le", "ascii"):
        raw = data
        if codec == "utf-16-le" and len(raw) % 2:
            if not raw.endswith(b"\x00"):
                continue
            raw = raw[:-1]  # systemd-boot measures its UTF-16 string with one trailing NUL
        try:
            text = raw.decode(codec).rstrip("\x00")
        except UnicodeDecodeError:
            continue
        if text and text.isprintable():
            return text
    return None


def _variable(event: ev.Event) -> tuple[uuid.UUID, str, bytes]:
    data = event.data
    if len(data) < 32:
        raise ValueError("UEFI_VARIABLE_DATA shorter than its header")
    guid = uuid.UUID(bytes_le=data[:16])
    name_len, data_len = struct.unpack_from("<QQ", data, 16)
    end_name = 32 + 2 * name_len
    if end_name + data_len > len(data):
        raise ValueError("UEFI_VARIABLE_DATA lengths exceed the event")
    return guid, _utf16(data[32:end_name]), data[end_name : end_name + data_len]


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


def _ipl(facts: BootFacts, event: ev.Event) -> None:
    text = event.data.rstrip(b"\x00")
    ascii_text = ""
    if b"\x00" not in text:
        with contextlib.suppress(UnicodeDecodeError):
            ascii_text = text.decode("ascii")
    if ascii_text.startswith("grub_cmd: "):
        facts.grub_commands.append(ascii_text[len("grub_cmd: ") :])
    elif ascii_text.startswith("kernel_cmdline: "):
        facts.kernel_cmdlines.append(ascii_text[len("kernel_cmdline: ") :])
    elif event.pcr in (8, 12) and not ascii_text:
        decoded = _text(event.data)  # systemd-boot: the command line in UTF-16
        if decoded:
            facts.kernel_cmdlines.append(decoded)


def _variable_fact(facts: BootFacts, event: ev.Event) -> None:
    guid, name, value = _variable(event)
    if guid == EFI_GLOBAL_VARIABLE and name == "SecureBoot":
        facts.secureboot_variable = value.hex()
        facts.secure_boot = value[:1] == b"\x01" if value else None
    elif guid == EFI_GLOBAL_VARIABLE and name == "SetupMode":
        facts.setup_mode = value[:1] == b"\x01" if value else None
    elif name in SECURE_BOOT_DBS and guid in (EFI_GLOBAL_VARIABLE, EFI_IMAGE_SECURITY_DATABASE):
        facts.databases[name] = signature_lists(value)


def boot_facts(log: ev.EventLog) -> BootFacts:
    facts = BootFacts()
    seen_pcr0 = False
    for event in log.events:
        try:
            if event.type == ev.EV_NO_ACTION:
                if event.data.startswith(ev.STARTUP_LOCALITY_SIGNATURE) and event.pcr == 0:
                    facts.startup_locality = event.data[len(ev.STARTUP_LOCALITY_SIGNATURE)]
                continue
            if event.pcr == 0 and not seen_pcr0 and event.type == ev.EV_EFI_HCRTM_EVENT:
                facts.hcrtm = True
            seen_pcr0 = seen_pcr0 or event.pcr == 0
            if event.type == ev.EV_S_CRTM_VERSION:
                facts.scrtm_version = _text(event.data) or event.data.hex()
            elif event.type == ev.EV_EFI_VARIABLE_DRIVER_CONFIG:
                _variable_fact(facts, event)
            elif event.type == ev.EV_EFI_BOOT_SERVICES_APPLICATION:
                facts.boot_applications.append(_boot_application(event))
            elif event.type == ev.EV_IPL:
                _ipl(facts, event)
            elif event.type == ev.EV_SEPARATOR:
                ok = event.data in (b"\x00\x00\x00\x00", b"")
                facts.separators[event.pcr] = "ok" if ok else "error"
        except (ValueError, IndexError, struct.error) as exc:
            facts.problems.append(
                f"event {event.number} at byte {event.offset} ({event.type_name}): {exc}"
            )
    return facts
