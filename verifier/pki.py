"""Make the files a verifier deployment needs: its CA, its server certificate, operator
certificates and the device issuing CAs; load them back at start. Used by ``devtrust-verifier
init``, ``operator``, ``ca rotate`` and ``serve``, and by the demo.

The device issuing CAs live beside the CA (``verifier/ca.py`` says why they are apart):
``device-ca.pem``/``.key`` signs (init's, or the one a rotation promoted);
``device-ca-next.pem``/``.key`` with ``device-ca-next.json`` (its activation time) is
published ahead of signing; ``device-ca-retired.json`` holds retired CA certificates (no keys)
and when each stopped signing; ``device-bundle.pem`` is the relying-party bundle as of the
last init or rotation, to hand out. ``ear.key``/``ear.pem`` sign the EARs the Query API
returns (verifier/ear.py); the CA issues ear.pem (``ear_certificate`` says its profile).

Every problem is one ``DevtrustError`` line naming the file and the remedy (issue 8). Nothing
is lost: ``init`` refuses a directory that already holds a CA unless forced, and a forced
``init`` (or an operator certificate issued again) keeps each file it replaces beside it as
``NAME.<UTC time>.bak``; new files are written in full and renamed into place.
"""

from __future__ import annotations

import datetime
import errno
import grp
import ipaddress
import os
import re
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from devtrust.core.errors import ConfigError, DevtrustError
from devtrust.core.files import write_atomic
from devtrust.verifier.ca import (
    CLOCK_SKEW,
    CertificateAuthority,
    new_device_ca,
    pem,
    private_key_pem,
)
from devtrust.verifier.ear import EAR_SIGNING_EKU, EarSigner

# RFC 1123 host names: labels of letters, digits and hyphens, not starting or ending with one.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_OPERATOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class PkiFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    # The device issuing CA that signs (the current one) and the relying-party bundle.
    device_ca_cert: Path
    device_ca_key: Path
    device_bundle: Path
    # What a forced init replaced, kept beside it.
    backups: tuple[Path, ...] = ()

    @classmethod
    def in_dir(cls, directory: Path) -> PkiFiles:
        return cls(
            directory / "ca.pem",
            directory / "ca.key",
            directory / "server.pem",
            directory / "server.key",
            directory / "device-ca.pem",
            directory / "device-ca.key",
            directory / "device-bundle.pem",
        )

    @property
    def directory(self) -> Path:
        return self.ca_cert.parent

    @property
    def next_cert(self) -> Path:
        return self.directory / "device-ca-next.pem"

    @property
    def next_key(self) -> Path:
        return self.directory / "device-ca-next.key"

    @property
    def next_meta(self) -> Path:
        return self.directory / "device-ca-next.json"

    @property
    def retired(self) -> Path:
        return self.directory / "device-ca-retired.json"

    @property
    def ear_key(self) -> Path:
        """The key that signs EARs (verifier/ear.py), ``ear.signing_key``."""
        return self.directory / "ear.key"

    @property
    def ear_cert(self) -> Path:
        """Its certificate, issued by the verifier's CA: ``ear.signing_cert``."""
        return self.directory / "ear.pem"

    def all(self) -> tuple[Path, ...]:
        return (self.ca_cert, self.ca_key, self.server_cert, self.server_key)

    def device_all(self) -> tuple[Path, ...]:
        return (
            self.device_ca_cert,
            self.device_ca_key,
            self.device_bundle,
            self.next_cert,
            self.next_key,
            self.next_meta,
            self.retired,
        )


