"""``devtrust gpu check``: one NVIDIA GPU's attestation report checked offline, as the verifier
checks it (the same appraisal), for an operator holding what nvtrust's local_gpu_verifier
wrote; and ``devtrust gpu rim add|list|remove``: the verifier's RIM store.

``gpu check`` exit status: 0 valid (no finding above info), 1 invalid (the worst finding's
stable id first: ``gpu.measurement.mismatch: ...``, then the others), 2 usage error or an
input that cannot be read as what its option takes. One JSON object with ``--json``. No
traceback on any input.

The report is the SPDM GET_MEASUREMENTS request and signed MEASUREMENTS response, as nvtrust
writes it (hex text) or binary; the chain is PEM, the attestation key's certificate first. The
time is ``--at`` (default now) for the chain, the RIMs and revocation alike: NVIDIA's RIM
signing certificates expire, so a recorded RIM verifies only at a time before its signer's
notAfter.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from devtrust.core.command import one_line
from devtrust.core.errors import ConfigError, DevtrustError
from devtrust.verifier import tools
from devtrust.verifier.audit_command import parse_time
from devtrust.verifier.config import (
    DEFAULT_GPU_DEVICE_ROOT,
    DEFAULT_RIM_ROOT,
    GpuConfig,
    VerifierConfig,
)
from devtrust.verifier.gpu import appraise
from devtrust.verifier.gpu.appraise import GpuVerdict
from devtrust.verifier.gpu.revocation import Revocations
from devtrust.verifier.gpu.types import REPORT, GpuEvidence, Rim, RimKind
from devtrust.verifier.trust import Claim, Finding, Severity, finding_json

# rim.py and rim_store.py load signxml and lxml (over 0.1 s): imported where a RIM is read,
# not by every `devtrust` command (each builds this parser).
if TYPE_CHECKING:
    from devtrust.verifier.gpu.rim_store import RimStore, StoredRim

EXIT_VALID, EXIT_INVALID, EXIT_USAGE = tools.EXIT_VALID, tools.EXIT_INVALID, tools.EXIT_USAGE
DEFAULT_STORE = GpuConfig().rim_store
# Bounds on what is read (a mistyped path to a disk image is refused, not read whole).
MAX_REPORT_FILE = 256 * 1024  # hex text of a 64 KiB report, with room for whitespace
MAX_CHAIN_FILE = 256 * 1024
MAX_RIM_FILE = 4 * 1024 * 1024
MAX_ROOT_FILES = 256
NONCE_SIZE = 32
# How a signed CoRIM starts: CBOR tag 502 (draft-ietf-rats-corim), 0xd9 0x01f6.
CORIM_START = bytes([0xD9, 0x01, 0xF6])
# The SPDM 1.1 GET_MEASUREMENTS request a binary report starts with.
SPDM_REQUEST_START = bytes([0x11, 0xE0])
# The one GPU `gpu check` appraises: the report carries no index of its own.
INDEX = 0
# What findings name as the device (the verifier names the device id).
DEVICE = "(gpu check)"
_HEX = frozenset(string.hexdigits + string.whitespace)
_AT_HELP = (
    "check at this time (YYYY-MM-DD or an ISO time, UTC if no zone): the chain, the RIMs and "
    "revocation data; none: now. NVIDIA's RIM signing certificates expire, so a RIM recorded "
    "earlier verifies only at a time within its signer's validity, such as when it was fetched"
)
_CHECK_DESCRIPTION = (
    "Check one NVIDIA GPU attestation report offline with the verifier's own appraisal: the "
    "SPDM report's structure, its nonce (with --nonce), the certificate chain to the device "
    "roots, the signature, revocation (with --revocation) and each active measurement of the "
    "driver and VBIOS RIMs given. Exit 0 valid (no finding above info), 1 invalid (the worst "
    "finding's stable id first, then the others), 2 usage error or unreadable input."
)
_STORE_HELP = (
    f"the RIM store directory; none: the one --config names (gpu.rim_store), else {DEFAULT_STORE}"
)
_CONFIG_HELP = "the verifier's configuration (verifier.yaml): its gpu.rim_store and gpu.rim_roots"


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    gpu = sub.add_parser(
        "gpu", help="NVIDIA GPU attestation: check a report offline, keep the RIM store"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    p = gpu.add_parser(
        "check",
        help="verify a GPU attestation report as nvtrust writes it: exit 0 valid, 1 invalid "
        "(the finding's id first), 2 usage",
        description=_CHECK_DESCRIPTION,
    )
    p.add_argument(
        "--report",
        type=Path,
        required=True,
        metavar="FILE",
        help="the attestation report: SPDM request and signed response, hex (as nvtrust "
        "writes it) or binary",
    )
    p.add_argument(
        "--chain",
        type=Path,
        required=True,
        metavar="FILE",
        help="the GPU's certificate chain, PEM, the attestation key's certificate first",
    )
    p.add_argument(
        "--rim",
        type=Path,
        action="extend",
        nargs="+",
        default=[],
        metavar="FILE",
        help="the driver and VBIOS RIMs (SWID tags, or signed CoRIMs) to compare the "
        "measurements with; none: "
        "the measurements are not compared (gpu.rim.missing, exit 1)",
    )
    p.add_argument(
        "--signer",
        type=Path,
        metavar="FILE",
        help="the certificate (PEM, leaf first) that signed the CoRIMs given as --rim, for "
        "CoRIMs that carry none (NVIDIA names its CoRIM signer by a link); it must chain to "
        "the RIM roots",
    )
    p.add_argument(
        "--nonce",
        metavar="HEX",
        help="the 32-byte nonce the GPU was asked to sign (64 hex digits); none: the nonce "
        "is not checked, and a replayed report is not told apart",
    )
    p.add_argument("--at", type=parse_time, metavar="TIME", help=_AT_HELP)
    p.add_argument(
        "--root",
        type=Path,
        action="extend",
        nargs="+",
        default=[],
        metavar="FILE",
        help="roots the chain must reach (PEM files or directories); none: NVIDIA's Device "
        f"Identity CA shipped with devtrust ({DEFAULT_GPU_DEVICE_ROOT.name})",
    )
    p.add_argument(
        "--rim-root",
        type=Path,
        action="extend",
        nargs="+",
        default=[],
        metavar="FILE",
        help="roots the RIMs' signers must reach (PEM files or directories); none: NVIDIA's "
        f"RIM signing root shipped with devtrust ({DEFAULT_RIM_ROOT.name})",
    )
    p.add_argument(
        "--revocation",
        type=Path,
        metavar="DIR",
        help="CRLs and OCSP responses for the chain's certificates (PEM or DER files); none: "
        "revocation is unknown (an info finding)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(tool=gpu_check)

    rim = gpu.add_parser(
        "rim", help="the RIM store: driver and VBIOS RIMs the verifier compares reports with"
    ).add_subparsers(dest="rim_action", required=True, metavar="ACTION")
    p = rim.add_parser(
        "add",
        help="verify RIMs (SWID tags or signed CoRIMs, from NVIDIA's RIM service or a mirror) "
        "and add them to the store",
    )
    p.add_argument(
        "files", type=Path, nargs="+", metavar="FILE", help="RIM files (SWID tags or CoRIMs)"
    )
    _store_options(p)
    p.add_argument(
        "--signer",
        type=Path,
        metavar="FILE",
        help="the certificate (PEM, leaf first) that signed the CoRIMs given, for CoRIMs that "
        "carry none (NVIDIA names its CoRIM signer by a link); it must chain to the RIM roots "
        "and is kept with each CoRIM in the store",
    )
    _verify_options(p)
    p.set_defaults(tool=rim_add)
    p = rim.add_parser(
        "fetch",
        help="fetch driver and VBIOS RIMs by ID from NVIDIA's RIM service or a mirror, verify "
        "them and add them to the store (exit 1 when one is missing or does not verify)",
    )
    p.add_argument(
        "ids",
        nargs="*",
        metavar="ID",
        help="RIM IDs as NVIDIA names them: NV_GPU_DRIVER_GH100_545.00, "
        "NV_GPU_CC_DRIVER_<chip>_<driver> (Blackwell), NV_GPU_VBIOS_1010_0200_882_96005E0001",
    )
    p.add_argument(
        "--report",
        type=Path,
        metavar="FILE",
        help="an attestation report (as `gpu check` reads it): fetch the driver and VBIOS RIMs "
        "it names (with --chain, whose leaf certificate names the chip)",
    )
    p.add_argument(
        "--chain", type=Path, metavar="FILE", help="the report's certificate chain (PEM)"
    )
    p.add_argument(
        "--service",
        metavar="URL",
        help="the RIM service's base URL, each ID appended; none: --config's "
        f"gpu.rim_service, else {GpuConfig().rim_service}",
    )
    _store_options(p)
    _verify_options(p)
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds each RIM's request may take in all",
    )
    p.set_defaults(tool=rim_fetch)
    p = rim.add_parser("list", help="the RIMs in the store")
    _store_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(tool=rim_list)
    p = rim.add_parser("remove", help="remove a RIM from the store")
    p.add_argument("kind", choices=("driver", "vbios"), help="the RIM's kind")
    p.add_argument("version", help="its version: 545.00 (driver), 96.00.5E.00.01 (VBIOS)")
    _store_options(p)
    p.set_defaults(tool=rim_remove)


def _verify_options(p: argparse.ArgumentParser) -> None:
    """How `rim add` and `rim fetch` verify and keep a RIM: --at, --root, --replace."""
    p.add_argument("--at", type=parse_time, metavar="TIME", help=_AT_HELP)
    p.add_argument(
        "--root",
        type=Path,
        action="extend",
        nargs="+",
        default=[],
        metavar="FILE",
        help="roots the RIMs' signers must reach (PEM files or directories); none: --config's "
        "gpu.rim_roots, else NVIDIA's RIM signing root shipped with devtrust",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="replace a stored RIM of the same kind and version that has other content "
        "(NVIDIA signs more than one for some versions: a production and a test VBIOS RIM); "
        "without it such a RIM is refused, naming both",
    )


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, metavar="DIR", help=_STORE_HELP)
    p.add_argument("--config", type=Path, metavar="FILE", help=_CONFIG_HELP)


# --- inputs ------------------------------------------------------------------------------------


def _read(path: Path, what: str, limit: int) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise tools.UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise tools.UsageError(
            f"{what} {path}: expected at most {limit} bytes, found more: is it the right file?"
        )
    if not data.strip():
        raise tools.UsageError(f"{what} {path} is empty")
    return data


def report_bytes(data: bytes, path: Path) -> bytes:
    """The report's bytes: hex text decoded, binary as it is. A file that is neither (a
    certificate, a RIM, text) is a usage error naming what it looks like; bytes that start as
    a report but do not parse are the appraisal's finding (gpu.report.malformed)."""
    what = f"--report {path}"
    if data.startswith(SPDM_REQUEST_START):
        return data
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if text and set(text) <= _HEX:
        digits = "".join(text.split())
        if len(digits) % 2:
            raise tools.UsageError(
                f"{what}: expected an even number of hex digits, found {len(digits)}"
            )
        return bytes.fromhex(digits)
    if b"-----BEGIN" in data:
        raise tools.UsageError(
            f"{what}: expected an attestation report (hex or binary SPDM), found PEM: give "
            "the certificate chain as --chain"
        )
    if data.lstrip().startswith(b"<"):
        raise tools.UsageError(
            f"{what}: expected an attestation report (hex or binary SPDM), found XML: give "
            "RIMs as --rim"
        )
    start = data[:2].hex()
    raise tools.UsageError(
        f"{what}: expected an attestation report: hex text, or binary starting with the SPDM "
        f"1.1 GET_MEASUREMENTS request (11e0), found {'text' if text else 'binary'} "
        f"starting {start}"
    )


