"""End to end over the wire: evidence checks, revocation, protocol errors and queries,
over real swtpm, real gRPC with mTLS on loopback and a real SQLite file."""

from __future__ import annotations

import asyncio
import datetime
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from devtrust.agent.evidence import evidence_body, host_facts
from devtrust.agent.messages import AttestationResult
from devtrust.agent.state import new_key, spki
from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import (
    attestation_pb2,
    attestation_pb2_grpc,
    common_pb2,
    query_pb2,
)
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.server import RunningVerifier
from tests.conftest import SwtpmFactory
from tests.db import counts as stored_counts
from tests.db import with_repos
from tests.env import (
    Agent,
    enrolled_agent,
    first_results,
    manual_stream,
    operator_stub,
    quote_evidence,
    running,
    stream_channel,
    verifier_config,
)

pytestmark = pytest.mark.swtpm


# --- evidence checks over the real stream ------------------------------------------------


def _run_manual(
    workdir: Path,
    pki: PkiFiles,
    ek_ca: EndorsementCA,
    tpm_factory: SwtpmFactory,
    build: Callable[[Agent, attestation_pb2.Challenge], Awaitable[attestation_pb2.Evidence]],
) -> tuple[attestation_pb2.VerifierMessage, dict[str, int]]:
    config = verifier_config(workdir, pki, ek_ca)

    async def scenario() -> attestation_pb2.VerifierMessage:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm_factory()) as agent,
        ):
            return await manual_stream(pki, verifier, agent, lambda ch: build(agent, ch))

    reply = asyncio.run(scenario())
    counts = stored_counts(config.database)
    return reply, counts


def _finding_ids(reply: attestation_pb2.VerifierMessage) -> list[str]:
    return [f.id for f in reply.result.trust.findings]


