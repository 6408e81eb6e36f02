"""Where the operator command (verifier/ops.py) finds the verifier and who it is there, and
how it words what went wrong: the profile and options, the identity files checked before any
call, and each gRPC failure as one line with its exit status.

Exit status: 0 done, 1 refused (the device's state forbids it, or the verifier failed), 2 bad
arguments (here or as the verifier judged them), 3 the verifier unreachable, 4 the identity
or its role refused, 5 no such device.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devtrust.core.command import TOOL_ERRORS, Failure, one_line
from devtrust.core.config import from_mapping, load_yaml
from devtrust.core.errors import ConfigError, DevtrustError

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_DENIED, EXIT_NOT_FOUND = range(6)
EXIT_TEXT = (
    "exit status: 0 done, 1 refused, 2 bad arguments, 3 verifier unreachable, "
    "4 identity or role refused, 5 no such device"
)
PROFILE_ENV = "DEVTRUST_PROFILE"
DEFAULT_PROFILE = Path("~/.config/devtrust/operator.yaml")
# The operator's channel: every call has its deadline (--timeout; a watch, its stream's), and
# a watch held open on a verifier gone silent (a dead host) ends after a keepalive ping gets
# no answer, not at its hour's deadline. The verifier takes a client's pings at most every
# 10 s (verifier/listen.py server_options).
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)


class OpsError(DevtrustError):
    """What went wrong, as one line, and the exit status it gets."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def explain(exc: Exception) -> Failure | None:
    return Failure(one_line(exc), exc.status) if isinstance(exc, OpsError) else None


# `devtrust`'s errors: the tools' (verifier/cli.py), and these commands' with their status.
ERRORS = replace(TOOL_ERRORS, explain=explain)


# --- where the verifier is ---------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    verifier: str = ""
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None


@dataclass(frozen=True)
class Connection:
    address: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    ca_path: Path | None = None  # where the CA came from, for a profile naming it


def usage(message: str) -> OpsError:
    return OpsError(message, EXIT_USAGE)


def load_profile(given: Path | None, environ: Mapping[str, str]) -> tuple[Profile, str]:
    """The profile named by ``--profile``, else ``$DEVTRUST_PROFILE``, else the default file
    if it exists (else an empty one), and where it came from. One named but unreadable is an
    error: the operator meant it."""
    if given is None and environ.get(PROFILE_ENV):
        given = Path(environ[PROFILE_ENV])
    path = given or DEFAULT_PROFILE.expanduser()
    if given is None and not path.exists():
        return Profile(), ""
    try:
        profile = from_mapping(Profile, load_yaml(path), where=str(path), base=path.parent)
    except ConfigError as exc:
        raise usage(f"profile {exc}") from None
    return profile, str(path)


def address_problem(address: str) -> str | None:
    """The profile `devtrust-verifier operator` prints has ``HOST:PORT`` to fill in: said so."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return (
            f"{address!r} is not HOST:PORT: give the verifier's host and its attestation port "
            "(listen.attestation in its configuration, e.g. verifier.example:7444)"
        )
    return None


def connection(args: argparse.Namespace, environ: Mapping[str, str]) -> Connection:
    """The verifier's address and the files of the operator's identity, from the options
    and the profile; each file read now, so that a wrong path is named before any call."""
    profile, source = load_profile(args.profile, environ)
    chosen = {
        "verifier": args.verifier or profile.verifier,
        "cert": args.cert or profile.cert,
        "key": args.key or profile.key,
        "ca": args.ca or profile.ca,
    }
    missing = [name for name, value in chosen.items() if not value]
    if missing:
        where = f"the profile {source} has no {', '.join(missing)}" if source else "no profile"
        raise usage(
            f"which verifier, as whom? missing {', '.join('--' + m for m in missing)} ({where}): "
            "give them, or a profile with keys verifier, cert, key and ca (--profile FILE, "
            f"${PROFILE_ENV}, or {DEFAULT_PROFILE})"
        )
    address = str(chosen["verifier"])
    problem = address_problem(address)
    if problem is not None:
        raise usage(f"verifier {problem}")

    def read(name: str) -> tuple[bytes, str]:
        path = Path(str(chosen[name]))
        what = f"--{name} {path}" if getattr(args, name) else f"{name} {path} of profile {source}"
        try:
            return path.read_bytes(), what
        except OSError as exc:
            raise usage(f"cannot read {what}: {exc.strerror}") from None

    ca, cert, key = read("ca"), read("cert"), read("key")
    check_identity(ca, cert, key)
    return Connection(address, ca[0], cert[0], key[0], Path(str(chosen["ca"])).resolve())


def check_identity(ca: tuple[bytes, str], cert: tuple[bytes, str], key: tuple[bytes, str]) -> None:
    """The files are what they are named for, and the key is the certificate's: said here,
    where the file can be named, rather than as a TLS library's log lines."""
    for data, what in (ca, cert):
        try:
            x509.load_pem_x509_certificates(data)
        except ValueError:
            raise usage(f"{what} holds no PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key[0], password=None)
    except (ValueError, TypeError) as exc:
        raise usage(f"{key[1]} is no unencrypted PEM private key ({exc})") from None
    leaf = x509.load_pem_x509_certificates(cert[0])[0]
    if leaf.public_key() != private.public_key():
        raise usage(f"{key[1]} is not the key of the certificate {cert[1]}")


# --- what the verifier answered ----------------------------------------------------------------


# Codes whose details say it all: what goes before them, and the status each gets.
_REFUSALS = {
    grpc.StatusCode.NOT_FOUND: ("", EXIT_NOT_FOUND),
    grpc.StatusCode.INVALID_ARGUMENT: ("", EXIT_USAGE),
    grpc.StatusCode.FAILED_PRECONDITION: ("", EXIT_REFUSED),
    grpc.StatusCode.PERMISSION_DENIED: ("refused by the verifier at {address}: ", EXIT_DENIED),
    grpc.StatusCode.UNAUTHENTICATED: (
        "the verifier at {address} does not take this certificate as an operator identity: ",
        EXIT_DENIED,
    ),
    grpc.StatusCode.UNIMPLEMENTED: (
        "{address} does not serve the query API: give the verifier's attestation port "
        "(listen.attestation), not its enrollment port, or the verifier is older than this "
        "devtrust: ",
        EXIT_REFUSED,
    ),
}


def rpc_error(exc: grpc.aio.AioRpcError, *, address: str, action: str, timeout: float) -> OpsError:
    """One line for a failed call, naming the verifier, and the exit status."""
    code = exc.code()
    details = " ".join((exc.details() or "").split())
    if code in _REFUSALS:
        before, status = _REFUSALS[code]
        return OpsError(f"{action}: {before.format(address=address)}{details}", status)
    if code is grpc.StatusCode.UNAVAILABLE:
        if "handshake" in details.lower() or "ssl" in details.lower():
            why = (
                "TLS with the verifier at {address} failed: check that --ca is the verifier's "
                "CA and --cert/--key an operator certificate it issued, and that its server "
                "certificate names this host"
            )
        elif "resolving" in details or "DNS" in details:
            why = "verifier host of {address} not found: check --verifier"
        else:
            why = "the verifier at {address} is unreachable: it is down, or the port is wrong"
        return OpsError(f"{action}: {why.format(address=address)} ({details})", EXIT_UNREACHABLE)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return OpsError(
            f"{action}: the verifier at {address} did not answer within {timeout:g} s "
            "(down, overloaded, or the connection is dropped on the way)",
            EXIT_UNREACHABLE,
        )
    return OpsError(f"{action}: {code.name.lower().replace('_', ' ')}: {details}", EXIT_REFUSED)
