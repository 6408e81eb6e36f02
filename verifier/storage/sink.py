"""The store as a decision sink: the first sink the attestation servicer publishes to, so a
Result reaches the agent only after its Decision is committed."""

from __future__ import annotations

from dataclasses import replace

from devtrust.verifier.decision import Decision
from devtrust.verifier.storage.interfaces import Repositories


class StoreSink:
    """A DecisionSink whose publish returns once the decision is committed (batched with
    other devices' decisions: group commit)."""

    def __init__(self, repos: Repositories) -> None:
        self._repos = repos

    async def publish(self, decision: Decision) -> Decision | None:
        revoked = await self._repos.trust.record(decision)
        # What it revoked with the decision (its tier fell), for the revocation sink.
        return replace(decision, revoked_now=tuple(revoked)) if decision.revoke_reason else None
