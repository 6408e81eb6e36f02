"""The store as a decision sink: the first sink the attestation servicer publishes to, so a
Result reaches the agent only after its Decision is committed."""

from __future__ import annotations

from devtrust.verifier.decision import Decision
from devtrust.verifier.storage.interfaces import Repositories


class StoreSink:
    """A DecisionSink whose publish returns once the decision is committed (batched with
    other devices' decisions: group commit)."""

    def __init__(self, repos: Repositories) -> None:
        self._repos = repos

    async def publish(self, decision: Decision) -> None:
        await self._repos.trust.record(decision)
