"""Valid inputs for each harness, from the conformance corpus (tests/data/corpus) and the
repository's own data: mutation starts from them so that it reaches code past the first
length check. Each function returns the seeds of one harness, in a fixed order (the suite's
runs are derandomized, so the same seeds must come back every time)."""

from __future__ import annotations

import functools
import struct
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.agent.gpu.smi_xml import parse_smi_xml
from devtrust.agent.posture import collect_posture
from devtrust.v1 import attestation_pb2, common_pb2
from devtrust.verifier.errors import MalformedInput
from devtrust.verifier.tpm import eventlog as ev
from tests.corpus import corpus_root

REPO = Path(__file__).resolve().parents[2]
POLICY_DIR = REPO / "verifier" / "data" / "policy"
# An event log seed is the log's Spec ID header and a run of its records, at most this many
# bytes: the corpus logs are 10-73 KB, and every input is parsed, replayed, scanned and
# hashed in each bank, so whole logs would cut the fuzzer's rate by ten.
EVENTLOG_SEED_BYTES = 8192
# The small captures only: the B200 and H100 ones are 200-350 KB.
SMI_XML_SEED_BYTES = 32 * 1024


def _files(pattern: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted(corpus_root().glob(pattern)) if p.is_file()]


@functools.cache
def tpms_attest() -> tuple[bytes, ...]:
    return tuple(_files("quotes/*/*.tpms_attest"))


@functools.cache
def tpmt_signature() -> tuple[bytes, ...]:
    return tuple(_files("quotes/*/*.tpmt_signature"))


@functools.cache
def tpm2b_public() -> tuple[bytes, ...]:
    """TPM2B_PUBLIC of real AKs, and an ECC one made here (the corpus AKs are RSA)."""
    key = ec.derive_private_key(0x5EED, ec.SECP256R1()).public_key().public_numbers()
    area = struct.pack(">HHI", 0x0023, 0x000B, 0x00050072) + struct.pack(">H", 0)
    area += struct.pack(">HHHHH", 0x0010, 0x0018, 0x000B, 0x0003, 0x0010)
    for coordinate in (key.x, key.y):
        area += struct.pack(">H", 32) + coordinate.to_bytes(32, "big")
    ecc = struct.pack(">H", len(area)) + area
    return (*_files("quotes/*/ak.tpm2b_public"), ecc)


def _records(log: bytes) -> tuple[bytes, list[int]]:
    """The Spec ID header (b"" for a legacy log) and the offsets of the other records."""
    parsed = ev.parse(log)
    first = 1 if parsed.format == "crypto-agile" else 0
    offsets = [e.offset for e in parsed.events[first:]] + [parsed.end]
    header = log[: offsets[0]] if first else b""
    return header, offsets


