"""A TPM that stopped answering, retried until it answers again (issue 12, C5).

When a quote fails because the TPM does not answer (``errors.TpmUnavailable``: swtpm or the
resource manager gone, the device unplugged), the attestation client answers that challenge
with TpmUnavailable and hands the TPM to a ``TpmRetry``: one task that asks the TPM again,
with backoff (``backoff.Backoff``, reconnect_min_s to reconnect_max_s), through a PCR read,
which reopens its TCTI (the backend drops a failed context: agent/tpm.py ``_call``). Until
it answers, each challenge is answered with TpmUnavailable at once, without touching the
TPM: the TPM is asked at the backoff's pace, not the verifier's. Once it answers, ``on_back``
runs (the client sends PostureChanged, so that the verifier challenges at once and trust
comes back without waiting for the next interval). The agent never exits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from devtrust.agent.backoff import Backoff
from devtrust.agent.errors import TpmError, TpmUnavailable
from devtrust.agent.interfaces import Selection, Tpm

logger = logging.getLogger(__name__)
# The posture signal sent when the TPM answers again: the verifier challenges at once.
TPM_SIGNAL = "tpm"
_ANY_PCR: Selection = (("sha256", (0,)),)


class TpmRetry:
    """Whether the TPM answers; while it does not, one task retries it with backoff."""

    def __init__(
        self,
        tpm: Tpm,
        backoff: Backoff,
        *,
        on_back: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tpm = tpm
        self._backoff = backoff
        self._on_back = on_back
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._since: float | None = None
        self.reason = ""
        self.retries = 0

    @property
    def down(self) -> bool:
        """The TPM did not answer its last call, and no retry has reached it since."""
        return self._since is not None

    def detail(self) -> str:
        """What the verifier is told while the TPM is down."""
        assert self._since is not None
        down_s = self._clock() - self._since
        return f"TPM not answering for {down_s:.0f} s ({self.retries} retries): {self.reason}"

    def failed(self, exc: TpmUnavailable, selection: Selection) -> None:
        """A call found the TPM not answering: retry it from now on (once)."""
        self.reason = str(exc)
        if self._since is None:
            self._since = self._clock()
            logger.error("%s; retrying it, answering challenges with TpmUnavailable", exc)
        if self._task is None or self._task.done():
            # A read of one PCR at least: an empty selection would not reach the TPM.
            self._task = asyncio.create_task(self._retry(tuple(selection) or _ANY_PCR))

    async def _retry(self, selection: Selection) -> None:
        while True:
            await asyncio.sleep(self._backoff.delay())
            self.retries += 1
            try:
                await self._tpm.pcr_read(selection)
            except TpmUnavailable as exc:
                self.reason = str(exc)
                logger.debug("TPM retry %d: %s", self.retries, exc)
                continue
            except TpmError as exc:
                # It answered, with an error of its own: the transport is back, and the next
                # quote will say what is wrong.
                logger.warning("TPM answers again, with an error: %s", exc)
            except Exception as exc:  # noqa: BLE001 (an OSError of a TCTI, a bug: retried)
                # Anything else must not end the retrying: this task alone brings the TPM
                # back, and while it is down every challenge is answered TpmUnavailable.
                self.reason = f"{type(exc).__name__}: {exc}"
                logger.warning("TPM retry %d failed unexpectedly: %s", self.retries, self.reason)
                continue
            break
        assert self._since is not None
        logger.warning(
            "TPM answers again after %.0f s and %d retries; attesting normally",
            self._clock() - self._since,
            self.retries,
        )
        self._since, self.reason, self.retries = None, "", 0
        self._backoff.reset()
        self._on_back()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
