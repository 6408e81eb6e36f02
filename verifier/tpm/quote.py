"""Quote verification: is this TPMS_ATTEST a quote, signed by this AK, over these PCR values,
answering this challenge? Pure: bytes and keys in, the parsed attestation or a
``QuoteRejected`` out. Steps are numbered and cite TPM 2.0 Library Part 2 (Structures) and
Part 3 (Commands), rev 1.59.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from devtrust.verifier.tpm.constants import (
    HASH_NAMES,
    ST_ATTEST_QUOTE,
    TPM_GENERATED_VALUE,
    Alg,
    hash_name,
)
from devtrust.verifier.tpm.structures import (
    Attest,
    PcrSelect,
    Signature,
    parse_attest,
    parse_signature,
)

ALLOWED_SIG_SCHEMES = frozenset({Alg.RSASSA, Alg.RSAPSS, Alg.ECDSA})
ALLOWED_SIG_HASHES = frozenset({Alg.SHA256, Alg.SHA384})
_HASHES: dict[int, hashes.HashAlgorithm] = {
    Alg.SHA256: hashes.SHA256(),
    Alg.SHA384: hashes.SHA384(),
}

AkKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PcrValues = Mapping[tuple[int, int], bytes]
"""PCR values keyed by (TPM_ALG_ID of the bank, PCR index)."""


@dataclass(frozen=True)
class QuoteRejected(Exception):
    """A hard failure: the quote proves nothing. ``finding_id`` is stable."""

    finding_id: str
    message: str
    expected: str = ""
    found: str = ""

    def __str__(self) -> str:
        return self.message


def verify_signature(key: AkKey, sig: Signature, message: bytes) -> None:
    """Check a TPMT_SIGNATURE over message with the AK's public key (Part 2, 11.3.4)."""
    # 1. Only schemes and hashes we allow: a quote signed with SHA-1 or with an HMAC proves
    #    nothing to a remote party.
    if sig.alg not in ALLOWED_SIG_SCHEMES:
        raise QuoteRejected(
            "tpm.quote.signature_scheme",
            f"signature scheme 0x{sig.alg:04x} is not allowed",
            "rsassa, rsapss or ecdsa",
            f"0x{sig.alg:04x}",
        )
    if sig.hash_alg not in ALLOWED_SIG_HASHES:
        raise QuoteRejected(
            "tpm.quote.signature_hash",
            f"signature hash 0x{sig.hash_alg:04x} is not allowed",
            "sha256 or sha384",
            f"0x{sig.hash_alg:04x}",
        )
    digest = _HASHES[sig.hash_alg]
    # 2. The scheme must fit the key type, then the signature must verify.
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if sig.alg != Alg.ECDSA:
                raise QuoteRejected(
                    "tpm.quote.signature_scheme",
                    "an ECC AK must sign with ECDSA",
                    "ecdsa",
                    f"0x{sig.alg:04x}",
                )
            der = encode_dss_signature(
                int.from_bytes(sig.ecc_r, "big"), int.from_bytes(sig.ecc_s, "big")
            )
            key.verify(der, message, ec.ECDSA(digest))
        else:
            if sig.alg == Alg.RSASSA:
                pad: padding.AsymmetricPadding = padding.PKCS1v15()
            elif sig.alg == Alg.RSAPSS:
                pad = padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.AUTO)
            else:
                raise QuoteRejected(
                    "tpm.quote.signature_scheme",
                    "an RSA AK must sign with RSASSA or RSAPSS",
                    "rsassa or rsapss",
                    f"0x{sig.alg:04x}",
                )
            key.verify(sig.rsa_sig, message, pad, digest)
    except InvalidSignature:
        raise QuoteRejected(
            "tpm.quote.signature_invalid", "quote signature does not verify with the enrolled AK"
        ) from None


def pcr_digest(hash_alg: int, selection: Sequence[PcrSelect], values: PcrValues) -> bytes:
    """H(PCR[i] || PCR[j] || ...) in selection order (Part 3, 18.4 TPM2_Quote, pcrDigest)."""
    h = hashlib.new(hash_name(hash_alg))
    for sel in selection:
        for index in sel.pcrs:
            h.update(values[(sel.hash_alg, index)])
    return h.digest()


