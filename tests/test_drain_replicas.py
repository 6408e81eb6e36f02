"""Two verifier replicas on one PostgreSQL (issue 12, item 2: what one replica changes the
others see), as the server wires them: a WatchTrust on replica A sends the decision replica B
made, and a policy reloaded on B is in force on A, from the stored documents."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from devtrust.swtpm import EndorsementCA
from devtrust.v1 import common_pb2, query_pb2
from devtrust.verifier.config import database_location
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.policy import Policy
from tests.conftest import SwtpmFactory
from tests.env import (
    enrolled_agent,
    manual_stream,
    operator_stub,
    quote_evidence,
    running,
    verifier_config,
)
from tests.test_policy_store import followed, policy_dir
from tests.test_workers import next_of

pytest_plugins = ["tests.pg"]


def test_replicas_on_postgresql_see_each_others_decisions_and_policy(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    pg_url: str,
) -> None:
    base = replace(
        verifier_config(workdir, pki, endorsement_ca), database=database_location(pg_url)
    )
    first = replace(base, policy=policy_dir(workdir / "a", "fleet-a"))
    second = replace(base, policy=policy_dir(workdir / "b", "fleet-b"))
    fleet_b = Policy.load(second.policy or Path())

    async def scenario() -> None:
        async with running(first) as a, running(second) as b:
            assert b.policy.current is not None
            assert b.policy.current.policy_id == "fleet-a"  # the database's
            async with enrolled_agent(workdir, pki, b, swtpm_factory()) as agent:
                device = agent.enrollment.device_id
                channel, stub = operator_stub(pki, a, workdir)
                async with channel:
                    watch = stub.WatchTrust(query_pb2.WatchTrustRequest(initial=True), timeout=60)
                    first_message = await next_of(watch)
                    assert first_message.end_of_initial
                    reply = await manual_stream(
                        pki, b, agent, lambda challenge: quote_evidence(agent, challenge)
                    )
                    assert reply.result.trust.policy_id == "fleet-a"
                    change = await next_of(watch)
                    assert change.device_id == device
                    assert change.trust.tier == reply.result.trust.tier
                    assert change.trust.tier != common_pb2.TIER_UNSPECIFIED
                    watch.cancel()
            channel, stub = operator_stub(pki, b, workdir)
            async with channel:
                await stub.ReloadPolicy(query_pb2.ReloadPolicyRequest(), timeout=30)
            await followed(a, fleet_b.digest)

    asyncio.run(scenario())
