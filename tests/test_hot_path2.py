"""Issue 11, item 2 (continued): the policy budget under a burst.

The budget (attestation.policy_budget_s) bounds one evaluation's own running time in a policy
worker, never the time it waited for one: many evaluations submitted at once to a small pool,
each well within the budget but together longer than it, all get their verdict (none
``policy.budget_exceeded``, the workers kept); one evaluation that truly runs past the budget
still gets ``policy.budget_exceeded`` and its workers are replaced, while those queued behind
it get their verdicts on the new workers.

The stream lease across verifier processes: two verifiers on one SQLite file (as two worker
processes are). A device opens stream A on verifier 1, then stream B on verifier 2: A's next
decision is refused in its own write transaction (ABORTED, nothing stored), B's is stored.
Another device opening streams does not void the first device's decisions: the lease is the
device's own, by the id its mTLS certificate names.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc, common_pb2
from devtrust.verifier.decision import DeviceChanged, below_minimum
from devtrust.verifier.errors import Superseded
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.policy import PolicyOutcome
from devtrust.verifier.policy_pool import PolicyRunner
from devtrust.verifier.records import DeviceRecord, DeviceState
from devtrust.verifier.revocation import RevocationSink
from devtrust.verifier.server import RunningVerifier
from devtrust.verifier.storage.sink import StoreSink
from tests.conftest import SwtpmFactory
from tests.db import decision, device, device_id
from tests.env import (
    Agent,
    AttestStream,
    enrolled_agent,
    quote_evidence,
    read_message,
    running,
    stream_channel,
    verifier_config,
)
from tests.test_workers_store import (
    CERTIFICATES,
    LIFETIME,
    T0,
    _certified,
    _live,
    _with_certificate,
    process,
)


def _sleeps(seconds: float) -> PolicyOutcome:
    """Runs in a policy worker: an evaluation that takes ``seconds``."""
    time.sleep(seconds)
    return PolicyOutcome(f"slept {seconds}", {}, (), ())


def _burst(runner: PolicyRunner, durations: list[float]) -> list[PolicyOutcome]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(durations)) as threads:
        calls = [
            threads.submit(runner.run, _sleeps, d, policy_id="p", device_id=f"device-{i}")
            for i, d in enumerate(durations)
        ]
        return [c.result() for c in calls]


def _exceeded(outcome: PolicyOutcome) -> bool:
    return "policy.budget_exceeded" in [f.id for f in outcome.findings]


def test_queued_evaluations_are_not_charged_for_their_wait() -> None:
    # One worker; 12 evaluations of 0.25 s (3 s together) submitted at once; budget 1.5 s:
    # the last ones wait ~2.75 s for the worker, which the old budget counted.
    runner = PolicyRunner(workers=1, budget_s=1.5)
    try:
        assert _burst(runner, [0.01]) == [PolicyOutcome("slept 0.01", {}, (), ())]  # started
        workers = runner.worker_pids()
        outcomes = _burst(runner, [0.25] * 12)
        assert [o.policy_id for o in outcomes] == ["slept 0.25"] * 12
        assert not any(_exceeded(o) for o in outcomes)
        assert runner.worker_pids() == workers  # none killed
    finally:
        runner.close()


def test_a_truly_slow_evaluation_is_abandoned_and_the_queue_behind_it_served() -> None:
    runner = PolicyRunner(workers=1, budget_s=1.0)
    try:
        _burst(runner, [0.01])
        workers = runner.worker_pids()
        outcomes = _burst(runner, [60.0, 0.05, 0.05, 0.05])
        assert _exceeded(outcomes[0])
        assert outcomes[0].policy_id == "p"
        assert [o.policy_id for o in outcomes[1:]] == ["slept 0.05"] * 3
        assert not runner.worker_pids() & workers  # the stuck worker was killed and replaced
    finally:
        runner.close()


# --- the stream lease across verifier processes ---------------------------------------------


async def _open(
    pki: PkiFiles, verifier: RunningVerifier, agent: Agent
) -> tuple[grpc.aio.Channel, AttestStream, attestation_pb2.Challenge]:
    channel = stream_channel(pki, verifier, agent.enrollment)
    call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=60)
    await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
    first = await read_message(call)
    assert first.HasField("challenge")
    return channel, call, first.challenge


async def _attest(
    agent: Agent, call: AttestStream, challenge: attestation_pb2.Challenge
) -> attestation_pb2.VerifierMessage:
    await call.write(attestation_pb2.AgentMessage(evidence=await quote_evidence(agent, challenge)))
    return await read_message(call)


async def _appraisals(verifier: RunningVerifier, device: DeviceId) -> int:
    history = await verifier.repos.audit.history(device)
    return sum(1 for entry in history if entry.event == "appraisal")


@pytest.mark.swtpm
def test_a_stream_whose_device_opened_a_newer_one_on_another_verifier_stores_nothing(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    # interval 0: the next challenge comes with each Result, so stream A has one to answer.
    config = verifier_config(workdir, pki, endorsement_ca, interval_s=0.0)

    async def scenario() -> None:
        async with (
            running(config) as one,
            running(config) as two,
            enrolled_agent(workdir, pki, one, swtpm_factory(), "a1") as agent,
            enrolled_agent(workdir, pki, one, swtpm_factory(), "a2") as other,
        ):
            device = DeviceId(agent.enrollment.device_id)
            a_channel, a, challenge = await _open(pki, one, agent)
            # Another device's newer streams, on the other verifier: A's lease is untouched.
            o_channel, o, o_challenge = await _open(pki, two, other)
            reply = await _attest(agent, a, challenge)
            assert reply.result.trust.tier == common_pb2.TIER_AFFIRMING
            assert reply.result.HasField("certificate")
            assert await _appraisals(one, device) == 1
            # The device's own newer stream B, on verifier 2: A's next decision is refused.
            b_channel, b, b_challenge = await _open(pki, two, agent)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _attest(agent, a, reply.challenge)
                assert err.value.code() == grpc.StatusCode.ABORTED
                assert "holds its lease" in (err.value.details() or "")
                assert await _appraisals(one, device) == 1  # nothing of A's stored
                assert await _appraisals(two, device) == 1
                stored = await two.repos.trust.latest(device)
                assert stored is not None
                # B's decision is stored and acknowledged, and the other device's too.
                b_reply = await _attest(agent, b, b_challenge)
                assert b_reply.result.trust.tier == common_pb2.TIER_AFFIRMING
                assert b_reply.result.HasField("certificate")
                assert await _appraisals(one, device) == 2
                o_reply = await _attest(other, o, o_challenge)
                assert o_reply.result.trust.tier == common_pb2.TIER_AFFIRMING
            finally:
                for channel in (a_channel, b_channel, o_channel):
                    await channel.close()

    asyncio.run(scenario())


# --- a tier drop revokes in the decision's own transaction ----------------------------------


def test_a_tier_drop_revokes_the_live_certificates_in_the_decisions_transaction(
    tmp_path: Path,
) -> None:
    """The revocation sink no longer reads the device's live certificates before each
    decision below its zone's minimum: the store revokes them in the transaction that
    stores the decision. A certificate another process issued just before (this one never
    heard of it) is revoked all the same, named in the Result, in this process's CRL and in
    the audit; a decision refused for its lost lease revokes nothing."""
    path = tmp_path / "verifier.db"

    async def scenario() -> None:
        async with process(path, "a", poll=False) as a, process(path, "b", poll=False) as b:
            cert = await _certified(a.repos, 1)  # issued on process a
            d = device_id(1)
            reason = below_minimum(Tier.WARNING, Tier.AFFIRMING, "")
            dropped = replace(decision(1, at=T0, tier=Tier.WARNING), revoke_reason=reason)
            # Refused (its stream lost the lease): nothing stored, nothing revoked.
            lease = await b.repos.streams().claim(d, "b/stream-1")
            await a.repos.streams().claim(d, "a/stream-2")
            with pytest.raises(Superseded):
                await StoreSink(b.repos).publish(replace(dropped, lease=lease))
            assert _live(path, cert.serial)
            # Stored: revoked with it, published without a read of the store.
            stored = await StoreSink(b.repos).publish(dropped)
            assert stored is not None
            assert [c.serial for c in stored.revoked_now or ()] == [cert.serial]
            assert not _live(path, cert.serial)
            out = await RevocationSink(b.revoker, CERTIFICATES).publish(stored)
            assert out is not None
            assert out.revoked_serials == (cert.serial,)
            assert cert.serial in b.revoker.crl.serials
            history = await b.repos.audit.history(d)
            assert [e.event for e in history][:2] == ["certificates_revoked", "appraisal"]
            # The next one below the minimum revokes nothing more and still names it.
            again = await StoreSink(b.repos).publish(
                replace(dropped, result=replace(dropped.result, appraised_at=T0 + LIFETIME / 2))
            )
            assert again is not None
            assert again.revoked_now == ()
            out = await RevocationSink(b.revoker, CERTIFICATES).publish(again)
            assert out is not None
            assert out.revoked_serials == (cert.serial,)

    asyncio.run(scenario())


# --- the device checked in the decision's transaction, not read before each appraisal -------


async def _unrevoke(repos: Any, device_id: str) -> None:
    """The test's shortcut back from "revoked": ``devices.save`` never undoes a revocation
    (review H3), and nothing in the verifier does."""

    def work(db: Any) -> None:
        db.execute("UPDATE devices SET state = 'enrolled' WHERE device_id = ?", (device_id,))

    await repos.engine.write(work)


def test_a_device_changed_while_its_decision_was_made_gets_nothing_stored(
    tmp_path: Path,
) -> None:
    """The servicer no longer reads the device before each appraisal: the store checks,
    in the transaction that would store the decision, that the device is as the decision
    assumed. Revoked, moved, relabelled or enrolled again with another AK after its stream
    read it: DeviceChanged (the device as it is now), and neither the decision nor its
    certificate is stored. Unchanged: stored."""
    path = tmp_path / "verifier.db"

    async def scenario() -> None:
        async with process(path, "a", poll=False) as a:
            record = device(1)
            await a.repos.devices.save(record, now=T0, event="enrolled:enrolled")
            made = replace(_with_certificate(1), assumed=record)
            assert made.certificate is not None
            changes: list[tuple[str, DeviceRecord]] = [
                ("revoked", replace(record, state=DeviceState.REVOKED)),
                ("moved", replace(record, zone="prod")),
                ("relabelled", replace(record, labels={"rack": "7"})),
                ("new AK", replace(record, ak_public=record.ak_public + b"x")),
            ]
            for what, changed in changes:
                await _unrevoke(a.repos, record.device_id)
                await a.repos.devices.save(changed, now=T0, event="enrolled:enrolled")
                with pytest.raises(DeviceChanged) as refused:
                    await StoreSink(a.repos).publish(made)
                assert refused.value.record == replace(changed, last_seen=None), what
                counts = await a.repos.counts()
                assert counts["certificates"] == 0, what
                assert await a.repos.trust.latest(device_id(1)) is None, what
            await _unrevoke(a.repos, record.device_id)
            await a.repos.devices.save(record, now=T0, event="enrolled:enrolled")
            await StoreSink(a.repos).publish(made)
            assert (await a.repos.counts())["certificates"] == 1

    asyncio.run(scenario())
