"""gRPC channels to the verifier (TLS for enrollment, mTLS for attestation), each to one
address (``addresses.Target``), with keepalive, and what a failed call means to an operator.

A failure is either worth retrying (the verifier is down, restarting, busy or out of reach:
UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ...) or not: the verifier's certificate
does not name the address used or is not signed by the configured CA, or the verifier refused
the request (PERMISSION_DENIED, INVALID_ARGUMENT, ...). ``explain`` tells them apart; a
failure retrying cannot fix becomes a ``VerifierError`` whose one line says what to do.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from cryptography import x509

from devtrust.agent.addresses import Target
from devtrust.agent.backoff import Backoff
from devtrust.agent.config import AgentConfig
from devtrust.core.errors import DevtrustError

# Worth another attempt: the verifier may come back, or the condition passes.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        # An enrollment challenge expired or was answered: the next attempt starts afresh.
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
# `run` (the daemon) retries what `enroll` reports and exits for (a refusal, a verifier
# certificate that does not verify, a TPM that failed a command, an answer it cannot read):
# under systemd an exit would be for good (RestartPreventExitStatus=2), and what failed is
# remote and may change (a certificate renewed, a rogue answer gone, a rolling upgrade done).
# The waits start at reconnect_max_s, the longest wait for an unreachable verifier, and grow
# to this: a fleet behind a broken verifier asks every few minutes, not in a tight loop.
REFUSED_MAX_S = 300.0
# gRPC core's words for the two TLS failures (grpcio 1.5x-1.8x, BoringSSL).
_NAME_MISMATCH = re.compile(r"Hostname Verification Check failed|Peer name \S+ is not in peer")
_UNTRUSTED = re.compile(r"CERTIFICATE_VERIFY_FAILED:?\s*([^:]*)")
_PREFIX = re.compile(
    r"^failed to connect to all addresses; last error: [A-Z_]+: (?:ipv[46]:\S+?: |unix:\S+: )?"
)


class VerifierError(DevtrustError):
    """The verifier cannot be used as configured, and retrying will not change that. The
    message starts with the configuration key concerned; the entry point names the file."""


class VerifierUnreachable(VerifierError):
    """No attempt reached the verifier in the time allowed."""


def refusal_backoff(reconnect_max_s: float) -> Backoff:
    """The waits of `run` between attempts that the verifier refused or failed TLS (see
    REFUSED_MAX_S): from ``reconnect_max_s`` up to REFUSED_MAX_S, with full jitter."""
    return Backoff(min_s=reconnect_max_s, max_s=max(REFUSED_MAX_S, reconnect_max_s))


@dataclass(frozen=True)
class Failure:
    """A failed call: where it went, its status, a short detail, and, when retrying cannot
    help, the one line that says what to do (``final``)."""

    where: str
    status: str
    detail: str
    final: str | None = None
    # For a TLS name mismatch: the name the check looked for.
    name_checked: str = ""
    # The TLS handshake failed on the verifier's certificate (its name or its issuer).
    tls: bool = False

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status

    def error(self, names: Sequence[str] = ()) -> VerifierError:
        """The final error; for a name mismatch, ``names`` are those the certificate holds."""
        if self.name_checked:
            return VerifierError(_name_mismatch(self.where, self.name_checked, names))
        return VerifierError(self.final or f"{self.where}: {self}")


def _name_mismatch(where: str, checked: str, names: Sequence[str]) -> str:
    holds = f" (it names {', '.join(names)})" if names else ""
    return (
        f"{where}: the verifier's certificate does not name {checked}{holds}; use a name the "
        "certificate holds, or re-issue the server certificate with "
        f"`devtrust-verifier init --hostname {checked}`"
    )


def short_detail(details: str | None) -> str:
    """gRPC's detail without its boilerplate: "Connection refused", not three prefixes."""
    return _PREFIX.sub("", details or "").strip()


def host_of(address: str) -> str:
    """The host part of a gRPC target (``dns:///h:p``, ``h:p``, ``[v6]:p``)."""
    target = address.split("///", 1)[-1]
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or "]" in target else target
    return host.strip("[]")


