"""The TPM retry (agent/tpm_retry.py) goes on until the TPM answers, whatever a retry
raises: it alone brings the TPM back (review of issue 12, L5)."""

from __future__ import annotations

import asyncio

from devtrust.agent.backoff import Backoff
from devtrust.agent.errors import TpmUnavailable
from devtrust.agent.interfaces import Selection
from devtrust.agent.tpm_retry import TpmRetry


class FlakyTpm:
    """A TPM whose PCR reads fail with ``failures`` in turn, then answer."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.reads = 0

    async def pcr_read(self, selection: Selection) -> dict[tuple[str, int], bytes]:
        self.reads += 1
        if self.failures:
            raise self.failures.pop(0)
        return {("sha256", 0): bytes(32)}


def down(retry: TpmRetry) -> bool:
    return retry.down


def test_a_retry_that_raises_something_unexpected_goes_on_until_the_tpm_answers() -> None:
    tpm = FlakyTpm([TpmUnavailable("swtpm gone"), OSError(111, "refused"), RuntimeError("bug")])
    back: list[bool] = []

    async def scenario() -> None:
        retry = TpmRetry(
            tpm,  # type: ignore[arg-type]
            Backoff(min_s=0.001, max_s=0.002),
            on_back=lambda: back.append(True),
        )
        retry.failed(TpmUnavailable("swtpm gone"), (("sha256", (0,)),))
        assert down(retry)
        for _ in range(500):
            if not down(retry):
                break
            await asyncio.sleep(0.005)
        await retry.close()
        assert not down(retry)
        assert back == [True]

    asyncio.run(scenario())
    assert tpm.reads == 4
