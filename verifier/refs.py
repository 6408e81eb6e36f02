"""Reference values per device group: golden PCR values and event-based rules. Pure logic
plus a YAML loader (the file is reviewed by an operator, see ``devtrust refs learn``).

Golden PCR values do not scale across hardware variants (Keylime's users found this); the
event-based rules do: Secure Boot must be on, boot applications must come from an
allowlist of digests, dbx must contain named revocations.

    groups:
      - name: h100-hosts
        zone: model-development          # selector: zone and labels must match
        labels: {sku: h100}
        pcrs: {sha256: {7: "65ca..."}}   # golden values (optional)
        secure_boot: true
        boot_applications: ["3f2a...", ...]  # sha256 digests as measured (optional; the log
                                             # must show at least one on PCR 4)
        dbx_contains: ["80b4..."]        # sha256 entries dbx must list (optional)
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devtrust.core.config import from_mapping, load_yaml
from devtrust.core.errors import ConfigError
from devtrust.verifier.config import clip
from devtrust.verifier.tpm.bootfacts import BOOT_APPLICATION_PCR, BootFacts
from devtrust.verifier.tpm.constants import DIGEST_SIZES, hash_alg
from devtrust.verifier.trust import (
    CONFIGURATION_APPROVED,
    CONFIGURATION_UNSAFE,
    EXECUTABLES_APPROVED_BOOT,
    EXECUTABLES_CONTRAINDICATED,
    Claim,
    Finding,
    Severity,
)

PcrValues = Mapping[tuple[int, int], bytes]
_HEX = re.compile(r"[0-9a-fA-F]*")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class RefGroup:
    name: str
    zone: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    pcrs: dict[str, dict[int, str]] = field(default_factory=dict)
    secure_boot: bool | None = None
    boot_applications: list[str] = field(default_factory=list)
    dbx_contains: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Each value checked at load, naming the group, bank and PCR: a typo must stop the
        verifier, not turn into a mismatch (or a traceback) at every appraisal."""
        at = f"group {clip(self.name)}"
        for bank, values in self.pcrs.items():
            try:
                size = DIGEST_SIZES[hash_alg(bank)]
            except ValueError as exc:
                raise ValueError(f"{at}: pcrs: {exc}") from None
            for index, value in values.items():
                where = f"{at}: pcrs.{bank} PCR {index}"
                if not 0 <= index <= 23:
                    raise ValueError(f"{where}: PCR indices are 0..23")
                if not _HEX.fullmatch(value):
                    raise ValueError(f"{where}: {clip(value)} is not hex digits")
                if len(value) != 2 * size:
                    raise ValueError(
                        f"{where}: {clip(value)} is {len(value)} hex digits; a {bank} value "
                        f"is {2 * size}"
                    )
        for key in ("boot_applications", "dbx_contains"):
            for n, digest in enumerate(getattr(self, key)):
                if not _SHA256_HEX.fullmatch(digest):
                    hexed = _HEX.fullmatch(digest)
                    wrong = f"is {len(digest)} hex digits" if hexed else "is not hex"
                    raise ValueError(
                        f"{at}: {key}[{n}]: {clip(digest)} {wrong}; a sha256 digest is 64 hex "
                        "digits"
                    )

    def matches(self, zone: str, labels: Mapping[str, str]) -> bool:
        return (not self.zone or self.zone == zone) and all(
            labels.get(k) == v for k, v in self.labels.items()
        )

    @property
    def needs_event_log(self) -> bool:
        return self.secure_boot is not None or bool(self.boot_applications or self.dbx_contains)


@dataclass(frozen=True)
class ReferenceValues:
    groups: list[RefGroup] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> ReferenceValues:
        refs = from_mapping(cls, load_yaml(path), where=str(path), base=path.parent)
        if not refs.groups:
            raise ConfigError(
                f"{path}: no reference value groups (expected `groups:` with at least one "
                "group, see verifier/refs.py): fill it in, or remove `reference_values:` "
                "from the configuration"
            )
        return refs

    def for_device(self, zone: str, labels: Mapping[str, str]) -> RefGroup | None:
        """The first group whose selector matches."""
        return next((g for g in self.groups if g.matches(zone, labels)), None)


def _finding(  # noqa: PLR0917 - the positional order is Finding's field order
    fid: str, claim: Claim, message: str, expected: str = "", found: str = "", subject: str = ""
) -> Finding:
    return Finding(
        id=fid,
        severity=Severity.CONTRAINDICATED,
        claim=claim,
        message=message,
        expected=expected,
        found=found,
        subject=subject,
    )


