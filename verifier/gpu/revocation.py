"""Revocation of GPU (and RIM) certificates from data the operator supplies: CRLs (PEM or
DER) and OCSP responses (DER) fetched from NVIDIA's services or a mirror and dropped into one
directory (``gpu.revocation`` in verifier.yaml). Nothing is fetched here, least of all while
appraising: ``Revocations.load`` reads the directory (at start and on reload), ``status``
is pure and takes the time in.

A CRL counts only when its issuer name is the certificate's issuer's subject and its
signature verifies with the issuer's key (RFC 5280, 6.3.3 (f), (g)). An OCSP response counts
only when it is successful, its signature verifies with the issuer's key or with a delegated
responder certificate the issuer signed that has the OCSP-signing extended key usage
(RFC 6960, 4.2.2.2), and its single response's CertID matches the certificate: serial number,
and the hashes of the issuer's name and key (RFC 6960, 4.1.1). Data that does not count is
ignored for that certificate, and said so in the status's ``detail``.

Age is measured from the CRL's thisUpdate or the OCSP response's thisUpdate; data older than
the operator's ``max_age``, or past its own nextUpdate, is stale (still used: a revocation
is a revocation; a stale "good" is a warning).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from devtrust.core.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_FILES",
    "MAX_FILE_BYTES",
    "RevocationState",
    "RevocationStatus",
    "Revocations",
]

# A revocation directory holds at most this many files, each at most this large (NVIDIA's
# GPU CRLs are a few KiB; a mistyped path such as /var is refused, not read whole).
MAX_FILES = 4096
MAX_FILE_BYTES = 16 * 1024 * 1024


class RevocationState(StrEnum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class RevocationStatus:
    """What the operator's data says of one certificate."""

    state: RevocationState
    # The file the answer came from ("" when unknown).
    source: str = ""
    # now - thisUpdate of that CRL or OCSP response (None when unknown).
    age: timedelta | None = None
    # Older than max_age, or past its own nextUpdate.
    stale: bool = False
    # Why, in words: the data that was ignored and why, the revocation time and reason.
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _Crl:
    crl: x509.CertificateRevocationList
    source: str


@dataclass(frozen=True, slots=True)
class _Ocsp:
    response: ocsp.OCSPResponse
    source: str


def _verify_with(key: object, signature: bytes, data: bytes, algorithm: object) -> bool:
    """``signature`` over ``data`` with ``key`` (the key types X.509 issuers use)."""
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(
            algorithm, hashes.HashAlgorithm
        ):
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey) and isinstance(algorithm, hashes.HashAlgorithm):
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(signature, data)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        return False
    return True


def _cert_id(
    cert: x509.Certificate, issuer: x509.Certificate, algorithm: hashes.HashAlgorithm
) -> tuple[bytes, bytes] | None:
    """RFC 6960 4.1.1 CertID hashes (issuerNameHash, issuerKeyHash) of ``cert`` as computed
    by cryptography's own OCSP request builder; None for a hash it does not support."""
    try:
        request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm).build()
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return request.issuer_name_hash, request.issuer_key_hash


def _key_sha1(cert: x509.Certificate) -> bytes:
    """RFC 6960 ResponderID byKey: SHA-1 of the subjectPublicKey bits (RFC 5280 key id
    method 1, which cryptography computes)."""
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


class _Memo:
    """Signature checks already made (a CRL or OCSP response, a key): the data is fixed for
    the life of a ``Revocations``, so each is made once, not once per report. Bounded."""

    LIMIT = 65536

    def __init__(self) -> None:
        self._results: dict[tuple[object, ...], bool] = {}

    def check(self, token: tuple[object, ...], verify: Callable[[], bool]) -> bool:
        result = self._results.get(token)
        if result is None:
            result = verify()
            if len(self._results) >= self.LIMIT:
                self._results.clear()
            self._results[token] = result
        return result


