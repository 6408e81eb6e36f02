"""The attestation stream, the agent's side (DESIGN.md flow 2).

One long-lived mTLS stream; the verifier drives with Challenges. For each, the agent builds
the evidence body (host facts and, when its device certificate is due for renewal, a fresh
public key), quotes with qualifying data binding nonce and body, and sends Evidence. A
Result may carry a new device certificate, which is written to the runtime directory with
the key that never left this host; the body asking for it carries a proof of possession of
that key (``devtrust.core.binding``). A broken stream is reopened with exponential backoff and
full jitter (``backoff``), at the next of the verifier.attestation addresses
(``addresses.AddressRing``): the agent attests to one verifier at a time and moves on when it is
unreachable, refuses or drains; a draining verifier (C4) is left at once, after a jitter of
at most a second, without backoff. A stream that ends cleanly is reopened at the same address.
A Result and the next Challenge may arrive
in one VerifierMessage: the Result is handled first. Every message is converted in
``devtrust.agent.wire``: this module works with ``messages`` values and builds none.

A Result naming the served certificate among its revoked serials, or that certificate's
expiry without a renewal, loses the identity: the key and certificate files are deleted and
``on_identity`` (the Workload API, ``devtrust.agent.workload``) is told None; each new
certificate is told with its key and bundle (the verifier's trust bundle, or the enrollment CA
from a verifier that sends none). While no verifier answers, the certificate is served until it
expires, then removed: the expiry watch runs for as long as the client, whatever the streams do.

A TPM that stops answering (``errors.TpmUnavailable``) costs the challenge a TpmUnavailable
answer, not the stream: ``tpm_retry.TpmRetry`` retries the TPM with backoff, and once it
answers, a PostureChanged brings the next challenge at once.

The client takes its parts (``interfaces``: the TPM, the host probe, the identity files) and
constructs none. Posture notes come from the host probe's one watch (agent/watch.py), already
debounced; notes waiting to be sent are merged in place, so what is pending stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust import __version__
from devtrust.agent import wire
from devtrust.agent.addresses import AddressRing, Target
from devtrust.agent.backoff import Backoff, drain_delay
from devtrust.agent.channel import (
    STREAM_DEADLINE_S,
    attestation_channel,
    drained,
    explain,
    final_error,
    refusal_backoff,
)
from devtrust.agent.collect import collect_body
from devtrust.agent.config import AgentConfig
from devtrust.agent.errors import MalformedMessage, TpmError, TpmUnavailable
from devtrust.agent.interfaces import HostProbe, IdentityFiles, Tpm
from devtrust.agent.messages import (
    AttestationResult,
    Challenge,
    Evidence,
    IssuedCertificate,
    LogChunk,
    TpmUnavailableNote,
    Verdict,
)
from devtrust.agent.state import (
    DeviceIdentity,
    Enrollment,
    bundle_pem,
    new_key,
    renewal_due,
    spki,
)
from devtrust.agent.tpm_retry import TPM_SIGNAL, TpmRetry
from devtrust.core.binding import qualifying_data, sign_possession
from devtrust.core.ids import serial_of
from devtrust.v1 import attestation_pb2_grpc

if TYPE_CHECKING:  # prometheus_client is imported only when metrics.listen is set
    from devtrust.agent.metrics import AgentMetrics, AgentMetricsServer

logger = logging.getLogger(__name__)
ResultCallback = Callable[[AttestationResult], None]
IdentityCallback = Callable[[DeviceIdentity | None], None]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class _PendingKey:
    key: ec.EllipticCurvePrivateKey
    spki: bytes


class AttestationClient:
    def __init__(
        self,
        cfg: AgentConfig,
        *,
        tpm: Tpm,
        host: HostProbe,
        files: IdentityFiles,
        enrollment: Enrollment,
        on_result: ResultCallback | None = None,
        on_identity: IdentityCallback | None = None,
        backoff: Backoff | None = None,
        metrics: AgentMetrics | None = None,
        retry_refused: bool = False,
        on_trouble: Callable[[str], None] | None = None,
    ) -> None:
        self._cfg = cfg
        # `run` (the daemon): a verifier certificate that does not verify, or an answer that
        # does not parse, is logged at ERROR with what to fix, told to ``on_trouble``
        # (STATUS=) and retried at the next address after ``channel.refusal_backoff``; else
        # it ends ``run`` (an exit under systemd would be for good: channel.REFUSED_MAX_S).
        self._retry_refused = retry_refused
        self._on_trouble = on_trouble
        self._refused = refusal_backoff(cfg.reconnect_max_s)
        # The agent's metrics (agent/metrics.py): given, or served by ``run`` on
        # metrics.listen when that is set; None: none kept.
        self._metrics = metrics
        self._metrics_server: AgentMetricsServer | None = None
        self._tpm = tpm
        self._host = host
        self._files = files
        self._enrollment = enrollment
        self._on_result = on_result
        self._on_identity = on_identity
        # Set whenever the certificate changes: the expiry watch waits on it.
        self._certificate_changed = asyncio.Event()
        # Read once, when ``run`` starts: from then on the client knows best, as it writes
        # each renewal.
        self._certificate: x509.Certificate | None = None
        self._certificate_read = False
        self._pending: _PendingKey | None = None
        # Signals to send in the next PostureChanged: merged in place, so bounded by the
        # number of watched signals however often the host churns.
        self._outbox: set[str] = set()
        self._outbox_ready = asyncio.Event()
        # grpc.aio allows one write at a time on a stream: evidence and PostureChanged share it.
        self._write_lock = asyncio.Lock()
        # Between streams (``backoff``: tests pass one with a fixed draw).
        self._backoff = backoff or Backoff(min_s=cfg.reconnect_min_s, max_s=cfg.reconnect_max_s)
        self._ring = AddressRing(
            cfg.verifier.attestation_addresses, server_name=cfg.verifier.server_name
        )
        # The address the current stream goes to (set before each ``session``), and whether
        # that stream delivered a result (the backoff starts again after one that did).
        self._target: Target | None = None
        self._delivered = False
        self._tpm_retry = TpmRetry(
            tpm,
            Backoff(min_s=cfg.reconnect_min_s, max_s=cfg.reconnect_max_s),
            on_back=lambda: self.notify_posture_changed([TPM_SIGNAL]),
        )

    @property
    def certificate(self) -> x509.Certificate | None:
        """The current device certificate (None before the first, or before ``run``)."""
        return self._certificate

    @property
    def metrics_port(self) -> int:
        """The port of the metrics endpoint ``run`` serves (0: none)."""
        return self._metrics_server.port if self._metrics_server is not None else 0

    def notify_posture_changed(self, signals: list[str]) -> None:
        self._outbox.update(signals)
        self._outbox_ready.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Attest until ``stop`` is set, reconnecting after failures; posture notes from the
        host probe are forwarded meanwhile."""
        if self._metrics is None and self._cfg.metrics.listen:
            from devtrust.agent.metrics import AgentMetricsServer  # noqa: PLC0415 - see TYPE_CHECKING

            self._metrics_server = AgentMetricsServer(self._cfg.metrics)
            self._metrics = self._metrics_server.metrics
        try:
            await self._serve(stop)
        finally:
            if self._metrics_server is not None:
                await self._metrics_server.aclose()
                self._metrics_server = None
                self._metrics = None

    async def _serve(self, stop: asyncio.Event) -> None:
        if not self._certificate_read:
            self._certificate = await self._files.device_certificate()
            self._certificate_read = True
            if self._on_identity is not None and self._certificate is not None:
                self._on_identity(await self._files.device_identity())
        self._certificate_metric()
        unsubscribe = self._host.subscribe(self.notify_posture_changed)
        expiry = asyncio.create_task(self._watch_expiry())
        try:
            await self._run(stop)
        finally:
            expiry.cancel()
            await asyncio.gather(expiry, return_exceptions=True)
            await self._tpm_retry.close()
            unsubscribe()

    async def _watch_expiry(self) -> None:
        """Lose the identity when the certificate expires unrenewed (the verifier unreachable,
        or certifying no more): a workload never gets an expired certificate, and the key
        does not outlive it on disk."""
        while True:
            self._certificate_changed.clear()
            cert = self._certificate
            if cert is None:
                await self._certificate_changed.wait()
                continue
            left = (cert.not_valid_after_utc - utcnow()).total_seconds()
            if left < 0:
                await self._lose_identity(f"serial {serial_of(cert.serial_number)} expired")
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._certificate_changed.wait(), left + 0.001)

    def _certificate_metric(self) -> None:
        if self._metrics is not None:
            cert = self._certificate
            self._metrics.certificate(cert.not_valid_after_utc if cert is not None else None)

    async def _lose_identity(self, why: str) -> None:
        await self._files.delete_device_certificate()
        self._certificate = None
        self._certificate_changed.set()
        self._certificate_metric()
        logger.warning(
            "device certificate %s: deleted its key and certificate files; workloads get no "
            "identity until the verifier certifies this device again",
            why,
        )
        if self._on_identity is not None:
            self._on_identity(None)

    async def _run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._target = target = await self._ring.current()
            self._delivered = False
            session = asyncio.create_task(self.session())
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if session not in done:
                session.cancel()
                await asyncio.gather(session, return_exceptions=True)
                return
            if self._delivered:
                self._backoff.reset()
                self._refused.reset()
            wait = await self._after(session.exception(), target)
            if self._metrics is not None:
                self._metrics.reconnects.inc()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def _after(self, exc: BaseException | None, target: Target) -> float:
        """What a stream's end means: the wait before the next one, and whether it goes to
        the next address (``self._ring``). Raises what no retry can fix."""
        if exc is None:
            logger.info("attestation stream to %s closed by the verifier; reconnecting", target)
            return self._backoff.delay()
        if isinstance(exc, grpc.aio.AioRpcError):
            return await self._after_rpc(exc, target)
        if isinstance(exc, asyncio.InvalidStateError):
            # The verifier ended the call (a restart) while we were writing evidence.
            self._ring.advance()
            logger.warning("attestation stream to %s ended while sending: %s", target, exc)
            return self._backoff.delay()
        if isinstance(exc, TpmError):
            wait = self._backoff.delay()
            logger.error("TPM error: %s; retrying in %.0f s", exc, wait)
            if self._on_trouble is not None:
                self._on_trouble(f"TPM error: {exc}; retrying in {wait:.0f} s")
            return wait
        if isinstance(exc, MalformedMessage):
            return self._refusal(exc, where=f"verifier.attestation {target}: ")
        raise exc

    async def _after_rpc(self, exc: grpc.aio.AioRpcError, target: Target) -> float:
        """``_after`` for a failed call."""
        state = self._cfg.state_dir
        failure = explain(
            exc,
            key="verifier.attestation",
            address=target.address,
            cfg=self._cfg,
            trusted_ca=(
                f"the CA this agent enrolled with ({state / 'verifier-ca.pem'}); if "
                f"the verifier's CA was replaced, empty {state} and enroll again"
            ),
            tls_name=target.tls_name,
        )
        if failure.tls:
            # The certificate does not name the address, or another CA signed it: a
            # person must act (or an impostor answered), so not at the stream's pace.
            error = await final_error(failure, target.address, self._cfg.rpc_timeout_s)
            return self._refusal(error)
        self._ring.advance()
        if drained(exc):
            wait = drain_delay()
            logger.info(
                "verifier at %s drains; reconnecting to %s in %.1f s",
                target,
                await self._ring.current(),
                wait,
            )
            return wait
        wait = self._backoff.delay()
        logger.warning(
            "attestation stream to %s failed: %s; trying %s in %.1f s",
            target,
            failure,
            await self._ring.current(),
            wait,
        )
        return wait

    def _refusal(self, error: Exception, *, where: str = "") -> float:
        """``error`` raised, or (``retry_refused``) logged, told and waited out."""
        if not self._retry_refused:
            raise error
        self._ring.advance()
        wait = self._refused.delay()
        line = f"{where}{error}; retrying in {wait:.0f} s"
        logger.error("%s", line)
        if self._on_trouble is not None:
            self._on_trouble(line)
        return wait

    async def session(self) -> None:
        """One stream to the current address, until the verifier closes it or it fails."""
        e = self._enrollment
        target = self._target or await self._ring.current()
        async with attestation_channel(
            target, ca_pem=e.ca_pem, key_pem=e.channel_key_pem, cert_pem=e.channel_cert_pem
        ) as channel:
            stub = attestation_pb2_grpc.AttestationStub(channel)
            call = stub.Attest(timeout=STREAM_DEADLINE_S)
            # The verifier challenges right after Hello, and that evidence reports the whole
            # posture: a note left from before this stream would only cost a second round.
            self._outbox.clear()
            self._outbox_ready.clear()
            await call.write(wire.hello_to_wire(__version__))
            watcher = asyncio.create_task(self._forward_posture(call))
            try:
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        return
                    result, challenge = wire.verifier_message_from_wire(msg)
                    if result is not None:
                        self._delivered = True
                        await self._handle_result(result)
                    if challenge is not None:
                        answer = await self._answer(challenge)
                        out = (
                            wire.evidence_to_wire(answer)
                            if isinstance(answer, Evidence)
                            else wire.tpm_unavailable_to_wire(answer)
                        )
                        async with self._write_lock:
                            await call.write(out)
            finally:
                watcher.cancel()

    async def _forward_posture(self, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            signals = sorted(self._outbox)
            self._outbox.clear()
            if not signals:
                continue
            async with self._write_lock:
                await call.write(wire.posture_changed_to_wire(signals))

    async def _answer(self, challenge: Challenge) -> Evidence | TpmUnavailableNote:
        """Evidence for ``challenge``, or, when the TPM does not answer, TpmUnavailable."""
        retry = self._tpm_retry
        if retry.down:  # retried at the backoff's pace (tpm_retry), not at each challenge
            return TpmUnavailableNote(challenge.nonce, retry.detail())
        started = perf_counter()
        try:
            evidence = await self._evidence(challenge)
        except TpmUnavailable as exc:
            retry.failed(exc, challenge.selection)
            return TpmUnavailableNote(challenge.nonce, retry.detail())
        if self._metrics is not None:
            self._metrics.collection.observe(perf_counter() - started)
        return evidence

    async def _evidence(self, challenge: Challenge) -> Evidence:
        now = utcnow()
        if self._pending is None and renewal_due(
            self._certificate, now=now, renew_at=self._cfg.renew_at
        ):
            key = new_key()
            self._pending = _PendingKey(key, spki(key))
        proof = b""
        if self._pending is not None:
            # Without it the verifier certifies nothing: we show we hold the key, for this
            # challenge and this device only.
            proof = sign_possession(self._pending.key, challenge.nonce, self._enrollment.device_id)
        # Each GPU is asked to attest with a nonce derived from this challenge's and its
        # index (core.binding.gpu_nonce): the quote below binds their reports too.
        body = await collect_body(
            self._host,
            now=now,
            nonce=challenge.nonce,
            certify_key_spki=self._pending.spki if self._pending else b"",
            certify_key_proof=proof,
        )
        quote = await self._tpm.quote(qualifying_data(challenge.nonce, body), challenge.selection)
        log = None
        if challenge.event_log_from is not None:
            log = await self._event_log(challenge.event_log_from)
        return Evidence(nonce=challenge.nonce, quote=quote, body=body, event_log=log)

    async def _event_log(self, from_offset: int) -> LogChunk | None:
        """The log from ``from_offset`` (the whole log when the verifier is past its end:
        the host rebooted and the log is a new one)."""
        data = await self._host.event_log()
        return None if data is None else LogChunk.since(data, from_offset)

    async def _handle_result(self, result: AttestationResult) -> None:
        trust = result.trust
        logger.info(
            "trust result: tier=%s score=%d findings=%s",
            trust.tier.label,
            trust.score,
            ",".join(f.id for f in trust.findings) or "-",
        )
        if self._metrics is not None:
            self._metrics.result(trust.tier, utcnow())
        served = self._certificate
        if served is not None and serial_of(served.serial_number) in result.revoked_serials:
            await self._lose_identity(f"serial {serial_of(served.serial_number)} revoked")
        issued = result.certificate
        if self._pending is not None and issued is None:
            logger.warning("no certificate: %s", withheld_reason(trust))
        if issued is not None and self._pending is not None:
            cert = issued.certificate
            if cert.public_key() != self._pending.key.public_key():
                logger.error("verifier certified a key that is not ours; discarding it")
            else:
                await self._save(self._pending.key, issued)
                logger.info(
                    "new device certificate serial %s valid until %s",
                    issued.serial,
                    cert.not_valid_after_utc.isoformat(),
                )
                self._pending = None
        if self._on_result is not None:
            self._on_result(result)

    async def _save(self, key: ec.EllipticCurvePrivateKey, issued: IssuedCertificate) -> None:
        """Write the new certificate, with the bundle workloads verify peers with: the
        verifier's trust bundle (the device issuing CAs), else the enrollment CA."""
        if issued.trust_bundle:
            bundle, pem = issued.trust_bundle, bundle_pem(issued.trust_bundle)
        else:
            pem = self._enrollment.ca_pem
            bundle = tuple(x509.load_pem_x509_certificates(pem))
        await self._files.save_device_certificate(key, issued.der, pem)
        self._certificate = issued.certificate
        self._certificate_changed.set()
        self._certificate_metric()
        if self._on_identity is not None:
            self._on_identity(DeviceIdentity(key, issued.certificate, bundle))


def withheld_reason(trust: Verdict) -> str:
    """Why a Result asked for a certificate carries none, as far as the agent can tell: the
    tier and the findings' ids (the verifier certifies only at its certificates.min_tier)."""
    ids = ", ".join(dict.fromkeys(f.id for f in trust.findings)) or "no findings"
    return f"tier {trust.tier.label} ({ids})"
