"""Make the files a verifier deployment needs: its CA, its server certificate and operator
certificates. Used by ``devtrust-verifier init`` and by the demo.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from agent.files import write_atomic
from verifier.ca import CertificateAuthority, pem, write_private_key


@dataclass(frozen=True)
class PkiFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> PkiFiles:
        return cls(
            directory / "ca.pem",
            directory / "ca.key",
            directory / "server.pem",
            directory / "server.key",
        )


def init_pki(
    directory: Path,
    *,
    hostnames: list[str],
    now: datetime.datetime,
    server_lifetime: datetime.timedelta = datetime.timedelta(days=365),
) -> PkiFiles:
    files = PkiFiles.in_dir(directory)
    ca = CertificateAuthority.create(common_name="devtrust verifier CA", now=now)
    ca.save(files.ca_cert, files.ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_server(
        hostnames=hostnames, public_key=key.public_key(), now=now, lifetime=server_lifetime
    )
    write_private_key(files.server_key, key)
    write_atomic(files.server_cert, pem(cert), mode=0o644)
    return files


def issue_operator(
    ca: CertificateAuthority,
    directory: Path,
    *,
    name: str,
    trust_domain: str,
    now: datetime.datetime,
    lifetime: datetime.timedelta = datetime.timedelta(days=30),
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_client(
        kind="operator",
        trust_domain=trust_domain,
        name=name,
        public_key=key.public_key(),
        now=now,
        lifetime=lifetime,
    )
    key_path, cert_path = directory / f"operator-{name}.key", directory / f"operator-{name}.pem"
    write_private_key(key_path, key)
    write_atomic(cert_path, pem(cert), mode=0o644)
    return cert_path, key_path
