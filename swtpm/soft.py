"""An in-process software TPM for simulation: ``devtrust.agent.interfaces.Tpm`` without a TPM,
so that thousands of devices run on one event loop in one process (DESIGN.md "Devices in
tests and simulation").

It produces what a TPM 2.0 produces, byte for byte in layout (TPM 2.0 Library rev 1.59,
Part 2 for the structures, Part 1 for the cryptography), so the unchanged verifier enrolls and
appraises it exactly as it does swtpm:

- EK: ECC NIST P-256 from the TCG default template L-2 (EK Credential Profile 2.0, B.3.4), with
  a certificate from a ``SimulationRoot`` (``devtrust.swtpm.simroot``), which only a verifier
  configured with ``endorsement.trust_simulation_root`` trusts;
- AK: ECC P-256 restricted signing key, ECDSA-SHA256, as ``devtrust.agent.tpm.ak_template()``,
  a primary key of the endorsement hierarchy (its qualified name signs quotes);
- PCRs: sha1 and sha256 banks of 24, extended at construction with the measured boot of
  ``devtrust.swtpm.bootlog`` and logged in a TCG2 crypto-agile event log;
- TPM2_ActivateCredential (Part 1, 24) and TPM2_Quote (Part 3, 18.4).

Costs: construction is two P-256 keys and one ECDSA signature (the EK certificate), a few
hundred microseconds; a quote is one ECDSA signature. The measured boot is computed once per
process and shared (PCR values and log bytes are immutable) until a device extends or reboots.
No tpm2-pytss: pure ``cryptography`` and ``struct`` (tests/test_softtpm.py checks the import).

Fault injection for simulations: ``extend(..., logged=False)`` changes a PCR the log does not
explain; ``roll_back_clock`` moves TPMS_CLOCK_INFO.clock back without a reset (``restore_clock``
undoes it); ``reboot``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
import time

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from devtrust.agent.errors import TpmError
from devtrust.agent.interfaces import PcrValues, Quote, Selection
from devtrust.swtpm import bootlog
from devtrust.swtpm.simroot import SimulationRoot

# TPM_ALG_ID, TPM_ECC_CURVE, TPM_ST, TPM_RH (Part 2, 6.3, 6.4, 6.9, 7.4).
ALG_SHA1 = 0x0004
ALG_AES = 0x0006
ALG_SHA256 = 0x000B
ALG_NULL = 0x0010
ALG_ECDSA = 0x0018
ALG_ECC = 0x0023
ALG_CFB = 0x0043
ECC_NIST_P256 = 0x0003
ST_ATTEST_QUOTE = 0x8018
TPM_GENERATED_VALUE = 0xFF544347
TPM_RH_ENDORSEMENT = 0x4000000B
# TPMA_OBJECT (Part 2, 8.3.2).
FIXED_TPM = 1 << 1
FIXED_PARENT = 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
USER_WITH_AUTH = 1 << 6
ADMIN_WITH_POLICY = 1 << 7
RESTRICTED = 1 << 16
DECRYPT = 1 << 17
SIGN_ENCRYPT = 1 << 18
# EK template L-2 (EK Credential Profile 2.0, B.3.3-B.3.4): authPolicy is
# PolicySecret(TPM_RH_ENDORSEMENT).
EK_ATTRIBUTES = (
    FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | ADMIN_WITH_POLICY | RESTRICTED | DECRYPT
)
EK_AUTH_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
# devtrust.agent.tpm.AK_ATTRIBUTES
AK_ATTRIBUTES = (
    RESTRICTED | SIGN_ENCRYPT | FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH
)
PCR_COUNT = 24
# PCRs 17-22 (the D-RTM's) start at all ones after a TPM Reset (PC Client PTP, 4.6).
DRTM_PCRS = range(17, 23)
BANKS: dict[str, tuple[int, int]] = {"sha1": (ALG_SHA1, 20), "sha256": (ALG_SHA256, 32)}
# TPMS_CLOCK_INFO / TPMS_ATTEST.firmwareVersion of simulated TPMs (vendor-defined).
FIRMWARE_VERSION = 0x0001_0000_2026_0001
MAX_QUALIFYING_DATA = 66  # TPM2B_DATA: sizeof(TPMT_HA) (Part 2, 10.4.3)
MAX_DIGEST = 64  # TPM2B_DIGEST: sizeof(TPMU_HA)
# A measurement with extend(): EV_EVENT_TAG unless the caller names another type (PFP 10.4.1).
EV_EVENT_TAG = 0x00000006

_U16 = struct.Struct(">H")
_EK_PARAMETERS = struct.pack(">HHHHHH", ALG_AES, 128, ALG_CFB, ALG_NULL, ECC_NIST_P256, ALG_NULL)
_AK_PARAMETERS = struct.pack(">HHHHH", ALG_NULL, ALG_ECDSA, ALG_SHA256, ECC_NIST_P256, ALG_NULL)
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _tpm2b(data: bytes) -> bytes:
    return _U16.pack(len(data)) + data


def _coordinates(key: ec.EllipticCurvePublicKey) -> tuple[bytes, bytes]:
    point = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:33], point[33:65]


def ecc_public_area(
    key: ec.EllipticCurvePublicKey, *, attributes: int, auth_policy: bytes, parameters: bytes
) -> bytes:
    """TPMT_PUBLIC of an ECC P-256 key with nameAlg SHA-256 (Part 2, 12.2.4)."""
    x, y = _coordinates(key)
    return (
        struct.pack(">HHI", ALG_ECC, ALG_SHA256, attributes)
        + _tpm2b(auth_policy)
        + parameters
        + _tpm2b(x)
        + _tpm2b(y)
    )


def name_of(public_area: bytes) -> bytes:
    """Name: nameAlg || H_nameAlg(TPMT_PUBLIC) (Part 1, 16)."""
    return _U16.pack(ALG_SHA256) + hashlib.sha256(public_area).digest()


def kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa with HMAC-SHA256 (Part 1, 11.4.10.2; SP 800-108 counter mode)."""
    fixed = label + b"\x00" + context_u + context_v + struct.pack(">I", bits)
    out = b""
    counter = 1
    while len(out) * 8 < bits:
        out += hmac.digest(key, struct.pack(">I", counter) + fixed, "sha256")
        counter += 1
    return out[: bits // 8]


def kdfe(z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe with SHA-256 (Part 1, 11.4.10.3; SP 800-56A concatenation KDF)."""
    other = label + b"\x00" + party_u + party_v
    out = b""
    counter = 1
    while len(out) * 8 < bits:
        out += hashlib.sha256(struct.pack(">I", counter) + z + other).digest()
        counter += 1
    return out[: bits // 8]


def _key_from(seed: bytes | None, use: bytes) -> ec.EllipticCurvePrivateKey:
    if seed is None:
        return ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(b"devtrust softtpm " + use + b"\x00" + seed).digest()
    return ec.derive_private_key(
        int.from_bytes(digest, "big") % (_P256_ORDER - 1) + 1, ec.SECP256R1()
    )


def _initial_pcrs() -> dict[str, list[bytes]]:
    pcrs: dict[str, list[bytes]] = {}
    for bank, (_, size) in BANKS.items():
        values = [bytes(size)] * PCR_COUNT
        for index in DRTM_PCRS:
            values[index] = b"\xff" * size
        pcrs[bank] = values
    return pcrs


def _extend_all(pcrs: dict[str, list[bytes]], index: int, data: bytes) -> list[tuple[int, bytes]]:
    """TPM2_PCR_Event: H(data) extended into PCR ``index`` of every bank (Part 3, 22.3);
    returns the (algorithm, digest) pairs for the log."""
    digests = []
    for bank, (alg, _) in BANKS.items():
        digest = hashlib.new(bank, data).digest()
        values = pcrs[bank]
        values[index] = hashlib.new(bank, values[index] + digest).digest()
        digests.append((alg, digest))
    return digests


@functools.cache
def _booted() -> tuple[dict[str, tuple[bytes, ...]], bytes]:
    """PCR values and event log after ``bootlog.boot_events()``: the same for every device,
    computed once."""
    pcrs = _initial_pcrs()
    log = bootlog.spec_id_event(list(BANKS.values()))
    for index, type_, data in bootlog.boot_events():
        log += bootlog.event_record(index, type_, _extend_all(pcrs, index, data), data)
    return {bank: tuple(values) for bank, values in pcrs.items()}, log


class SoftTpm:
    """A booted software TPM with an ECC EK (certified by ``root``) and the devtrust AK.

    ``seed``: derive both keys from it (the same seed, the same device id); None: random.
    """

    __slots__ = (
        "_ak",
        "_ak_name",
        "_ak_public",
        "_ak_qualified_name",
        "_clock_back_ms",
        "_ek",
        "_ek_certificate",
        "_ek_public",
        "_ek_x",
        "_log",
        "_made",
        "_pcrs",
        "reset_count",
        "restart_count",
    )

    def __init__(self, root: SimulationRoot, *, seed: bytes | None = None) -> None:
        self._ek = _key_from(seed, b"ek")
        self._ak = _key_from(seed, b"ak")
        ek_public_key = self._ek.public_key()
        ek_area = ecc_public_area(
            ek_public_key,
            attributes=EK_ATTRIBUTES,
            auth_policy=EK_AUTH_POLICY,
            parameters=_EK_PARAMETERS,
        )
        ak_area = ecc_public_area(
            self._ak.public_key(),
            attributes=AK_ATTRIBUTES,
            auth_policy=b"",
            parameters=_AK_PARAMETERS,
        )
        self._ek_public = _tpm2b(ek_area)
        self._ek_x = ek_area[-66:-34]  # unique.ecc.x
        self._ak_public = _tpm2b(ak_area)
        self._ak_name = name_of(ak_area)
        # A primary key's qualified name: H(hierarchy handle || Name) (Part 1, 16.6).
        self._ak_qualified_name = (
            _U16.pack(ALG_SHA256)
            + hashlib.sha256(struct.pack(">I", TPM_RH_ENDORSEMENT) + self._ak_name).digest()
        )
        self._ek_certificate = root.issue_ek_certificate(ek_public_key)
        self._made = time.monotonic()
        self._clock_back_ms = 0
        self.reset_count = 0
        self.restart_count = 0
        self._boot()

    # --- simulation controls ------------------------------------------------------------

    def _boot(self) -> None:
        pcrs, self._log = _booted()
        self._pcrs = {bank: list(values) for bank, values in pcrs.items()}

    def event_log(self) -> bytes:
        """The TCG2 crypto-agile event log of every logged extend since the last boot."""
        return self._log

    def extend(
        self, index: int, data: bytes, *, logged: bool = True, event_type: int = EV_EVENT_TAG
    ) -> None:
        """Measure ``data`` into PCR ``index`` (its hash in every bank, as TPM2_PCR_Event)
        and log it as an event of ``event_type``, unless ``logged`` is False: then the PCR
        changes and the log does not say so (what PCR tampering looks like)."""
        if not 0 <= index < PCR_COUNT:
            raise ValueError(f"PCR index {index} is not 0-{PCR_COUNT - 1}")
        digests = _extend_all(self._pcrs, index, data)
        if logged:
            self._log += bootlog.event_record(index, event_type, digests, data)

    def reboot(self) -> None:
        """A TPM Reset (TPM2_Startup(CLEAR) after a power cycle) and the measured boot again:
        PCRs and log start over, resetCount + 1, restartCount 0; the clock keeps running."""
        self.reset_count += 1
        self.restart_count = 0
        self._boot()

    def roll_back_clock(self, ms: int) -> None:
        """Move TPMS_CLOCK_INFO.clock back by ``ms`` with no reset and safe still YES: what
        no TPM does, for the verifier to notice. The clock stays at 0 while it would be
        negative, then runs on."""
        if ms < 0:
            raise ValueError("roll_back_clock: ms must not be negative")
        self._clock_back_ms += ms

    def restore_clock(self) -> None:
        """Undo every ``roll_back_clock``: the clock reads as if never moved back (it jumps
        forward; a TPM's clock may be set forward, TPM2_ClockSet, never back)."""
        self._clock_back_ms = 0

    def clock_ms(self) -> int:
        """TPMS_CLOCK_INFO.clock: milliseconds since this TPM was made, less roll-backs."""
        return max(0, int((time.monotonic() - self._made) * 1000) - self._clock_back_ms)

    # --- devtrust.agent.interfaces.Tpm ----------------------------------------------------

    async def ek_certificate(self) -> bytes | None:
        return self._ek_certificate

    async def ek_public(self) -> bytes:
        return self._ek_public

    async def ak_public(self) -> bytes:
        return self._ak_public

    async def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        return self.activate(credential_blob, encrypted_secret)

    async def pcr_read(self, selection: Selection) -> PcrValues:
        return {
            (bank, i): self._pcrs[bank][i] for bank, pcrs in self._checked(selection) for i in pcrs
        }

    async def quote(self, qualifying_data: bytes, selection: Selection) -> Quote:
        return self.sign_quote(qualifying_data, selection)

    # --- the commands, synchronous ------------------------------------------------------

    def activate(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential(AK, EK) (Part 3, 12.5; Part 1, 24.4 and C.6.1)."""
        # 1. The encrypted secret is a TPMS_ECC_POINT: the ephemeral key of MakeCredential.
        point = _unwrap(encrypted_secret, "TPM2B_ENCRYPTED_SECRET")
        ex, rest = _split_tpm2b(point, "TPMS_ECC_POINT.x")
        ey, rest = _split_tpm2b(rest, "TPMS_ECC_POINT.y")
        if rest or not 0 < len(ex) <= 32 or not 0 < len(ey) <= 32:
            raise TpmError("TPM ActivateCredential failed: TPM_RC_SIZE (encrypted secret)")
        try:
            ephemeral = ec.EllipticCurvePublicNumbers(
                int.from_bytes(ex, "big"), int.from_bytes(ey, "big"), ec.SECP256R1()
            ).public_key()
        except ValueError:
            raise TpmError("TPM ActivateCredential failed: TPM_RC_ECC_POINT") from None
        # 2. Z = x of d_EK * Q_e; seed = KDFe(SHA-256, Z, "IDENTITY", x_e, x_EK, 256).
        z = self._ek.exchange(ec.ECDH(), ephemeral)
        seed = kdfe(z, b"IDENTITY", ex, self._ek_x, 256)
        # 3. TPM2B_ID_OBJECT: integrityHMAC (TPM2B_DIGEST) || encIdentity.
        blob = _unwrap(credential_blob, "TPM2B_ID_OBJECT")
        integrity, enc_identity = _split_tpm2b(blob, "TPM2B_ID_OBJECT.integrityHMAC")
        if len(integrity) != 32 or not enc_identity:
            raise TpmError("TPM ActivateCredential failed: TPM_RC_SIZE (credential blob)")
        # 4. The outer HMAC over encIdentity || Name(AK), keyed from the seed (Part 1, 24.5):
        #    a credential made for another EK or another AK name fails here.
        hmac_key = kdfa(seed, b"INTEGRITY", b"", b"", 256)
        expected = hmac.digest(hmac_key, enc_identity + self._ak_name, "sha256")
        if not hmac.compare_digest(expected, integrity):
            raise TpmError("TPM ActivateCredential failed: TPM_RC_INTEGRITY")
        # 5. AES-128-CFB, IV zero, with KDFa(SHA-256, seed, "STORAGE", Name(AK), "", 128).
        key = kdfa(seed, b"STORAGE", self._ak_name, b"", 128)
        decryptor = Cipher(algorithms.AES(key), CFB(bytes(16))).decryptor()
        plain = decryptor.update(enc_identity) + decryptor.finalize()
        # 6. The credential is a TPM2B_DIGEST filling the decrypted area.
        credential, rest = _split_tpm2b(plain, "credential")
        if rest or len(credential) > MAX_DIGEST:
            raise TpmError("TPM ActivateCredential failed: TPM_RC_SIZE (credential)")
        return credential

    def sign_quote(self, qualifying_data: bytes, selection: Selection) -> Quote:
        """TPM2_Quote by the AK (Part 3, 18.4): TPMS_ATTEST and TPMT_SIGNATURE."""
        if len(qualifying_data) > MAX_QUALIFYING_DATA:
            raise TpmError("TPM Quote failed: TPM_RC_SIZE (qualifyingData)")
        chosen = self._checked(selection)
        values: dict[tuple[str, int], bytes] = {}
        select = b""
        digest = hashlib.sha256()  # the AK's scheme hash
        for bank, pcrs in chosen:
            bitmap = bytearray(3)
            for i in pcrs:
                bitmap[i // 8] |= 1 << (i % 8)
                value = self._pcrs[bank][i]
                values[(bank, i)] = value
                digest.update(value)
            select += struct.pack(">HB", BANKS[bank][0], 3) + bytes(bitmap)
        attest = (
            struct.pack(">IH", TPM_GENERATED_VALUE, ST_ATTEST_QUOTE)
            + _tpm2b(self._ak_qualified_name)
            + _tpm2b(qualifying_data)
            + struct.pack(
                ">QIIBQI",
                self.clock_ms(),
                self.reset_count,
                self.restart_count,
                1,
                FIRMWARE_VERSION,
                len(chosen),
            )
            + select
            + _tpm2b(digest.digest())
        )
        r, s = decode_dss_signature(self._ak.sign(attest, ec.ECDSA(hashes.SHA256())))
        signature = (
            struct.pack(">HH", ALG_ECDSA, ALG_SHA256)
            + _tpm2b(r.to_bytes(32, "big"))
            + _tpm2b(s.to_bytes(32, "big"))
        )
        return Quote(attest, signature, values)

    def _checked(self, selection: Selection) -> list[tuple[str, list[int]]]:
        """The selection with its indices ascending (TPMS_PCR_SELECTION is a bitmap), empty
        banks left out; a bank or index this TPM lacks fails as on a TPM (TPM_RC_PCR)."""
        out = []
        for bank, pcrs in selection:
            if bank not in BANKS:
                raise TpmError(f"TPM has no PCR bank {bank!r} (TPM_RC_PCR)")
            bad = [i for i in pcrs if not 0 <= i < PCR_COUNT]
            if bad:
                raise TpmError(f"TPM has no PCR {bad[0]} in bank {bank} (TPM_RC_PCR)")
            if pcrs:
                out.append((bank, sorted(set(pcrs))))
        return out


def _unwrap(data: bytes, what: str) -> bytes:
    inner, rest = _split_tpm2b(data, what)
    if rest:
        raise TpmError(f"TPM ActivateCredential failed: TPM_RC_SIZE ({what})")
    return inner


def _split_tpm2b(data: bytes, what: str) -> tuple[bytes, bytes]:
    if len(data) < 2:
        raise TpmError(f"TPM ActivateCredential failed: TPM_RC_INSUFFICIENT ({what})")
    size = _U16.unpack_from(data)[0]
    if size > len(data) - 2:
        raise TpmError(f"TPM ActivateCredential failed: TPM_RC_INSUFFICIENT ({what})")
    return data[2 : 2 + size], data[2 + size :]