def appraise_refs(
    group: RefGroup, *, device_id: str, pcrs: PcrValues, facts: BootFacts | None
) -> tuple[dict[Claim, int], list[Finding]]:
    """Claims and findings of one device against its group's reference values."""
    findings: list[Finding] = []
    # Golden PCR values.
    for bank, values in group.pcrs.items():
        alg = hash_alg(bank)
        for index, want in sorted(values.items()):
            got = pcrs.get((alg, index))
            if got is None:
                findings.append(
                    _finding(
                        "refs.pcr_not_quoted",
                        Claim.EXECUTABLES,
                        f"PCR {index} ({bank}) of device {device_id} has a reference value but is "
                        "not in the quoted selection",
                        want,
                        "",
                        f"pcr:{bank}:{index}",
                    )
                )
            elif not hmac.compare_digest(got, bytes.fromhex(want)):
                findings.append(
                    _finding(
                        "refs.pcr_mismatch",
                        Claim.EXECUTABLES,
                        f"PCR {index} ({bank}) of device {device_id}: expected {want.lower()}, "
                        f"got {got.hex()}",
                        want.lower(),
                        got.hex(),
                        f"pcr:{bank}:{index}",
                    )
                )
    # Event-based rules, on facts from an event log that replayed to the quoted PCRs.
    if group.needs_event_log and facts is None:
        findings.append(
            _finding(
                "refs.no_event_log",
                Claim.EXECUTABLES,
                f"device {device_id}: group {group.name} has event-based rules but no verified "
                "event log is available",
            )
        )
    elif facts is not None:
        findings.extend(_event_rules(group, device_id, facts))
    claims: dict[Claim, int] = {}
    executables = [f for f in findings if f.claim is Claim.EXECUTABLES]
    configuration = [f for f in findings if f.claim is Claim.CONFIGURATION]
    claims[Claim.EXECUTABLES] = (
        EXECUTABLES_CONTRAINDICATED if executables else EXECUTABLES_APPROVED_BOOT
    )
    if group.secure_boot is not None or group.dbx_contains:
        claims[Claim.CONFIGURATION] = (
            CONFIGURATION_UNSAFE if configuration else CONFIGURATION_APPROVED
        )
    return claims, findings


def _event_rules(group: RefGroup, device_id: str, facts: BootFacts) -> list[Finding]:
    findings: list[Finding] = []
    if group.secure_boot is not None and facts.secure_boot is not group.secure_boot:
        state = {True: "on", False: "off", None: "not measured"}
        findings.append(
            _finding(
                "refs.secure_boot",
                Claim.CONFIGURATION,
                f"device {device_id}: Secure Boot is {state[facts.secure_boot]}, group "
                f"{group.name} requires {state[group.secure_boot]}",
                state[group.secure_boot],
                state[facts.secure_boot],
            )
        )
    if group.boot_applications:
        allowed = {d.lower() for d in group.boot_applications}
        # An allowlist refuses what it sees: a log that shows no boot application on PCR 4
        # (PFP 3.3.4.5; every event there counts but separators and action texts, see
        # verifier.tpm.bootfacts) booted nothing we can check, or hid it. Those on other
        # PCRs do not count: the OS may extend PCR 8 and up and log anything there.
        if not any(app.pcr == BOOT_APPLICATION_PCR for app in facts.boot_applications):
            findings.append(
                _finding(
                    "refs.no_boot_application",
                    Claim.EXECUTABLES,
                    f"device {device_id}: its event log shows no boot application on PCR "
                    f"{BOOT_APPLICATION_PCR}, group {group.name} allows only listed ones",
                    "one of the allowlisted digests",
                    "none",
                    f"pcr:sha256:{BOOT_APPLICATION_PCR}",
                )
            )
        for app in facts.boot_applications:
            digest = app.digests.get("sha256", "")
            if digest not in allowed:
                findings.append(
                    _finding(
                        "refs.boot_application_not_allowed",
                        Claim.EXECUTABLES,
                        f"device {device_id}: boot application {app.path or '<no path>'} "
                        f"(sha256 {digest}) is not in the allowlist of group {group.name}",
                        "one of the allowlisted digests",
                        digest,
                        f"pcr:sha256:{app.pcr}",
                    )
                )
    if group.dbx_contains:
        dbx = {e.sha256 for e in facts.databases.get("dbx", [])}
        for wanted in group.dbx_contains:
            if wanted.lower() not in dbx:
                findings.append(
                    _finding(
                        "refs.dbx_missing_revocation",
                        Claim.CONFIGURATION,
                        f"device {device_id}: dbx does not revoke {wanted.lower()}",
                        wanted.lower(),
                        f"{len(dbx)} dbx entries",
                    )
                )
    return findings