def load_chain(path: Path, option: str = "--chain") -> list[x509.Certificate]:
    """A chain: PEM certificates (leaf first), or one DER certificate."""
    data = _read(path, option, MAX_CHAIN_FILE)
    what = f"{option} {path}"
    if b"-----BEGIN" in data:
        if b"-----BEGIN CERTIFICATE-----" not in data:
            kinds = sorted({k.decode() for k in re.findall(rb"-----BEGIN ([A-Z0-9 ]+)-----", data)})
            raise tools.UsageError(
                f"{what}: expected PEM certificates, found PEM blocks {', '.join(kinds)}"
            )
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise tools.UsageError(f"{what}: not PEM certificates: {exc}") from None
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise tools.UsageError(
            f"{what}: expected PEM certificates (-----BEGIN CERTIFICATE-----), leaf first, "
            "or one DER certificate; found neither"
        ) from None


def load_roots(paths: Sequence[Path], option: str) -> tuple[x509.Certificate, ...]:
    """Root certificates from PEM (or DER) files and directories of .pem/.crt files."""
    roots: list[x509.Certificate] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".pem", ".crt"))
            if len(files) > MAX_ROOT_FILES:
                raise tools.UsageError(
                    f"{option} {path}: expected at most {MAX_ROOT_FILES} certificate files, "
                    f"found {len(files)}: give the roots' own directory"
                )
        else:
            files = [path]
        for file in files:
            data = _read(file, option, MAX_CHAIN_FILE)
            try:
                if b"-----BEGIN" in data:
                    roots.extend(x509.load_pem_x509_certificates(data))
                else:
                    roots.append(x509.load_der_x509_certificate(data))
            except ValueError:
                raise tools.UsageError(
                    f"{option} {file}: expected PEM certificates (-----BEGIN CERTIFICATE-----) "
                    "or one DER certificate, found neither"
                ) from None
    if not roots:
        raise tools.UsageError(
            f"{option}: no certificate in {', '.join(map(str, paths))}: give PEM files"
        )
    return tuple(roots)


