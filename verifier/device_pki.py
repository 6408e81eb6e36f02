"""The device issuing CAs' files in the PKI directory (``PkiFiles``): loaded at start
(``load_device_issuers``), rotated by ``devtrust-verifier ca rotate`` (``rotate_device_ca``).
What each file holds is in ``verifier/pki.py``; which CA signs and which a relying party
trusts is decided in ``verifier/ca.py`` (``DeviceIssuers``, ``plan_rotation``), from the
times read here.

A rotation is published ahead: the next CA goes into the bundle at once and signs only from
its activation time, by default one device certificate lifetime later, so that every agent
has handed it to its relying parties (with a certificate renewal) before any certificate it
signed is presented. The verifier must be restarted after a rotation to publish it; from
then on it switches to the new CA at that time by itself.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.core.errors import ConfigError, DevtrustError
from devtrust.verifier.ca import (
    ALWAYS,
    CertificateAuthority,
    DeviceIssuers,
    Issuer,
    Rotation,
    new_device_ca,
    pem,
    plan_rotation,
    private_key_pem,
)
from devtrust.verifier.pki import (
    PkiFiles,
    keep_backup,
    load_ca,
    parse_cert,
    parse_key,
    read_file,
    writable_dir,
    write_file,
)


def _device_pair(cert_path: Path, key_path: Path, missing: str) -> CertificateAuthority:
    """A device issuing CA from its two files, checked to be a pair and a CA."""
    what = "device CA certificate"
    cert = parse_cert(read_file(cert_path, what, missing=missing), cert_path, what)
    key = parse_key(
        read_file(key_path, "device CA key", missing=missing), key_path, "device CA key"
    )
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError(
            f"device CA key {key_path} is not the key of device CA certificate {cert_path}: "
            "give the pair that init or `ca rotate` made together"
        )
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(
            f"device CA certificate {cert_path} is not a CA certificate: give the file init or "
            "`ca rotate` made"
        )
    return CertificateAuthority(key=key, cert=cert)


def _time(value: object, path: Path, field: str) -> datetime.datetime:
    try:
        when = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise ConfigError(
            f"{path}: {field} {str(value)[:40]!r} is not an ISO 8601 time with its UTC offset: "
            "give the file `ca rotate` made"
        )
    return when


def _json(path: Path) -> dict[str, object]:
    data = read_file(path, "device CA state", missing="give the files `ca rotate` made")
    try:
        loaded = json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"{path} is not JSON ({exc}): give the file `ca rotate` made") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} is not a JSON object: give the file `ca rotate` made")
    return loaded


def _read_retired(path: Path) -> list[Issuer]:
    if not path.exists():
        return []
    entries = _json(path).get("retired")
    if not isinstance(entries, list):
        raise ConfigError(f"{path} has no list `retired`: give the file `ca rotate` made")
    retired = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: a retired CA is not a JSON object")
        cert = parse_cert(str(entry.get("certificate", "")).encode(), path, "retired device CA in")
        until = _time(entry.get("signed_until"), path, "signed_until")
        retired.append(Issuer(cert=cert, key=None, activate_after=ALWAYS, signed_until=until))
    return retired


def read_device_issuers(files: PkiFiles) -> tuple[Issuer, Issuer | None, list[Issuer]]:
    """The device CA that signs (as of the last init or rotation), the one published ahead
    (if any) and the retired ones still on record."""
    missing = (
        f"run `devtrust-verifier ca rotate --dir {files.directory}` to make one (device "
        f"certificates come from a CA of their own, not from {files.ca_cert.name})"
    )
    current = _device_pair(files.device_ca_cert, files.device_ca_key, missing)
    pending = None
    if files.next_cert.exists():
        ca = _device_pair(files.next_cert, files.next_key, "give the files `ca rotate` made")
        when = _time(
            _json(files.next_meta).get("activate_after"), files.next_meta, "activate_after"
        )
        pending = Issuer(cert=ca.cert, key=ca.key, activate_after=when)
    signer = Issuer(cert=current.cert, key=current.key, activate_after=ALWAYS)
    return signer, pending, _read_retired(files.retired)


def load_device_issuers(
    directory: Path,
    *,
    verifier_ca: x509.Certificate,
    device_lifetime: datetime.timedelta,
    clock: Callable[[], datetime.datetime],
) -> DeviceIssuers:
    """The device issuing CAs in ``directory`` (the one holding ``ca.cert``), at start. None
    may be the verifier's own CA: a relying party trusting the bundle would then accept
    channel, operator and server certificates too."""
    files = PkiFiles.in_dir(directory)
    current, pending, retired = read_device_issuers(files)
    for issuer, path in ((current, files.device_ca_cert), (pending, files.next_cert)):
        if issuer is not None and issuer.cert.public_key() == verifier_ca.public_key():
            raise ConfigError(
                f"device CA {path} is the verifier's CA: relying parties trusting it would "
                f"accept channel, operator and server certificates too; remove {path.name} and "
                f"its key, and run `devtrust-verifier ca rotate --dir {directory}` to make a "
                "device CA of its own"
            )
    issuers = DeviceIssuers(
        [current, *([pending] if pending else []), *retired],
        device_lifetime=device_lifetime,
        clock=clock,
    )
    now = clock()
    signer = issuers.signer_at(now)
    if signer.cert.not_valid_after_utc <= now:
        raise ConfigError(
            f"device CA {signer.cert.subject.rfc4514_string()} in {directory} expired on "
            f"{signer.cert.not_valid_after_utc.isoformat()}: run `devtrust-verifier ca rotate "
            f"--dir {directory} --activate-after 0`"
        )
    return issuers


def _replace_file(
    path: Path, data: bytes, *, mode: int, now: datetime.datetime, group: int | None = None
) -> None:
    try:
        keep_backup(path, now)
    except OSError as exc:
        raise DevtrustError(f"cannot keep a backup of {path}: {exc.strerror}") from exc
    write_file(path, data, mode=mode, group=group)


def _key_access(files: PkiFiles) -> tuple[int, int | None]:
    """Mode and group for new device CA keys: those of the key there now (the verifier's
    service user reads it through its group, README), never more than 0640."""
    try:
        st = files.device_ca_key.stat()
    except FileNotFoundError:
        st = files.ca_key.stat()
    group = None if st.st_gid == os.getegid() else st.st_gid
    return 0o600 | (st.st_mode & 0o040), group


def rotate_device_ca(
    directory: Path,
    *,
    now: datetime.datetime,
    activate_after: datetime.timedelta,
    device_lifetime: datetime.timedelta,
) -> Rotation | None:
    """``ca rotate``: publish a next device CA (``plan_rotation``) and rewrite the bundle.
    In a directory without any device CA (made before they existed) it makes the first one,
    which signs at once (None): no device CA signed anything that relying parties hold."""
    files = PkiFiles.in_dir(directory)
    writable_dir(directory, "--dir")
    if not files.device_ca_cert.exists() and not files.device_ca_key.exists():
        load_ca(files.ca_cert, files.ca_key, configured=False)  # a directory init made
        ca = new_device_ca(now)
        mode, group = _key_access(files)
        write_file(files.device_ca_key, private_key_pem(ca.key), mode=mode, group=group)
        write_file(files.device_ca_cert, pem(ca.cert), mode=0o644)
        _replace_file(files.device_bundle, pem(ca.cert), mode=0o644, now=now)
        return None
    current, pending, retired = read_device_issuers(files)
    mode, group = _key_access(files)
    try:
        rotation = plan_rotation(
            current,
            pending,
            retired,
            now=now,
            activate_after=activate_after,
            device_lifetime=device_lifetime,
        )
    except ValueError as exc:
        raise DevtrustError(str(exc)) from exc
    # The retiring CA is on record before the files that held it are replaced.
    record = {
        "retired": [
            {"certificate": pem(r.cert).decode(), "signed_until": r.signed_until.isoformat()}
            for r in rotation.retired
            if r.signed_until is not None
        ]
    }
    _replace_file(files.retired, json.dumps(record, indent=1).encode(), mode=0o644, now=now)
    if rotation.promoted:
        assert rotation.current.key is not None
        _replace_file(
            files.device_ca_key,
            private_key_pem(rotation.current.key),
            mode=mode,
            now=now,
            group=group,
        )
        _replace_file(files.device_ca_cert, pem(rotation.current.cert), mode=0o644, now=now)
    nxt = rotation.next
    assert nxt.key is not None
    meta = json.dumps({"activate_after": nxt.activate_after.isoformat()}).encode()
    write_file(files.next_key, private_key_pem(nxt.key), mode=mode, group=group)
    write_file(files.next_meta, meta, mode=0o644)
    write_file(files.next_cert, pem(nxt.cert), mode=0o644)
    bundle = DeviceIssuers(
        [rotation.current, nxt, *rotation.retired],
        device_lifetime=device_lifetime,
        clock=lambda: now,
    ).bundle_at(now)
    _replace_file(files.device_bundle, b"".join(pem(c) for c in bundle), mode=0o644, now=now)
    return rotation