@functools.cache
def eventlog() -> tuple[bytes, ...]:
    """Per corpus log: its header with the first records, and with a window from its middle
    (PCR 7's Secure Boot variables and PCR 4's applications sit there), each cut at a record
    boundary within EVENTLOG_SEED_BYTES. Logs the parser refuses (the corpus keeps a few
    bogus ones) are seeds as they are."""
    seeds: list[bytes] = []
    for log in _files("eventlogs/*/*"):
        try:
            header, offsets = _records(log)
        except MalformedInput:
            seeds.append(log[:EVENTLOG_SEED_BYTES])
            continue
        budget = EVENTLOG_SEED_BYTES - len(header)
        for start_index in (0, len(offsets) // 2):
            start = offsets[start_index]
            end = max((o for o in offsets[start_index:] if o - start <= budget), default=start)
            if end > start or not start_index:
                seeds.append(header + log[start:end])
    return tuple(dict.fromkeys(seeds))


@functools.cache
def smi_xml() -> tuple[bytes, ...]:
    return tuple(x for x in _files("gpu/*/*.xml") if len(x) <= SMI_XML_SEED_BYTES)


@functools.cache
def evidence_body() -> tuple[bytes, ...]:
    """Serialized EvidenceBody as the agent sends it: host facts, the posture of an empty
    root (every field unavailable), the GPU state of each small nvidia-smi capture, and a
    certify key."""
    spki = (
        ec.derive_private_key(0xB0D1, ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    host = common_pb2.HostFacts(
        hostname="gpu-node-7",
        os_release="Ubuntu 24.04",
        kernel="6.8.0-45-generic",
        machine_id="0f" * 16,
        agent_version="0.12.0",
        zone="production-inference",
        labels={"rack": "r12", "pool": "h100"},
    )
    posture = collect_posture(REPO / "tests" / "fuzz" / "no-such-root")
    posture.sshd.permit_root_login = "no"
    posture.sshd.password_authentication = False
    posture.modules.add(name="nvidia", taint="OE")
    # A listener the host reports, not a bind of ours.
    posture.listening.add(protocol="tcp", address="0.0.0.0", port=22, process="sshd")  # noqa: S104
    posture.mounts.add(mount_point="/", device="/dev/dm-0", encrypted=True, cipher="aes-xts")
    seeds = [attestation_pb2.EvidenceBody().SerializeToString()]
    for xml in smi_xml()[:3]:
        body = attestation_pb2.EvidenceBody(
            certify_key_spki=spki,
            certify_key_proof=b"\x30" + bytes(70),
            host=host,
            os=posture,
            gpu=parse_smi_xml(xml),
        )
        body.collected_at.FromSeconds(1_764_547_200)
        seeds.append(body.SerializeToString(deterministic=True))
    return tuple(seeds)


# sshd_config files as shipped (Debian's, trimmed of its comments) and the shapes the
# parser's conformance test (tests/test_sshd_config.py) checks against `sshd -T`.
_SSHD_CONFIGS = (
    "Include /etc/ssh/sshd_config.d/*.conf\nKbdInteractiveAuthentication no\nUsePAM yes\n"
    "X11Forwarding yes\nPrintMotd no\nAcceptEnv LANG LC_*\n"
    "Subsystem\tsftp\t/usr/lib/openssh/sftp-server\n",
    "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
    "Match User alice,bob Address 10.0.0.0/8\n  PermitRootLogin yes\n"
    "  PasswordAuthentication yes\nMatch all\nPermitRootLogin no\n",
    'PermitRootLogin = "without-password" # old name\nPasswordAuthentication=no\r\n'
    "Match invalid-user\n\tPasswordAuthentication no\n",
    "#PermitRootLogin yes\n\nInclude sshd_config.d/*.conf loop.conf\nPermitRootLogin no\n",
    "AllowUsers 'a b' \"c d\" e\\ f\nPermitRootLogin 'no'\nMatch User x # comment\n",
)


@functools.cache
def sshd_config() -> tuple[bytes, ...]:
    from tests.test_sshd_config import CASES

    texts = [*_SSHD_CONFIGS, *(c.config.replace("{dir}", "/etc/ssh") for c in CASES)]
    return tuple(dict.fromkeys(t.encode() for t in texts))


# Policies as an operator writes them: the shipped default and one that uses every key.
_POLICY = """policy_id: fuzz-seed
data:
  bulletins: nvidia-driver-bulletins.csv
rules:
  - id: os.root_login
    description: no root login over SSH
    claim: configuration
    severity: contraindicated
    expr: os.sshd.permit_root_login in ["no", "prohibit-password"]
    found: os.sshd.permit_root_login
  - id: gpu.ecc
    description: ECC on every GPU
    claim: hardware
    severity: warning
    scope: gpu
    zones: [production-inference]
    labels: {pool: "h100"}
    expr: this.ecc_enabled == true && size(gpu.missing_bulletins) == 0
required_evidence:
  - evidence: os
  - evidence: gpu
    zones: [production-inference]
"""


@functools.cache
def policy() -> tuple[bytes, ...]:
    """The policy above, and each rule of the shipped default policy as a policy of its own
    (the whole file is past the harness's bound, tests.fuzz.targets.POLICY_MAX_BYTES)."""
    default = yaml.safe_load((POLICY_DIR / "default.yaml").read_text())
    singles = [
        yaml.safe_dump({"policy_id": f"default-{i}", "rules": [rule]}, sort_keys=False)
        for i, rule in enumerate(default["rules"])
    ]
    return tuple(t.encode() for t in (_POLICY, *singles))


@functools.cache
def gpu_report() -> tuple[bytes, ...]:
    """NVIDIA's recorded Hopper attestation reports (nvtrust's samples), binary."""
    return tuple(
        bytes.fromhex(data.decode().strip())
        for data in _files("gpu/nvidia_nvtrust_attestation/*ttestationReport*.txt")
    )


@functools.cache
def rim() -> tuple[bytes, ...]:
    """NVIDIA's driver and VBIOS RIMs (signed SWID tags)."""
    return tuple(_files("gpu/*/*.swidtag"))


@functools.cache
def gpu_leaf_fwid() -> tuple[bytes, ...]:
    """The DICE extension (2.23.133.5.4.1) of NVIDIA's recorded GPU attestation keys'
    certificates (RIoT's CompositeDeviceID on Hopper)."""
    return tuple(
        x509.load_pem_x509_certificates(data)[0]
        .extensions.get_extension_for_oid(x509.ObjectIdentifier("2.23.133.5.4.1"))
        .value.public_bytes()
        for data in _files("gpu/nvidia_nvtrust_attestation/*CertChain*.txt")
    )