def parse_nonce(text: str | None) -> bytes | None:
    if text is None:
        return None
    digits = text.strip().removeprefix("0x")
    try:
        nonce = bytes.fromhex(digits)
    except ValueError:
        raise tools.UsageError(
            f"--nonce: expected {2 * NONCE_SIZE} hex digits, found {text!r} (not hex)"
        ) from None
    if len(nonce) != NONCE_SIZE:
        raise tools.UsageError(
            f"--nonce: expected {2 * NONCE_SIZE} hex digits ({NONCE_SIZE} bytes, the nonce the "
            f"GPU signed), found {len(digits)}"
        )
    return nonce


def _revocations(path: Path | None) -> Revocations | None:
    if path is None:
        return None
    if not path.is_dir():
        raise tools.UsageError(
            f"--revocation {path}: expected a directory of CRLs and OCSP "
            "responses, found " + ("a file" if path.exists() else "nothing")
        )
    try:
        return Revocations.load(path)
    except (DevtrustError, OSError, ValueError) as exc:
        reason = one_line(exc).removeprefix("gpu.revocation: ")
        raise tools.UsageError(f"--revocation {path}: {reason}") from None


def _is_xml(data: bytes) -> bool:
    return data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")


def _rim_data(path: Path, what: str = "--rim") -> bytes:
    """A RIM file's bytes: a SWID tag (XML) or a signed CoRIM (CBOR tag 502). Anything else
    (a certificate, a report) is a usage error."""
    data = _read(path, what, MAX_RIM_FILE)
    if _is_xml(data) or data.startswith(CORIM_START):
        return data
    raise tools.UsageError(
        f"{what} {path}: expected a RIM, a SWID tag (XML) or a signed CoRIM (CBOR tag 502), "
        f"found {data[:16]!r}..."
    )