def check_quote(
    *,
    attest_bytes: bytes,
    signature_bytes: bytes,
    ak_key: AkKey,
    expected_qualifying_data: bytes,
    requested: Sequence[PcrSelect],
    pcr_values: PcrValues | None,
    qualified_signers: Collection[bytes] | None = None,
) -> Attest:
    """Verify a quote; return the parsed TPMS_ATTEST or raise ``QuoteRejected``.

    ``MalformedInput`` (from parsing) means the bytes are not a TPMS_ATTEST or TPMT_SIGNATURE
    at all; that is bad input, not a verdict. ``pcr_values=None`` skips step 7: only for the
    offline ``devtrust quote check`` run without ``--pcrs``; the verifier always passes them.
    """
    sig = parse_signature(signature_bytes)
    attest = parse_attest(attest_bytes)
    # 1-2. Signature by the enrolled AK over the exact TPMS_ATTEST bytes (Part 3, 18.4).
    verify_signature(ak_key, sig, attest_bytes)
    # 3. magic is TPM_GENERATED_VALUE (Part 2, 10.12.12; 6.2): the TPM made this structure.
    if attest.magic != TPM_GENERATED_VALUE:
        raise QuoteRejected(
            "tpm.quote.bad_magic",
            "TPMS_ATTEST magic is not TPM_GENERATED",
            f"{TPM_GENERATED_VALUE:08x}",
            f"{attest.magic:08x}",
        )
    # 4. type is TPM_ST_ATTEST_QUOTE (Part 2, 6.9): not a certify or audit reused as a quote.
    if attest.type != ST_ATTEST_QUOTE:
        raise QuoteRejected(
            "tpm.quote.wrong_type",
            "TPMS_ATTEST is not a quote",
            f"{ST_ATTEST_QUOTE:04x}",
            f"{attest.type:04x}",
        )
    # 4b. qualifiedSigner is the AK's qualified name where the verifier knows its place
    #     (Part 2, 10.12.12; Part 1, 16.6): the enrolled key, under the enrolled EK.
    if qualified_signers is not None and attest.qualified_signer not in qualified_signers:
        raise QuoteRejected(
            "tpm.quote.qualified_signer",
            "quote's qualifiedSigner is not the qualified name of the enrolled AK",
            " or ".join(sorted(q.hex() for q in qualified_signers)),
            attest.qualified_signer.hex(),
        )
    # 5. extraData (qualifying data) binds this challenge's nonce and this evidence body.
    if not hmac.compare_digest(attest.extra_data, expected_qualifying_data):
        raise QuoteRejected(
            "tpm.quote.qualifying_data_mismatch",
            "quote does not answer this challenge: its qualifying data (extraData) is not "
            "the expected binding of nonce and evidence",
            expected_qualifying_data.hex(),
            attest.extra_data.hex(),
        )
    # 6. The quoted selection is exactly what was asked (Part 2, 10.12.1 TPMS_QUOTE_INFO).
    want = tuple(PcrSelect(s.hash_alg, tuple(sorted(s.pcrs))) for s in requested if s.pcrs)
    got = tuple(s for s in attest.pcr_select if s.pcrs)
    if got != want:
        raise QuoteRejected(
            "tpm.quote.selection_mismatch",
            "quoted PCR selection differs from the challenge",
            _fmt_selection(want),
            _fmt_selection(got),
        )
    # 7. pcrDigest equals the hash (the signing scheme's) of the reported values (Part 3, 18.4).
    if pcr_values is None:
        return attest
    missing = [(s.hash_alg, i) for s in got for i in s.pcrs if (s.hash_alg, i) not in pcr_values]
    if missing:
        raise QuoteRejected(
            "tpm.quote.pcr_values_missing",
            "evidence lacks quoted PCR values",
            "",
            ", ".join(f"{_bank_name(a)}:{i}" for a, i in missing),
        )
    computed = pcr_digest(sig.hash_alg, got, pcr_values)
    if not hmac.compare_digest(computed, attest.pcr_digest):
        raise QuoteRejected(
            "tpm.quote.pcr_digest_mismatch",
            "reported PCR values do not hash to the quoted pcrDigest",
            attest.pcr_digest.hex(),
            computed.hex(),
        )
    return attest


def _bank_name(alg: int) -> str:
    """A bank's name in a message; the TPM_ALG_ID itself for one the verifier does not know
    (a quote's selection may name any: the message must still be made)."""
    return HASH_NAMES.get(alg, f"0x{alg:04x}")


def _fmt_selection(sel: Sequence[PcrSelect]) -> str:
    return "+".join(f"{_bank_name(s.hash_alg)}:{','.join(map(str, s.pcrs))}" for s in sel)