def explain(
    exc: grpc.aio.AioRpcError,
    *,
    key: str,
    address: str,
    cfg: AgentConfig,
    trusted_ca: str = "",
    tls_name: str = "",
) -> Failure:
    """What a failed call to the verifier at ``address`` (configuration ``key``) means.
    ``trusted_ca`` names the CA the call trusted and what to do when it did not sign the
    verifier's certificate (default: verifier.ca_bundle, for enrollment); ``tls_name`` the
    name TLS checked ("": the host in ``address``, or verifier.server_name)."""
    code, details = exc.code(), exc.details() or ""
    where, status, detail = f"{key} {address}", code.name, short_detail(details)
    if code is grpc.StatusCode.UNAVAILABLE and _NAME_MISMATCH.search(details):
        checked = tls_name or cfg.verifier.server_name or host_of(address)
        return Failure(where, status, detail, _name_mismatch(where, checked, ()), checked, tls=True)
    untrusted = _UNTRUSTED.search(details)
    if code is grpc.StatusCode.UNAVAILABLE and untrusted:
        reason = untrusted.group(1).strip() or "verification failed"
        trusted_ca = trusted_ca or (
            f"the CA in verifier.ca_bundle {cfg.verifier.ca_bundle}; copy there the ca.pem "
            "that `devtrust-verifier init --dir` made"
        )
        ca, _, remedy = trusted_ca.partition("; ")
        return Failure(
            where,
            status,
            detail,
            f"{where}: the verifier's certificate is not signed by {ca} ({reason}); {remedy}",
            tls=True,
        )
    if code in RETRYABLE:
        return Failure(where, status, detail)
    return Failure(where, status, detail, f"{where}: the verifier refused: {status}: {details}")


async def final_error(failure: Failure, address: str, timeout_s: float) -> VerifierError:
    """``failure.error()``, with the names the certificate holds when it did not name ours."""
    names = await certificate_names(address, timeout_s) if failure.name_checked else []
    return failure.error(names)


async def certificate_names(address: str, timeout_s: float) -> list[str]:
    """The DNS names and IP addresses in the certificate the server at ``address`` presents,
    read without trusting it (only to tell the operator which names would work); [] when it
    cannot be read."""
    host = host_of(address)
    try:
        port = int(address.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return []
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # read the names only; nothing is sent or trusted
    context.set_alpn_protocols(["h2"])
    try:
        ipaddress.ip_address(host)
        sni: str | None = None
    except ValueError:
        sni = host
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=sni), timeout_s
        )
    except (OSError, TimeoutError):
        return []
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    try:
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except (ValueError, x509.ExtensionNotFound):
        return []
    return [
        *san.value.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)),
    ]


# Keepalive on every channel: a ping after 30 s without traffic, the connection dropped when
# none is answered within 10 s, so that a verifier gone without a word (a host down, a
# partition) ends the stream in 40 s rather than at the TCP timeout. The verifier accepts a
# ping every 10 s (verifier/listen.py server_options). max_pings_without_data 0: the stream may be
# quiet for a whole challenge interval, and the pings must go on through it.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)
# A stream lives at most this long, then the agent opens a new one (every call has a
# deadline, STYLE 15); an hour costs one handshake an hour.
STREAM_DEADLINE_S = 3600.0
# The trailing metadata of a stream a draining verifier ended (C4): reconnect at once,
# elsewhere.
DRAIN_KEY, DRAIN_VALUE = "devtrust-drain", "1"


def channel_options(target: Target) -> list[tuple[str, str | int]]:
    """The options of every channel to the verifier: keepalive, message size, TLS name."""
    opts: list[tuple[str, str | int]] = [
        *KEEPALIVE_OPTIONS,
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ]
    if target.tls_name:
        # The name the certificate must hold, whichever of its records is dialled.
        opts.append(("grpc.ssl_target_name_override", target.tls_name))
    return opts


def enrollment_channel(target: Target, ca_pem: bytes) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    return grpc.aio.secure_channel(target.target, creds, options=channel_options(target))


def attestation_channel(
    target: Target, *, ca_pem: bytes, key_pem: bytes, cert_pem: bytes
) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    return grpc.aio.secure_channel(target.target, creds, options=channel_options(target))


def drained(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a verifier ended the call because it drains (C4): UNAVAILABLE with the
    trailer ``devtrust-drain: 1``."""
    if exc.code() is not grpc.StatusCode.UNAVAILABLE:
        return False
    trailer = exc.trailing_metadata() or ()
    return any(key == DRAIN_KEY and value == DRAIN_VALUE for key, value in trailer)