@dataclass(frozen=True)
class LoadedRims:
    rims: tuple[Rim, ...]
    findings: tuple[Finding, ...]  # gpu.rim.invalid, one per RIM that does not verify


def load_rims(
    paths: Sequence[Path],
    *,
    roots: Sequence[x509.Certificate],
    at: datetime.datetime,
    subject: str,
    name: str,
    signer: Sequence[x509.Certificate] = (),
) -> LoadedRims:
    """The RIM files (SWID tags or CoRIMs; ``signer``: a CoRIM's signer certificate when it
    carries none) verified at ``at``; each that does not verify is a gpu.rim.invalid
    finding with the reason (its measurements are not used)."""
    from devtrust.verifier.gpu.corim import load_corim  # noqa: PLC0415 - as rim.py
    from devtrust.verifier.gpu.rim import (  # noqa: PLC0415 - signxml, lxml: see above
        RimFormatError,
        RimSignatureError,
        load_rim,
    )

    rims: list[Rim] = []
    findings: list[Finding] = []
    when = at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for path in paths:
        data = _rim_data(path)
        try:
            if _is_xml(data):
                rims.append(load_rim(data, roots=roots, at=at, source=str(path)))
            else:
                rims.append(load_corim(data, roots=roots, at=at, signer=signer, source=str(path)))
        except (RimFormatError, RimSignatureError) as exc:
            findings.append(
                Finding(
                    id="gpu.rim.invalid",
                    severity=Severity.WARNING,
                    claim=Claim.EXECUTABLES,
                    message=f"{subject}: {one_line(exc)} (checked at {when}); its "
                    "measurements are not used",
                    expected=f"a RIM whose signature verifies, by a signer chaining to a RIM "
                    f"root at {when}",
                    found=one_line(exc),
                    subject=name,
                )
            )
    return LoadedRims(tuple(rims), tuple(findings))