def hostname_problem(name: str) -> str | None:
    """Why ``name`` cannot go into a server certificate, or None: an IP address or an RFC 1123
    host name (a wildcard is not: agents check the name they dial)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return None
    labels = name.removesuffix(".").split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return (
            f"--hostname {name!r} is neither an IP address nor a host name (letters, digits, "
            "hyphens and dots): give the name agents use to reach the verifier"
        )
    return None


def _backup_name(path: Path, now: datetime.datetime) -> Path:
    stamp = now.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    backup = path.with_name(f"{path.name}.{stamp}.bak")
    n = 1
    while backup.exists():
        backup = path.with_name(f"{path.name}.{stamp}.{n}.bak")
        n += 1
    return backup


def keep_backup(path: Path, now: datetime.datetime) -> Path | None:
    """Keep the file at ``path`` (if any) as a backup beside it: a hard link, so that the path
    itself holds the old content until the new file is renamed over it."""
    if not path.exists():
        return None
    backup = _backup_name(path, now)
    try:
        os.link(path, backup)
    except OSError:  # a file system without hard links
        _copy_private(path, backup)
    return backup


def _copy_private(path: Path, backup: Path) -> None:
    """A copy of ``path`` at ``backup`` with its mode, never more open than 0600 meanwhile
    (shutil.copy2 creates the copy with the umask's mode first: a key readable for a moment)."""
    fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with open(fd, "wb") as fh:
        fh.write(path.read_bytes())
        os.fchmod(fh.fileno(), stat.S_IMODE(path.stat().st_mode))
        fh.flush()
        os.fsync(fh.fileno())


def write_file(path: Path, data: bytes, *, mode: int, group: int | None = None) -> None:
    """Write ``path`` whole with exactly ``mode`` (whatever the umask: a 0640 key made under
    UMask=0077 would otherwise be 0600 and the service could not read it; write_atomic sets
    it on the open file, never through the path) and ``group``."""
    try:
        write_atomic(path, data, mode=mode, group=group)
    except OSError as exc:
        raise DevtrustError(
            f"cannot write {path}: {exc.strerror}: choose a directory you can write"
        ) from exc


def writable_dir(directory: Path, flag: str) -> None:
    """Make ``directory`` if needed and check that it can be written, before anything else
    is done: one line naming it and ``flag`` (the option that names it) otherwise."""
    if directory.exists() and not directory.is_dir():
        raise DevtrustError(f"{directory} is not a directory: choose a directory ({flag})")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DevtrustError(
            f"cannot create {directory}: {exc.strerror}: choose a directory you can write ({flag})"
        ) from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise DevtrustError(
            f"cannot write in {directory}: {os.strerror(errno.EACCES)}: choose a directory "
            f"you can write ({flag})"
        )


@dataclass(frozen=True)
class KeyGroup:
    """The group that may read the keys the verifier service reads (the server key, the
    device issuing CA keys), and why that one."""

    gid: int
    name: str
    why: str


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# The group the packaged verifier service runs as (sysusers.d, the unit's User=devtrust).
SERVICE_GROUP = "devtrust"


def key_group(directory: Path, name: str | None) -> KeyGroup | None:
    """The group for ``init``'s service keys: ``name`` (``--group``) when given; else the
    group owning ``directory`` when it exists and is the service's group, SERVICE_GROUP
    (the package makes /etc/devtrust/verifier root:devtrust 0750, so that init there just
    works); else None (the keys stay 0600, the caller's). Only that one group is inferred: a
    directory under a setgid /srv (staff, users, adm) or made by hand with another group
    would otherwise hand the key that mints device certificates to everyone in it. The
    caller must be able to give files to the group (root, or a member): a group it cannot
    use is refused when named, and passed over when only inferred."""
    if name is not None:
        try:
            gid = grp.getgrnam(name).gr_gid
        except KeyError:
            raise DevtrustError(
                f"--group {name}: no such group: give the group the verifier service runs "
                "as (devtrust, made by the package)"
            ) from None
        if not _may_use(gid):
            raise DevtrustError(
                f"--group {name}: you are not in that group, so the keys cannot be given to "
                "it: run init as root (or as a member of the group)"
            )
        return KeyGroup(gid, name, "--group")
    try:
        gid = directory.stat().st_gid
    except FileNotFoundError:
        return None
    name = _group_name(gid)
    if name != SERVICE_GROUP or gid == os.getegid() or not _may_use(gid):
        return None
    return KeyGroup(gid, name, f"the group owning {directory}")


def _may_use(gid: int) -> bool:
    return os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups()


def init_pki(
    directory: Path,
    *,
    hostnames: list[str],
    now: datetime.datetime,
    server_lifetime: datetime.timedelta = datetime.timedelta(days=365),
    force: bool = False,
    group: int | None = None,
) -> PkiFiles:
    """Make a CA and a server certificate in ``directory``; the result lists the backups of
    the files a forced run replaced. Refuses a directory with any of them unless ``force``:
    a new CA key makes every certificate the old one issued stop verifying.

    ``group`` (``key_group``): the server key and the device issuing CA key are made 0640
    with that group, for the service user to read; ca.key stays 0600, the caller's: the
    service gets it only through systemd's LoadCredential= (``serve --ca-key``)."""
    if not hostnames:
        raise DevtrustError("no --hostname: give the name agents use to reach the verifier")
    for name in hostnames:
        problem = hostname_problem(name)
        if problem is not None:
            raise DevtrustError(problem)
    files = PkiFiles.in_dir(directory)
    # The verifier's CA files are named if there are some: a device CA alone is named too.
    present = [p for p in files.all() if p.exists()] or [
        p for p in files.device_all() if p.exists()
    ]
    if present and not force:
        raise DevtrustError(
            f"{directory} already holds a CA ({', '.join(p.name for p in present)}); replacing "
            "it would make every certificate it issued stop verifying: keep it, or run init "
            "again with --force (the old files are kept as *.bak)"
        )
    writable_dir(directory, "--dir")
    ca = CertificateAuthority.create(common_name="devtrust verifier CA", now=now)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_server(
        hostnames=hostnames, public_key=key.public_key(), now=now, lifetime=server_lifetime
    )
    device = new_device_ca(now)
    ear_key = ec.generate_private_key(ec.SECP256R1())
    ear_cert = ear_certificate(
        ca, public_key=ear_key.public_key(), now=now, lifetime=server_lifetime
    )
    service_mode = 0o600 if group is None else 0o640
    service_keys = (files.server_key, files.device_ca_key, files.ear_key)
    new: dict[Path, tuple[bytes, int] | None] = {
        files.ca_key: (private_key_pem(ca.key), 0o600),
        files.ca_cert: (pem(ca.cert), 0o644),
        files.server_key: (private_key_pem(key), service_mode),
        files.server_cert: (pem(cert), 0o644),
        files.device_ca_key: (private_key_pem(device.key), service_mode),
        files.device_ca_cert: (pem(device.cert), 0o644),
        files.device_bundle: (pem(device.cert), 0o644),
        files.ear_key: (private_key_pem(ear_key), service_mode),
        files.ear_cert: (pem(ear_cert), 0o644),
        # A rotation of the replaced device CA is void: kept as *.bak, then removed.
        files.next_cert: None,
        files.next_key: None,
        files.next_meta: None,
        files.retired: None,
    }
    backups = []
    for path, content in new.items():
        try:
            backup = keep_backup(path, now)
        except OSError as exc:
            raise DevtrustError(
                f"cannot keep a backup of {path}: {exc.strerror}; nothing was replaced"
            ) from exc
        if backup is not None:
            backups.append(backup)
        if content is None:
            path.unlink(missing_ok=True)
        else:
            write_file(
                path, content[0], mode=content[1], group=group if path in service_keys else None
            )
    return replace(files, backups=tuple(backups))


def ear_certificate(
    ca: CertificateAuthority,
    *,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
    lifetime: datetime.timedelta = datetime.timedelta(days=365),
) -> x509.Certificate:
    """The certificate of the EAR signing key, issued by the verifier's CA: subject
    O=devtrust, OU=ear, CN=devtrust EAR signer; not a CA (critical); key usage
    digitalSignature only (critical); EKU ``EAR_SIGNING_EKU`` only (verifier/ear.py says
    why); SKI and AKI. A relying
    party verifies it to ca.pem, checks that EKU, then the JWT with its key (verifier/ear.py
    ``verify_ear``; the JWT's kid is its SHA-256)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devtrust"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "ear"),
            x509.NameAttribute(NameOID.COMMON_NAME, "devtrust EAR signer"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([EAR_SIGNING_EKU]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )


def issue_ear_signer(
    directory: Path,
    *,
    now: datetime.datetime,
    force: bool = False,
    group: int | None = None,
    lifetime: datetime.timedelta = datetime.timedelta(days=365),
) -> PkiFiles:
    """A new EAR signing key and certificate (``ear.key``, ``ear.pem``) from the CA in
    ``directory``, for a directory init made before EARs existed, or to replace the pair
    (``force``; the old files kept as *.bak, listed in the result's backups). ``group``:
    as init's, ear.key 0640 with it (the service reads it), else 0600."""
    files = PkiFiles.in_dir(directory)
    ca = load_ca(files.ca_cert, files.ca_key, configured=False)
    present = [p.name for p in (files.ear_key, files.ear_cert) if p.exists()]
    if present and not force:
        raise DevtrustError(
            f"{directory} already holds an EAR signing key ({', '.join(present)}): keep it, "
            "or run again with --force (the old files are kept as *.bak; relying parties "
            "need the new ear.pem)"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ear_certificate(ca, public_key=key.public_key(), now=now, lifetime=lifetime)
    backups = []
    for path, data, mode, owner in (
        (files.ear_key, private_key_pem(key), 0o600 if group is None else 0o640, group),
        (files.ear_cert, pem(cert), 0o644, None),
    ):
        try:
            backup = keep_backup(path, now)
        except OSError as exc:
            raise DevtrustError(f"cannot keep a backup of {path}: {exc.strerror}") from exc
        if backup is not None:
            backups.append(backup)
        write_file(path, data, mode=mode, group=owner)
    return replace(files, backups=tuple(backups))


def check_operator_name(name: str, *, given_as: str = "--name") -> None:
    """An operator name goes into a SPIFFE ID and two file names. ``given_as``: how the
    command line took it, for the message."""
    if not _OPERATOR_NAME.fullmatch(name):
        raise DevtrustError(
            f"{given_as} {name!r}: an operator name is 1-64 letters, digits, dots, hyphens or "
            "underscores, starting with a letter or digit"
        )


OPERATOR_LIFETIME = datetime.timedelta(days=30)


def operator_certificate(
    ca: CertificateAuthority,
    *,
    name: str,
    trust_domain: str,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
    lifetime: datetime.timedelta = OPERATOR_LIFETIME,
) -> x509.Certificate:
    """An operator's certificate, spiffe://TD/operator/NAME: what ``issue_operator`` writes
    and the Query API's IssueOperatorCertificate returns."""
    check_operator_name(name)
    return ca.issue_client(
        kind="operator",
        trust_domain=trust_domain,
        name=name,
        public_key=public_key,
        now=now,
        lifetime=lifetime,
    )


def issue_operator(
    ca: CertificateAuthority,
    directory: Path,
    *,
    name: str,
    trust_domain: str,
    now: datetime.datetime,
    lifetime: datetime.timedelta = datetime.timedelta(days=30),
) -> tuple[Path, Path]:
    """Issue ``operator-NAME.pem``/``.key`` in ``directory``; files of an earlier certificate
    for the same name are kept as *.bak."""
    check_operator_name(name)
    writable_dir(directory, "--dir")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = operator_certificate(
        ca,
        name=name,
        trust_domain=trust_domain,
        public_key=key.public_key(),
        now=now,
        lifetime=lifetime,
    )
    key_path, cert_path = directory / f"operator-{name}.key", directory / f"operator-{name}.pem"
    for path, data, mode in (
        (key_path, private_key_pem(key), 0o600),
        (cert_path, pem(cert), 0o644),
    ):
        try:
            keep_backup(path, now)
        except OSError as exc:
            raise DevtrustError(f"cannot keep a backup of {path}: {exc.strerror}") from exc
        write_file(path, data, mode=mode)
    return cert_path, key_path


# --- loading ---------------------------------------------------------------------------------


def read_file(path: Path, what: str, *, missing: str, key: str | None = None) -> bytes:
    """The bytes of ``path``, or one line naming it, the reason and the remedy: ``missing``
    when it does not exist; for a configured file, ``key`` names its configuration key."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        fix = f", or fix `{key}:` in the configuration" if key else ""
        raise ConfigError(f"{what} {path} does not exist: {missing}{fix}") from exc
    except PermissionError as exc:
        raise ConfigError(
            f"{what} {path}: permission denied: make it readable by the user the verifier "
            f"runs as (uid {os.geteuid()})"
        ) from exc
    except OSError as exc:
        where = f"`{key}:`" if key else "it"
        raise ConfigError(f"{what} {path}: {exc.strerror}: {where} must name a file") from exc


def parse_key(data: bytes, path: Path, what: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{what} {path} is not an unencrypted PEM private key: give the file init made"
        ) from exc


def parse_cert(data: bytes, path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(
            f"{what} {path} is not a PEM certificate: give the file init made"
        ) from exc


def load_ca(cert_path: Path, key_path: Path, *, configured: bool = True) -> CertificateAuthority:
    """The CA from its two files; ``configured``: named by the verifier's configuration
    (``ca.cert``, ``ca.key``), not by a --dir."""
    directory = cert_path.parent
    missing = f"run `devtrust-verifier init --dir {directory} --hostname NAME` to make a CA"
    if not configured:
        missing += ", or give --dir the directory that init made"
    cert = parse_cert(
        read_file(
            cert_path, "CA certificate", missing=missing, key="ca.cert" if configured else None
        ),
        cert_path,
        "CA certificate",
    )
    key = parse_key(
        read_file(key_path, "CA key", missing=missing, key="ca.key" if configured else None),
        key_path,
        "CA key",
    )
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError(
            f"CA key {key_path} is not the key of CA certificate {cert_path}: give the pair "
            "that init made together"
        )
    return CertificateAuthority(key=key, cert=cert)


def read_server_credentials(cert_path: Path, key_path: Path) -> tuple[bytes, bytes]:
    """The server certificate and key (PEM), checked to be a pair: gRPC would otherwise fail
    at the first handshake, not at start."""
    missing = f"run `devtrust-verifier init --dir {cert_path.parent} --hostname NAME`"
    cert_pem = read_file(cert_path, "server certificate", missing=missing, key="tls.server_cert")
    key_pem = read_file(key_path, "server key", missing=missing, key="tls.server_key")
    cert = parse_cert(cert_pem, cert_path, "server certificate")
    key = parse_key(key_pem, key_path, "server key")
    if key.public_key() != cert.public_key():
        raise ConfigError(
            f"server key {key_path} is not the key of server certificate {cert_path}: give "
            "the pair that init made together"
        )
    return cert_pem, key_pem


def load_ear_signer(
    key_path: Path, cert_path: Path, *, ca: x509.Certificate | None = None
) -> EarSigner:
    """The EAR signing key and its certificate (``ear.signing_key``, ``ear.signing_cert``),
    checked to be a P-256 pair, and with ``ca`` issued by it (relying parties verify the
    certificate to the verifier's CA). One ``ConfigError`` line naming the file otherwise."""
    missing = (
        f"run `devtrust-verifier ear-key --dir {key_path.parent}` to issue ear.key and ear.pem "
        "with the CA there (`devtrust-verifier init` makes them with a new CA)"
    )
    key = parse_key(
        read_file(key_path, "EAR signing key", missing=missing, key="ear.signing_key"),
        key_path,
        "EAR signing key",
    )
    cert = parse_cert(
        read_file(cert_path, "EAR signing certificate", missing=missing, key="ear.signing_cert"),
        cert_path,
        "EAR signing certificate",
    )
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(
            f"EAR signing key {key_path} is not an ECDSA P-256 key (ES256): give the key init made"
        )
    if key.public_key() != cert.public_key():
        raise ConfigError(
            f"EAR signing key {key_path} is not the key of certificate {cert_path}: give the "
            "pair that init made together (`ear.signing_key`, `ear.signing_cert`)"
        )
    if ca is not None:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise ConfigError(
                f"EAR signing certificate {cert_path} is not issued by the verifier's CA: "
                "relying parties would refuse its EARs; configure the ear.pem that the same "
                "`init` made (`ear.signing_cert`)"
            ) from exc
    return EarSigner(key=key, cert=cert)


def check_server_issued_by(
    cert_pem: bytes, cert_path: Path, ca: CertificateAuthority, ca_path: Path
) -> None:
    """The server certificate must be signed by the configured CA: agents check it against
    that CA (their ``ca_bundle``), so a pair from two ``init`` runs would fail every handshake
    with a TLS error instead of one line at start."""
    cert = parse_cert(cert_pem, cert_path, "server certificate")
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError(
            f"server certificate {cert_path} is not issued by CA {ca_path}: agents would refuse "
            "the verifier; configure the server certificate and the CA that one `init` made "
            "together (`tls.server_cert`, `ca.cert`)"
        ) from exc
