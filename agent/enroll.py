"""Enrollment, the agent's side (DESIGN.md flow 1): over the parts ``devtrust-agent`` chose
at start (``interfaces``: the TPM, the host probe for the facts sent, the identity files).
The requests and answers are converted in ``devtrust.agent.wire``; this module builds none."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc
from cryptography import x509

from devtrust.agent import wire
from devtrust.agent.addresses import AddressRing, Target
from devtrust.agent.backoff import Backoff
from devtrust.agent.channel import (
    Failure,
    VerifierError,
    VerifierUnreachable,
    enrollment_channel,
    explain,
    final_error,
    refusal_backoff,
)
from devtrust.agent.config import AgentConfig
from devtrust.agent.errors import MalformedMessage, TpmError
from devtrust.agent.interfaces import HostProbe, IdentityFiles, Tpm
from devtrust.agent.state import Enrollment, der_to_pem, key_pem, new_key, spki
from devtrust.core.binding import proof_for
from devtrust.v1 import enrollment_pb2_grpc

logger = logging.getLogger(__name__)


class EnrollmentPending(Exception):
    """The verifier enrolled the device but an operator must approve it first."""

    def __init__(self, device_id: str) -> None:
        super().__init__(f"device {device_id} awaits operator approval")
        self.device_id = device_id


async def verifier_ca(cfg: AgentConfig, files: IdentityFiles) -> bytes:
    """The CA bundle that verifies the verifier's certificate: readable, and PEM certificates."""
    path = cfg.verifier.ca_bundle
    remedy = "copy there the ca.pem that `devtrust-verifier init --dir` made"
    try:
        data = await files.read_ca_bundle(path)
    except OSError as exc:
        raise VerifierError(
            f"verifier.ca_bundle {path}: cannot read: {exc.strerror}; {remedy}"
        ) from exc
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise VerifierError(
            f"verifier.ca_bundle {path}: not a PEM certificate bundle; {remedy}"
        ) from exc
    return data


async def enroll(
    cfg: AgentConfig,
    tpm: Tpm,
    files: IdentityFiles,
    *,
    host: HostProbe,
    ca_pem: bytes | None = None,
    target: Target | None = None,
) -> Enrollment:
    """Enroll this host's TPM; return and save the attestation-channel identity. One
    attempt: a failed call raises ``grpc.aio.AioRpcError`` (``enroll_retrying`` retries).
    ``ca_pem``: the verifier's CA bundle as ``verifier_ca`` read it (None: read it now);
    ``target``: the verifier address to ask (None: the first of verifier.enrollment)."""
    if ca_pem is None:
        ca_pem = await verifier_ca(cfg, files)
    if target is None:
        ring = AddressRing(cfg.verifier.enrollment_addresses, server_name=cfg.verifier.server_name)
        target = await ring.current()
    ek_cert = await tpm.ek_certificate()
    ek_public = await tpm.ek_public()
    ak_public = await tpm.ak_public()
    facts = await host.facts()
    channel_key = new_key()
    channel_spki = spki(channel_key)
    async with enrollment_channel(target, ca_pem) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)
        challenge = wire.credential_challenge_from_wire(
            await stub.Enroll(
                wire.enroll_request_to_wire(
                    ek_certificate=ek_cert,
                    ek_public=ek_public,
                    ak_public=ak_public,
                    host=facts,
                    bootstrap_token=cfg.bootstrap_token,
                    channel_key_spki=channel_spki,
                ),
                timeout=cfg.rpc_timeout_s,
            )
        )
        secret = await tpm.activate_credential(
            challenge.credential_blob, challenge.encrypted_secret
        )
        activated = wire.activated_from_wire(
            await stub.Activate(
                wire.activate_request_to_wire(
                    enrollment_id=challenge.enrollment_id,
                    proof=proof_for(secret, challenge.enrollment_id, channel_spki),
                ),
                timeout=cfg.rpc_timeout_s,
            )
        )
    if activated.pending_approval:
        raise EnrollmentPending(activated.device_id)
    chain_pem = b"".join(der_to_pem(der) for der in activated.ca_chain)
    enrollment = Enrollment(
        device_id=activated.device_id,
        channel_key_pem=key_pem(channel_key),
        channel_cert_pem=der_to_pem(activated.channel_certificate),
        ca_pem=chain_pem or ca_pem,
    )
    await files.save_enrollment(enrollment)
    logger.info("enrolled as device %s", enrollment.device_id)
    return enrollment