# --- gpu check ---------------------------------------------------------------------------------


def _facts(verdict: GpuVerdict) -> dict[str, str]:
    """What the signed report says of the GPU (empty when it does not parse: a finding says
    why), and its identity."""
    facts = {"identity": verdict.identity}
    report = verdict.report
    if report is None:
        return facts
    opaque = report.response.opaque
    facts.update(
        driver=report.driver_version or "",
        vbios=report.vbios_version or "",
        nonce=report.request.nonce.hex(),
    )
    for key in ("project", "project_sku", "chip_sku"):
        value = opaque.get(key)
        facts[key] = value if isinstance(value, str) else ""
    return facts


def gpu_check(args: argparse.Namespace) -> int:
    at: datetime.datetime = args.at or datetime.datetime.now(datetime.UTC)
    data = report_bytes(_read(args.report, "--report", MAX_REPORT_FILE), args.report)
    chain = load_chain(args.chain)
    nonce = parse_nonce(args.nonce)
    anchors = Anchors(
        device_roots=load_roots(args.root or [DEFAULT_GPU_DEVICE_ROOT], "--root"),
        rim_roots=load_roots(args.rim_root or [DEFAULT_RIM_ROOT], "--rim-root"),
        revocation=_revocations(args.revocation),
        rim_signer=tuple(load_chain(args.signer, "--signer")) if args.signer else (),
    )
    verdict, rim_findings = check_report(
        data, chain, name=args.report.name, nonce=nonce, at=at, anchors=anchors, rims=args.rim
    )
    findings = _ordered((*rim_findings, *verdict.findings))
    valid = not any(f.severity > Severity.INFO for f in findings)
    return _verdict(
        args,
        valid=valid,
        findings=findings,
        facts=_facts(verdict),
        claims={c.value: v for c, v in verdict.claims.items()},
        nonce_checked=nonce is not None,
    )


@dataclass(frozen=True)
class Anchors:
    """What `gpu check` checks against, from its options."""

    device_roots: tuple[x509.Certificate, ...]
    rim_roots: tuple[x509.Certificate, ...]
    revocation: Revocations | None
    # The signer of CoRIMs that carry no certificate (NVIDIA names it by href), leaf first.
    rim_signer: tuple[x509.Certificate, ...] = ()


