"""Appraisal of NVIDIA GPUs' own attestation reports: pure (no I/O), the time passed in.

For each GPU NVML listed in the evidence body (``HostGpu``), its report (``GpuEvidence``, by
index) is checked in these steps, each refusal a finding with a stable id (docs: issue 14):

1. parse the SPDM 1.1 GET_MEASUREMENTS request and MEASUREMENTS response (spdm.py);
2. the request nonce is the one this challenge asked of this GPU (core.binding.gpu_nonce:
   one challenge binds the TPM quote and every GPU's report);
3. the certificate chain verifies to one of the device roots at ``now``;
4. the response signature (ECDSA P-384 over the transcript, SPDM 1.1 10.11) verifies with
   the chain's leaf (the GPU's attestation key);
5. the firmware ID the report states (opaque data field 20, FWID) is the one the leaf was
   issued for (its TCG DICE extension, spdm.certificate_fwid), as nvtrust checks it: a
   report that states no FWID (NVIDIA's older firmware) is not compared;
6. every certificate of the path but the root is not revoked, by the operator's CRLs and
   OCSP responses (revocation.py), and that data's age;
7. the report's driver and VBIOS versions are those NVML reported in the same body;
8. each active measurement of the driver RIM and of the VBIOS RIM for the report's versions
   equals the report's measurement block at that index (RIM index i is SPDM block i + 1).

Steps 1-4 are hard failures: the rest of a report that fails them means nothing and is not
looked at. Results are AR4SI claims per GPU (hardware, executables, configuration; instance-
identity for a replayed report), for the GPU's submod.

NVIDIA's verifier (nvtrust local_gpu_verifier, verifier.py) means to skip RIM index 35 when
the report's opaque NVDEC0 status says disabled (0x55), but its test compares the field's
bytes with an Enum member and is never true: it compares index 35 always, and its recorded
reports (NVDEC0 disabled) match there. We compare it always too: skipping would make this
appraisal weaker than the reference verifier as it runs (tests/test_gpu_appraise.py).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from devtrust.core.binding import gpu_nonce
from devtrust.verifier.gpu import spdm
from devtrust.verifier.gpu.revocation import Revocations, RevocationState
from devtrust.verifier.gpu.types import REPORT, GpuEvidence, Rim, RimKind, RimSource, same_version
from devtrust.verifier.trust import (
    CONFIGURATION_APPROVED,
    CONFIGURATION_UNSAFE,
    CRYPTO_VALIDATION_FAILED,
    EXECUTABLES_CONTRAINDICATED,
    EXECUTABLES_UNRECOGNIZED,
    HARDWARE_GENUINE,
    HARDWARE_UNRECOGNIZED,
    Claim,
    Finding,
    Severity,
)

__all__ = [
    "ChainCache",
    "GpuAnchors",
    "GpuVerdict",
    "HostGpu",
    "appraise_gpus",
    "appraise_report",
]

# AR4SI values used here besides trust.py's (draft-ietf-rats-ar4si 2.3).
HARDWARE_WARNING = 32  # genuine, but its revocation data is stale
HARDWARE_CONTRAINDICATED = 96  # revoked, duplicated, or required and absent
IDENTITY_CONTRAINDICATED = 96  # two GPUs speak with one attestation key
EXECUTABLES_APPROVED = 2  # every active RIM measurement matched

_RIM_NAME = {RimKind.DRIVER: "driver", RimKind.VBIOS: "VBIOS"}


class ChainCache:
    """Chains that verified, so that the next report of the same GPU (every attestation,
    a few minutes apart) costs one signature, not five (bench/gpu_verify.py: the chain is
    nine tenths of a report's verification). Keyed by the SHA-256 of the chain's DER
    certificates and of the roots; an entry is used only within the validity window of
    every certificate of its path, so a hit gives what verifying again at ``now`` would.
    Bounded (least recently used out), thread-safe. ``size`` 0: no caching."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, tuple[list[x509.Certificate], datetime, datetime]]
        self._entries = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(certificates: Sequence[bytes], root: x509.Certificate) -> bytes:
        digest = hashlib.sha256()
        for der in (*certificates, root.public_bytes(Encoding.DER)):
            digest.update(len(der).to_bytes(4, "big"))
            digest.update(der)
        return digest.digest()

    def get(self, key: bytes, now: datetime) -> list[x509.Certificate] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            path, not_before, not_after = entry
            if not not_before <= now <= not_after:
                return None
            self._entries.move_to_end(key)
            return list(path)

    def put(self, key: bytes, path: list[x509.Certificate]) -> None:
        if self.size <= 0 or not path:
            return
        not_before = max(c.not_valid_before_utc for c in path)
        not_after = min(c.not_valid_after_utc for c in path)
        with self._lock:
            self._entries[key] = (list(path), not_before, not_after)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class GpuAnchors:
    """What GPU reports are checked against (verifier/gpu/anchors.py reads them from
    verifier.yaml; `devtrust gpu check` from its options)."""

    device_roots: tuple[x509.Certificate, ...]
    rims: RimSource
    # None: no revocation data configured (every certificate's status is unknown: INFO).
    revocation: Revocations | None = None
    revocation_max_age: timedelta = timedelta(days=7)
    # Verified chains (a memo of step 3; replaced with the anchors on reload).
    chains: ChainCache = field(default_factory=ChainCache, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class HostGpu:
    """NVML's view of one GPU in the same evidence body: its index, its submod name
    (policy.gpu_name: ``gpu0:GPU-...``) and the VBIOS version NVML read (None: unknown)."""

    index: int
    name: str
    vbios_version: str | None = None


@dataclass(frozen=True)
class GpuVerdict:
    """One GPU's attestation result: its claims and findings for its submod."""

    index: int
    name: str
    claims: dict[Claim, int]
    findings: tuple[Finding, ...]
    # Hex SHA-256 of the leaf (attestation key) certificate's DER; "" when none was sent.
    identity: str = ""
    # The parsed report when it parsed (the facts `devtrust gpu check --json` shows).
    report: spdm.SpdmReport | None = field(default=None, compare=False)

    @property
    def worst(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)


class _Verdict:
    """Findings and claims of one GPU as they are found (the worst value per claim)."""

    def __init__(self, gpu: HostGpu, device_id: str) -> None:
        self.gpu = gpu
        self.subject = f"GPU {gpu.index} ({gpu.name}) of device {device_id}"
        self.claims: dict[Claim, int] = {}
        self.findings: list[Finding] = []
        self.identity = ""
        self.report: spdm.SpdmReport | None = None

    def claim(self, claim: Claim, value: int) -> None:
        if abs(value) > abs(self.claims.get(claim, 0)):
            self.claims[claim] = value

    def add(
        self,
        finding_id: str,
        severity: Severity,
        claim: Claim,
        value: int | None,
        message: str,
        *,
        expected: str = "",
        found: str = "",
    ) -> None:
        self.findings.append(
            Finding(
                id=finding_id,
                severity=severity,
                claim=claim,
                message=f"{self.subject}: {message}",
                expected=expected,
                found=found,
                subject=self.gpu.name,
            )
        )
        if value is not None:
            self.claim(claim, value)

    def done(self) -> GpuVerdict:
        return GpuVerdict(
            index=self.gpu.index,
            name=self.gpu.name,
            claims=dict(self.claims),
            findings=tuple(self.findings),
            identity=self.identity,
            report=self.report,
        )


def appraise_gpus(
    reports: Sequence[GpuEvidence],
    gpus: Sequence[HostGpu],
    *,
    driver_version: str | None,
    challenge_nonce: bytes,
    anchors: GpuAnchors,
    now: datetime,
    device_id: str,
    required: bool,
) -> tuple[GpuVerdict, ...]:
    """The verdicts on every GPU of one evidence body. Each GPU in ``gpus`` is appraised
    with its report (by index) against ``gpu_nonce(challenge_nonce, index)``; a GPU without
    a report is ``gpu.attestation.required`` when ``required``, else
    ``gpu.attestation.unavailable`` (INFO) when the body had GPU reports, and no verdict at
    all when it had none (an agent from before GPU attestation). A report for an index NVML
    did not list gets a verdict of its own (``gpu.report.unknown_index``). GPUs that show the
    same attestation certificate are each ``gpu.identity.duplicate``."""
    by_index: dict[int, GpuEvidence] = {}
    repeated: set[int] = set()
    for sent in reports:
        if sent.index in by_index:
            repeated.add(sent.index)
        else:
            by_index[sent.index] = sent
    listed = {gpu.index for gpu in gpus}
    verdicts: list[GpuVerdict] = []
    for gpu in gpus:
        evidence = by_index.get(gpu.index)
        if gpu.index in repeated:
            verdict = _Verdict(gpu, device_id)
            verdict.add(
                "gpu.report.malformed",
                Severity.CONTRAINDICATED,
                Claim.HARDWARE,
                CRYPTO_VALIDATION_FAILED,
                "the evidence holds more than one GPU report for this index",
                expected="one report per GPU",
                found="several",
            )
            verdicts.append(verdict.done())
        elif evidence is None or evidence.status != REPORT:
            if reports or required:
                verdicts.append(_without_report(gpu, evidence, device_id, required=required))
        else:
            verdicts.append(
                appraise_report(
                    evidence,
                    gpu,
                    driver_version=driver_version,
                    expected_nonce=gpu_nonce(challenge_nonce, gpu.index),
                    anchors=anchors,
                    now=now,
                    device_id=device_id,
                )
            )
    for index in sorted(set(by_index) - listed):
        verdict = _Verdict(HostGpu(index, f"gpu{index}:unlisted"), device_id)
        verdict.add(
            "gpu.report.unknown_index",
            Severity.CONTRAINDICATED,
            Claim.HARDWARE,
            HARDWARE_CONTRAINDICATED,
            "a GPU report for an index the GPU state of the same evidence does not list",
            expected="an index among " + (", ".join(map(str, sorted(listed))) or "none"),
            found=str(index),
        )
        verdicts.append(verdict.done())
    return _duplicates(verdicts, device_id)


def appraise_report(
    evidence: GpuEvidence,
    gpu: HostGpu,
    *,
    driver_version: str | None,
    expected_nonce: bytes | None,
    anchors: GpuAnchors,
    now: datetime,
    device_id: str,
) -> GpuVerdict:
    """One GPU's report checked against an explicit expected GPU nonce (None: the nonce is
    not checked, as `devtrust gpu check` without --nonce) and NVML's view of it
    (``driver_version``, ``gpu.vbios_version``; None: not compared). A report whose status
    is not "report" gives ``gpu.attestation.unavailable``. ``now`` must be timezone-aware."""
    if now.tzinfo is None:
        raise ValueError("appraise_report: `now` must be timezone-aware")
    if evidence.status != REPORT:
        return _without_report(gpu, evidence, device_id, required=False)
    verdict = _Verdict(gpu, device_id)
    if evidence.certificates:
        verdict.identity = key_identity(evidence.certificates[0])
    # 1. Parse (each field bounded, named on error).
    try:
        report = spdm.parse_report(evidence.report)
    except spdm.SpdmFormatError as exc:
        verdict.add(
            "gpu.report.malformed",
            Severity.CONTRAINDICATED,
            Claim.HARDWARE,
            CRYPTO_VALIDATION_FAILED,
            str(exc),
            expected="an SPDM 1.1 GET_MEASUREMENTS request and signed MEASUREMENTS response",
            found=f"{len(evidence.report)} bytes",
        )
        return verdict.done()
    verdict.report = report
    # 2. The nonce this challenge asked of this GPU (SPDM 1.1 10.11: the requester's nonce).
    if expected_nonce is not None:
        try:
            spdm.verify_nonce(report, expected_nonce)
        except spdm.SpdmNonceError:
            verdict.add(
                "gpu.report.nonce_mismatch",
                Severity.CONTRAINDICATED,
                Claim.INSTANCE_IDENTITY,
                CRYPTO_VALIDATION_FAILED,
                "the report answers another challenge (replayed or stale): its request "
                f"nonce is {report.request.nonce.hex()}, expected {expected_nonce.hex()}",
                expected=expected_nonce.hex(),
                found=report.request.nonce.hex(),
            )
            return verdict.done()
    # 3. The chain, leaf first, to one of the device roots at `now`.
    path = _chain(verdict, evidence.certificates, anchors, now)
    if path is None:
        return verdict.done()
    leaf = path[0]
    # 4. The signature over the transcript, with the leaf's key.
    try:
        spdm.verify_signature(report, leaf)
    except spdm.SpdmSignatureError as exc:
        verdict.add(
            "gpu.report.signature_invalid",
            Severity.CONTRAINDICATED,
            Claim.HARDWARE,
            CRYPTO_VALIDATION_FAILED,
            str(exc),
            expected=f"a signature by {leaf.subject.rfc4514_string()}",
            found="a signature that does not verify",
        )
        return verdict.done()
    verdict.claim(Claim.HARDWARE, HARDWARE_GENUINE)
    verdict.claim(Claim.CONFIGURATION, CONFIGURATION_APPROVED)
    verdict.claim(Claim.EXECUTABLES, EXECUTABLES_APPROVED)
    # 5. The report's FWID against the one the attestation key's certificate declares.
    _fwid(verdict, report, leaf)
    # 6. Revocation of every certificate of the path but the root.
    _revocation(verdict, path, anchors, now)
    # 7. The GPU's own versions against NVML's in the same body.
    _versions(verdict, report, driver_version, gpu.vbios_version)
    # 8. Measurements against the driver and VBIOS RIMs for the report's versions.
    _measurements(verdict, report, anchors.rims)
    return verdict.done()


def _without_report(
    gpu: HostGpu, evidence: GpuEvidence | None, device_id: str, *, required: bool
) -> GpuVerdict:
    verdict = _Verdict(gpu, device_id)
    if evidence is None:
        said = "the evidence holds no GPU report for it"
    else:
        said = f"the agent reported {evidence.status}" + (
            f": {evidence.detail}" if evidence.detail else ""
        )
    if required:
        verdict.add(
            "gpu.attestation.required",
            Severity.CONTRAINDICATED,
            Claim.HARDWARE,
            HARDWARE_CONTRAINDICATED,
            f"the zone requires each GPU's own verified attestation report; {said}",
            expected="a GPU attestation report",
            found=evidence.status if evidence else "none",
        )
    else:
        verdict.add(
            "gpu.attestation.unavailable",
            Severity.INFO,
            Claim.HARDWARE,
            None,
            f"no attestation report from the GPU itself: {said}",
            expected="a GPU attestation report",
            found=evidence.status if evidence else "none",
        )
    return verdict.done()


def _chain(
    verdict: _Verdict,
    certificates: Sequence[bytes],
    anchors: GpuAnchors,
    now: datetime,
) -> list[x509.Certificate] | None:
    roots = anchors.device_roots
    keys = [ChainCache.key(certificates, root) for root in roots]
    for key in keys:
        cached = anchors.chains.get(key, now)
        if cached is not None:
            return cached
    chain: list[x509.Certificate] = []
    for n, der in enumerate(certificates):
        try:
            chain.append(x509.load_der_x509_certificate(der))
        except ValueError as exc:
            verdict.add(
                "gpu.certificate.chain_invalid",
                Severity.CONTRAINDICATED,
                Claim.HARDWARE,
                HARDWARE_UNRECOGNIZED,
                f"certificate {n} of the GPU's chain does not parse as DER X.509: {exc}",
                expected="DER certificates, the attestation key's first",
                found=f"{len(der)} bytes",
            )
            return None
    reasons: list[str] = []
    if not roots:
        reasons.append("no device root is configured (gpu.device_roots)")
    for root, key in zip(roots, keys, strict=True):
        try:
            path = spdm.verify_chain(chain, root, now)
        except spdm.SpdmChainError as exc:
            reasons.append(str(exc))
            continue
        anchors.chains.put(key, path)
        return path
    verdict.add(
        "gpu.certificate.chain_invalid",
        Severity.CONTRAINDICATED,
        Claim.HARDWARE,
        HARDWARE_UNRECOGNIZED,
        "; ".join(reasons),
        expected="a chain to " + ", ".join(r.subject.rfc4514_string() for r in roots),
        found=" <- ".join(c.subject.rfc4514_string() for c in chain) or "no certificates",
    )
    return None


def _fwid(verdict: _Verdict, report: spdm.SpdmReport, leaf: x509.Certificate) -> None:
    """The firmware that signed the report is the firmware the attestation key was
    certified for: the report's FWID (opaque field 20) equals the first FWID of the leaf's
    TCG DICE extension (nvtrust cc_admin_utils.verify_gpu_certificate_chain; it skips a
    report without FWID, and so do we). A leaf without the extension, or with one that does
    not parse, cannot vouch for the report's firmware: the same finding, saying why."""
    stated = report.response.opaque.get("fwid")
    if not isinstance(stated, bytes) or not stated:
        return
    leaf_name = leaf.subject.rfc4514_string()
    try:
        declared = spdm.certificate_fwid(leaf)
    except spdm.TcbInfoError as exc:
        why, found = str(exc), "a TCG DICE extension that does not parse"
    else:
        if declared is None:
            why = (
                f"certificate {leaf_name} has no TCG DICE TcbInfo extension "
                f"({spdm.TCG_DICE_TCB_INFO.dotted_string} or "
                f"{spdm.TCG_DICE_MULTI_TCB_INFO.dotted_string})"
            )
            found = "no FWID in the certificate"
        elif hmac.compare_digest(declared.digest, stated):
            return
        else:
            why = (
                f"certificate {leaf_name} declares FWID {declared.digest.hex()} "
                f"({declared.hash_name}, {declared.source})"
            )
            found = f"{declared.digest.hex()} (certificate)"
    verdict.add(
        "gpu.certificate.fwid_mismatch",
        Severity.CONTRAINDICATED,
        Claim.HARDWARE,
        HARDWARE_UNRECOGNIZED,
        f"the report's firmware ID (opaque data FWID) is {stated.hex()}, not the one its "
        f"attestation key was certified for: {why}",
        expected=f"{stated.hex()} (report)",
        found=found,
    )


def _revocation(
    verdict: _Verdict, path: Sequence[x509.Certificate], anchors: GpuAnchors, now: datetime
) -> None:
    if anchors.revocation is None:
        verdict.add(
            "gpu.revocation.unknown",
            Severity.INFO,
            Claim.HARDWARE,
            None,
            "the revocation of its certificates is not checked: no CRLs or OCSP responses "
            "are given (gpu.revocation in verifier.yaml; --revocation of gpu check)",
            expected="revocation data for the GPU's certificates",
            found="none configured",
        )
        return
    max_age = anchors.revocation_max_age
    for cert, issuer in itertools.pairwise(path):
        status = anchors.revocation.status(cert, issuer, now, max_age)
        name = f"certificate {cert.subject.rfc4514_string()} (serial {cert.serial_number:x})"
        if status.state is RevocationState.REVOKED:
            verdict.add(
                "gpu.certificate.revoked",
                Severity.CONTRAINDICATED,
                Claim.HARDWARE,
                HARDWARE_CONTRAINDICATED,
                f"{name} is revoked: {status.detail}",
                expected="not revoked",
                found=f"revoked ({status.source})",
            )
        elif status.state is RevocationState.UNKNOWN:
            verdict.add(
                "gpu.revocation.unknown",
                Severity.INFO,
                Claim.HARDWARE,
                None,
                f"the revocation of {name} is unknown: {status.detail}",
                expected="a CRL or OCSP response from its issuer",
                found="none that covers it",
            )
        elif status.stale:
            age = status.age or timedelta()
            verdict.add(
                "gpu.revocation.stale",
                Severity.WARNING,
                Claim.HARDWARE,
                HARDWARE_WARNING,
                f"the revocation data for {name} ({status.source}) is {_days(age)} old, "
                f"older than gpu.revocation_max_age_s ({_days(max_age)}) or past its "
                "nextUpdate: fetch it again",
                expected=f"at most {_days(max_age)} old",
                found=_days(age),
            )


def _days(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    return f"{seconds / 3600:.1f} hours"


def _versions(
    verdict: _Verdict,
    report: spdm.SpdmReport,
    driver_version: str | None,
    vbios_version: str | None,
) -> None:
    pairs = (
        ("driver", driver_version, report.driver_version),
        ("VBIOS", vbios_version, report.vbios_version),
    )
    for what, nvml, signed in pairs:
        if nvml is None:
            continue
        if signed is None or not same_version(nvml, signed):
            verdict.add(
                "gpu.version.mismatch",
                Severity.CONTRAINDICATED,
                Claim.CONFIGURATION,
                CONFIGURATION_UNSAFE,
                f"the GPU's signed report says {what} {signed or '(none)'}, the host's NVML "
                f"said {nvml or 'nothing'} in the same evidence",
                expected=f"{what} {nvml or '(not reported)'} (NVML)",
                found=f"{what} {signed or '(none)'} (GPU report)",
            )


def _measurements(verdict: _Verdict, report: spdm.SpdmReport, rims: RimSource) -> None:
    usable: list[Rim] = []
    for kind, version in (
        (RimKind.DRIVER, report.driver_version),
        (RimKind.VBIOS, report.vbios_version),
    ):
        what = _RIM_NAME[kind]
        rim = rims.find(kind, version) if version else None
        if rim is None or rim.kind is not kind:
            verdict.add(
                "gpu.rim.missing",
                Severity.WARNING,
                Claim.EXECUTABLES,
                EXECUTABLES_UNRECOGNIZED,
                f"no {what} RIM for {what} {version or '(the report names none)'}: its "
                "measurements are not compared (add NVIDIA's RIM to the verifier's store with "
                "`gpu rim add`, or give it to gpu check with --rim)",
                expected=f"a {what} RIM for {version or '?'}",
                found="none",
            )
        elif version is None or not same_version(rim.version, version):
            verdict.add(
                "gpu.rim.version_mismatch",
                Severity.WARNING,
                Claim.EXECUTABLES,
                EXECUTABLES_UNRECOGNIZED,
                f"the {what} RIM given ({_rim_name(rim)}) is for {what} {rim.version}, the "
                f"report is of {what} {version}: its measurements are not compared",
                expected=f"a {what} RIM for {version}",
                found=f"{what} RIM for {rim.version}",
            )
        else:
            usable.append(rim)
    # Driver and VBIOS RIMs both active at an index: which golden value holds is ambiguous
    # (nvtrust refuses the pair); such indices are named and not compared.
    conflict: set[int] = set()
    if len(usable) == 2:
        driver, vbios = usable
        conflict = {m.index for m in driver.measurements} & {m.index for m in vbios.measurements}
        if conflict:
            indices = ", ".join(str(i - 1) for i in sorted(conflict))
            verdict.add(
                "gpu.rim.index_conflict",
                Severity.CONTRAINDICATED,
                Claim.EXECUTABLES,
                EXECUTABLES_CONTRAINDICATED,
                f"the driver RIM ({_rim_name(driver)}) and the VBIOS RIM ({_rim_name(vbios)}) "
                f"both have active measurements at RIM index {indices}",
                expected="each index active in one RIM",
                found=f"RIM index {indices} in both",
            )
    blocks = {block.index: block for block in report.response.blocks}
    for rim in usable:
        for reference in sorted(rim.measurements, key=lambda m: m.index):
            if reference.index in conflict:
                continue
            block = blocks.get(reference.index)
            if block is not None and (
                len(block.value) == reference.size and block.value in reference.alternatives
            ):
                continue  # the usual case: nothing to name, nothing formatted
            where = f"block {reference.index} (RIM index {reference.index - 1})"
            allowed = " or ".join(a.hex() for a in reference.alternatives)
            if block is None:
                verdict.add(
                    "gpu.measurement.missing",
                    Severity.CONTRAINDICATED,
                    Claim.EXECUTABLES,
                    EXECUTABLES_CONTRAINDICATED,
                    f"measurement {where} is active in the {_RIM_NAME[rim.kind]} RIM "
                    f"({_rim_name(rim)}) but absent from the report",
                    expected=allowed,
                    found="absent",
                )
                continue
            verdict.add(
                "gpu.measurement.mismatch",
                Severity.CONTRAINDICATED,
                Claim.EXECUTABLES,
                EXECUTABLES_CONTRAINDICATED,
                f"measurement {where} is {block.value.hex()}; the {_RIM_NAME[rim.kind]} RIM "
                f"({_rim_name(rim)}) allows {allowed}",
                expected=allowed,
                found=block.value.hex(),
            )


def _rim_name(rim: Rim) -> str:
    name = f"{rim.kind.value} {rim.version}"
    if rim.tag_id:
        name += f", tag {rim.tag_id}"
    if rim.source:
        name += f", {rim.source}"
    return name


def key_identity(leaf_der: bytes) -> str:
    """A GPU's identity: hex SHA-256 of its attestation key (the leaf's SubjectPublicKeyInfo),
    not of the certificate's bytes, which a host can vary without the key (an ECDSA
    signature's s and n - s both verify); "" when the certificate does not parse (its chain
    check then fails anyway)."""
    try:
        key = x509.load_der_x509_certificate(leaf_der).public_key()
        spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion):
        return ""
    return hashlib.sha256(spki).hexdigest()


# A duplicate finding names at most this many of the other GPUs (then a count): its text
# stays linear in the GPU count whatever a host sends.
_NAMED_DUPLICATES = 3


def _duplicates(verdicts: list[GpuVerdict], device_id: str) -> tuple[GpuVerdict, ...]:
    """GPUs that showed one attestation certificate: each contraindicated, naming the
    others (a host that copies one GPU's report and chain for another)."""
    holders: dict[str, list[GpuVerdict]] = {}
    for verdict in verdicts:
        if verdict.identity:
            holders.setdefault(verdict.identity, []).append(verdict)
    out: list[GpuVerdict] = []
    for verdict in verdicts:
        same = holders.get(verdict.identity, []) if verdict.identity else []
        if len(same) < 2:
            out.append(verdict)
            continue
        rest = [v for v in same if v is not verdict]
        others = ", ".join(f"GPU {v.index} ({v.name})" for v in rest[:_NAMED_DUPLICATES])
        if len(rest) > _NAMED_DUPLICATES:
            others += f" and {len(rest) - _NAMED_DUPLICATES} more"
        finding = Finding(
            id="gpu.identity.duplicate",
            severity=Severity.CONTRAINDICATED,
            claim=Claim.INSTANCE_IDENTITY,
            message=f"GPU {verdict.index} ({verdict.name}) of device {device_id}: its "
            f"attestation key (SPKI sha256 {verdict.identity}) is also {others}'s",
            expected="one attestation key per GPU",
            found=f"shared with {others}",
            subject=verdict.name,
        )
        claims = dict(verdict.claims)
        if abs(IDENTITY_CONTRAINDICATED) > abs(claims.get(Claim.INSTANCE_IDENTITY, 0)):
            claims[Claim.INSTANCE_IDENTITY] = IDENTITY_CONTRAINDICATED
        out.append(
            GpuVerdict(
                index=verdict.index,
                name=verdict.name,
                claims=claims,
                findings=(*verdict.findings, finding),
                identity=verdict.identity,
                report=verdict.report,
            )
        )
    return tuple(out)