async def enroll_retrying(
    cfg: AgentConfig,
    tpm: Tpm,
    files: IdentityFiles,
    *,
    host: HostProbe,
    stop: asyncio.Event,
    give_up_s: float | None = None,
    pending_retry_s: float | None = None,
    retry_refused: bool = False,
    on_trouble: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Enrollment | None:
    """Enroll, retrying while the verifier is out of reach with the stream's backoff
    (``Backoff``), one log line per failed attempt, each retry at the next of the
    verifier.enrollment addresses. Returns None once ``stop`` is set.

    Raises ``VerifierError`` at once for what retrying cannot fix (a certificate that does not
    name the address, an untrusted one, a refusal such as an untrusted EK or a spent token),
    ``VerifierUnreachable`` when ``give_up_s`` passed without an answer (None: never), and
    ``EnrollmentPending`` when an operator must approve and ``pending_retry_s`` is None
    (otherwise it asks again after that many seconds).

    ``retry_refused`` (`run`, the daemon): what would raise at once, a refusal, a TLS
    failure, a TPM error or an answer that does not parse, is logged at ERROR with what to
    fix, told to ``on_trouble`` (systemd's STATUS=), and retried at the next address after
    ``channel.refusal_backoff``: under systemd an exit would be final, and each of these
    can change without this host being touched. Only the configuration's own mistakes (the
    CA bundle it names, read before the first attempt) still raise.
    """
    ring = AddressRing(cfg.verifier.enrollment_addresses, server_name=cfg.verifier.server_name)
    ca_pem = await verifier_ca(cfg, files)  # once: a retry changes the call, not the file
    backoff = Backoff(min_s=cfg.reconnect_min_s, max_s=cfg.reconnect_max_s)
    refused = refusal_backoff(cfg.reconnect_max_s)
    started, attempts = clock(), 0

    def trouble(error: Exception, target: Target) -> float:
        """``error`` retried later (``retry_refused``): the wait, the log line, STATUS=."""
        ring.advance()
        wait = refused.delay()
        where = "" if isinstance(error, VerifierError) else f"verifier.enrollment {target}: "
        line = f"{where}{error}; retrying in {wait:.0f} s"
        logger.error("%s", line)
        if on_trouble is not None:
            on_trouble(line)
        return wait

    while not stop.is_set():
        attempts += 1
        target = await ring.current()
        address = target.address
        try:
            return await enroll(cfg, tpm, files, host=host, ca_pem=ca_pem, target=target)
        except (TpmError, MalformedMessage) as exc:
            if not retry_refused:
                raise
            wait = trouble(exc, target)
        except EnrollmentPending as exc:
            if pending_retry_s is None:
                raise
            logger.info("%s; asking again in %.0f s", exc, pending_retry_s)
            backoff.reset()
            wait = pending_retry_s
        except grpc.aio.AioRpcError as exc:
            failure = explain(
                exc, key="verifier.enrollment", address=address, cfg=cfg, tls_name=target.tls_name
            )
            if failure.final is not None:
                error = await final_error(failure, address, cfg.rpc_timeout_s)
                error = _with_token_remedy(error, cfg, exc)
                if not retry_refused:
                    raise error from None
                wait = trouble(error, target)
            else:
                wait = _unreachable(
                    ring,
                    backoff,
                    failure,
                    attempts=attempts,
                    spent=clock() - started,
                    give_up_s=give_up_s,
                )
                logger.warning(
                    "enrollment at %s failed: %s; attempt %d, next in %.1f s",
                    target,
                    failure,
                    attempts,
                    wait,
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)
    return None


def _unreachable(
    ring: AddressRing,
    backoff: Backoff,
    failure: Failure,
    *,
    attempts: int,
    spent: float,
    give_up_s: float | None,
) -> float:
    """The wait after an attempt that did not reach the verifier, at the next address;
    ``VerifierUnreachable`` when it would pass ``give_up_s``."""
    ring.advance()
    wait = backoff.delay()
    if give_up_s is not None and spent + wait > give_up_s:
        where = ", ".join(ring.addresses)
        raise VerifierUnreachable(
            f"verifier.enrollment {where}: no answer in {attempts} attempt(s) over "
            f"{spent:.0f} s (last: {failure}); check that `devtrust-verifier serve` "
            "runs there and that this is its enrollment port (its listen.enrollment)"
        ) from None
    return wait


def _with_token_remedy(
    error: VerifierError, cfg: AgentConfig, exc: grpc.aio.AioRpcError
) -> VerifierError:
    """A refusal about the bootstrap token says how to get one that works, once: not where
    the verifier's own message already names the remedy."""
    if exc.code() is not grpc.StatusCode.PERMISSION_DENIED:
        return error
    details = exc.details() or ""
    # Only for the token's own problems (unknown, used, expired), not for a refusal that
    # merely mentions a token (a zone conflict): a new token would not help there.
    problems = ("unknown bootstrap token", "bootstrap token already used", "token expired")
    if not any(p in details for p in problems) or "token create" in details:
        return error
    if not cfg.bootstrap_token:
        remedy = "bootstrap_token is empty: set it to a token from"
    else:
        remedy = "bootstrap_token cannot be used: set it to a new token from"
    return VerifierError(f"{error}; {remedy} `devtrust token create` on the verifier")