def check_report(
    data: bytes,
    chain: Sequence[x509.Certificate],
    *,
    name: str,
    nonce: bytes | None,
    at: datetime.datetime,
    anchors: Anchors,
    rims: Sequence[Path],
) -> tuple[GpuVerdict, tuple[Finding, ...]]:
    """The verifier's own appraisal (appraise.appraise_report) of one report against an
    explicit GPU nonce (None: not checked), with the versions it names taken as the host's
    (there is no NVML view to compare them with); and gpu.rim.invalid for each RIM file that
    does not verify at ``at``."""
    from devtrust.verifier.gpu.rim import FileRims  # noqa: PLC0415 - signxml, lxml: see above

    subject = f"GPU {INDEX} ({name}) of device {DEVICE}"
    loaded = load_rims(
        rims,
        roots=anchors.rim_roots,
        at=at,
        subject=subject,
        name=name,
        signer=anchors.rim_signer,
    )
    verdict = appraise.appraise_report(
        GpuEvidence(
            index=INDEX,
            status=REPORT,
            report=data,
            certificates=tuple(c.public_bytes(Encoding.DER) for c in chain),
        ),
        appraise.HostGpu(index=INDEX, name=name, vbios_version=None),
        driver_version=None,
        expected_nonce=nonce,
        anchors=appraise.GpuAnchors(
            device_roots=anchors.device_roots,
            rims=FileRims(loaded.rims),
            revocation=anchors.revocation,
            revocation_max_age=datetime.timedelta(seconds=GpuConfig().revocation_max_age_s),
        ),
        now=at,
        device_id=DEVICE,
    )
    return verdict, loaded.findings


def _ordered(findings: Sequence[Finding]) -> tuple[Finding, ...]:
    """Worst first; among equals, in the order found."""
    return tuple(sorted(findings, key=lambda f: -f.severity))


def _verdict(
    args: argparse.Namespace,
    *,
    valid: bool,
    findings: Sequence[Finding],
    facts: dict[str, str],
    claims: dict[str, int],
    nonce_checked: bool,
) -> int:
    note = "" if nonce_checked else " (nonce not checked: no --nonce)"
    if valid:
        reason = f"the GPU report verifies{note}"
    else:
        reason = f"{findings[0].id}: {findings[0].message}"
    if args.json:
        out: dict[str, Any] = {
            "valid": valid,
            "reason": reason,
            "nonce_checked": nonce_checked,
            "findings": [finding_json(f) for f in findings],
            # The GPU's AR4SI claims, as its submod in the verifier's result.
            "claims": claims,
            "gpu": facts,
        }
        print(json.dumps(out, indent=2))
        return EXIT_VALID if valid else EXIT_INVALID
    lines = [f"valid: {reason}"] if valid else [reason]
    rest = findings if valid else findings[1:]
    lines.extend(f"{f.id}: {f.message}" for f in rest)
    if facts.get("driver") or facts.get("vbios"):
        lines.append(
            f"GPU: driver {facts['driver'] or '?'}, VBIOS {facts['vbios'] or '?'}, project "
            f"{facts['project'] or '?'} SKU {facts['project_sku'] or '?'}, chip SKU "
            f"{facts['chip_sku'] or '?'}"
        )
    if facts.get("identity"):
        lines.append(f"identity: sha256 {facts['identity']} (the attestation key, SPKI)")
    print("\n".join(lines))
    return EXIT_VALID if valid else EXIT_INVALID


# --- gpu rim -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StoreSettings:
    store: Path
    rim_roots: list[Path]
    rim_service: str = GpuConfig().rim_service


def _settings(args: argparse.Namespace) -> _StoreSettings:
    gpu = GpuConfig()
    if args.config is not None:
        try:
            gpu = VerifierConfig.load(args.config).gpu
        except (ConfigError, OSError, ValueError) as exc:
            raise tools.UsageError(f"--config {args.config}: {one_line(exc)}") from None
    return _StoreSettings(
        store=args.store or gpu.rim_store,
        rim_roots=list(gpu.rim_roots),
        rim_service=gpu.rim_service,
    )