def test_honest_evidence_by_hand_is_affirmed(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """The control for the tampering tests below: the same hand-driven path, untampered."""
    reply, counts = _run_manual(workdir, pki, endorsement_ca, swtpm_factory, quote_evidence)
    assert reply.result.trust.tier == common_pb2.TIER_AFFIRMING
    assert reply.result.HasField("certificate")
    assert counts["certificates"] == 2


def test_quote_answering_a_different_nonce_is_rejected(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    reply, counts = _run_manual(
        workdir,
        pki,
        endorsement_ca,
        swtpm_factory,
        lambda agent, ch: quote_evidence(agent, ch, quoted_nonce=bytes(32)),
    )
    trust = reply.result.trust
    assert trust.tier == common_pb2.TIER_CONTRAINDICATED
    assert _finding_ids(reply) == ["tpm.quote.qualifying_data_mismatch"]
    assert "does not answer this challenge" in trust.findings[0].message
    assert not reply.result.HasField("certificate")
    assert counts["certificates"] == 1  # the channel certificate only
    # enrollment and the contraindicated appraisal; the chain announced on its shard of
    # "chains", and that shard (the database's first) on the root "chains"
    assert counts["audit"] == 4


def test_evidence_body_changed_after_quoting_is_tampered(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    quoted = evidence_body(host=host_facts(), certify_key_spki=spki(new_key()), now=now)
    swapped = evidence_body(host=host_facts(), certify_key_spki=spki(new_key()), now=now)
    reply, _ = _run_manual(
        workdir,
        pki,
        endorsement_ca,
        swtpm_factory,
        lambda agent, ch: quote_evidence(agent, ch, body=quoted, sent_body=swapped),
    )
    assert reply.result.trust.tier == common_pb2.TIER_CONTRAINDICATED
    assert _finding_ids(reply) == ["tpm.quote.qualifying_data_mismatch"]
    assert not reply.result.HasField("certificate")


def test_evidence_for_another_nonce_field_is_rejected(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    async def build(agent: Agent, ch: attestation_pb2.Challenge) -> attestation_pb2.Evidence:
        evidence = await quote_evidence(agent, ch, quoted_nonce=b"\x01" * 32)
        evidence.nonce = b"\x01" * 32  # a replay of an answer to some other challenge
        return evidence

    reply, _ = _run_manual(workdir, pki, endorsement_ca, swtpm_factory, build)
    assert _finding_ids(reply) == ["tpm.challenge.nonce_mismatch"]
    assert reply.result.trust.tier == common_pb2.TIER_CONTRAINDICATED


def test_malformed_evidence_is_refused_and_nothing_is_written(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    config = verifier_config(workdir, pki, endorsement_ca)
    tpm_a, tpm_b = swtpm_factory(), swtpm_factory()

    async def scenario() -> tuple[
        grpc.aio.AioRpcError, dict[str, int], dict[str, int], list[AttestationResult]
    ]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm_a, "a") as bad,
            enrolled_agent(workdir, pki, verifier, tpm_b, "b") as good,
        ):
            before = await verifier.repos.counts()

            async def garbage(ch: attestation_pb2.Challenge) -> attestation_pb2.Evidence:
                return attestation_pb2.Evidence(
                    nonce=ch.nonce,
                    quote_attest=b"\xff\x54\x43",
                    quote_signature=b"\x00\x18",
                    body=b"",
                )

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await manual_stream(pki, verifier, bad, garbage)
            after = await verifier.repos.counts()
            # The verifier keeps serving: another device attests normally.
            results = await first_results(good)
            return err.value, before, after, results

    err, before, after, results = asyncio.run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "TPMT_SIGNATURE: truncated at byte 2" in (err.details() or "")
    assert before == after
    assert results[0].trust.tier is Tier.AFFIRMING


def test_revoked_device_can_neither_attest_nor_enroll_again(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    from devtrust.agent.enroll import enroll
    from devtrust.agent.main import make_host
    from devtrust.verifier.records import DeviceState

    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            await verifier.repos.devices.set_state(
                DeviceId(agent.enrollment.device_id),
                DeviceState.REVOKED,
                now=datetime.datetime.now(datetime.UTC),
                event="revoked",
            )
            async with stream_channel(pki, verifier, agent.enrollment) as channel:
                call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as stream:  # noqa: PT012
                    await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
                    await call.read()
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await enroll(agent.cfg, agent.tpm, agent.files, host=make_host(agent.cfg))
            return stream.value, again.value

    stream, again = asyncio.run(scenario())
    assert stream.code() == grpc.StatusCode.PERMISSION_DENIED
    assert again.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "is revoked" in (again.details() or "")


async def _stream_error(
    pki: PkiFiles,
    verifier: RunningVerifier,
    agent: Agent,
    messages: list[attestation_pb2.AgentMessage],
) -> grpc.aio.AioRpcError:
    async with stream_channel(pki, verifier, agent.enrollment) as channel:
        call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # noqa: PT012
            for message in messages:
                await call.write(message)
            while True:
                await call.read()
        return err.value


def test_protocol_violations_and_oversized_messages_are_clear_errors(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)
    hello = attestation_pb2.AgentMessage(hello=attestation_pb2.Hello())
    big = attestation_pb2.AgentMessage(
        evidence=attestation_pb2.Evidence(body=b"\x00" * (5 * 1024 * 1024))
    )
    cases = {
        "no hello first": [
            attestation_pb2.AgentMessage(
                posture_changed=attestation_pb2.PostureChanged(signals=["x"])
            )
        ],
        "hello twice": [hello, hello],
        "empty message": [hello, attestation_pb2.AgentMessage()],
        "oversized": [hello, big],
    }

    async def scenario() -> dict[str, grpc.aio.AioRpcError]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            errors = {
                name: await _stream_error(pki, verifier, agent, msgs)
                for name, msgs in cases.items()
            }
            # Still serving: the same device attests normally afterwards.
            [result] = await first_results(agent)
            assert result.trust.tier is Tier.AFFIRMING
            return errors

    errors = asyncio.run(scenario())
    assert errors["no hello first"].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message on an attestation stream must be Hello" in (
        errors["no hello first"].details() or ""
    )
    assert "Hello sent twice" in (errors["hello twice"].details() or "")
    assert "empty AgentMessage" in (errors["empty message"].details() or "")
    assert errors["oversized"].code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_dead_tpm_is_a_clear_error() -> None:
    from devtrust.agent.errors import TpmError
    from devtrust.agent.tpm import TpmBackend

    backend = TpmBackend("swtpm:host=127.0.0.1,port=9")  # nothing listens there
    with pytest.raises(
        TpmError, match=re.escape("cannot open TPM at 'swtpm:host=127.0.0.1,port=9'")
    ):
        backend.ak_public()


@dataclass(frozen=True)
class _QueryAnswers:
    """What the operator read back in ``test_query_filters_pages_and_staleness``."""

    affirming: query_pb2.ListDevicesResponse
    none: query_pb2.ListDevicesResponse
    zone: query_pb2.ListDevicesResponse
    pages: list[str]
    missing: grpc.aio.AioRpcError
    ids: tuple[DeviceId, DeviceId]


def test_query_filters_pages_and_staleness(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """Two devices, one appraised and one enrolled only; a verifier clock pushed past the
    staleness bound turns the appraised one's tier to none."""
    from dataclasses import replace

    from devtrust.verifier.config import AttestationConfig

    tpms = [swtpm_factory(), swtpm_factory()]
    config = replace(
        verifier_config(workdir, pki, endorsement_ca),
        attestation=AttestationConfig(interval_s=30.0, staleness_s=60.0),
    )

    async def scenario() -> _QueryAnswers:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpms[0], "a") as a,
            enrolled_agent(workdir, pki, verifier, tpms[1], "b") as b,
        ):
            await first_results(a)
            channel, query = operator_stub(pki, verifier, workdir)
            async with channel:
                affirming = await query.ListDevices(
                    query_pb2.ListDevicesRequest(tier=common_pb2.TIER_AFFIRMING), timeout=5
                )
                none = await query.ListDevices(
                    query_pb2.ListDevicesRequest(tier=common_pb2.TIER_NONE), timeout=5
                )
                zone = await query.ListDevices(
                    query_pb2.ListDevicesRequest(zone="production-inference"), timeout=5
                )
                page = await query.ListDevices(query_pb2.ListDevicesRequest(page_size=1), timeout=5)
                rest = await query.ListDevices(
                    query_pb2.ListDevicesRequest(page_size=1, page_token=page.next_page_token),
                    timeout=5,
                )
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await query.GetDevice(query_pb2.GetDeviceRequest(device_id="nope"), timeout=5)
            return _QueryAnswers(
                affirming=affirming,
                none=none,
                zone=zone,
                pages=[d.device_id for d in (*page.devices, *rest.devices)],
                missing=missing.value,
                ids=(DeviceId(a.enrollment.device_id), DeviceId(b.enrollment.device_id)),
            )

    out = asyncio.run(scenario())
    appraised, enrolled = out.ids
    assert [d.device_id for d in out.affirming.devices] == [appraised]
    assert [d.device_id for d in out.none.devices] == [enrolled]
    assert list(out.zone.devices) == []
    assert sorted(out.pages) == sorted([appraised, enrolled])
    assert out.missing.code() == grpc.StatusCode.NOT_FOUND

    # Later, past the staleness bound: the stored result reads as tier none.
    result = with_repos(config.database, lambda repos: repos.trust.latest(appraised))
    assert result is not None
    later = result.appraised_at + datetime.timedelta(seconds=61)
    assert result.at(later).tier.label == "none"
