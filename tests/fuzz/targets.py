"""One harness per parser of bytes that come from a device or an operator (issue 12, item 5).

``check_<name>(data)`` feeds ``data`` to the parser the way its caller does (text parsers get
it decoded as their caller decodes it) and carries on through what the caller does with the
result, so that mutation reaches the code behind the parser. It lets only the parser's
domain errors through, the ones its callers catch and turn into a refusal or a finding;
any other exception (IndexError, struct.error, KeyError, RecursionError, a ValueError
where a domain error is meant, ...) is a crash the fuzzer reports.

The harnesses are pure apart from the sshd one, which reads Include files under a small
tree it writes once into a temporary directory. ``TARGETS`` lists them for the suite
(tests/test_fuzz_*.py, hypothesis) and the long runs (``python -m tests.fuzz``, atheris).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from devtrust.agent.gpu.smi_xml import SmiXmlError, parse_smi_xml
from devtrust.agent.posture import SshdConfigError, sshd_settings
from devtrust.verifier import measured_boot, wire_body
from devtrust.verifier.config import LimitsConfig
from devtrust.verifier.document import Bulletins, build
from devtrust.verifier.enrollment import check_ak, check_ek_attributes, parse_ak
from devtrust.verifier.errors import MalformedInput, Rejected
from devtrust.verifier.gpu import spdm
from devtrust.verifier.gpu.rim import RimFormatError, RimSignatureError, load_rim
from devtrust.verifier.policy import Policy, PolicyError
from devtrust.verifier.tpm import bootfacts
from devtrust.verifier.tpm import eventlog as ev
from devtrust.verifier.tpm.clock import ClockState, check_clock
from devtrust.verifier.tpm.constants import DIGEST_SIZES
from devtrust.verifier.tpm.quote import QuoteRejected, check_quote, verify_signature
from devtrust.verifier.tpm.structures import (
    ak_qualified_names,
    parse_attest,
    parse_public,
    parse_signature,
    public_key_matches,
)
from devtrust.verifier.wire import load_public_key
from tests.corpus import corpus_root
from tests.fuzz import seeds

_NVTRUST = corpus_root() / "gpu" / "nvidia_nvtrust_attestation"
_GPU_CHAIN = (_NVTRUST / "gpuAkCertChain-545.00.txt").read_bytes()
_GPU_LEAF = x509.load_pem_x509_certificates(_GPU_CHAIN)[0]
_RIM_ROOT = x509.load_pem_x509_certificate((_NVTRUST / "verifier_RIM_root.pem").read_bytes())
# The RIMs' signers were valid then (they expire in 2025).
_RIM_TIME = datetime.datetime(2024, 6, 1, tzinfo=datetime.UTC)

# --- TPM structures (verifier/tpm/structures.py, quote.py, clock.py) ------------------------

# A fixed AK: the quote harness signs each input with it, so that check_quote goes past the
# signature to the checks on the parsed TPMS_ATTEST (magic, type, signer, selection, digest).
_EC_AK = ec.derive_private_key(0xA11CE, ec.SECP256R1())
_RSA_AK = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_MESSAGE = b"fuzzed TPMS_ATTEST stand-in"
_PREVIOUS_CLOCK = ClockState(
    clock=10_000, reset_count=3, restart_count=1, firmware_version=0x2019_1023
)


def _ecdsa_tpmt_signature(message: bytes) -> bytes:
    r, s = decode_dss_signature(_EC_AK.sign(message, ec.ECDSA(hashes.SHA256())))
    out = b"\x00\x18\x00\x0b"
    for n in (r, s):
        out += (32).to_bytes(2, "big") + n.to_bytes(32, "big")
    return out


def check_tpms_attest(data: bytes) -> None:
    """TPMS_ATTEST from Evidence.quote_attest: parsed, then through check_quote (signed here
    by the fixed AK, so every step after the signature runs) and the clock check."""
    try:
        attest = parse_attest(data)
    except MalformedInput:
        return
    check_clock(attest, _PREVIOUS_CLOCK)
    selection = attest.pcr_select
    values = {
        (s.hash_alg, i): bytes(DIGEST_SIZES.get(s.hash_alg, 32)) for s in selection for i in s.pcrs
    }
    if len(data) % 2 and values:  # odd lengths: a quoted PCR value is missing
        values.pop(next(iter(values)))
    with contextlib.suppress(MalformedInput, QuoteRejected):
        check_quote(
            attest_bytes=data,
            signature_bytes=_ecdsa_tpmt_signature(data),
            ak_key=_EC_AK.public_key(),
            expected_qualifying_data=attest.extra_data,
            requested=selection,
            pcr_values=values,
            qualified_signers={attest.qualified_signer} if len(data) % 3 else {b"\x00\x0b"},
        )


def check_tpm2b_public(data: bytes) -> None:
    """TPM2B_PUBLIC of an AK or EK (Enroll): parsed sized and bare, named, its key loaded,
    and the enrollment checks on it."""
    for sized in (True, False):
        try:
            area = parse_ak(data) if sized else parse_public(data, sized=False)
            _ = area.name
            key = area.public_key()
            public_key_matches(area, key)
            ak_qualified_names(area, area)
            check_ek_attributes(area)
            check_ak(area)
        except (MalformedInput, Rejected):
            pass


def check_tpmt_signature(data: bytes) -> None:
    """TPMT_SIGNATURE from Evidence.quote_signature: parsed and checked against an ECC and an
    RSA AK over a fixed message."""
    try:
        sig = parse_signature(data)
    except MalformedInput:
        return
    for key in (_EC_AK.public_key(), _RSA_AK.public_key()):
        with contextlib.suppress(QuoteRejected):
            verify_signature(key, sig, _MESSAGE)


# --- TCG event log (verifier/tpm/eventlog.py, eventdata.py, bootfacts.py, measured_boot.py) ---

_LIMITS = LimitsConfig()


def _appraise_log(state: measured_boot.LogState) -> None:
    quoted = {
        (alg, index): value
        for bank, _, alg, replayed in measured_boot._replayed(state)
        for index, value in replayed.items()
    }
    measured_boot.compare(state, quoted, "fuzz")
    verified = measured_boot.verified_pcrs(state, quoted)
    measured_boot.facts_of(state, verified)
    measured_boot.digest_findings(state, "fuzz", verified)
    measured_boot.fact_findings(state, "fuzz", verified)


def check_eventlog(data: bytes) -> None:
    """An event log as the verifier takes it (measured_boot.extend: parse, replay, scan each
    event's data against its digests), whole and in two parts split at a record, which must
    come to the same state; then as ``devtrust eventlog replay`` reads it (every fact, data
    unchecked, so that the scanners of event data see fuzzed data too)."""
    limits = {
        "max_bytes": _LIMITS.max_event_log_bytes,
        "max_events": _LIMITS.max_event_log_events,
    }
    try:
        whole = measured_boot.extend(None, 0, data, **limits)
    except MalformedInput:
        return
    _appraise_log(whole)
    log = ev.parse(data)
    if len(log.events) > 2:
        cut = log.events[len(log.events) // 2].offset
        first = measured_boot.extend(None, 0, data[:cut], **limits)
        second = measured_boot.extend(first, cut, data[cut:], **limits)
        assert (second.offset, second.event_count) == (whole.offset, whole.event_count)
        assert second.replay.pcrs == whole.replay.pcrs
        assert list(second.contributions()) == list(whole.contributions())
    ev.replay_log(log)
    bootfacts.boot_facts(log, check_digests=False)


# --- EvidenceBody (verifier/wire_body.py, document.py) --------------------------------------

_BULLETINS = Bulletins.load(seeds.POLICY_DIR / "nvidia-driver-bulletins.csv")


def check_evidence_body(data: bytes) -> None:
    """Evidence.body: parsed within its limits, its posture digest, the plain values policy
    reads, the document built from them, and its certify key; and the same bytes as the
    operator's JSON form (``devtrust policy eval``)."""
    try:
        body = wire_body.body_from_wire(data, _LIMITS)
    except MalformedInput:
        pass
    else:
        wire = wire_body.WireBody(body, raw=data)
        _ = wire.posture_digest
        build(wire.plain(), bulletins=_BULLETINS, zone="fuzz", labels={"pool": "h100"})
        if body.certify_key_spki:
            with contextlib.suppress(MalformedInput):
                load_public_key(body.certify_key_spki, field="EvidenceBody.certify_key_spki")
    if data[:1] == b"{":
        try:
            wire = wire_body.body_from_json(data)
        except MalformedInput:
            return
        build(wire.plain(), bulletins=_BULLETINS)


# --- nvidia-smi -q -x (agent/gpu/smi_xml.py) ------------------------------------------------


def check_smi_xml(data: bytes) -> None:
    """nvidia-smi -q -x output, as the agent reads a capture; the GpuState must serialize
    (the agent sends it)."""
    try:
        state = parse_smi_xml(data)
    except SmiXmlError:
        return
    state.SerializeToString()


# --- sshd_config (agent/posture.py) ---------------------------------------------------------


def _sshd_root() -> Path:
    """A posture root whose /etc/ssh has Include targets: a drop-in directory, a file that
    includes itself, and a file with a bad value."""
    root = Path(tempfile.mkdtemp(prefix="devtrust-fuzz-sshd-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    ssh = root / "etc" / "ssh"
    (ssh / "sshd_config.d").mkdir(parents=True)
    (ssh / "sshd_config.d" / "10-hardening.conf").write_text(
        "PermitRootLogin no\nPasswordAuthentication no\n"
    )
    (ssh / "sshd_config.d" / "50-cloud.conf").write_text("Match User ci\nPermitRootLogin yes\n")
    (ssh / "loop.conf").write_text("Include loop.conf\n")
    (ssh / "bad.conf").write_text("\nPermitRootLogin perhaps\n")
    return root


_SSHD_ROOT: Path | None = None


def check_sshd_config(data: bytes) -> None:
    """/etc/ssh/sshd_config as the agent reads it (decoded with errors="replace")."""
    global _SSHD_ROOT  # noqa: PLW0603 - made at the first call, not at import
    if _SSHD_ROOT is None:
        _SSHD_ROOT = _sshd_root()
    text = data.decode("utf-8", errors="replace")
    with contextlib.suppress(SshdConfigError):
        sshd_settings(text, name="/etc/ssh/sshd_config", root=_SSHD_ROOT)


# --- policy (verifier/policy.py: YAML, rules, CEL compile and check) -------------------------

# YAML and CEL cost about 1 ms per kilobyte: a bound keeps the long run near a thousand
# inputs a second. Past it the input is cut, not skipped.
POLICY_MAX_BYTES = 4096


def check_policy(data: bytes) -> None:
    """A policy file as the verifier loads it: UTF-8 (an operator's file), YAML, every rule
    compiled and checked; data files relative to the shipped policy directory."""
    data = data[:POLICY_MAX_BYTES]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # Policy.load refuses it as PolicyError; the harness skips reading a file
    with contextlib.suppress(PolicyError):
        Policy.parse(text, source="fuzz.yaml", base=seeds.POLICY_DIR)


def check_gpu_report(data: bytes) -> None:
    """A GPU's attestation report as the verifier reads it from a device (SPDM request and
    signed MEASUREMENTS response): parsed, and its signature checked with the recorded
    chain's leaf (what the parser accepted is what the signature covers)."""
    try:
        report = spdm.parse_report(data)
    except spdm.SpdmFormatError:
        return
    with contextlib.suppress(spdm.SpdmSignatureError):
        spdm.verify_signature(report, _GPU_LEAF)


def check_gpu_leaf_fwid(data: bytes) -> None:
    """The DICE extension of a GPU attestation key's certificate (TcbInfo, RIoT's
    CompositeDeviceID, MultiTcbInfo) as the verifier reads its FWID."""
    for oid in (spdm.TCG_DICE_TCB_INFO, spdm.TCG_DICE_MULTI_TCB_INFO):
        with contextlib.suppress(spdm.TcbInfoError):
            spdm.extension_fwid(oid, data)


def check_rim(data: bytes) -> None:
    """A RIM file as `devtrust gpu rim add` and `gpu check --rim` read it."""
    with contextlib.suppress(RimFormatError, RimSignatureError):
        load_rim(data, roots=[_RIM_ROOT], at=_RIM_TIME)


@dataclass(frozen=True)
class Target:
    name: str
    check: Callable[[bytes], None]
    seeds: Callable[[], tuple[bytes, ...]]
    # Inputs the long run tries are at most this long (libFuzzer's -max_len).
    max_len: int


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("tpms_attest", check_tpms_attest, seeds.tpms_attest, 1024),
        Target("tpm2b_public", check_tpm2b_public, seeds.tpm2b_public, 1024),
        Target("tpmt_signature", check_tpmt_signature, seeds.tpmt_signature, 1024),
        Target("eventlog", check_eventlog, seeds.eventlog, seeds.EVENTLOG_SEED_BYTES),
        Target("evidence_body", check_evidence_body, seeds.evidence_body, 16384),
        Target("smi_xml", check_smi_xml, seeds.smi_xml, seeds.SMI_XML_SEED_BYTES),
        Target("sshd_config", check_sshd_config, seeds.sshd_config, 2048),
        Target("policy", check_policy, seeds.policy, POLICY_MAX_BYTES),
        Target("gpu_report", check_gpu_report, seeds.gpu_report, 8192),
        Target("rim", check_rim, seeds.rim, 32768),
        Target("gpu_leaf_fwid", check_gpu_leaf_fwid, seeds.gpu_leaf_fwid, 4096),
    )
}