def _open_store(path: Path) -> RimStore:
    from devtrust.verifier.gpu.rim_store import RimStore  # noqa: PLC0415 - as rim.py

    try:
        return RimStore.open(path)
    except OSError as exc:
        raise tools.UsageError(f"RIM store {path}: {one_line(exc)}") from None
    except DevtrustError as exc:  # RimStoreError names the store
        raise tools.UsageError(one_line(exc)) from None


def rim_add(args: argparse.Namespace) -> int:
    settings = _settings(args)
    roots = load_roots(args.root or settings.rim_roots, "--root")
    at: datetime.datetime = args.at or datetime.datetime.now(datetime.UTC)
    signer = tuple(load_chain(args.signer, "--signer")) if args.signer else ()
    blobs = [(path, _rim_data(path, "RIM file")) for path in args.files]
    store = _open_store(settings.store)
    status = EXIT_VALID
    for path, data in blobs:
        added = _keep(store, data, roots=roots, at=at, source=str(path), signer=signer, args=args)
        status = status if added else EXIT_INVALID
    return status


def _keep(
    store: RimStore,
    data: bytes,
    *,
    roots: Sequence[x509.Certificate],
    at: datetime.datetime,
    source: str,
    args: argparse.Namespace,
    signer: Sequence[x509.Certificate] = (),
    rim_id: str = "",
) -> bool:
    """``data`` verified and added to the store (`rim add`, `rim fetch`); one line says what
    happened (``rim_id``: the RIM service's ID it was fetched as). False when not added."""
    from devtrust.verifier.gpu.rim import (  # noqa: PLC0415 - signxml, lxml: see above
        RimFormatError,
        RimSignatureError,
    )
    from devtrust.verifier.gpu.rim_store import RimStoreError  # noqa: PLC0415 - as rim.py

    named = f"{rim_id}: " if rim_id else ""
    try:
        rim = store.add(
            data, roots=roots, at=at, source=source, signer=signer, replace=args.replace
        )
    except (RimFormatError, RimSignatureError) as exc:  # the message names the file or URL
        print(f"gpu.rim.invalid: {named}{one_line(exc)}" + ("; not added" if rim_id else ""))
        return False
    except RimStoreError as exc:  # another RIM of this kind and version is stored
        print(f"not added: {named}{one_line(exc)}")
        return False
    print(
        f"added {rim.kind} RIM {rim.version} ({rim.product}, {len(rim.measurements)} "
        f"active measurements, signed by {rim.signer}) from {source}"
    )
    return True


def _fetch_ids(args: argparse.Namespace) -> list[str]:
    """The IDs given, then those the report names (each once)."""
    from devtrust.verifier.gpu import rim_fetch  # noqa: PLC0415 - urllib: this command only

    ids = [rim_fetch.check_id(rim_id) for rim_id in args.ids]
    if (args.report is None) != (args.chain is None):
        raise tools.UsageError("--report and --chain go together: give both, or IDs")
    if args.report is not None:
        data = report_bytes(_read(args.report, "--report", MAX_REPORT_FILE), args.report)
        derived = rim_fetch.report_ids(data, load_chain(args.chain), name=str(args.report))
        ids += [derived.driver, derived.vbios]
    if not ids:
        raise tools.UsageError(
            "give RIM IDs (such as NV_GPU_DRIVER_GH100_545.00), or --report and --chain"
        )
    return list(dict.fromkeys(ids))