def _der_hash(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


class Revocations:
    """The operator's CRLs and OCSP responses, parsed (not yet verified: each one's issuer is
    known only when a certificate is checked)."""

    def __init__(
        self,
        crls: Sequence[_Crl] = (),
        responses: Sequence[_Ocsp] = (),
        problems: Sequence[str] = (),
    ) -> None:
        self._crls = tuple(crls)
        self._responses = tuple(responses)
        self._memo = _Memo()
        # Files left out when loaded (each a sentence naming it): logged and shown.
        self.problems = tuple(problems)
        # Looked up by the certificate's issuer name and serial, not scanned: a directory of
        # thousands of CRLs must not cost each GPU certificate thousands of comparisons.
        self._crls_by_issuer: dict[bytes, list[tuple[int, _Crl]]] = {}
        for n, entry in enumerate(self._crls):
            key = entry.crl.issuer.public_bytes()
            self._crls_by_issuer.setdefault(key, []).append((n, entry))
        self._ocsp_by_serial: dict[int, list[tuple[int, _Ocsp]]] = {}
        for n, item in enumerate(self._responses):
            for serial in {single.serial_number for single in item.response.responses}:
                self._ocsp_by_serial.setdefault(serial, []).append((n, item))

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(c.source for c in self._crls) + tuple(r.source for r in self._responses)

    @classmethod
    def from_files(cls, files: Iterable[tuple[str, bytes]], *, strict: bool = True) -> Revocations:
        """Parse ``(name, bytes)`` pairs: a PEM or DER CRL, or a DER OCSP response each;
        ConfigError naming the one that is neither. Not ``strict`` (the verifier): such a
        file is left out, named in ``problems`` and logged, and the others count: one bad
        file must not keep a new CRL's revocations from taking effect."""
        crls: list[_Crl] = []
        responses: list[_Ocsp] = []
        problems: list[str] = []
        for name, data in files:
            try:
                parsed = _parse(name, data)
            except ConfigError as exc:
                if strict:
                    raise
                problems.append(str(exc))
                logger.error("%s; left out, the other files count", exc)  # noqa: TRY400
                continue
            if isinstance(parsed, _Crl):
                crls.append(parsed)
            else:
                responses.append(parsed)
        return cls(crls, responses, problems)

    @classmethod
    def load(cls, directory: Path, *, strict: bool = True) -> Revocations:
        """Every regular file of ``directory`` (dot files skipped), each a CRL or an OCSP
        response: ConfigError naming the directory or the file that cannot be used (not
        ``strict``: a file that is neither is left out, see ``from_files``)."""
        try:
            entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
        except OSError as exc:
            raise ConfigError(
                f"gpu.revocation: cannot read the directory {directory}: {exc.strerror}"
            ) from None
        if len(entries) > MAX_FILES:
            raise ConfigError(
                f"gpu.revocation: {directory} holds {len(entries)} files, more than {MAX_FILES}: "
                "give the directory of CRLs and OCSP responses only"
            )
        files: list[tuple[str, bytes]] = []
        skipped: list[str] = []
        for path in entries:
            if not path.is_file():
                continue
            read = _read_file(path)
            if isinstance(read, bytes):
                files.append((str(path), read))
                continue
            if strict:
                raise read
            skipped.append(str(read))
            logger.error("%s; left out, the other files count", read)
        loaded = cls.from_files(files, strict=strict)
        if not skipped:
            return loaded
        return cls(loaded._crls, loaded._responses, (*skipped, *loaded.problems))

    def status(
        self,
        cert: x509.Certificate,
        issuer: x509.Certificate,
        now: datetime,
        max_age: timedelta,
    ) -> RevocationStatus:
        """What the data says of ``cert`` issued by ``issuer`` at ``now``: revoked if any
        verified CRL or OCSP response says so; else good from the freshest verified one that
        covers it; else unknown. ``detail`` names data that was ignored and why."""
        ignored: list[str] = []
        answers: list[tuple[RevocationState, str, datetime, datetime | None, str]] = []
        for n, entry in self._crls_by_issuer.get(cert.issuer.public_bytes(), ()):
            answer = _crl_answer(
                entry, cert, issuer, now, ignored, memo=self._memo, token=("crl", n)
            )
            if answer is not None:
                answers.append(answer)
        for n, item in self._ocsp_by_serial.get(cert.serial_number, ()):
            answer = _ocsp_answer(
                item, cert, issuer, now, ignored, memo=self._memo, token=("ocsp", n)
            )
            if answer is not None:
                answers.append(answer)
        note = "; ".join(ignored)
        if not answers:
            return RevocationStatus(
                RevocationState.UNKNOWN,
                detail=note or "no CRL or OCSP response from its issuer",
            )
        revoked = [a for a in answers if a[0] is RevocationState.REVOKED]
        chosen = revoked[0] if revoked else max(answers, key=lambda a: a[2])
        state, source, this_update, next_update, detail = chosen
        age = now - this_update
        stale = age > max_age or (next_update is not None and now > next_update)
        return RevocationStatus(
            state, source, age, stale, "; ".join(x for x in (detail, note) if x)
        )


def _read_file(path: Path) -> bytes | ConfigError:
    """A revocation file's bytes, or the error naming why it cannot be used."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return ConfigError(
                f"gpu.revocation: {path} is {size} bytes, more than {MAX_FILE_BYTES}: "
                "expected a CRL or an OCSP response"
            )
        return path.read_bytes()
    except OSError as exc:
        return ConfigError(f"gpu.revocation: cannot read {path}: {exc.strerror}")


def _parse(name: str, data: bytes) -> _Crl | _Ocsp:
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"gpu.revocation: {name} is larger than {MAX_FILE_BYTES} bytes")
    if b"-----BEGIN" in data[:4096]:
        try:
            return _Crl(x509.load_pem_x509_crl(data), name)
        except ValueError:
            raise ConfigError(
                f"gpu.revocation: {name}: expected a PEM CRL (-----BEGIN X509 CRL-----), "
                "found PEM that does not parse as one"
            ) from None
    try:
        return _Crl(x509.load_der_x509_crl(data), name)
    except ValueError:
        pass
    try:
        response = ocsp.load_der_ocsp_response(data)
    except ValueError:
        raise ConfigError(
            f"gpu.revocation: {name}: expected a CRL (PEM or DER) or an OCSP response (DER), "
            f"found {len(data)} bytes that parse as neither"
        ) from None
    if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise ConfigError(
            f"gpu.revocation: {name}: expected a successful OCSP response, found status "
            f"{response.response_status.name}"
        )
    return _Ocsp(response, name)


def _crl_answer(
    entry: _Crl,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    now: datetime,
    ignored: list[str],
    *,
    memo: _Memo,
    token: tuple[object, ...],
) -> tuple[RevocationState, str, datetime, datetime | None, str] | None:
    crl = entry.crl
    if crl.issuer != cert.issuer or crl.issuer != issuer.subject:
        return None  # another issuer's CRL: says nothing of this certificate
    # 1. The signature, with the issuer's key (RFC 5280 6.3.3 (f)).
    key = issuer.public_key()
    if not isinstance(
        key,
        ec.EllipticCurvePublicKey
        | rsa.RSAPublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ) or not memo.check((*token, _der_hash(issuer)), lambda: crl.is_signature_valid(key)):
        ignored.append(
            f"CRL {entry.source} names {issuer.subject.rfc4514_string()} as its issuer but "
            "its signature does not verify with that certificate's key"
        )
        return None
    this_update = crl.last_update_utc
    # 2. Not from the future (a clock or a forged date): ignored, said so.
    if this_update > now:
        ignored.append(f"CRL {entry.source} has thisUpdate {this_update.isoformat()} after now")
        return None
    # 3. The serial (RFC 5280 6.3.3 (g)).
    revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if revoked is not None:
        detail = f"revoked at {revoked.revocation_date_utc.isoformat()} by CRL {entry.source}"
        return RevocationState.REVOKED, entry.source, this_update, crl.next_update_utc, detail
    return RevocationState.GOOD, entry.source, this_update, crl.next_update_utc, ""


def _ocsp_answer(
    item: _Ocsp,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    now: datetime,
    ignored: list[str],
    *,
    memo: _Memo,
    token: tuple[object, ...],
) -> tuple[RevocationState, str, datetime, datetime | None, str] | None:
    response = item.response
    single = next(
        (
            candidate
            for candidate in response.responses
            if candidate.serial_number == cert.serial_number
            and _cert_id(cert, issuer, candidate.hash_algorithm)
            == (candidate.issuer_name_hash, candidate.issuer_key_hash)
        ),
        None,
    )
    if single is None:
        return None  # about other certificates
    problem = _ocsp_untrusted(item, issuer, now, memo, token)
    this_update = single.this_update_utc
    if problem is None and this_update > now:
        problem = f"OCSP response {item.source} has thisUpdate {this_update.isoformat()} after now"
    status = single.certificate_status
    if problem is None and status is ocsp.OCSPCertStatus.UNKNOWN:
        problem = f"OCSP response {item.source} says unknown"
    if problem is not None:
        ignored.append(problem)
        return None
    if status is ocsp.OCSPCertStatus.REVOKED:
        when = single.revocation_time_utc
        reason = single.revocation_reason
        detail = (
            f"revoked at {when.isoformat() if when else '?'}"
            + (f" ({reason.name})" if reason else "")
            + f" by OCSP response {item.source}"
        )
        return RevocationState.REVOKED, item.source, this_update, single.next_update_utc, detail
    return RevocationState.GOOD, item.source, this_update, single.next_update_utc, ""


def _ocsp_untrusted(
    item: _Ocsp,
    issuer: x509.Certificate,
    now: datetime,
    memo: _Memo,
    token: tuple[object, ...],
) -> str | None:
    """Why ``item`` cannot be trusted for certificates of ``issuer``; None when it can."""
    response = item.response
    # 1. Who signed it: the issuer itself, or a delegated responder it issued (RFC 6960
    #    4.2.2.2) with id-kp-OCSPSigning, valid now.
    responder = _responder(response, issuer, now, memo, token)
    if responder is None:
        return (
            f"OCSP response {item.source} is signed by neither "
            f"{issuer.subject.rfc4514_string()} nor a responder certificate it delegated "
            "(OCSP signing)"
        )
    # 2. Its signature over tbsResponseData.
    if not memo.check(
        (*token, _der_hash(responder)),
        lambda: _verify_with(
            responder.public_key(),
            response.signature,
            response.tbs_response_bytes,
            response.signature_hash_algorithm,
        ),
    ):
        return (
            f"OCSP response {item.source}: its signature does not verify with "
            f"{responder.subject.rfc4514_string()}"
        )
    return None


def _issued_by(delegate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        delegate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _responder(
    response: ocsp.OCSPResponse,
    issuer: x509.Certificate,
    now: datetime,
    memo: _Memo,
    token: tuple[object, ...],
) -> x509.Certificate | None:
    """The certificate whose key signed ``response``: the issuer when the ResponderID names
    it, else a delegated responder certificate carried in the response."""

    def named(cert: x509.Certificate) -> bool:
        if response.responder_name is not None:
            return response.responder_name == cert.subject
        return response.responder_key_hash == _key_sha1(cert)

    if named(issuer):
        return issuer
    for delegate in response.certificates:
        if not named(delegate):
            continue
        issued = (*token, "delegate", _der_hash(delegate), _der_hash(issuer))
        if not memo.check(issued, functools.partial(_issued_by, delegate, issuer)):
            continue
        if not delegate.not_valid_before_utc <= now <= delegate.not_valid_after_utc:
            continue
        try:
            usage = delegate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            continue
        if ExtendedKeyUsageOID.OCSP_SIGNING in usage:
            return delegate
    return None
