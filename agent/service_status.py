"""What the agent tells systemd while it runs (the sd_notify protocol,
``devtrust.core.sdnotify``): READY=1 once the configuration is loaded and the TPM answered,
before enrollment; STATUS= lines for enrolling, attesting (the last tier, when, the
certificate's expiry), and what `run` retries and a person should fix; STOPPING=1. Nothing is
sent when NOTIFY_SOCKET is unset."""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable

from cryptography import x509

from devtrust.agent.config import AgentConfig
from devtrust.agent.errors import TpmError
from devtrust.agent.messages import AttestationResult
from devtrust.agent.tpm import AsyncTpm
from devtrust.core.sdnotify import Notifier

logger = logging.getLogger("devtrust.agent")

# The verifier's finding for a TPM that does not answer (verifier/tpm_unavailable.py).
TPM_UNAVAILABLE_FINDING = "tpm.unavailable"

# A read of one PCR: the cheapest command that shows the TPM answers.
_ANY_PCR: tuple[tuple[str, tuple[int, ...]], ...] = (("sha256", (0,)),)


def _addresses(addresses: tuple[str, ...]) -> str:
    return addresses[0] if len(addresses) == 1 else f"one of {', '.join(addresses)}"


def result_line(
    attesting_to: str,
    result: AttestationResult,
    *,
    at: datetime.datetime,
    certificate: x509.Certificate | None,
) -> str:
    """STATUS= while attesting: ``attesting to HOST:PORT: affirming (score 100) at
    12:00:03Z, certificate valid until 2026-12-02T12:00:00+00:00`` (and ``TPM unavailable``
    when the verifier's last finding says so)."""
    trust = result.trust
    parts = [
        f"attesting to {attesting_to}: {trust.tier.label} (score {trust.score}) at "
        f"{at.astimezone(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"
    ]
    if any(f.id == TPM_UNAVAILABLE_FINDING for f in trust.findings):
        parts.append("TPM unavailable (retrying it)")
    if certificate is not None:
        parts.append(f"certificate valid until {certificate.not_valid_after_utc.isoformat()}")
    else:
        parts.append("no device certificate")
    return ", ".join(parts)


class ServiceStatus:
    """What the agent tells systemd (``notifier``; nothing when NOTIFY_SOCKET is unset)."""

    def __init__(self, notifier: Notifier, cfg: AgentConfig) -> None:
        self.notifier = notifier
        self._attesting_to = _addresses(cfg.verifier.attestation_addresses)
        self._enrolling_at = _addresses(cfg.verifier.enrollment_addresses)
        self._tpm = ""

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled

    async def started(self, tpm: AsyncTpm, *, enrolled: bool) -> None:
        """READY=1 once the TPM answered a PCR read, or failed to (said in STATUS=: an
        enrolled agent keeps running and retries it; enrollment reports it as an error)."""
        try:
            await tpm.pcr_read(_ANY_PCR)
        except TpmError as exc:
            self._tpm = f"; TPM unavailable: {exc}"
            logger.debug("TPM probe at start failed: %s", exc)
        if enrolled:
            line = f"attesting to {self._attesting_to}: waiting for the first result"
        else:
            line = f"enrolling at {self._enrolling_at}: waiting for the verifier"
        self.notifier.ready(line + self._tpm)

    def enrolled(self, device_id: str) -> None:
        self.notifier.status(
            f"enrolled as device {device_id}; attesting to {self._attesting_to}: waiting for "
            "the first result"
        )

    def result(self, result: AttestationResult, certificate: x509.Certificate | None) -> None:
        self.notifier.status(
            result_line(
                self._attesting_to,
                result,
                at=datetime.datetime.now(datetime.UTC),
                certificate=certificate,
            )
        )

    def trouble(self, line: str) -> None:
        """What `run` retries and a person should fix (a refusal, a TLS failure, a TPM
        error): the line it logged at ERROR, until the next result or enrollment."""
        self.notifier.status(line)

    def stopping(self) -> None:
        self.notifier.stopping("stopping (SIGTERM)")


def stopper(stop: asyncio.Event, status: ServiceStatus) -> Callable[[], None]:
    def on_signal() -> None:
        if not stop.is_set():
            status.stopping()
        stop.set()

    return on_signal