def rim_fetch(args: argparse.Namespace) -> int:
    """Each ID fetched, verified and added; one line each. Exit 1 when any was not added
    (after trying the others), 2 for usage."""
    from devtrust.verifier.gpu import rim_fetch  # noqa: PLC0415 - urllib: this command only
    from devtrust.verifier.gpu.corim import load_any_rim  # noqa: PLC0415 - as rim.py
    from devtrust.verifier.gpu.rim import (  # noqa: PLC0415 - signxml, lxml: see above
        RimFormatError,
        RimSignatureError,
    )

    if not 0 < args.timeout <= 3600:
        raise tools.UsageError(f"--timeout: expected 0 < S <= 3600 seconds, found {args.timeout}")
    settings = _settings(args)
    try:
        ids = _fetch_ids(args)
        service, plain = rim_fetch.service_url(args.service or settings.rim_service)
    except rim_fetch.IdError as exc:
        raise tools.UsageError(str(exc)) from None
    if plain:
        print(
            f"devtrust: fetching over plain http from {service}: a mirror on a network you "
            "trust (each RIM's signature is still verified)",
            file=sys.stderr,
        )
    roots = load_roots(args.root or settings.rim_roots, "--root")
    at: datetime.datetime = args.at or datetime.datetime.now(datetime.UTC)
    store = _open_store(settings.store)
    status = EXIT_VALID
    for rim_id in ids:
        try:
            fetched = rim_fetch.fetch(service, rim_id, timeout=args.timeout)
        except rim_fetch.FetchError as exc:
            print(f"not fetched: {one_line(exc)}")
            status = EXIT_INVALID
            continue
        try:
            # Verified first, so that a RIM for another version than its ID is never kept.
            rim = load_any_rim(fetched.data, roots=roots, at=at, source=fetched.url)
            expected = rim_fetch.expected_rim(rim_id)
        except (RimFormatError, RimSignatureError) as exc:
            print(f"gpu.rim.invalid: {rim_id}: {one_line(exc)}; not added")  # names the URL
            status = EXIT_INVALID
            continue
        if expected is not None and (
            rim.kind is not expected[0]
            or rim_fetch.id_version(rim.kind, rim.version) != expected[1]
        ):
            print(
                f"not added: {rim_id}: {fetched.url} sent a {rim.kind.value} RIM for "
                f"{rim.version}, not the {expected[0].value} RIM {expected[1]} its ID names"
            )
            status = EXIT_INVALID
            continue
        added = _keep(
            store, fetched.data, roots=roots, at=at, source=fetched.url, args=args, rim_id=rim_id
        )
        status = status if added else EXIT_INVALID
    return status


def rim_list(args: argparse.Namespace) -> int:
    """The store's RIMs; exit 1 when entries were left out (a file changed or gone: each
    named), as the verifier leaves them out."""
    settings = _settings(args)
    store = _open_store(settings.store)
    stored = store.list()
    if args.json:
        doc = {
            "store": str(settings.store),
            "rims": [_stored_json(s) for s in stored],
            "problems": list(store.problems),
        }
        print(json.dumps(doc, indent=2))
        return EXIT_INVALID if store.problems else EXIT_VALID
    if not stored:
        print(f"no RIMs in {settings.store}: add them with `devtrust gpu rim add FILE`")
    for s in stored:
        rim = s.rim
        print(
            f"{rim.kind.value:<6} {rim.version:<16} {rim.product} {len(rim.measurements)} "
            f"active measurements, tag {rim.tag_id}, verified at {s.verified_at.isoformat()}, "
            f"signed by {rim.signer}"
        )
    for problem in store.problems:
        print(f"gpu.rim.invalid: {problem}")
    return EXIT_INVALID if store.problems else EXIT_VALID


def _stored_json(stored: StoredRim) -> dict[str, Any]:
    rim = stored.rim
    return {
        "kind": rim.kind.value,
        "version": rim.version,
        "product": rim.product,
        "tag_id": rim.tag_id,
        "format": rim.format,
        "signer": rim.signer,
        "source": rim.source,
        "measurements": len(rim.measurements),
        "sha256": stored.sha256,
        "verified_at": stored.verified_at.isoformat(),
    }


def rim_remove(args: argparse.Namespace) -> int:
    """NotFound (exit 1) names what the store holds."""
    settings = _settings(args)
    store = _open_store(settings.store)
    gone = store.remove(RimKind(args.kind), args.version)
    print(f"removed the {gone.rim.kind.value} RIM {gone.rim.version} from {settings.store}")
    return EXIT_VALID
